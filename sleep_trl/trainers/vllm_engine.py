"""The colocate vLLM engine of sleep-trl's trainers (`GeneralizedDistillationTrainer`, `DreamTrainer`).

Both build on a TRL trainer whose own colocate engine cannot sync weights on vLLM's CPU backend. Each trainer
constructs its TRL parent inside `generation.vllm_cpu.without_trl_engine` and then calls `setup_colocate_engine`,
which gives it a `SleepVLLMGeneration`: sleep-trl's engine on CPU (built here), TRL's own one with the CPU-safe sync
elsewhere. A model carrying a continuum memory is served as its dense fold (`mem.export_dense`: every fixed-gate
expert becomes extra FFN neurons) and each sync pushes `mem.dense_state_dict()`, so the engine computes exactly
what the training model computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..generation.vllm_cpu import SleepVLLMGeneration, attach_vllm_generation, enable_cpu_weight_sync
from ..memory import find_memory


def setup_colocate_engine(trainer, deferred: bool, **kwargs: Any) -> SleepVLLMGeneration:
    """Attach the engine to `trainer` (`deferred`: what `without_trl_engine` yielded, i.e. sleep-trl builds it);
    `**kwargs` go to `attach_vllm_generation` (e.g. `max_num_seqs`)."""
    args = trainer.args
    memory = find_memory(trainer.accelerator.unwrap_model(trainer.model))
    if memory is not None:
        routed = [lv.name for lv in memory.config.levels if lv.resolved_gate != "fixed"]
        if routed:
            raise ValueError(
                f"`use_vllm` needs every continuum-memory level to fold into dense weights, but {routed} use a "
                "per-token router. Use `gate='fixed'` for those levels, or `use_vllm: false`."
            )
        if not deferred:
            raise ValueError(
                "`use_vllm` with a continuum memory is supported with the CPU colocate engine only for now; on "
                "GPU export the model with `mem.export_dense(dir)` first, or set `use_vllm: false`."
            )
        folder = Path(args.output_dir) / "vllm-engine"
        if trainer.accelerator.is_main_process:
            memory.export_dense(folder, tokenizer=trainer.processing_class, overwrite=True)
        trainer.accelerator.wait_for_everyone()
        kwargs["model_path"] = folder
    generation = attach_vllm_generation(trainer, **kwargs) if deferred else enable_cpu_weight_sync(
        trainer.vllm_generation
    )
    if memory is not None:
        generation.weights_fn = lambda: memory.dense_state_dict().items()
    return generation
