"""`sleep-trl <recipe.yaml> [--field value ...]`, also `python -m sleep_trl ...` and `accelerate launch -m sleep_trl ...`.

A recipe is a YAML file whose `job` key names what to run (`seed`, `dream`, `sleep`); every other key is a field of
that job's dataclasses (TRL's `TrlParser` style: the YAML sets defaults, command-line flags override them). An
unknown or misspelled key stops the run before anything is loaded, naming the key and the closest valid ones.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from dataclasses import fields
from pathlib import Path

# job name -> module exposing `ARGUMENT_CLASSES` (tuple of dataclasses) and `run(*parsed)`
JOBS = {
    "seed": "sleep_trl.scripts.seed",
    "dream": "sleep_trl.scripts.dream",
    "sleep": "sleep_trl.scripts.sleep",
}

USAGE = """usage: sleep-trl RECIPE.yaml [--field value ...]
       accelerate launch [--config_file recipes/accelerate/zero3.yaml] -m sleep_trl RECIPE.yaml [--field value ...]

The recipe's `job:` key picks what runs: {jobs}. Try `sleep-trl recipes/sleep.yaml`.
`sleep-trl RECIPE.yaml --help` lists every field of that job."""


class RecipeError(ValueError):
    """A recipe that cannot run as written (unknown key, missing job, unreadable file)."""


def _load_yaml(path: Path) -> dict:
    import yaml

    if not path.exists():
        raise RecipeError(f"Recipe {str(path)!r} does not exist.")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise RecipeError(f"Recipe {str(path)!r} must be a YAML mapping of field: value.")
    return data


def _job_module(job: str | None, path: Path):
    if job is None:
        raise RecipeError(f"Recipe {str(path)!r} has no `job:` key. Add one of: {', '.join(JOBS)}.")
    if job not in JOBS:
        close = difflib.get_close_matches(str(job), JOBS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"Recipe {str(path)!r} has `job: {job}`, which is not one of {', '.join(JOBS)}.{hint}")
    return importlib.import_module(JOBS[job])


def parse_recipe(path: str | os.PathLike, overrides: list[str] | None = None):
    """Parse a recipe (+ command-line overrides) into `(job_name, job_module, parsed_dataclasses)`.

    Uses TRL's `TrlParser` (so recipes follow TRL's config-file conventions, including the `env:` block) and fails
    on any key that no dataclass of the job declares.
    """
    from trl import TrlParser

    path = Path(path)
    data = _load_yaml(path)
    job = data.pop("job", None)
    module = _job_module(job, path)
    env = data.pop("env", None) or {}
    if not isinstance(env, dict):
        raise RecipeError("`env` in a recipe must be a mapping of VARIABLE: value.")
    for key, value in env.items():
        os.environ[key] = str(value)

    parser = TrlParser(module.ARGUMENT_CLASSES)
    known = {f.name for cls in module.ARGUMENT_CLASSES for f in fields(cls)}
    unknown = [key for key in data if key not in known]
    if unknown:
        lines = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            lines.append(f"  - {key!r}" + (f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""))
        raise RecipeError(
            f"Recipe {str(path)!r} (job {job!r}) has keys that no field of "
            f"{', '.join(c.__name__ for c in module.ARGUMENT_CLASSES)} declares:\n" + "\n".join(lines)
            + "\nFix the spelling or remove them."
        )
    remaining = parser.set_defaults_with_config(**data)
    assert not remaining, remaining  # every key is known (checked above)
    parsed = parser.parse_args_into_dataclasses(args=list(overrides or []))
    return job, module, parsed


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE.format(jobs=", ".join(JOBS)))
        return 0
    recipe, overrides = argv[0], argv[1:]
    if recipe == "--config" and overrides:  # TRL habit: `--config recipe.yaml`
        recipe, overrides = overrides[0], overrides[1:]
    try:
        _, module, parsed = parse_recipe(recipe, overrides)
    except RecipeError as err:
        print(f"sleep-trl: {err}", file=sys.stderr)
        return 2
    module.run(*parsed)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
