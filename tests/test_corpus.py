"""The corpus: the committed manifest's splits, byte-identical builds, hash checks and loading."""

from __future__ import annotations

import collections
import json
import sys

import pytest

from optimum_admm import corpus
from optimum_admm.corpus import (
    DOMAINS,
    MANIFEST_PATH,
    SPLITS,
    CorpusMismatchError,
    assign_split,
    build_corpus,
    dump_manifest,
    load_corpus,
    load_manifest,
)


def test_manifest_splits_regenerate():
    manifest = load_manifest()
    assert list(manifest["domains"]) == list(DOMAINS)
    for domain, entry in manifest["domains"].items():
        names = [doc["name"] for doc in entry["documents"]]
        assert names == sorted(set(names)), f"{domain}: names must be unique and sorted"
        for doc in entry["documents"]:
            assert doc["split"] == assign_split(domain, doc["name"]), f"{domain}/{doc['name']}"
            assert len(doc["sha256"]) == 64 and 0 < doc["chars"] <= corpus.MAX_DOC_CHARS
        counts = collections.Counter(doc["split"] for doc in entry["documents"])
        assert set(counts) == set(SPLITS), f"{domain} needs documents in every split"
        assert entry["chars"] == sum(doc["chars"] for doc in entry["documents"]) <= manifest["budget_chars"]
        assert entry["source"] == corpus.SOURCES[domain]


def test_manifest_file_is_canonical():
    text = MANIFEST_PATH.read_text()
    assert dump_manifest(json.loads(text)) == text


def test_assign_split_fractions():
    counts = collections.Counter(assign_split("d", str(i)) for i in range(10_000))
    assert 7_700 < counts["train"] < 8_300 and 800 < counts["validation"] < 1_200 and 800 < counts["test"] < 1_200


FAKE_DOCS = {"chapter_1": "Call me Ishmael.", "chapter_2": "The Carpet-Bag.", "epilogue": "And I only am escaped."}


@pytest.fixture
def fake_moby(monkeypatch):
    """Replace the Moby Dick domain's manifest and source with three short documents."""
    documents = [
        {"name": n, "sha256": corpus._sha256_text(t), "chars": len(t), "split": s}
        for (n, t), s in zip(sorted(FAKE_DOCS.items()), SPLITS, strict=True)
    ]
    manifest = {"domains": {"moby_dick": {"source": corpus.SOURCES["moby_dick"], "documents": documents}}}
    source = dict(FAKE_DOCS)
    monkeypatch.setattr(corpus, "load_manifest", lambda: manifest)
    monkeypatch.setattr(corpus, "_fetch", lambda domain, raw_dir, names=None: dict(source))
    return source


def test_build_is_byte_identical_and_loads(fake_moby, tmp_path):
    first = build_corpus(tmp_path / "a", domains=["moby_dick"])
    second = build_corpus(tmp_path / "b", domains="moby_dick")
    for split in SPLITS:
        data = (first / "moby_dick" / f"{split}.jsonl").read_bytes()
        assert data == (second / "moby_dick" / f"{split}.jsonl").read_bytes()
    dataset = load_corpus("validation", domains=["moby_dick"], cache_dir=tmp_path / "a")
    assert dataset.column_names == ["text", "domain", "name"]
    assert dataset[0] == {"text": "The Carpet-Bag.", "domain": "moby_dick", "name": "chapter_2"}


def test_changed_document_is_named(fake_moby, tmp_path):
    fake_moby["chapter_2"] = "The Carpet Bag."
    with pytest.raises(CorpusMismatchError, match="moby_dick/chapter_2"):
        build_corpus(tmp_path, domains=["moby_dick"])
    del fake_moby["chapter_2"]
    with pytest.raises(CorpusMismatchError, match="moby_dick/chapter_2 is missing"):
        build_corpus(tmp_path, domains=["moby_dick"])


def test_tampered_split_file_is_caught_on_load(fake_moby, tmp_path):
    root = build_corpus(tmp_path, domains=["moby_dick"])
    path = root / "moby_dick" / "train.jsonl"
    path.write_text(path.read_text().replace("Ishmael", "Ahab"))
    with pytest.raises(CorpusMismatchError, match="moby_dick/chapter_1"):
        load_corpus("train", domains=["moby_dick"], cache_dir=tmp_path)


def test_code_mismatch_explains_the_python_version():
    with pytest.raises(CorpusMismatchError, match=r"python_code/abc\.py.*CPython 3\.11\.7"):
        corpus._verify("python_code", "abc.py", "changed", "0" * 64)


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [({"split": "dev"}, "split"), ({"domains": ["novels"]}, "domains"), ({"domains": []}, "domains")],
)
def test_bad_arguments(kwargs, parameter, tmp_path):
    with pytest.raises(ValueError, match=parameter):
        load_corpus(**{"cache_dir": tmp_path, **kwargs})


@pytest.mark.real_model
def test_real_code_domain_builds_from_this_interpreter(tmp_path):
    if sys.version.split()[0] != corpus.SOURCES["python_code"]["version"]:
        pytest.skip("the code domain was recorded from another Python version's standard library")
    root = build_corpus(tmp_path, domains=["python_code"])
    first = {split: (root / "python_code" / f"{split}.jsonl").read_bytes() for split in SPLITS}
    build_corpus(tmp_path, domains=["python_code"], force=True)
    assert first == {split: (root / "python_code" / f"{split}.jsonl").read_bytes() for split in SPLITS}
    test = load_corpus("test", domains=["python_code"], cache_dir=tmp_path)
    expected = [d["name"] for d in load_manifest()["domains"]["python_code"]["documents"] if d["split"] == "test"]
    assert test["name"] == expected


@pytest.mark.real_model
def test_real_corpus_matches_manifest():
    root = corpus.corpus_dir()
    if not all((root / d / f"{s}.jsonl").is_file() for d in DOMAINS for s in SPLITS):
        pytest.skip("the corpus is not built (python -m optimum_admm.corpus build)")
    manifest = load_manifest()
    for split in SPLITS:
        dataset = load_corpus(split)  # checks every document's sha256
        for domain in DOMAINS:
            names = [n for n, d in zip(dataset["name"], dataset["domain"], strict=True) if d == domain]
            entry = manifest["domains"][domain]["documents"]
            assert names == [doc["name"] for doc in entry if assign_split(domain, doc["name"]) == split]
