"""recipes/dream.yaml parses into the dream job's dataclasses; the job runs end to end on a tiny model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sleep_trl.cli import RecipeError, parse_recipe
from sleep_trl.scripts.dream import ARGUMENT_CLASSES, run
from sleep_trl.trainers.dream_config import DreamConfig, DreamScriptArguments

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "dream.yaml"


def test_dream_recipe_parses_into_the_job_dataclasses():
    job, module, (script_args, config) = parse_recipe(RECIPE)
    raw = yaml.safe_load(RECIPE.read_text())
    assert job == "dream" and module.ARGUMENT_CLASSES == ARGUMENT_CLASSES
    assert isinstance(script_args, DreamScriptArguments) and isinstance(config, DreamConfig)
    assert script_args.model_name_or_path == raw["model_name_or_path"]
    assert config.num_generations == raw["num_dreams"] == 4
    for key in (
        "num_selected_dreams",
        "num_random_dreams",
        "policy_update",
        "tau_metric",
        "inner_steps",
        "importance_parameters",
        "rehearsal_coef",
        "num_iterations",
    ):
        assert getattr(config, key) == raw[key], key
    inner = config.inner_loop()  # the inner loop is configured from the recipe's inner_* fields, in one place
    assert (inner.r, inner.lora_alpha, inner.steps, inner.learning_rate) == (
        raw["inner_lora_r"], raw["inner_lora_alpha"], raw["inner_steps"], raw["inner_learning_rate"])


def test_unknown_recipe_key_is_reported_with_the_closest_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.read_text() + "\nnum_dreems: 3\n")
    with pytest.raises(RecipeError, match=r"'num_dreems' \(did you mean 'num_dreams'"):
        parse_recipe(bad)


def test_dream_job_runs_on_a_tiny_model(tmp_path):
    out = tmp_path / "dream"
    script_args = DreamScriptArguments(tiny=True, num_tasks=1, save_model=True)
    args = DreamConfig(
        str(out), num_dreams=2, per_device_train_batch_size=2, max_steps=1, max_completion_length=8, use_cpu=True,
        bf16=False, report_to="none", save_strategy="no", tau_max_new_tokens=4, inner_steps=1, inner_lora_r=2,
        inner_lora_alpha=4, num_dreams_to_print=0,
    )  # fmt: skip
    summary = run(script_args, args)
    assert set(summary["before"]) == set(summary["after"]) == {"tau", "tau_after_dream", "improved_fraction"}
    assert json.loads((out / "dream_summary.json").read_text())["after"] == summary["after"]
    assert (out / "config.json").exists() and (out / "README.md").exists()
    assert "Language Models Need Sleep" in (out / "README.md").read_text()


def test_missing_dataset_file_fails_before_the_model_loads(tmp_path):
    with pytest.raises(FileNotFoundError):
        run(DreamScriptArguments(tiny=True, dataset_path=str(tmp_path / "none.jsonl")),
            DreamConfig(str(tmp_path), use_cpu=True, bf16=False))  # fmt: skip
