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


# ---------------------------------------------------------------------------------------------------------------------
# The sleep job's sections: every phase trainer's field by its own name, checked at every depth
# ---------------------------------------------------------------------------------------------------------------------

SLEEP_TINY = ROOT / "recipes/sleep_tiny.yaml"


def test_section_fields_reach_the_phase_trainers_from_yaml_and_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    # `5e-4` without a dot is a string to YAML 1.1; a section reads it as the number it means
    recipe.write_text(SLEEP_TINY.read_text() + "dream_args:\n  num_dreams: 3\n  inner_lora_r: 2\n  learning_rate: 5e-4\n")
    _, _, (config,) = parse_recipe(recipe, ["--consolidation_args.lmbda", "0.5", "--consolidation_args.alpha=0.25",
                                            "--wake_args.learning_rate", "3e-3", "--dream_args.num_dreams", "5"])
    consolidation = config.phase_config("consolidation_args", output_dir=str(tmp_path / "c"), seed=1)
    assert (consolidation.lmbda, consolidation.alpha) == (0.5, 0.25)
    assert consolidation.max_steps == 2 and consolidation.max_completion_length == 8  # from the recipe's section
    assert config.phase_config("wake_args", output_dir=str(tmp_path / "w"), seed=1).learning_rate == 3e-3
    dream = config.phase_config("dream_args", output_dir=str(tmp_path / "d"), seed=1)
    assert (dream.num_generations, dream.inner_lora_r, dream.learning_rate) == (5, 2, 5e-4)  # the flag wins
    assert dream.per_device_train_batch_size == 5  # one context per round, unless set
    assert config.fingerprint()["consolidation_args.lmbda"] == 0.5


def test_unknown_section_keys_are_named_with_the_closest_field(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(SLEEP_TINY.read_text() + "consolidation_args:\n  lmbdaa: 0.5\n")
    with pytest.raises(RecipeError, match=r"'consolidation_args.lmbdaa' \(did you mean 'consolidation_args.lmbda'"):
        parse_recipe(recipe)
    with pytest.raises(RecipeError, match=r"'wake_args.learnig_rate' \(did you mean 'wake_args.learning_rate'"):
        parse_recipe(SLEEP_TINY, ["--wake_args.learnig_rate", "1e-3"])


def test_misspelled_or_misplaced_flags_get_the_same_did_you_mean_as_recipe_keys():
    with pytest.raises(RecipeError, match=r"'lmbdaa' .*did you mean .*'consolidation_args.lmbda'"):
        parse_recipe(SLEEP_TINY, ["--lmbdaa", "0.5"])
    # a phase trainer's field given at the top level points to its section
    with pytest.raises(RecipeError, match=r"'learning_rate' .*'wake_args.learning_rate'"):
        parse_recipe(SLEEP_TINY, ["--learning_rate", "0.1"])
    with pytest.raises(RecipeError, match="max_stepz"):
        parse_recipe(ROOT / "recipes/seed_tiny.yaml", ["--max_stepz", "3"])


def test_fields_the_cycle_sets_and_bad_values_are_refused_by_section_and_name():
    with pytest.raises(RecipeError, match=r"`consolidation_args.trainable_parameters` is set by the cycle"):
        parse_recipe(SLEEP_TINY, ["--consolidation_args.trainable_parameters", "[x]"])
    with pytest.raises(RecipeError, match=r"`dream_args.tau_metric` is set by the cycle .*eval_"):
        parse_recipe(SLEEP_TINY, ["--dream_args.tau_metric", "f1"])
    with pytest.raises(RecipeError, match=r"`consolidation_args`: `lmbda` must be in \[0, 1\], got 2"):
        parse_recipe(SLEEP_TINY, ["--consolidation_args.lmbda", "2"])
    with pytest.raises(RecipeError, match=r"`eval_metric`='exact' is not supported"):
        parse_recipe(SLEEP_TINY, ["--eval_metric", "exact"])
    with pytest.raises(RecipeError, match=r"router_loss_weight.*slow_gate: sigmoid"):
        parse_recipe(SLEEP_TINY, ["--slow_gate", "fixed", "--consolidation_args.router_loss_weight", "1.0"])
    assert parse_recipe(SLEEP_TINY, ["--consolidation_args.router_loss_weight", "1.0"])
    for bad in ("0", "1", "1.5"):
        with pytest.raises(RecipeError, match=rf"`new_prompt_share` must be a number strictly between 0 and 1.*{bad}"):
            parse_recipe(SLEEP_TINY, ["--new_prompt_share", bad])
    with pytest.raises(RecipeError, match=r"`new_prompt_share`.*`method: replay` does not sleep"):
        parse_recipe(SLEEP_TINY, ["--method", "replay", "--new_prompt_share", "0.5"])
    _, _, (config,) = parse_recipe(SLEEP_TINY, ["--new_prompt_share", "0.5"])
    assert config.new_prompt_share == 0.5



def test_memory_layers_take_indices_and_inclusive_ranges():
    for spec, layers in (("all", "all"), ("0,2,4", [0, 2, 4]), ("10-12", [10, 11, 12]), ("0, 3-4", [0, 3, 4])):
        _, _, (config,) = parse_recipe(SLEEP_TINY, ["--memory_layers", spec])
        assert config.layers == layers
    for bad in ("5-3", "top", "1-x"):
        with pytest.raises(RecipeError, match=rf"`memory_layers` must be 'all' or .*ranges.*{bad}"):
            parse_recipe(SLEEP_TINY, ["--memory_layers", bad])

def test_yaml_syntax_error_is_a_recipe_error(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("job: sleep\nnum_sessions: [3\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        parse_recipe(broken)
