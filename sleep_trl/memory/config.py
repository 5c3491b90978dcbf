"""Configuration of a continuum memory: which MLP layers carry expert banks, and the levels of those banks."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

GATES = ("auto", "fixed", "sigmoid")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Fields of earlier versions that saved memories may still carry; they no longer mean anything and are dropped.
_RETIRED_FIELDS = {"save_with_model"}
_RESERVED = {"banks", "level_names", "layer", "hook", "memory"}  # attributes of MemoryBlock


@dataclass
class LevelConfig:
    """One level of the continuum memory: a bank of pre-allocated low-rank experts in every attached MLP layer.

    Levels are listed from fastest (short-term) to slowest (long-term). A level's experts are extra FFN neurons of
    the host MLP (same form: gated for SwiGLU hosts, plain otherwise); all slots exist from the start, masked, and
    `ContinuumMemory.expand(name)` unlocks the next one in every attached layer at once.
    """

    name: str
    """Level name, used in every API call (`mem.expand("slow")`) and in parameter names; a Python identifier."""

    num_slots: int = 1
    """Number of pre-allocated expert slots. A level full of unlocked experts refuses `expand` with a clear error;
    `reset` frees all of them. Consolidation adds one expert per sleep, so a level that receives from a faster level
    every `C_fast` steps and is itself consolidated every `C_slow` steps needs about `C_slow / C_fast` slots."""

    rank: int = 64
    """Width of each expert (its number of extra FFN neurons, `r` in the paper's `A: d x r`, `B: r x d`). The paper
    adds experts of dimension 64 to 3B/8B models."""

    chunk_size: int | None = None
    """Steps between this level's boundaries (the paper's chunk size `C`). At a boundary the level's content is due
    to be consolidated (sleep) into the next slower level and the level is reset, before new training overwrites it.
    `None`: the level never has a boundary (permanent long-term memory; the usual choice for the slowest level).
    Must not decrease from one level to the next slower one."""

    gate: Literal["auto", "fixed", "sigmoid"] = "auto"
    """How unlocked experts are gated, per token. `"fixed"`: every unlocked expert contributes fully (gate 1); the
    level then folds exactly into a dense checkpoint (`export_dense`) and can be served by vLLM. `"sigmoid"`: a
    router gives each slot its own logit and gate `sigmoid(w_s . x + b_s)` (dense gating, no competition between
    experts, so unlocking an expert whose `B` is zero never changes the function); needed for random-expert sampling
    during dreaming, but not foldable into a dense checkpoint. `"auto"`: `"fixed"` for a one-slot level, `"sigmoid"`
    for a level with several slots."""

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(
                f"LevelConfig.name={self.name!r} is not a valid level name: use a Python identifier such as 'fast'."
            )
        if self.name in _RESERVED or hasattr(nn.Module, self.name):
            raise ValueError(f"LevelConfig.name={self.name!r} is reserved: choose another name, e.g. 'fast'.")
        if not isinstance(self.num_slots, int) or self.num_slots < 1:
            raise ValueError(f"LevelConfig.num_slots={self.num_slots!r} for level {self.name!r}: use an int >= 1.")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LevelConfig.rank={self.rank!r} for level {self.name!r}: use an int >= 1.")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(
                f"LevelConfig.chunk_size={self.chunk_size!r} for level {self.name!r}: use an int >= 1 (steps between "
                "boundaries) or None (no boundary)."
            )
        if self.gate not in GATES:
            raise ValueError(f"LevelConfig.gate={self.gate!r} for level {self.name!r}: use one of {GATES}.")

    @property
    def resolved_gate(self) -> str:
        """The gate actually used: `"auto"` resolved by the number of slots."""
        if self.gate == "auto":
            return "fixed" if self.num_slots == 1 else "sigmoid"
        return self.gate


def _default_levels() -> list[LevelConfig]:
    return [
        LevelConfig(name="fast", num_slots=1, rank=64, chunk_size=1000),
        LevelConfig(name="slow", num_slots=5, rank=64, chunk_size=None),
    ]


@dataclass
class MemoryConfig:
    """A continuum memory on a Hugging Face causal LM (see `attach_memory`).

    The default is a two-level ladder: a one-expert `fast` level (short-term memory, written during wake, due for
    consolidation every 1000 steps) and a five-expert `slow` level (long-term memory, one expert added per sleep,
    never reset), each expert of rank 64, on every decoder layer. The paper added 5 experts of dimension 64.
    """

    layers: str | list[int] = "all"
    """Decoder layers whose MLP gets expert banks: `"all"`, or a list of layer indices (negative counts from the
    end, e.g. `[-4, -3, -2, -1]` for the last four)."""

    levels: list[LevelConfig] = field(default_factory=_default_levels)
    """The levels, fastest first. Dicts are accepted (e.g. from YAML) and turned into `LevelConfig`."""

    init_std: float | None = None
    """Standard deviation of the random `A` matrices (gate/up projections) of every expert. `None`:
    `hidden_size ** -0.5`, which gives unit-scale pre-activations on unit-RMS inputs, like a host FFN neuron.
    `B` (down projection) is always zero at unlock, so unlocking never changes the function."""

    router_init_bias: float = 0.0
    """Initial router bias of every slot of a `"sigmoid"` level (router weights start at zero, so every token gets
    gate `sigmoid(router_init_bias)` at unlock; 0.0 gives 0.5)."""

    dtype: str | None = None
    """Dtype of the expert parameters (`"float32"`, `"bfloat16"`, `"float16"`). `None`: the host MLP's dtype."""

    seed: int = 0
    """Seed of the expert initialisation. Every slot's `A` is drawn from a generator seeded by (seed, layer, level,
    slot), so `reset` restores exactly the initial weights and every process of a distributed run agrees."""

    def __post_init__(self):
        if isinstance(self.levels, (LevelConfig, dict)):
            self.levels = [self.levels]
        self.levels = [LevelConfig(**lv) if isinstance(lv, dict) else lv for lv in self.levels]
        if not self.levels:
            raise ValueError("MemoryConfig.levels is empty: give at least one LevelConfig.")
        for lv in self.levels:
            if not isinstance(lv, LevelConfig):
                raise ValueError(f"MemoryConfig.levels holds {lv!r}: use LevelConfig objects or dicts of its fields.")
        names = [lv.name for lv in self.levels]
        if len(set(names)) != len(names):
            raise ValueError(f"MemoryConfig.levels has duplicate names {names}: give every level its own name.")
        previous = None
        for lv in self.levels:
            if previous is not None:
                if previous.chunk_size is None and lv.chunk_size is not None:
                    raise ValueError(
                        f"MemoryConfig.levels: level {lv.name!r} (chunk_size={lv.chunk_size}) is slower than "
                        f"{previous.name!r} (chunk_size=None) but has a boundary: list levels fastest first, and give "
                        "chunk_size=None only to the slowest ones."
                    )
                if (
                    previous.chunk_size is not None
                    and lv.chunk_size is not None
                    and lv.chunk_size < previous.chunk_size
                ):
                    raise ValueError(
                        f"MemoryConfig.levels: chunk_size of {lv.name!r} ({lv.chunk_size}) is smaller than that of "
                        "the "
                        f"faster level {previous.name!r} ({previous.chunk_size}): list levels fastest first, with "
                        "non-decreasing chunk sizes."
                    )
            previous = lv
        if isinstance(self.layers, str):
            if self.layers != "all":
                raise ValueError(f"MemoryConfig.layers={self.layers!r}: use 'all' or a list of layer indices.")
        else:
            layers = list(self.layers)
            if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise ValueError(f"MemoryConfig.layers={self.layers!r}: use 'all' or a non-empty list of ints.")
            self.layers = layers
        if self.init_std is not None and not self.init_std > 0:
            raise ValueError(f"MemoryConfig.init_std={self.init_std!r}: use a positive float, or None for d**-0.5.")
        if self.dtype is not None and self.dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise ValueError(
                f"MemoryConfig.dtype={self.dtype!r}: use 'float32', 'bfloat16', 'float16' or None (host dtype)."
            )

    def level(self, name: str) -> LevelConfig:
        """The level called `name`; a clear error naming the known levels otherwise."""
        for lv in self.levels:
            if lv.name == name:
                return lv
        raise KeyError(f"Unknown memory level {name!r}: this memory has levels {[lv.name for lv in self.levels]}.")

    @property
    def level_names(self) -> list[str]:
        return [lv.name for lv in self.levels]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryConfig:
        """Build from a dict (e.g. a recipe section); an unknown key is an error naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k not in _RETIRED_FIELDS}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown MemoryConfig field(s) {sorted(unknown)}: known fields are {sorted(known)}.")
        levels = data.get("levels")
        if levels is not None:
            level_fields = {f.name for f in dataclasses.fields(LevelConfig)}
            for lv in levels if isinstance(levels, list) else [levels]:
                if isinstance(lv, dict) and set(lv) - level_fields:
                    raise ValueError(
                        f"Unknown LevelConfig field(s) {sorted(set(lv) - level_fields)} in level {lv.get('name')!r}: "
                        f"known fields are {sorted(level_fields)}."
                    )
        return cls(**data)
