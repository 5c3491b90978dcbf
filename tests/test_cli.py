"""Recipes and the command line: every recipe parses into its job's dataclasses; bad keys are clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from sleep_trl.cli import JOBS, RecipeError, main, parse_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert {p.name for p in RECIPES} >= {"seed_tiny.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses_against_its_config_classes(recipe):
    import yaml

    job, module, parsed = parse_recipe(recipe)
    assert job in JOBS
    assert len(parsed) == len(module.ARGUMENT_CLASSES)
    data = yaml.safe_load(recipe.read_text())
    data.pop("job"), data.pop("env", None)
    values = {}
    for obj in parsed:
        values.update(vars(obj))
    for key, value in data.items():
        # TRL configs normalise a few fields in __post_init__ (e.g. report_to: none -> [])
        if key in ("report_to", "lr_scheduler_type", "save_strategy", "eval_strategy", "logging_strategy"):
            continue
        assert values[key] == value, f"{recipe.name}: {key}"


def test_overrides_win_over_the_recipe():
    _, _, (script, config, model) = parse_recipe(ROOT / "recipes/seed_tiny.yaml", ["--max_steps", "7", "--alpha", "1"])
    assert config.max_steps == 7 and config.alpha == 1.0


def test_misspelled_key_names_the_key_and_a_suggestion(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "recipes/seed_tiny.yaml").read_text() + "\nlmbdaa: 0.3\nnot_a_field: 1\n")
    with pytest.raises(RecipeError) as err:
        parse_recipe(bad)
    message = str(err.value)
    assert "'lmbdaa'" in message and "did you mean 'lmbda'" in message and "'not_a_field'" in message


def test_missing_or_unknown_job(tmp_path):
    no_job = tmp_path / "a.yaml"
    no_job.write_text("max_steps: 3\n")
    with pytest.raises(RecipeError, match="no `job:` key"):
        parse_recipe(no_job)
    typo = tmp_path / "b.yaml"
    typo.write_text("job: sleeep\n")
    with pytest.raises(RecipeError, match="Did you mean 'sleep'"):
        parse_recipe(typo)


def test_bad_value_is_rejected_before_any_model_loads(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "recipes/seed_tiny.yaml").read_text().replace("lmbda: 0.5", "lmbda: 2.0"))
    with pytest.raises(ValueError, match="lmbda"):
        parse_recipe(bad)


def test_console_script_reports_recipe_errors_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: seed\nlearning_rat: 1e-3\n")
    assert main([str(bad)]) == 2
    assert "learning_rat" in capsys.readouterr().err
    assert main(["--help"]) == 0


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "sleep_trl", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "job" in proc.stdout
