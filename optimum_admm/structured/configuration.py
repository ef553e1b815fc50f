"""The Sheared-LLaMA recipe (:class:`ShearingConfig`) and its resolution against a source model (:class:`ShearingPlan`).

A :class:`ShearingConfig` is strict on construction (types and ranges) and is checked against the source model's
config by :meth:`ShearingConfig.plan`, which raises :class:`ValueError` naming the dimension that cannot be reached
(a target larger than the source, a broken head dimension, a KV-group ratio that GQA cannot keep, a structure whose
gate is switched off). The resulting :class:`ShearingPlan` holds every count the gates, the Lagrangian and
:func:`~optimum_admm.structured.prune_to_shape.prune_to_shape` need.

Example:
    >>> from transformers import LlamaConfig
    >>> source = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
    ...     num_key_value_heads=4, vocab_size=100)
    >>> config = ShearingConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
    ...     intermediate_size=64)
    >>> plan = config.plan(source)
    >>> plan.head_gating, plan.target_units("head")
    ('kv_group', 2)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..version import __version__

CONFIG_FILE = "shearing_config.json"
STRUCTURES: tuple[str, ...] = ("layer", "head", "intermediate", "hidden")
HEAD_GATINGS: tuple[str, ...] = ("auto", "kv_group", "query")
TIED_POLICIES: tuple[str, ...] = ("binarize", "untie")
SHAPE_FIELDS: tuple[str, ...] = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)
# The structure whose gate must be on for each dimension to shrink.
_GATE_FOR_DIMENSION = {
    "num_hidden_layers": "layer",
    "hidden_size": "hidden",
    "num_attention_heads": "head",
    "num_key_value_heads": "head",
    "intermediate_size": "intermediate",
}


def _number(name: str, value: Any, *, low: float, high: float = math.inf, open_low: bool = False) -> float:
    """Return ``value`` as a float, raising ``ValueError`` naming ``name`` when it is not in range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name}={value!r} is invalid; allowed: a number")
    if (value <= low if open_low else value < low) or value > high:
        bracket = "(" if open_low else "["
        raise ValueError(f"{name}={value!r} is out of range; allowed: {bracket}{low}, {high}]")
    return float(value)


@dataclass
class ShearingConfig:
    """Targeted structured pruning to a given shape (Xia et al. 2023, https://arxiv.org/abs/2310.06694).

    A target dimension left as ``None`` keeps the source model's value.

    Example:
        >>> config = ShearingConfig(num_hidden_layers=24, hidden_size=384, num_attention_heads=6,
        ...     num_key_value_heads=2, intermediate_size=1024)
        >>> config.temperature
        0.6666666666666666
        >>> ShearingConfig(lagrangian_warmup=1.5)
        Traceback (most recent call last):
        ...
        ValueError: lagrangian_warmup=1.5 is out of range; allowed: [0.0, 1.0]
    """

    num_hidden_layers: int | None = field(default=None, metadata={"help": "Target number of decoder layers."})
    hidden_size: int | None = field(default=None, metadata={"help": "Target residual-stream width."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Target number of query heads."})
    num_key_value_heads: int | None = field(default=None, metadata={"help": "Target number of key/value heads."})
    intermediate_size: int | None = field(default=None, metadata={"help": "Target FFN width."})
    structures: list[str] = field(
        default_factory=lambda: list(STRUCTURES),
        metadata={
            "help": f"Which gates are learnt, a subset of {STRUCTURES}. A dimension can only shrink if its "
            "gate is on (the reference code's default has no hidden gate and cannot reach a smaller hidden size)."
        },
    )
    head_gating: str = field(
        default="auto",
        metadata={
            "help": "'kv_group': gate whole KV groups (a K/V head with its query heads); 'query': gate query "
            "heads, the same number kept in every group; 'auto': 'query' when the target keeps the KV heads "
            "and drops query heads, else 'kv_group'."
        },
    )
    strict_head_dim: bool = field(
        default=True,
        metadata={
            "help": "Require hidden_size == num_attention_heads * head_dim in the target when the source "
            "satisfies it (the paper's H_T = d_T / d_h). False writes an explicit head_dim instead."
        },
    )
    lagrangian_warmup: float = field(
        default=0.2, metadata={"help": "Fraction of the steps over which the target sparsity ramps linearly from 0."}
    )
    gate_learning_rate: float = field(default=1.0, metadata={"help": "AdamW learning rate of the gate logits."})
    lambda_learning_rate: float = field(
        default=1.0, metadata={"help": "Learning rate of the Lagrange multipliers (gradient ascent)."}
    )
    temperature: float = field(default=2 / 3, metadata={"help": "Hard-concrete temperature beta (reference code)."})
    limit_left: float = field(default=-0.1, metadata={"help": "Hard-concrete stretch limit gamma (< 0)."})
    limit_right: float = field(default=1.1, metadata={"help": "Hard-concrete stretch limit zeta (> 1)."})
    init_drop_probability: float = field(
        default=0.01, metadata={"help": "Initial log-odds a = ln((1-p)/p); p=0.01 gives a = 4.6 (all gates on)."}
    )
    log_alpha_min: float = field(default=math.log(1e-2), metadata={"help": "Lower clamp of the gate logits."})
    log_alpha_max: float = field(default=math.log(1e2), metadata={"help": "Upper clamp of the gate logits."})
    deterministic_scale: float = field(
        default=0.8, metadata={"help": "Final soft gate value is sigmoid(deterministic_scale * a / temperature)."}
    )
    epsilon: float = field(default=1e-6, metadata={"help": "Uniform noise is drawn from U(eps, 1 - eps)."})
    tied_embeddings: str = field(
        default="binarize",
        metadata={
            "help": "With tied input/output embeddings: 'binarize' the surviving hidden gates (nothing to "
            "fold into the shared matrix) or 'untie' (fold into the embedding, copy lm_head)."
        },
    )

    def __post_init__(self) -> None:
        for name in SHAPE_FIELDS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} is invalid; allowed: None or an integer >= 1")
        if isinstance(self.structures, str):
            self.structures = [self.structures]
        unknown = [s for s in self.structures if s not in STRUCTURES]
        if unknown or not self.structures:
            raise ValueError(f"structures={self.structures!r} is invalid; allowed: a non-empty subset of {STRUCTURES}")
        self.structures = [s for s in STRUCTURES if s in self.structures]
        if self.head_gating not in HEAD_GATINGS:
            raise ValueError(f"head_gating={self.head_gating!r} is unknown; allowed: {HEAD_GATINGS}")
        if self.tied_embeddings not in TIED_POLICIES:
            raise ValueError(f"tied_embeddings={self.tied_embeddings!r} is unknown; allowed: {TIED_POLICIES}")
        if not isinstance(self.strict_head_dim, bool):
            raise ValueError(f"strict_head_dim={self.strict_head_dim!r} is invalid; allowed: True or False")
        self.lagrangian_warmup = _number("lagrangian_warmup", self.lagrangian_warmup, low=0.0, high=1.0)
        self.gate_learning_rate = _number("gate_learning_rate", self.gate_learning_rate, low=0.0, open_low=True)
        self.lambda_learning_rate = _number("lambda_learning_rate", self.lambda_learning_rate, low=0.0, open_low=True)
        self.temperature = _number("temperature", self.temperature, low=0.0, open_low=True)
        self.limit_left = _number("limit_left", self.limit_left, low=-math.inf, high=-1e-12)
        self.limit_right = _number("limit_right", self.limit_right, low=1.0, open_low=True)
        self.init_drop_probability = _number(
            "init_drop_probability", self.init_drop_probability, low=0.0, high=1.0 - 1e-12, open_low=True
        )
        self.deterministic_scale = _number("deterministic_scale", self.deterministic_scale, low=0.0, open_low=True)
        self.epsilon = _number("epsilon", self.epsilon, low=0.0, high=0.5, open_low=True)
        self.log_alpha_min = _number("log_alpha_min", self.log_alpha_min, low=-math.inf)
        self.log_alpha_max = _number("log_alpha_max", self.log_alpha_max, low=-math.inf)
        if self.log_alpha_min >= self.log_alpha_max:
            raise ValueError(f"log_alpha_min={self.log_alpha_min} must be below log_alpha_max={self.log_alpha_max}")

    @property
    def init_log_alpha(self) -> float:
        """The initial gate logit ``ln((1 - p) / p)`` for ``p = init_drop_probability``."""
        p = self.init_drop_probability
        return math.log(1.0 - p) - math.log(p)

    def target_shape(self) -> dict[str, int | None]:
        """The five target dimensions (``None`` = keep the source's)."""
        return {name: getattr(self, name) for name in SHAPE_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a JSON-serialisable dict, stamped with the library version."""
        return {"method": "sheared_llama", **dataclasses.asdict(self), "optimum_admm_version": __version__}

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = False) -> ShearingConfig:
        """Rebuild a config; keys this version does not know are ignored with a warning (refused when ``strict``,
        as for a recipe file a user wrote, where an unknown key is a typo), like the pruning configs.

        Example:
            >>> ShearingConfig.from_dict({"num_hidden_layer": 2}, strict=True)
            Traceback (most recent call last):
            ...
            optimum_admm.errors.InvalidArgumentError: ShearingConfig has no field 'num_hidden_layer'; allowed: ...
        """
        from ..errors import InvalidArgumentError

        data = dict(data)
        method = data.pop("method", "sheared_llama")
        data.pop("optimum_admm_version", None)
        if method != "sheared_llama":
            raise InvalidArgumentError(f"method={method!r} is not a Sheared-LLaMA recipe; allowed: 'sheared_llama'")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown and strict:
            raise InvalidArgumentError(
                f"ShearingConfig has no field {', '.join(map(repr, unknown))}; allowed: {', '.join(known)}"
            )
        if unknown:
            warnings.warn(
                f"Ignoring unknown ShearingConfig keys {unknown} (written by a newer version?)", stacklevel=2
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``shearing_config.json`` into ``save_directory`` (created if missing); returns the file."""
        from ..files import atomic_write

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_FILE
        text = self.to_json() + "\n"
        return atomic_write(path, lambda staging: staging.write_text(text, encoding="utf-8"))

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
    ) -> ShearingConfig:
        """Load ``shearing_config.json`` from a local directory or a Hub repo (a sheared model or a saved recipe).

        Example:
            >>> ShearingConfig.from_pretrained("me/smollm2-sheared-56m").num_hidden_layers  # doctest: +SKIP
            24
        """
        from ..hub_files import saved_file

        path = saved_file(name_or_path, CONFIG_FILE, revision=revision, token=token)
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def plan(self, model_config: Any) -> ShearingPlan:
        """Resolve the target against the source model's config (a ``PretrainedConfig``).

        Raises:
            ValueError: naming the dimension when the target cannot be reached.
        """
        return ShearingPlan.resolve(self, model_config)


def _source_head_dim(model_config: Any) -> int:
    head_dim = getattr(model_config, "head_dim", None)
    return int(head_dim) if head_dim else model_config.hidden_size // model_config.num_attention_heads


@dataclass(frozen=True)
class ShearingPlan:
    """Source and target shapes plus the gate layout, checked for consistency.

    Attributes:
        source: The five dimensions of the source model.
        target: The five target dimensions (resolved, no ``None``).
        head_dim: Head dimension, kept from the source.
        head_gating: ``"kv_group"`` or ``"query"``.
        structures: The gates that are learnt.
        tied_embeddings: Whether the source ties its input and output embeddings.
        binarize_hidden: Whether surviving hidden gates are set to 1 when finalising (tied embeddings).

    Example:
        >>> from transformers import MistralConfig
        >>> cfg = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        ...     num_key_value_heads=2, vocab_size=50)
        >>> ShearingConfig(num_attention_heads=2, hidden_size=16).plan(cfg).head_gating
        'query'
    """

    source: dict[str, int]
    target: dict[str, int]
    head_dim: int
    head_gating: str
    structures: tuple[str, ...]
    tied_embeddings: bool
    binarize_hidden: bool

    @classmethod
    def resolve(cls, config: ShearingConfig, model_config: Any) -> ShearingPlan:
        """Build the plan; see :meth:`ShearingConfig.plan`."""
        source = {}
        for name in SHAPE_FIELDS:
            value = getattr(model_config, name, None)
            if name == "num_key_value_heads" and value is None:
                value = model_config.num_attention_heads
            if not isinstance(value, int):
                raise ValueError(f"source model config has no integer {name}; Sheared-LLaMA needs a LLaMA-like config")
            source[name] = value
        target = {name: source[name] if getattr(config, name) is None else getattr(config, name) for name in source}
        if target == source:
            raise ValueError(
                f"the target equals the source shape {source}; nothing to prune (set at least one of "
                f"{', '.join(SHAPE_FIELDS)} below the source's)"
            )
        for name in SHAPE_FIELDS:
            if target[name] > source[name]:
                raise ValueError(f"target {name}={target[name]} exceeds the source model's {source[name]}")
            if target[name] < source[name] and _GATE_FOR_DIMENSION[name] not in config.structures:
                raise ValueError(
                    f"target {name}={target[name]} is below the source's {source[name]} but the "
                    f"'{_GATE_FOR_DIMENSION[name]}' gate is not in structures={config.structures}"
                )
        heads, kv = target["num_attention_heads"], target["num_key_value_heads"]
        if heads % kv:
            raise ValueError(f"target num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        head_dim = _source_head_dim(model_config)
        strict = config.strict_head_dim and source["hidden_size"] == source["num_attention_heads"] * head_dim
        if strict and target["hidden_size"] != heads * head_dim:
            raise ValueError(
                f"target hidden_size={target['hidden_size']} != num_attention_heads={heads} x head_dim={head_dim}"
                f" (the head dimension is kept; use hidden_size={heads * head_dim}, or strict_head_dim=False)"
            )
        gating = config.head_gating
        if gating == "auto":
            keeps_kv = kv == source["num_key_value_heads"] and heads < source["num_attention_heads"]
            gating = (
                "query" if keeps_kv and source["num_key_value_heads"] < source["num_attention_heads"] else "kv_group"
            )
        group = source["num_attention_heads"] // source["num_key_value_heads"]
        if gating == "kv_group" and heads != kv * group:
            raise ValueError(
                f"target num_key_value_heads={kv} with num_attention_heads={heads}: gating whole KV groups keeps "
                f"{group} query heads per KV head, so num_attention_heads must be {kv * group}"
            )
        if gating == "query" and kv != source["num_key_value_heads"]:
            raise ValueError(
                f"target num_key_value_heads={kv}: head_gating='query' keeps every KV head "
                f"({source['num_key_value_heads']}); use head_gating='kv_group' to drop KV heads"
            )
        tied = bool(getattr(model_config, "tie_word_embeddings", False))
        return cls(
            source=source,
            target=target,
            head_dim=head_dim,
            head_gating=gating,
            structures=tuple(config.structures),
            tied_embeddings=tied,
            binarize_hidden=tied and config.tied_embeddings == "binarize",
        )

    def gate_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each learnt gate: ``layer [L]``, ``head [L, U]``, ``intermediate [L, m]``, ``hidden [d]``."""
        layers = self.source["num_hidden_layers"]
        shapes = {
            "layer": (layers,),
            "head": (layers, self.source_units("head")),
            "intermediate": (layers, self.source["intermediate_size"]),
            "hidden": (self.source["hidden_size"],),
        }
        return {name: shapes[name] for name in self.structures}

    def source_units(self, structure: str) -> int:
        """Gate entries per row in the source (``U`` for heads: KV groups or query heads)."""
        return self._units(structure, self.source)

    def target_units(self, structure: str) -> int:
        """Entries per row kept in the target."""
        return self._units(structure, self.target)

    def _units(self, structure: str, shape: dict[str, int]) -> int:
        if structure == "head":
            return shape["num_key_value_heads" if self.head_gating == "kv_group" else "num_attention_heads"]
        key = {"layer": "num_hidden_layers", "intermediate": "intermediate_size", "hidden": "hidden_size"}[structure]
        return shape[key]

    def target_sparsity(self, structure: str) -> float:
        """``t = 1 - target / source`` for one structure."""
        return 1.0 - self.target_units(structure) / self.source_units(structure)

    @property
    def query_groups(self) -> int:
        """Number of groups the query-head top-k runs over (``num_key_value_heads`` in ``'query'`` mode, else 1)."""
        return self.source["num_key_value_heads"] if self.head_gating == "query" else 1
