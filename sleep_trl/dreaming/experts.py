"""Random-expert sampling while dreaming (paper notes §4, step 1).

When the model carries a continuum memory (low-rank expert banks on its MLP layers, `sleep_trl.memory`), each
router additionally picks one random expert while dreams are sampled, mixing unrelated knowledge into the dream.
"""

from __future__ import annotations

from contextlib import contextmanager

from ..memory import find_memory


@contextmanager
def random_expert_sampling(model, enabled: bool, seed: int | None = None):
    """Within the block, the model's memory routes through one extra random expert per layer (when `enabled`)."""
    if not enabled:
        yield None
        return
    memory = find_memory(model)
    if memory is None:
        raise ValueError(
            "random_expert_sampling=True needs a model that carries a continuum memory (sleep_trl.memory), but none "
            "was found on this model. Expand the model with a memory first, or set random_expert_sampling=False."
        )
    with memory.random_experts(seed=seed):
        yield memory
