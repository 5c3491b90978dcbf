"""The continuum memory substrate on stock Hugging Face causal LMs, and growth operators.

    from sleep_trl.memory import MemoryConfig, attach_memory

    mem = attach_memory(model, MemoryConfig())       # same logits: every slot starts locked
    names = mem.expand("slow")                       # unlock one expert per layer; only it trains
    mem.freeze_all_but(names)
    with mem.teacher_view(): ...                     # the model before that expand, no weight copy
    mem.reset("fast")                                # synaptic pruning of the fast level
    with mem.random_experts(seed=0): model.generate(...)   # dreaming
    mem.due_levels(global_step)                      # which level boundaries (sleeps) are due
    mem.save_pretrained(d); load_memory(model2, d)   # host checkpoint + memory.safetensors + memory_config.json
    mem.export_dense(out)                            # plain checkpoint, fixed-gate levels folded in
    with mem.frozen_trunk(): trainer.train()         # layers below the memory run once per text (exact)

See `memory.py` for the lifecycle of a slot, `experts.py` for the expert form, `host.py` for what is read off the
host model, `persistence.py`/`export.py` for saving and dense export, `growth.py` for width/depth growth.
"""

from .config import LevelConfig, MemoryConfig
from .experts import ExpertBank, MemoryBlock
from .growth import grow_depth, grow_width
from .host import find_decoder_layers
from .memory import ContinuumMemory, attach_memory, detach_memory, find_memory, load_memory
from .persistence import MEMORY_CONFIG_NAME, MEMORY_WEIGHTS_NAME, has_memory, read_memory_config
from .schedule import LevelSchedule
from .trunk import FrozenTrunk

__all__ = [
    "ContinuumMemory",
    "ExpertBank",
    "FrozenTrunk",
    "LevelConfig",
    "LevelSchedule",
    "MEMORY_CONFIG_NAME",
    "MEMORY_WEIGHTS_NAME",
    "MemoryBlock",
    "MemoryConfig",
    "attach_memory",
    "detach_memory",
    "find_decoder_layers",
    "find_memory",
    "grow_depth",
    "grow_width",
    "has_memory",
    "load_memory",
    "read_memory_config",
]
