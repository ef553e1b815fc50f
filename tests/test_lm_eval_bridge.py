"""The lm-eval bridge on an in-memory model, with a small local task (offline)."""

from __future__ import annotations

import json

import pytest
from conftest import build_tiny_model

from optimum_admm.lm_eval_bridge import evaluate_tasks

pytest.importorskip("lm_eval")

QUESTIONS = [
    ("The ship sailed on the", [" sea", " law", " string"]),
    ("The president spoke to the", [" congress", " whale", " import"]),
    ("In python you", [" import", " peace", " captain"]),
    ("The captain saw a", [" whale", " module", " union"]),
    ("The government of the", [" nation", " file", " sea"]),
    ("A function returns a", [" value", " ship", " war"]),
]


@pytest.fixture
def task_dir(tmp_path):
    data = tmp_path / "tiny_choice.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": 0}) + "\n" for q, c in QUESTIONS))
    (tmp_path / "tiny_choice.yaml").write_text(
        "task: optimum_admm_tiny_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return tmp_path


def test_local_task_on_an_in_memory_model(task_dir, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = build_tiny_model("llama")
    scores = evaluate_tasks(
        model, tokenizer, ["optimum_admm_tiny_choice"], include_path=task_dir, include_defaults=False
    )
    accuracy = scores["optimum_admm_tiny_choice"]["acc,none"]
    assert accuracy in {i / len(QUESTIONS) for i in range(len(QUESTIONS) + 1)}
    again = evaluate_tasks(
        model, tokenizer, ["optimum_admm_tiny_choice"], include_path=task_dir, include_defaults=False
    )
    assert again == scores


@pytest.mark.parametrize(("kwargs", "message"), [({"tasks": []}, "tasks=\\[\\]"), ({"tasks": "piqa"}, "tasks='piqa'")])
def test_bad_tasks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate_tasks(None, None, **kwargs)


def test_missing_include_path(tmp_path):
    with pytest.raises(ValueError, match="include_path="):
        evaluate_tasks(None, None, ["x"], include_path=tmp_path / "nope")
