"""Publishing a Sleep run (`push_to_hub`, `hub_model_id`, `hub_private_repo`), offline up to the upload call.

The Hub client is replaced by a recorder that lists the files of the folder at the moment `upload_folder` is called
(what would be sent); the model card must parse with `huggingface_hub.ModelCard` and carry the metadata the Hub
reads. Also: the early refusals (offline, no token) before any run directory exists, the upload of a run that
finished without `push_to_hub`, and the TRL trainers' cards naming a packaged base model.
"""

import json
import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from test_sleep_cycle import run_cycle, tiny_config

from sleep_trl.errors import SleepTrlError
from sleep_trl.sleep import publish
from sleep_trl.sleep.model_card import build_model_card

EXPECTED_FILES = {"config.json", "model.safetensors", "memory.safetensors", "memory_config.json", "tokenizer.json",
                  "tokenizer_config.json", "README.md", "sleep_report.json", "accuracy_matrix.png"}


def loaded_repos(card_text: str) -> list[str]:
    """The repositories the card's loading snippet reads (model, tokenizer, memory)."""
    return re.findall(r'(?:from_pretrained|load_memory)\((?:model, )?"([^"]+)"\)', card_text)


class RecordingHub:
    """Stands in for `huggingface_hub.HfApi`: records the calls and the files the upload would send."""

    calls: list = []

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        RecordingHub.calls.append(("create_repo", repo_id, private, exist_ok))
        full = repo_id if "/" in repo_id else f"someone/{repo_id}"
        return type("Repo", (), {"repo_id": full})()

    def upload_folder(self, repo_id, folder_path, commit_message, **kwargs):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        card = (Path(folder_path) / "README.md").read_text()
        RecordingHub.calls.append(("upload_folder", repo_id, files, commit_message, card))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0123abc"})()


@pytest.fixture
def hub(monkeypatch):
    RecordingHub.calls = []
    monkeypatch.setattr(publish, "HfApi", RecordingHub)
    monkeypatch.setattr(publish, "hub_offline", lambda: False)
    monkeypatch.setattr(publish, "get_token", lambda: "hf_test")
    return RecordingHub.calls


def test_push_to_hub_uploads_the_model_folder_with_a_valid_card(tmp_path, hub):
    out = tmp_path / "run"
    report = run_cycle(tiny_config(out, "--push_to_hub", "true", "--hub_model_id", "me/tiny-sleep",
                                   "--hub_private_repo", "true"))
    assert hub[0] == ("create_repo", "me/tiny-sleep", True, True)
    kind, repo_id, files, message, card_text = hub[1]
    assert kind == "upload_folder" and repo_id == "me/tiny-sleep" and len(hub) == 2
    assert EXPECTED_FILES <= set(files), sorted(EXPECTED_FILES - set(files))
    assert not any(f.startswith(("checkpoints", "trainer")) for f in files)  # only the model, never the run's state
    assert "sleep" in message and "2 sessions" in message
    assert report["hub"] == {"repo_id": "me/tiny-sleep",
                             "commit_url": "https://huggingface.co/me/tiny-sleep/commit/0123abc"}
    assert json.loads((out / "sleep_report.json").read_text())["hub"] == report["hub"]

    card = ModelCard(card_text)
    data = card.data
    assert data.library_name == "transformers"
    assert {"sleep-trl", "trl", "continual-learning", "sleep"} <= set(data.tags)
    assert data.base_model is None  # the tiny model is no Hub repository
    last_row = report["accuracy_matrix"]["R"][-1]
    per_session = [r for r in data.eval_results if r.task_name == "closed-book QA after the last session"]
    assert [r.metric_value for r in per_session] == pytest.approx(last_row)
    summary = {r.metric_type: r.metric_value for r in data.eval_results if r.task_name == "continual learning"}
    assert summary["backward_transfer"] == pytest.approx(report["summary"]["backward_transfer"])
    assert summary["average_accuracy"] == pytest.approx(report["summary"]["average_accuracy"])
    text = card.text
    assert loaded_repos(text) == ["me/tiny-sleep"] * 3  # model, tokenizer and memory load from the repository
    assert "author       = {Behrouz, Ali and Hashemi, Farnoosh and Mirrokni, Vahab}" in text
    assert "|---|---|---|" in text  # the matrix table's separator row, whole
    assert "session 1: slow expert 1" in text  # the lineage: one slow expert per sleep
    assert "hub_model_id" not in text and "output_dir" not in text  # the recipe shown holds no machine fields


def test_a_finished_run_is_uploaded_later_without_training_again(tmp_path, hub):
    out = tmp_path / "run"
    first = run_cycle(tiny_config(out))
    assert hub == [] and "hub" not in first
    ledger = (out / "cycle_state.json").read_text()
    again = run_cycle(tiny_config(out, "--push_to_hub", "true", "--hub_model_id", "me/later"))
    assert [c[0] for c in hub] == ["create_repo", "upload_folder"]
    assert again["hub"]["repo_id"] == "me/later"
    assert again["accuracy_matrix"] == first["accuracy_matrix"]
    assert json.loads((out / "cycle_state.json").read_text())["phases"] == json.loads(ledger)["phases"]
    assert loaded_repos((out / "model" / "README.md").read_text()) == ["me/later"] * 3
    run_cycle(tiny_config(out, "--push_to_hub", "true", "--hub_model_id", "me/later"))
    assert len(hub) == 2  # already uploaded: not again


@pytest.mark.parametrize("offline", [True, False])
def test_push_to_hub_is_refused_before_the_run_starts(tmp_path, monkeypatch, offline):
    monkeypatch.setattr(publish, "hub_offline", lambda: offline)
    monkeypatch.setattr(publish, "get_token", lambda: None)
    out = tmp_path / "run"
    with pytest.raises(SleepTrlError, match="HF_HUB_OFFLINE" if offline else "hf auth login"):
        run_cycle(tiny_config(out, "--push_to_hub", "true"))
    assert not out.exists()


def test_the_card_names_the_packaged_base_model_by_its_hub_repository(tmp_path):
    report = {
        "config": {"model_name_or_path": "smollm2-135m-instruct", "output_dir": str(tmp_path / "run"), "seed": 0,
                   "dataset_name": None},
        "model": {"base": "smollm2-135m-instruct"}, "method": "sleep", "mode": "sleep", "sleep_trl_version": "0",
        "data": {"kind": "world", "source": "embedded world", "sessions": [{}, {}]}, "memory": "memory",
        "experts_added": [], "summary": {"average_accuracy": 0.5, "backward_transfer": -0.25},
        "accuracy_matrix": {"R": [[1.0, 0.0], [0.5, 0.5]], "base": [0.0, 0.0], "metric": "contains"},
    }
    card = ModelCard(str(build_model_card(report)))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)" in card.text
    assert [r.metric_value for r in card.data.eval_results][:2] == [0.5, 0.5]


def test_repo_name_defaults_to_the_output_folder(tmp_path):
    config = type("C", (), {"hub_model_id": None, "output_dir": str(tmp_path / "my-run")})()
    assert publish.repo_name(config) == "my-run"
