"""When each memory level reaches its boundary, i.e. when a sleep is due.

Level `l` has a boundary every `chunk_size_l` steps (global optimizer steps of wake training). At a boundary the
level's content must be consolidated into the next slower level and the level reset, *before* further training
overwrites it (the paper: "sleep happens at every block's update boundary, before the block is overwritten").

When several boundaries coincide (e.g. step 5000 with chunk sizes 1000 and 5000), they are returned slowest first:
the slower level is emptied into its own slower neighbour before it receives the faster level's content, so
knowledge cascades downwards one level per sleep and nothing is consolidated twice in one sleep.
"""

from __future__ import annotations

from collections.abc import Sequence

from .config import LevelConfig


class LevelSchedule:
    """Boundaries of the levels of a continuum memory (fastest first, as in `MemoryConfig.levels`)."""

    def __init__(self, levels: Sequence[LevelConfig]):
        self.levels = list(levels)

    def _check_step(self, step: int) -> None:
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"global_step={step!r}: use a non-negative int (the number of optimizer steps done).")

    def due_levels(self, global_step: int) -> list[str]:
        """Names of the levels whose boundary falls at `global_step` (> 0), slowest first."""
        self._check_step(global_step)
        if global_step == 0:
            return []
        due = [lv.name for lv in self.levels if lv.chunk_size is not None and global_step % lv.chunk_size == 0]
        return due[::-1]

    def target(self, level: str) -> str | None:
        """The level receiving `level`'s content at its boundary: the next slower level, or None for the slowest."""
        names = [lv.name for lv in self.levels]
        if level not in names:
            raise KeyError(f"Unknown memory level {level!r}: this memory has levels {names}.")
        i = names.index(level)
        return names[i + 1] if i + 1 < len(names) else None

    def plan(self, global_step: int) -> list[tuple[str, str | None]]:
        """The consolidations due at `global_step`, in order: `(source level, target level or None)` pairs."""
        return [(name, self.target(name)) for name in self.due_levels(global_step)]

    def next_boundary(self, global_step: int) -> int | None:
        """The first step after `global_step` at which some level has a boundary; None if no level has one."""
        self._check_step(global_step)
        steps = [(global_step // lv.chunk_size + 1) * lv.chunk_size for lv in self.levels if lv.chunk_size]
        return min(steps) if steps else None

    def __repr__(self) -> str:
        return "LevelSchedule(" + ", ".join(f"{lv.name}: every {lv.chunk_size}" for lv in self.levels) + ")"
