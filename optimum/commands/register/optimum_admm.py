"""Registers ``optimum-cli admm`` (``optimum.commands.register`` is a PEP 420 namespace: no ``__init__.py``)."""

from optimum_admm.commands.admm import ADMMCommand

REGISTER_COMMANDS = [ADMMCommand]
