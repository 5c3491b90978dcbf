"""`sleep-trl <recipe.yaml> [--field value ...]`, also `python -m sleep_trl ...` and `accelerate launch -m sleep_trl ...`.

A recipe is a YAML file whose `job` key names what to run (`seed`, `dream`, `sleep`); every other key is a field of
that job's dataclasses (TRL's `TrlParser` style: the YAML sets defaults, command-line flags override them). A job's
config may have sections (the sleep job's `wake_args`, `consolidation_args`, `dream_args`): a YAML mapping of that
phase trainer's own fields, overridden field by field on the command line with `--section.field value`.

A key or flag that no field declares, at any depth, stops the run before anything is loaded, naming the key and the
closest valid ones; so does a bad value (the configs validate themselves) or a YAML syntax error.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from dataclasses import fields
from pathlib import Path

import yaml

from .errors import SleepTrlError

# job name -> module exposing `ARGUMENT_CLASSES` (tuple of dataclasses) and `run(*parsed)`
JOBS = {
    "seed": "sleep_trl.scripts.seed",
    "dream": "sleep_trl.scripts.dream",
    "sleep": "sleep_trl.scripts.sleep",
}

USAGE = """usage: sleep-trl RECIPE.yaml [--field value ...] [--section.field value ...]
       accelerate launch [--config_file recipes/accelerate/zero3.yaml] -m sleep_trl RECIPE.yaml [--field value ...]

The recipe's `job:` key picks what runs: {jobs}. Try `sleep-trl recipes/sleep.yaml`.
`sleep-trl RECIPE.yaml --help` lists every field of that job."""


class RecipeError(SleepTrlError):
    """A recipe that cannot run as written (unknown key, missing job, unreadable file, bad value)."""


def _load_yaml(path: Path) -> dict:
    if not path.exists():
        raise RecipeError(f"Recipe {str(path)!r} does not exist.")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"Recipe {str(path)!r} is not valid YAML: {err}") from None
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


def _init_fields(cls) -> set[str]:
    return {f.name for f in fields(cls) if f.init}


class _Schema:
    """The keys a job accepts: top-level fields, and each section's fields."""

    def __init__(self, classes):
        self.top = {name for cls in classes for name in _init_fields(cls)}
        self.sections = {name: sub for cls in classes for name, sub in getattr(cls, "sections", {}).items()}
        self.section_fields = {name: _init_fields(sub) for name, sub in self.sections.items()}
        self.names = " / ".join(c.__name__ for c in classes)

    def suggestions(self, key: str) -> list[str]:
        """The closest valid keys to `key`: for `section.field`, the section's closest fields; for a bare name, the
        closest top-level fields and the closest fields of every section, dotted (`lmbda` ->
        `consolidation_args.lmbda`)."""
        section, dot, bare = key.partition(".")
        if dot and section in self.sections:
            return [f"{section}.{c}" for c in difflib.get_close_matches(bare, sorted(self.section_fields[section]), n=3)]
        close = difflib.get_close_matches(key, sorted(self.top), n=3, cutoff=0.6)
        for name, names in self.section_fields.items():
            close += [f"{name}.{c}" for c in difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.8)]
        return close[:5]

    def unknown(self, key: str) -> str:
        close = self.suggestions(key)
        return f"  - {key!r}" + (f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else "")

    def check_recipe(self, data: dict) -> list[str]:
        problems = []
        for key, value in data.items():
            if key not in self.top:
                problems.append(self.unknown(key))
            elif key in self.sections and isinstance(value, dict):
                problems += [self.unknown(f"{key}.{k}") for k in value if k not in self.section_fields[key]]
        return problems


def _parse_value(text: str):
    """A command-line value as the YAML recipe would read it, numbers first (YAML 1.1 reads `3e-3` as a string)."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def _split_overrides(overrides: list[str], schema: _Schema) -> tuple[list[str], dict[str, dict], list[str]]:
    """Command-line flags for the parser, `--section.field value` overrides (values parsed as YAML scalars), and the
    unknown flags."""
    flags, sections, unknown = [], {}, []
    i = 0
    while i < len(overrides):
        token = overrides[i]
        if not token.startswith("--") or token in ("--help", "-h"):
            flags.append(token)
            i += 1
            continue
        name, eq, inline = token[2:].partition("=")
        section, dot, key = name.partition(".")
        if dot and section in schema.sections:
            if key not in schema.section_fields[section]:
                unknown.append(schema.unknown(name))
            if eq:
                value, i = inline, i + 1
            elif i + 1 < len(overrides):
                value, i = overrides[i + 1], i + 2
            else:
                raise RecipeError(f"`--{name}` needs a value.")
            sections.setdefault(section, {})[key] = _parse_value(value)
            continue
        if name not in schema.top:
            unknown.append(schema.unknown(name))
        flags.append(token)
        i += 1
    return flags, sections, unknown


def parse_recipe(path: str | os.PathLike, overrides: list[str] | None = None):
    """Parse a recipe (+ command-line overrides) into `(job_name, job_module, parsed_dataclasses)`.

    Uses TRL's `TrlParser` (so recipes follow TRL's config-file conventions, including the `env:` block) and fails
    on any key or flag that no dataclass of the job declares, at any depth, and on bad values, with a `RecipeError`.
    """
    from trl import TrlParser

    path = Path(path)
    data = _load_yaml(path)
    job = data.pop("job", None)
    module = _job_module(job, path)
    env = data.pop("env", None) or {}
    if not isinstance(env, dict):
        raise RecipeError("`env` in a recipe must be a mapping of VARIABLE: value.")
    schema = _Schema(module.ARGUMENT_CLASSES)
    problems = schema.check_recipe(data)
    if problems:
        raise RecipeError(
            f"Recipe {str(path)!r} (job {job!r}) has keys that no field of {schema.names} declares:\n"
            + "\n".join(problems) + "\nFix the spelling or remove them."
        )
    flags, section_overrides, unknown = _split_overrides(list(overrides or []), schema)
    if unknown:
        raise RecipeError(
            f"Command-line flags that no field of {schema.names} declares:\n" + "\n".join(unknown)
            + "\nFix the spelling (`sleep-trl RECIPE.yaml --help` lists the fields)."
        )
    for section, values in section_overrides.items():
        current = data.get(section) or {}
        if not isinstance(current, dict):
            raise RecipeError(f"`{section}` in the recipe must be a mapping of field: value.")
        data[section] = {**current, **values}
    for key, value in env.items():
        os.environ[key] = str(value)
    parser = TrlParser(module.ARGUMENT_CLASSES, exit_on_error=False)
    remaining = parser.set_defaults_with_config(**data)
    assert not remaining, remaining  # every key is known (checked above)
    try:
        parsed = parser.parse_args_into_dataclasses(args=flags)
    except argparse.ArgumentError as err:  # a flag's value of the wrong type
        raise RecipeError(f"Command line: {err}.") from None
    except (ValueError, TypeError) as err:  # the configs' own validation: a bad value, named by its field
        raise RecipeError(f"Recipe {str(path)!r}: {err}") from err
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
        module.run(*parsed)
    except SleepTrlError as err:  # an expected user error: one clear message, no traceback (those are for bugs)
        print(f"sleep-trl: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
