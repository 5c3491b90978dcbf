"""Expert banks: pre-allocated low-rank experts that act as extra FFN neurons of a host MLP.

An expert of rank `r` mirrors the host MLP's form, so that it is literally `r` more FFN neurons:
- gated host (SwiGLU: Llama, Qwen2/3, Mistral, SmolLM): `expert(x) = B (act(A_g x) * (A_u x))`,
- plain host (`fc1`/`fc2`, GPT-NeoX, GPT-2): `expert(x) = B act(A x)`,
with the host's own activation. `A_g, A_u: r x d` start small and random, `B: d x r` starts at zero, so unlocking
an expert never changes the model's function.

Every slot owns its own `nn.Parameter`s (`gate_3`, `up_3`, `down_3`, `router_3`, `router_bias_3`), registered
directly on the bank module:
- per-slot `requires_grad`, so only a newly unlocked slot trains, and an optimizer (AdamW weight decay included)
  never moves a frozen slot, which a stacked `(num_slots, ...)` tensor could not guarantee;
- shapes never change (all slots exist from the start), so optimizer and DeepSpeed state stay valid;
- parameters owned by the module whose `forward` runs are what DeepSpeed ZeRO-3 gathers automatically (a
  `ParameterList` child would not be gathered, its own forward is never called).
Which slots are unlocked is plain Python state shared by all banks (`MemoryState`): the forward then computes only
unlocked slots (a level with none costs nothing) without reading a device mask (no host-device synchronisation).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ._zero import gathered


@dataclass
class MemoryState:
    """State shared by every bank of one memory: unlocked slot counts, suspended levels, random-expert sampling."""

    unlocked: dict[str, int]
    suspended: set[str] = field(default_factory=set)
    generator: torch.Generator | None = None  # set only inside `ContinuumMemory.random_experts`
    # Per-row multipliers of a level's output, `(batch,)` tensors: set only inside a `teacher_view(rows_suspend=...)`
    # (one batch whose rows see different views, e.g. new rows the awake model and replayed rows the long-term one).
    row_scale: dict[str, torch.Tensor] = field(default_factory=dict)
    # `{(level, slot): [gates of each forward, one (..., seq) tensor per attached layer]}`: set only inside
    # `ContinuumMemory.recording_gates` (the router loss of a sleep reads the new expert's gates from it).
    gate_record: dict[tuple[str, int], list[torch.Tensor]] | None = None

    def active(self, level: str) -> bool:
        return self.unlocked[level] > 0 and level not in self.suspended


def slot_seed(seed: int, layer: int, level: str, slot: int) -> int:
    """A stable 63-bit seed for one slot (identical on every process and across Python runs)."""
    digest = hashlib.sha256(f"{seed}/{layer}/{level}/{slot}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ExpertBank(nn.Module):
    """The slots of one level in one MLP layer (see the module docstring for the layout)."""

    def __init__(
        self,
        *,
        level: str,
        num_slots: int,
        rank: int,
        gate: str,
        hidden_size: int,
        gated: bool,
        act: nn.Module,
        state: MemoryState,
        layer: int,
        init_std: float,
        router_init_bias: float,
        seed: int,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ):
        super().__init__()
        self.level, self.num_slots, self.rank, self.gate_kind = level, num_slots, rank, gate
        self.hidden_size, self.gated, self.layer = hidden_size, gated, layer
        self.init_std, self.router_init_bias, self.seed = init_std, router_init_bias, seed
        # Not registered as a submodule: the host owns its activation; the bank only calls it.
        self.__dict__["_act"] = act
        self.__dict__["_state"] = state
        d, r = hidden_size, rank
        for s in range(num_slots):
            if gated:
                self.register_parameter(f"gate_{s}", nn.Parameter(torch.empty(r, d, dtype=dtype, device=device)))
            self.register_parameter(f"up_{s}", nn.Parameter(torch.empty(r, d, dtype=dtype, device=device)))
            self.register_parameter(f"down_{s}", nn.Parameter(torch.empty(d, r, dtype=dtype, device=device)))
            if gate == "sigmoid":
                self.register_parameter(f"router_{s}", nn.Parameter(torch.empty(1, d, dtype=dtype, device=device)))
                self.register_parameter(f"router_bias_{s}", nn.Parameter(torch.empty(1, dtype=dtype, device=device)))
        for p in self.parameters():
            p.requires_grad_(False)
        if str(device) != "meta":
            for s in range(num_slots):
                self.init_slot(s)

    @property
    def routed(self) -> bool:
        return self.gate_kind == "sigmoid"

    def slot_param_names(self, slot: int) -> list[str]:
        names = ([f"gate_{slot}"] if self.gated else []) + [f"up_{slot}", f"down_{slot}"]
        if self.routed:
            names += [f"router_{slot}", f"router_bias_{slot}"]
        return names

    def slot_parameters(self, slot: int) -> list[nn.Parameter]:
        return [getattr(self, n) for n in self.slot_param_names(slot)]

    @torch.no_grad()
    def init_slot(self, slot: int) -> None:
        """(Re-)initialise one slot: random A (seeded by seed/layer/level/slot), zero B, zero router weight."""
        gen = torch.Generator().manual_seed(slot_seed(self.seed, self.layer, self.level, slot))
        params = self.slot_parameters(slot)
        d, r = self.hidden_size, self.rank
        with gathered(params, modify=True):
            for name in (["gate", "up"] if self.gated else ["up"]):
                a = torch.randn(r, d, generator=gen) * self.init_std
                getattr(self, f"{name}_{slot}").copy_(a)
            getattr(self, f"down_{slot}").zero_()
            if self.routed:
                getattr(self, f"router_{slot}").zero_()
                getattr(self, f"router_bias_{slot}").fill_(self.router_init_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state: MemoryState = self._state
        k = state.unlocked[self.level]
        dtype = self.down_0.dtype
        h_in = x if x.dtype == dtype else x.to(dtype)
        p = self._parameters
        # One matmul for every unlocked slot's input projections (and one for their outputs): the slots are
        # concatenated along the neuron axis, exactly like the host's own FFN neurons.
        if self.gated:
            w_in = torch.cat([p[f"gate_{s}"] for s in range(k)] + [p[f"up_{s}"] for s in range(k)])
            g, u = F.linear(h_in, w_in).chunk(2, dim=-1)
            h = self._act(g) * u
        else:
            w_in = p["up_0"] if k == 1 else torch.cat([p[f"up_{s}"] for s in range(k)])
            h = self._act(F.linear(h_in, w_in))
        if self.routed:
            w_r = torch.cat([p[f"router_{s}"] for s in range(k)])
            b_r = torch.cat([p[f"router_bias_{s}"] for s in range(k)])
            gates = torch.sigmoid(F.linear(h_in, w_r, b_r))
            if state.gate_record is not None:
                for (level, slot), record in state.gate_record.items():
                    if level == self.level and slot < k:
                        record.append(gates[..., slot])
            if state.generator is not None:
                # Random-expert sampling (dreaming): one uniformly random unlocked slot per token gets gate 1.
                pick = torch.randint(k, gates.shape[:-1], generator=state.generator).to(gates.device)
                gates = gates.scatter(-1, pick.unsqueeze(-1), 1.0)
            h = (h.unflatten(-1, (k, self.rank)) * gates.unsqueeze(-1)).flatten(-2)
        w_out = p["down_0"] if k == 1 else torch.cat([p[f"down_{s}"] for s in range(k)], dim=1)
        out = F.linear(h, w_out)
        scale = state.row_scale.get(self.level)
        if scale is not None:
            if scale.numel() != out.shape[0]:
                raise RuntimeError(
                    f"A per-row memory view for {scale.numel()} rows met a batch of {out.shape[0]}: the rows of "
                    "`teacher_view(rows_suspend=...)` must be the rows of the batch (no num_return_sequences > 1)."
                )
            out = out * scale.to(device=out.device, dtype=out.dtype).view(-1, *([1] * (out.dim() - 1)))
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"level={self.level!r}, slots={self.num_slots}, rank={self.rank}, gate={self.gate_kind!r}, "
            f"form={'gated' if self.gated else 'plain'}"
        )


class MemoryBlock(nn.Module):
    """All levels of one attached MLP layer; its `hook` adds their output to the host MLP's output."""

    def __init__(self, banks: dict[str, ExpertBank], state: MemoryState, layer: int):
        super().__init__()
        # Banks are direct children named after their level: `...mlp.memory.slow.down_0`.
        for name, bank in banks.items():
            self.add_module(name, bank)
        self.level_names = list(banks)
        self.layer = layer
        self.__dict__["_state"] = state
        self.__dict__["memory"] = None  # the owning ContinuumMemory (plain reference, set by attach_memory)

    @property
    def banks(self) -> dict[str, ExpertBank]:
        return {name: self._modules[name] for name in self.level_names}

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        out = None
        for name in self.level_names:
            if self._state.active(name):
                y = self._modules[name](x)
                out = y if out is None else out + y
        return out

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output):
        """Forward hook on the host MLP: `output + memory(x)`; returns None (output unchanged) when no level is
        active, so an attached memory with every slot masked costs one Python check per layer."""
        state = self._state
        if not any(state.active(name) for name in self.level_names):
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        extra = self(x)
        return output + extra
