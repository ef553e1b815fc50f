"""Calibration sources and seeded windows."""

from __future__ import annotations

import pytest
import torch

from optimum_admm.calibration import describe_source, get_calibration_data


def test_list_of_strings_gives_seeded_windows(tokenizer, corpus_text):
    a = get_calibration_data([corpus_text], tokenizer, num_samples=6, sequence_length=16, seed=1)
    b = get_calibration_data([corpus_text], tokenizer, num_samples=6, sequence_length=16, seed=1)
    c = get_calibration_data([corpus_text], tokenizer, num_samples=6, sequence_length=16, seed=2)
    assert a.shape == (6, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    ids = tokenizer(corpus_text, add_special_tokens=False)["input_ids"]
    joined = " ".join(map(str, ids))
    for row in a.tolist():  # every window is a contiguous slice of the tokenised text
        assert " ".join(map(str, row)) in joined


def test_dataset_file_and_list_agree(tmp_path, tokenizer, corpus_text):
    from datasets import Dataset

    halves = corpus_text[: len(corpus_text) // 2], corpus_text[len(corpus_text) // 2 :]
    dataset = Dataset.from_dict({"content": list(halves)})
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(halves))
    from_dataset = get_calibration_data(dataset, tokenizer, 4, 16, text_column="content")
    from_file = get_calibration_data(str(path), tokenizer, 4, 16)
    from_list = get_calibration_data(list(halves), tokenizer, 4, 16)
    assert torch.equal(from_dataset, from_file) and torch.equal(from_file, from_list)
    with pytest.raises(ValueError, match="text_column='text' is not a column"):
        get_calibration_data(dataset, tokenizer, 4, 16)


def test_tensor_and_dataloader_sources():
    ids = torch.arange(200).reshape(10, 20)
    assert torch.equal(get_calibration_data(ids, None, num_samples=3, sequence_length=8), ids[:3, :8])
    loader = torch.utils.data.DataLoader([{"input_ids": row} for row in ids], batch_size=4)
    assert torch.equal(get_calibration_data(loader, None, num_samples=5, sequence_length=20), ids[:5])


def test_named_datasets_use_the_datasets_loader(monkeypatch, tokenizer, corpus_text):
    import datasets

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_dict({"text": [corpus_text]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    get_calibration_data("wikitext2", tokenizer, 2, 16)
    get_calibration_data("c4", tokenizer, 2, 16)
    assert calls[0][0] == ("wikitext", "wikitext-2-raw-v1")
    assert calls[1][0] == ("allenai/c4",) and "en/c4-train" in str(calls[1][1]["data_files"])


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("does-not-exist.txt", "neither a named dataset"),
        ([], "non-empty list of strings"),
        ([1, 2], "non-empty list of strings"),
        (3.5, "not supported"),
        (torch.zeros(4, dtype=torch.long), r"shape \(4,\); allowed: token ids of shape \(batch, length\)"),
    ],
)
def test_bad_sources(source, message, tokenizer):
    with pytest.raises(ValueError, match=message):
        get_calibration_data(source, tokenizer, 2, 16)


def test_too_short_names_the_numbers(tokenizer):
    with pytest.raises(ValueError, match=r"too short: \d+ tokens, but one window needs sequence_length=64"):
        get_calibration_data(["tiny text"], tokenizer, 2, 64)


def test_describe_never_includes_the_text():
    assert describe_source(["secret words"] * 3) == "list[str] (3 texts)"
    assert describe_source("wikitext2") == "wikitext2"
