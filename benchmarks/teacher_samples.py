"""Do the teacher's sampling rounds draw the same samples as one `generate`? Session 0's teacher-cache fill of a
main-job run (its awake model, `checkpoints/s0-wake`), with `teacher_sampling_rounds` on and off, for each of
`--seeds`: per run, the share of samples equal to their prompt's most common sample (over all runs), the mean length,
the share longer than 8 tokens (what the rounds skip), and the fill's seconds.

    python benchmarks/teacher_samples.py --run outputs/sleep --seeds 0 1 --threads 1
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sleep_speed  # noqa: E402  (sets HF_HUB_OFFLINE and the import path)
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import sleep_trl.trainers.generalized_distillation_trainer as gdt  # noqa: E402
from sleep_trl.assets import resolve_model_path  # noqa: E402
from sleep_trl.cli import parse_recipe  # noqa: E402
from sleep_trl.sleep.cycle import load_config_stream  # noqa: E402
from sleep_trl.sleep.data import consolidation_prompts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a main-job run directory with checkpoints/s0-wake")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--samples", type=int, default=6, help="teacher samples per prompt (6: session 0's sleep)")
    parser.add_argument("--threads", type=int, default=None)
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    _, _, (config,) = parse_recipe(sleep_speed.ROOT / "recipes/sleep.yaml", ["--output_dir", str(a.run)])
    stream = load_config_stream(config)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.model_name_or_path))
    prompts = consolidation_prompts(stream, 0, config.replay_prompts, config.seed, with_context=False,
                                    tokenizer=tokenizer, system_prompt=config.system_prompt)
    caches = {}
    build = gdt.build_teacher_cache
    try:
        for seed in a.seeds:
            for mode in ("on", "off"):
                gdt.build_teacher_cache = lambda trainer, rows, key=(mode, seed): caches.setdefault(key, build(trainer, rows))
                with tempfile.TemporaryDirectory() as scratch:
                    sleep_speed.one_sleep(a.run, config, prompts, {"teacher_sampling_rounds": mode, "alpha": 1.0}, 1,
                                          seed, Path(scratch), a.samples)
    finally:
        gdt.build_teacher_cache = build
    pooled = collections.defaultdict(collections.Counter)
    for cache in caches.values():
        for key, pool in cache.samples.items():
            pooled[key].update(tuple(s.completion) for s in pool)
    modal = {key: counts.most_common(1)[0][0] for key, counts in pooled.items()}
    for (mode, seed), cache in caches.items():
        samples = [(key, tuple(s.completion)) for key, pool in cache.samples.items() for s in pool]
        n = len(samples)
        print(f"rounds {mode}, seed {seed}: {n} samples, modal share {sum(x == modal[k] for k, x in samples) / n:.3f}, "
              f"mean length {sum(len(x) for _, x in samples) / n:.2f}, longer than 8 "
              f"{sum(len(x) > 8 for _, x in samples) / n:.3f}, fill {cache.seconds:.1f} s")


if __name__ == "__main__":
    main()
