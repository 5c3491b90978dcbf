"""Fail early, fail clearly, never lose a run: every case here was a traceback, a silent success or a blocked
directory before (issue "Fail early, fail clearly"), on the tiny recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from sleep_trl.cli import RecipeError, main, parse_recipe
from sleep_trl.sleep.guards import RunLock, RunLockedError, TrainingDivergedError
from sleep_trl.sleep.ledger import LedgerMismatchError

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/sleep_tiny.yaml"
ONE = ["--num_sessions", "1", "--consolidation_args.max_steps", "2", "--wake_args.num_train_epochs", "0.5"]


def config(out, *extra):
    return parse_recipe(RECIPE, ["--output_dir", str(out), *ONE, *extra])[2][0]


def run(cfg):
    from rich.console import Console

    from sleep_trl.sleep import SleepCycle

    return SleepCycle(cfg, console=Console(quiet=True)).run()


# --------------------------------------------------------------------------------------------------------- 1. restart
def test_a_run_that_failed_before_learning_anything_restarts_with_the_corrected_config(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match=r"wake of session 0 diverged at step \d+: the update left non-finite weights"):
        run(config(out, "--wake_args.learning_rate", "1e38"))
    state = json.loads((out / "cycle_state.json").read_text())
    assert [p["phase"] for p in state["phases"]] == ["base"]  # the NaN wake was not recorded
    report = run(config(out))  # the same command with the mistake fixed is not refused
    assert [p["phase"] for p in report["phases"]] == ["base", "wake", "consolidate", "eval"]


def test_bad_model_paths_and_names_fail_before_the_run_directory_exists(tmp_path):
    from sleep_trl.assets import ModelNotFoundError

    out = tmp_path / "never"
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        run(config(out, "--model_name_or_path", str(tmp_path / "no-such-model")))
    with pytest.raises(ModelNotFoundError, match="did you mean 'smollm2-135m-instruct'"):
        run(config(out, "--model_name_or_path", "smollm2-135m-instruc"))
    assert not out.exists()


# ---------------------------------------------------------------------------------------- 2. settings checked at parse
@pytest.mark.parametrize("flags, match", [
    (["--consolidation_args.lmbda", "2"], r"`lmbda` must be in \[0, 1\]"),
    (["--consolidation_args.temperature", "0"], r"`temperature` must be > 0"),
    (["--consolidation_args.alpha", "0.5", "--consolidation_args.num_imitation_generations", "1"],
     "num_imitation_generations"),
    (["--num_sessions", "2.5"], "num_sessions"),
])
def test_every_phases_settings_are_checked_before_anything_runs(tmp_path, flags, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(RECIPE, ["--output_dir", str(tmp_path / "x"), *flags])
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------------ 3. divergence
def test_a_non_finite_memory_is_never_checkpointed(tmp_path):
    from sleep_trl.memory import MemoryConfig, attach_memory
    from sleep_trl.sleep.guards import check_finite
    from sleep_trl.tiny import build_model, build_tokenizer

    mem = attach_memory(build_model(build_tokenizer(), arch="llama"), MemoryConfig())
    check_finite(mem, "wake of session 0")
    with torch.no_grad():
        mem.parameters("fast")[0].fill_(float("nan"))
    with pytest.raises(TrainingDivergedError, match="non-finite weights"):
        check_finite(mem, "wake of session 0")


# ------------------------------------------------------------------------------------------------- 4. damaged state
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("robust") / "run"
    run(config(out))
    return out


def copy_run(finished, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    state = json.loads((out / "cycle_state.json").read_text())
    state["finished"] = False  # as if killed before the end: the next start resumes from the last checkpoint
    (out / "cycle_state.json").write_text(json.dumps(state))
    return out


def test_a_truncated_ledger_names_the_file(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    (out / "cycle_state.json").write_text('{"format": "sleep_trl.cycle/1", "phases": [')
    with pytest.raises(LedgerMismatchError, match=r"cycle_state.json is damaged"):
        run(config(out))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_checkpoint_is_refused_by_its_checksum(finished, tmp_path, damage):
    out = copy_run(finished, tmp_path)
    weights = out / "checkpoints/s0-consolidate/memory.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-5] ^= 0x01  # one bit in the last tensor's data: still a loadable file
    weights.write_bytes(bytes(data))
    with pytest.raises(LedgerMismatchError, match=r"s0-consolidate/memory.safetensors does not match the checksum"):
        run(config(out))


def test_a_finished_run_regenerates_a_deleted_report_and_model(finished, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    reference = json.loads((out / "sleep_report.json").read_text())
    (out / "sleep_report.json").unlink()
    shutil.rmtree(out / "model")
    report = run(config(out))
    assert report["accuracy_matrix"]["R"] == reference["accuracy_matrix"]["R"]
    assert (out / "sleep_report.json").exists() and (out / "model/memory.safetensors").exists()


def test_two_runs_in_one_directory_do_not_both_run(finished):
    with RunLock(finished):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            run(config(finished))


# ------------------------------------------------------------------------------------------------------- 5. messages
def test_user_errors_are_one_message_and_a_non_zero_exit(tmp_path, capsys):
    assert main([str(RECIPE), "--lmbdaa", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "did you mean" in err and "consolidation_args.lmbda" in err and "Traceback" not in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main([str(RECIPE), "--dataset_name", str(empty), "--output_dir", str(tmp_path / "o")]) == 2
    assert "empty file" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("job: sleep\nwake_args: {learning_rate: [\n")
    assert main([str(broken)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_empty_data_and_empty_prompts_are_refused_by_the_trainer(tmp_path, student_dir, teacher_dir):
    from sleep_trl.trainers.generalized_distillation_config import GeneralizedDistillationConfig
    from sleep_trl.trainers.generalized_distillation_trainer import GeneralizedDistillationTrainer

    args = GeneralizedDistillationConfig(str(tmp_path / "o"), use_cpu=True, bf16=False, report_to="none", max_steps=1)
    empty = Dataset.from_dict({"prompt": []})
    with pytest.raises(ValueError, match="is empty"):
        GeneralizedDistillationTrainer(model=str(student_dir), teacher_model=str(teacher_dir), train_dataset=empty,
                                       args=args)
    blank = Dataset.from_dict({"prompt": [[{"role": "user", "content": "Hi?"}], [{"role": "user", "content": " "}]]})
    with pytest.raises(ValueError, match="Row 1 .* empty prompt"):
        GeneralizedDistillationTrainer(model=str(student_dir), teacher_model=str(teacher_dir), train_dataset=blank,
                                       args=args)


# ------------------------------------------------------------------------------------------------ 6. cards and docs
def test_the_sleep_model_card_table_is_valid_markdown(finished):
    card = (finished / "model/README.md").read_text()
    table = [line for line in card.splitlines() if line.startswith("|")]
    assert table[1] == "|---" * (len(table[0].split("|")) - 2) + "|"  # one separator row, right after the header
    widths = {len(line.split("|")) for line in table}
    assert len(widths) == 1  # every row has the header's columns


# ---------------------------------------------------------------------------------------------------- 8. the console
@pytest.mark.slow
def test_the_console_holds_progress_and_summaries_only(tmp_path):
    cmd = [sys.executable, "-m", "sleep_trl", str(RECIPE), "--output_dir", str(tmp_path / "run"), *ONE]
    proc = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "FutureWarning" not in output
    assert "Tokenizing train dataset" not in output and "Loading weights" not in output  # library progress bars
    assert "{'loss'" not in output  # metrics are not printed a second time next to the rich progress
    assert "Sleep run finished" in output
