"""push_to_hub against a real Hub-compatible HTTP server on 127.0.0.1, through the real huggingface_hub client.

The client is pointed at the server the way ``HF_ENDPOINT`` does it (``huggingface_hub.constants``, read at call
time by ``HfApi`` and the download functions); the CLI test in ``test_cli.py`` sets ``HF_ENDPOINT`` itself in a
subprocess. Xet is disabled, so weights take the LFS path (batch, upload, verify).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model
from hub_server import HubServer

from optimum_admm import ADMMConfig, ADMMPruner

TOKEN = "hf_test_Secret_4f9c2b7e"  # must never appear in a file, a log or an error message
# huggingface_hub's own LFS upload passes a file object as data=, which httpx2 deprecates: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
FAST = {"num_samples": 4, "sequence_length": 32, "iterations": 8, "mask_iterations": 4}


@pytest.fixture(scope="module")
def server():
    with HubServer({TOKEN}) as hub:
        yield hub


@pytest.fixture
def hub(server, tmp_path, monkeypatch, caplog):
    """Point huggingface_hub at the local server, with an empty cache and no ambient token."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    # transformers caches one HfApi (and its endpoint) on first use: a fresh one for this server
    monkeypatch.setattr(importlib.import_module("transformers.utils.hub"), "_hf_api", None)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    caplog.set_level(logging.DEBUG)
    return server


@pytest.fixture(scope="module")
def pruned(tokenizer, corpus_text):
    pruner = ADMMPruner.from_pretrained(
        build_tiny_model("llama"), tokenizer=tokenizer, config=ADMMConfig(sparsity=0.5, **FAST)
    )
    pruner.prune(calibration_dataset=[corpus_text], show_progress=False)
    return pruner


def _logits(model, tokenizer, text):
    ids = tokenizer(text[:300], return_tensors="pt")["input_ids"][:, :40]
    with torch.no_grad():
        return model(input_ids=ids).logits


def _assert_token_nowhere(tmp_path, server, caplog, capsys, *texts):
    captured = capsys.readouterr()
    for text in (caplog.text, captured.out, captured.err, "\n".join(server.state.log), *texts):
        assert TOKEN not in text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    for repo in server.state.repos.values():
        for commits in repo.branches.values():
            for commit in commits:
                assert all(TOKEN.encode() not in f.content for f in commit.files.values())


def test_first_push_then_download(hub, pruned, tmp_path, corpus_text, caplog, capsys):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    pruned.evaluation_results = {"wikitext2": 99.5}
    try:
        info = pruned.push_to_hub("org/first", token=TOKEN, base_model="org/tiny-llama")
    finally:
        del pruned.evaluation_results
    files = hub.state.files("org/first")
    assert {"model.safetensors", "config.json", "pruning_config.json", "README.md", "tokenizer.json"} <= set(files)
    commits = hub.state.commits("org/first")
    assert len(commits) == 2 and commits[-1].oid == info.oid  # the initial commit and ours: one commit for all
    assert commits[-1].files["model.safetensors"].lfs
    assert any(line.startswith("PUT /lfs-upload/") for line in hub.state.log)
    assert "POST /lfs-verify" in hub.state.log

    card = ModelCard.load("org/first")
    assert card.data.base_model == "org/tiny-llama" and "pruned" in card.data.tags
    assert card.data.eval_results[0].metric_value == 99.5
    assert 'from_pretrained("org/first")' in card.text
    reloaded = AutoModelForCausalLM.from_pretrained("org/first", cache_dir=tmp_path / "dl").eval()
    assert torch.equal(
        _logits(reloaded, pruned.tokenizer, corpus_text), _logits(pruned.model, pruned.tokenizer, corpus_text)
    )
    _assert_token_nowhere(tmp_path, hub, caplog, capsys)


def test_push_to_an_existing_repo_answers_409_on_create_and_replaces_stale_shards(hub, pruned, tmp_path):
    pruned.push_to_hub("org/existing", token=TOKEN, max_shard_size="40KB")
    assert "model.safetensors.index.json" in hub.state.files("org/existing")
    pruned.push_to_hub("org/existing", token=TOKEN, commit_message="single file now")
    assert ("POST", "/api/repos/create", 409) in hub.state.responses
    commits = hub.state.commits("org/existing")
    assert len(commits) == 3 and commits[-1].message == "single file now"
    files = hub.state.files("org/existing")
    assert "model.safetensors" in files
    assert not [name for name in files if name.startswith("model-0") or name.endswith(".index.json")]


def test_push_to_a_new_branch(hub, pruned):
    pruned.push_to_hub("org/branched", token=TOKEN, revision="sparse-50")
    assert "model.safetensors" in hub.state.files("org/branched", "sparse-50")
    assert "model.safetensors" not in hub.state.files("org/branched", "main")


def test_commit_answering_500_commits_nothing_and_a_retry_succeeds(hub, pruned):
    from optimum_admm.errors import HubError

    pruned.push_to_hub("org/flaky", token=TOKEN)
    before = hub.state.commits("org/flaky")
    hub.state.fail_next("POST", r"^/api/models/org/flaky/commit/", 500)
    with pytest.raises(HubError, match="HTTP 500; nothing was committed"):
        pruned.push_to_hub("org/flaky", token=TOKEN, max_shard_size="40KB")
    assert hub.state.commits("org/flaky") == before  # nothing half-committed
    pruned.push_to_hub("org/flaky", token=TOKEN, max_shard_size="40KB")
    assert "model.safetensors.index.json" in hub.state.files("org/flaky")


def test_transient_500_on_preupload_is_retried(hub, pruned):
    hub.state.fail_next("POST", r"^/api/models/org/retried/preupload/", 500)
    pruned.push_to_hub("org/retried", token=TOKEN)
    assert ("POST", "/api/models/org/retried/preupload/main", 500) in hub.state.responses
    assert "model.safetensors" in hub.state.files("org/retried")


def test_401_gives_a_clear_error_without_the_token(hub, pruned, tmp_path, caplog, capsys):
    wrong = TOKEN[::-1]
    with pytest.raises(PermissionError, match="HTTP 401") as excinfo:
        pruned.push_to_hub("org/denied", token=wrong)
    message = "".join(str(e) for e in (excinfo.value, excinfo.value.__cause__, excinfo.value.__context__) if e)
    assert wrong not in message and "org/denied" not in hub.state.repos
    _assert_token_nowhere(tmp_path, hub, caplog, capsys, message, wrong)


def test_bad_push_arguments_fail_before_any_request(hub, pruned):
    requests = len(hub.state.log)
    with pytest.raises(ValueError, match="repo_id='not a repo'"):
        pruned.push_to_hub("not a repo", token=TOKEN)
    with pytest.raises(ValueError, match="private='yes'"):
        pruned.push_to_hub("org/x", private="yes", token=TOKEN)
    assert len(hub.state.log) == requests


_FRESH_PROCESS = """
import json, sys
from optimum_admm.export import load_masks, load_pruning_config
from optimum_admm.training import SparsityPreservingCallback
repo = sys.argv[1]
config = load_pruning_config(repo)
masks = load_masks(repo)
callback = SparsityPreservingCallback.from_saved(repo)
print(json.dumps({"config": config.to_dict(), "masks": {k: int(v.sum()) for k, v in masks.items()},
                  "callback": len(callback.masks)}))
"""


def test_saved_metadata_loads_from_a_repo_id_in_a_fresh_process(hub, pruned, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import online_environment

    from optimum_admm.export import load_masks

    pruned.push_to_hub("org/with-masks", token=TOKEN, save_masks=True)
    env = {**online_environment(), "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
           "HF_HOME": str(tmp_path / "fresh-home")}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, "org/with-masks"], capture_output=True, text=True,
                            env=env, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["config"]["sparsity"] == 0.5 and loaded["config"]["method"] == "admm"
    assert loaded["callback"] == len(loaded["masks"]) > 0
    pruned.save_pretrained(tmp_path / "local", save_masks=True)
    local = load_masks(tmp_path / "local")
    assert loaded["masks"] == {k: int(v.sum()) for k, v in local.items()}
    assert os.environ.get("HF_TOKEN") != TOKEN  # the token stayed in the child's environment
    with pytest.raises(ValueError, match=r"repo 'org/with-masks' has no nothing\.json"):
        from optimum_admm.export import saved_file

        saved_file("org/with-masks", "nothing.json", token=TOKEN)


def test_configs_save_load_and_push_like_peft_configs(hub, pruned, tmp_path):
    from optimum_admm import PruningConfig, WandaConfig

    config = WandaConfig(sparsity=0.6, mask_structure="unstructured", seed=3)
    path = config.save_pretrained(tmp_path / "recipe")
    assert path.name == "pruning_config.json"
    assert WandaConfig.from_pretrained(tmp_path / "recipe") == config
    config.push_to_hub("org/recipes", token=TOKEN)
    assert PruningConfig.from_pretrained("org/recipes", token=TOKEN) == config
    pruned.push_to_hub("org/pruned-model", token=TOKEN)  # a pruned model's sidecar holds its recipe too
    assert ADMMConfig.from_pretrained("org/pruned-model", token=TOKEN) == pruned.config
    with pytest.raises(ValueError, match="method='admm' is invalid for WandaConfig"):
        WandaConfig.from_pretrained("org/pruned-model", token=TOKEN)


def test_a_pruned_card_inherits_the_license_of_the_base_models_hub_card(hub, tokenizer, corpus_text, tmp_path):
    from huggingface_hub import HfApi, ModelCard

    api = HfApi(token=TOKEN)
    api.create_repo("org/dense-base", exist_ok=True)
    api.upload_file(path_or_fileobj=b"---\nlicense: apache-2.0\n---\n# A dense base model\n", path_in_repo="README.md",
                    repo_id="org/dense-base")  # fmt: skip
    pruner = ADMMPruner.from_pretrained(
        build_tiny_model("llama"), tokenizer=tokenizer, config=ADMMConfig(sparsity=0.5, **FAST)
    )
    pruner.prune(calibration_dataset=[corpus_text], show_progress=False)
    pruner.save_pretrained(tmp_path / "out", base_model="org/dense-base")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.license == "apache-2.0" and card.data.base_model == "org/dense-base"


def test_inspect_reports_a_pruned_model_loaded_saved_pushed_and_a_dense_one(hub, pruned, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from optimum_admm import inspect

    assert pruned.model.config.pruning["method"] == "admm"
    pruned.save_pretrained(tmp_path / "saved")
    assert AutoConfig.from_pretrained(tmp_path / "saved").pruning["sparsity"] == pytest.approx(0.5)  # kept as is
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    reloaded.save_pretrained(tmp_path / "resaved")  # plain transformers writes the section back
    pruned.push_to_hub("org/inspected", token=TOKEN)
    for source in (pruned.model, tmp_path / "saved", tmp_path / "resaved", "org/inspected"):
        report = inspect(source, token=TOKEN) if isinstance(source, str) else inspect(source)
        assert report.pruned and report.method == "admm", source
        assert report.sparsity_by_kind["attention"] == pytest.approx(0.5, abs=0.01), source
        assert report.sparsity_by_kind["mlp"] == pytest.approx(0.5, abs=0.01), source
        assert "pruned with admm" in str(report)
    assert inspect("org/inspected", token=TOKEN).source == "recorded"
    assert inspect(tmp_path / "saved").recipe["sparsity"] == 0.5
    dense = inspect(build_tiny_model("llama"))
    assert not dense.pruned and dense.method is None and "not pruned" in str(dense)


def test_a_fine_tuned_copy_keeps_its_sidecar_with_lineage_and_a_valid_card(hub, tokenizer, corpus_text, tmp_path):
    import json

    from huggingface_hub import ModelCard, hf_hub_download
    from transformers import AutoModelForCausalLM

    from optimum_admm.lineage import save_derived
    from optimum_admm.training import keep_sparse

    pruner = ADMMPruner.from_pretrained(
        build_tiny_model("llama"), tokenizer=tokenizer, config=ADMMConfig(sparsity=0.5, **FAST)
    )
    pruner.prune(calibration_dataset=[corpus_text], show_progress=False)
    pruner.push_to_hub("org/pruned-base", token=TOKEN)
    model = AutoModelForCausalLM.from_pretrained(pruner_dir := _saved(pruner, tmp_path)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = tokenizer(corpus_text[:2000], return_tensors="pt")["input_ids"][:, :64]
    with keep_sparse(model, optimizer=optimizer):
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    folder = save_derived(model, tmp_path / "fine-tuned", stage="fine-tuned", source="org/pruned-base",
                          tokenizer=tokenizer, save_masks=True, token=TOKEN)  # fmt: skip
    from optimum_admm.hub import push_folder_to_hub

    push_folder_to_hub(folder, "org/fine-tuned", token=TOKEN)
    sidecar = json.loads(Path(hf_hub_download("org/fine-tuned", "pruning_config.json", token=TOKEN)).read_text())
    assert [entry["stage"] for entry in sidecar["lineage"]] == ["pruned", "fine-tuned"]
    assert sidecar["lineage"][-1]["from"] == "org/pruned-base"
    assert sidecar["sparsity"] == pytest.approx(0.5, abs=0.01)  # measured on the fine-tuned weights
    assert sidecar["config"] == pruner.config.to_dict()
    card = ModelCard.load(hf_hub_download("org/fine-tuned", "README.md", token=TOKEN))
    assert card.data.model_name and "Lineage: pruned → fine-tuned" in card.text
    assert f'from_pretrained("{tmp_path / "fine-tuned"}")' in card.text
    assert pruner_dir.exists()


def _saved(pruner, tmp_path):
    target = tmp_path / "pruned"
    pruner.save_pretrained(target)
    return target


def test_save_pretrained_pushes_like_transformers_and_refuses_pickles(hub, pruned, tmp_path, monkeypatch):

    from optimum_admm.errors import InvalidArgumentError

    pruned.save_pretrained(tmp_path / "sparse-model", push_to_hub=True, token=TOKEN, repo_id="org/pushed-on-save")
    assert "model.safetensors" in hub.state.files("org/pushed-on-save")
    assert b'from_pretrained("org/pushed-on-save")' in hub.state.files("org/pushed-on-save")["README.md"]
    with pytest.raises(InvalidArgumentError, match=r"safe_serialization=False is invalid; allowed: True"):
        pruned.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(InvalidArgumentError, match=r"\['token'\] apply only with push_to_hub=True"):
        pruned.save_pretrained(tmp_path / "not-pushed", token=TOKEN)
    assert not (tmp_path / "pickled").exists() and not (tmp_path / "not-pushed").exists()
    main_before = hub.state.files("org/pushed-on-save")
    pruned.evaluation_results = {"wikitext2": 99.0}  # a change to propose (an identical push is a no-op)
    info = pruned.push_to_hub("org/pushed-on-save", token=TOKEN, create_pr=True, commit_message="Sparser")
    assert info.pr_num == 1 and info.pr_revision == "refs/pr/1"  # a real pull request on the loopback Hub
    assert hub.state.files("org/pushed-on-save") == main_before  # main is untouched until the PR is merged
    assert hub.state.commits("org/pushed-on-save", "refs/pr/1")[-1].message == "Sparser"
    assert "pruning_config.json" in hub.state.files("org/pushed-on-save", "refs/pr/1")
