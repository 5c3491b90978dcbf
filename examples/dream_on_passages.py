"""Dreaming on a few passages: the model learns to write the synthetic data that teaches it the passages.

Each task is a short fictional passage with questions about it. tau is the no-context QA score: the questions are
asked WITHOUT the passage, so the model can only answer from its weights. The script measures, before and after
dreaming:

- tau of the model itself (no context), which rehearsing the kept dreams should raise, and
- tau after one dream (SEAL's protocol): the model writes one dream per passage (greedy), an isolated LoRA copy
  learns it, and tau is measured on the copy; a better dream writer gives a higher score.

Runs offline on CPU. The default model is SmolLM2-135M-Instruct (packaged on PyPI, converted once into the cache);
`--tiny` uses a tiny locally built model instead (a smoke run; its scores stay at zero).

    python examples/dream_on_passages.py                      # SmolLM2-135M-Instruct, ~3.5 min on 2 idle cores
    python examples/dream_on_passages.py --tiny               # smoke run
    python examples/dream_on_passages.py --config recipes/dream.yaml
    python examples/dream_on_passages.py --policy_update grpo --max_steps 12

Every `DreamConfig` / `DreamScriptArguments` field is a command-line flag (`--num_dreams`, `--num_selected_dreams`,
`--tau_metric`, `--dataset_path tasks.jsonl`, ...). The same job runs as `sleep-trl recipes/dream.yaml`.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import yaml
from trl import TrlParser

from sleep_trl.scripts.dream import ARGUMENT_CLASSES, run

# CPU-friendly defaults for this example (a recipe or a flag overrides them).
EXAMPLE_DEFAULTS = {
    "output_dir": "outputs/dream_on_passages",
    "use_cpu": True,
    "bf16": False,
    "num_tasks": 4,
    "num_dreams": 4,  # m dreams per passage
    "num_selected_dreams": 1,  # k kept by gradient alignment with tau's data
    "num_random_dreams": 1,  # b kept at random
    "per_device_train_batch_size": 4,  # one passage (m dreams) per ReST-EM round
    "max_steps": 12,
    "num_iterations": 3,  # optimizer steps per round (generation batch)
    "learning_rate": 5e-5,
    "max_completion_length": 96,
    "temperature": 0.7,  # a 135M model's dreams at temperature 1 drift away from the passage
    "tau_metric": "contains",
    "tau_max_new_tokens": 24,
    "inner_steps": 8,
    "inner_learning_rate": 1e-3,
    "logging_steps": 1,
    "num_dreams_to_print": 2,
    "save_strategy": "no",
    "report_to": "none",
    "gradient_checkpointing": False,
    "seed": 0,
}


def parse():
    parser = TrlParser(ARGUMENT_CLASSES)
    parser.set_defaults(**EXAMPLE_DEFAULTS)
    argv = sys.argv[1:]
    if "--config" in argv:  # a sleep-trl recipe: its `job:` key is for the CLI, not a dataclass field
        i = argv.index("--config")
        with open(argv[i + 1]) as f:
            config = yaml.safe_load(f) or {}
        config.pop("job", None)
        unknown = parser.set_defaults_with_config(**config)
        if unknown:
            raise ValueError(f"Unknown keys in {argv[i + 1]}: {unknown}")
        argv = argv[:i] + argv[i + 2 :]
    return parser.parse_args_into_dataclasses(argv)


if __name__ == "__main__":
    run(*parse())
