"""`ContinuumMemory`: a continuum memory attached in place to a stock Hugging Face causal LM.

`attach_memory(model, config)` adds, to the MLP of each chosen decoder layer, one `ExpertBank` per level (as a
child module `mlp.memory`, so its parameters appear in `model.named_parameters()`, are seen by optimizers and by
DeepSpeed) and a forward hook that adds the memory's output to the MLP's output. Nothing of the host model is
copied or replaced, and nothing on the model instance is patched: `mem.save_pretrained(dir)` writes a plain host
checkpoint plus `memory.safetensors` + `memory_config.json` beside it, `mem.save(dir)` the memory alone, and
`MemoryCheckpointCallback` (sleep_trl.sleep) adds the memory files to a Trainer's checkpoints.

Lifecycle of a level's slots (all attached layers move together):

    locked --expand--> unlocked, training (only the newest slot has requires_grad)
           --next expand--> unlocked, frozen
           --reset--> locked again (A re-drawn from its seed, B zero): "synaptic pruning"

`suspend(level)` makes a level contribute nothing without losing it; `teacher_view()` shows the model as it was
before the newest `expand` (that slot masked, suspensions made since undone), with no copy of any weight.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import export, persistence
from ._zero import gathered
from .config import MemoryConfig
from .experts import ExpertBank, MemoryBlock, MemoryState
from .host import detect_mlp_form, find_decoder_layers, text_config
from .persistence import MEMORY_CONFIG_NAME, MEMORY_WEIGHTS_NAME, read_memory_meta
from .schedule import LevelSchedule
from .trunk import FrozenTrunk

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class ExpandRecord:
    """One `expand`: which slot, and the memory's state just before it (what `teacher_view` restores)."""

    level: str
    slot: int
    unlocked_before: dict[str, int]
    suspended_before: list[str] = field(default_factory=list)
    viewable: bool = True  # False once a `reset` has changed weights the pre-expand model depended on


class ContinuumMemory:
    """Handle on a memory attached to a model (returned by `attach_memory`, found again by `find_memory`).

    Attributes:
        model: the model the memory was attached to (parameter names are relative to it unless `root=` is given).
        config: the `MemoryConfig`.
        state: unlocked slot counts and suspended levels (shared by every bank).
        blocks: `{layer index: MemoryBlock}`.
        history: every `expand` so far (level, slot, state before it), oldest first.
        schedule: the `LevelSchedule` of the levels.
    """

    def __init__(self, model: nn.Module, config: MemoryConfig, blocks: dict[int, MemoryBlock], state: MemoryState):
        self.model = model
        self.config = config
        self.blocks = blocks
        self.state = state
        self.history: list[ExpandRecord] = []
        self.schedule = LevelSchedule(config.levels)
        self._in_view = False
        self._hook_ids: dict[int, int] = {}

    # ------------------------------------------------------------------ introspection
    @property
    def levels(self) -> list[str]:
        """Level names, fastest first."""
        return self.config.level_names

    @property
    def layers(self) -> list[int]:
        """Indices of the decoder layers that carry the memory."""
        return sorted(self.blocks)

    @property
    def form(self) -> str:
        """`"gated"` or `"plain"`: the host MLP form the experts mirror."""
        return "gated" if next(iter(self.blocks.values())).banks[self.levels[0]].gated else "plain"

    def unlocked(self, level: str) -> int:
        """Number of unlocked slots of `level`."""
        self.config.level(level)
        return self.state.unlocked[level]

    def is_suspended(self, level: str) -> bool:
        self.config.level(level)
        return level in self.state.suspended

    def banks(self, level: str) -> list[ExpertBank]:
        """The bank of `level` in every attached layer, in layer order."""
        self.config.level(level)
        return [self.blocks[i].banks[level] for i in self.layers]

    def parameters(self, level: str | None = None, slots: Iterable[int] | None = None) -> list[nn.Parameter]:
        """Memory parameters, of one level (and some of its slots) or of all levels."""
        out = []
        for name in [level] if level is not None else self.levels:
            for bank in self.banks(name):
                for s in range(bank.num_slots) if slots is None else slots:
                    out += bank.slot_parameters(s)
        return out

    def names(self, params: Iterable[nn.Parameter], root: nn.Module | None = None) -> list[str]:
        """Full names (as in `root.named_parameters()`, default the attached model) of `params`."""
        params = list(params)
        by_id = {id(p): n for n, p in (root or self.model).named_parameters(remove_duplicate=False)}
        missing = [p for p in params if id(p) not in by_id]
        if missing:
            raise ValueError(
                f"{len(missing)} memory parameter(s) are not parameters of the given root module: pass the model the "
                "memory is attached to, or a wrapper of it (e.g. a PeftModel)."
            )
        return [by_id[id(p)] for p in params]

    def trainable_parameters(self, root: nn.Module | None = None) -> dict[str, nn.Parameter]:
        """`{name: parameter}` of the newest expanded slot: what should train now (empty before any expand)."""
        if not self.history:
            return {}
        rec = self.history[-1]
        if rec.slot >= self.state.unlocked[rec.level]:
            return {}  # the level was reset since
        params = self.parameters(rec.level, slots=[rec.slot])
        return dict(zip(self.names(params, root), params))

    def num_parameters(self, active_only: bool = False) -> int:
        """Number of memory parameters (all pre-allocated slots, or only unlocked slots of active levels).
        Counted from the config, so it is also right when parameters are ZeRO-3 partitioned."""
        total = 0
        d = next(iter(self.blocks.values())).banks[self.levels[0]].hidden_size
        per_neuron = d * (3 if self.form == "gated" else 2)
        for lv in self.config.levels:
            slots = lv.num_slots
            if active_only:
                slots = self.state.unlocked[lv.name] if self.state.active(lv.name) else 0
            router = (d + 1) if lv.resolved_gate == "sigmoid" else 0
            total += len(self.blocks) * slots * (lv.rank * per_neuron + router)
        return total

    # ------------------------------------------------------------------ operations
    def _check_not_in_view(self, what: str) -> None:
        if self._in_view:
            raise RuntimeError(f"mem.{what}() inside mem.teacher_view(): leave the view first.")

    def expand(self, level: str, root: nn.Module | None = None) -> list[str]:
        """Unlock the next slot of `level` in every attached layer and make it the only memory slot that trains.

        The new slot's `B` is zero, so the function is unchanged. Every other memory parameter gets
        `requires_grad=False` and its `.grad` cleared (a stale gradient would let AdamW's weight decay move it);
        host parameters are left as they are (use `freeze_all_but`). Returns the full names, as in
        `root.named_parameters()` (default: the attached model), of exactly the parameters that should train: the
        slot's `gate`/`up`/`down` matrices, and its router row and bias in a `"sigmoid"` level.
        """
        self._check_not_in_view("expand")
        lv = self.config.level(level)
        k = self.state.unlocked[level]
        if k >= lv.num_slots:
            raise RuntimeError(
                f"Memory level {level!r} has no free slot ({k} of num_slots={lv.num_slots} unlocked): raise "
                f"LevelConfig.num_slots, add a slower level, or free it with mem.reset({level!r})."
            )
        self.history.append(
            ExpandRecord(level, k, dict(self.state.unlocked), sorted(self.state.suspended))
        )
        self.state.unlocked[level] = k + 1
        for p in self.parameters():
            p.requires_grad_(False)
            p.grad = None
        new = self.parameters(level, slots=[k])
        for p in new:
            p.requires_grad_(True)
        return self.names(new, root)

    def suspend(self, level: str) -> None:
        """Make `level` contribute nothing (its slots and weights are kept). Used during consolidation: the student
        must not see the fast level that the teacher view still sees."""
        self._check_not_in_view("suspend")
        self.config.level(level)
        self.state.suspended.add(level)

    def resume(self, level: str) -> None:
        """Undo `suspend(level)`."""
        self._check_not_in_view("resume")
        self.config.level(level)
        self.state.suspended.discard(level)

    @contextlib.contextmanager
    def suspended(self, *levels: str):
        """Context manager: the given levels contribute nothing inside, and get back their previous state after."""
        for level in levels:
            self.config.level(level)
        before = set(self.state.suspended)
        self.state.suspended |= set(levels)
        try:
            yield self
        finally:
            self.state.suspended = before

    @torch.no_grad()
    def copy_slot(self, source: tuple[str, int], target: tuple[str, int], gate: float = 0.99) -> None:
        """Copy an expert's weights into another slot, in every attached layer (`(level, slot)` pairs; the ranks must
        match). A routed target gets a constant gate of `gate` (router weights zero, bias `logit(gate)`), so it then
        contributes `gate` times what the source did. The sleep's warm start: the new slow expert begins as the
        fast expert that learned the session, and distillation only has to repair what it disturbs."""
        self._check_not_in_view("copy_slot")
        (src_level, src), (dst_level, dst) = source, target
        if self.config.level(src_level).rank != self.config.level(dst_level).rank:
            raise ValueError(
                f"copy_slot: level {src_level!r} has rank {self.config.level(src_level).rank} and {dst_level!r} "
                f"{self.config.level(dst_level).rank}; experts copy only between levels of the same rank."
            )
        if not 0.0 < gate < 1.0:
            raise ValueError(f"copy_slot: gate must be in (0, 1), got {gate}.")
        bias = math.log(gate / (1.0 - gate))
        for i in self.layers:
            src_bank, dst_bank = self.blocks[i].banks[src_level], self.blocks[i].banks[dst_level]
            params = src_bank.slot_parameters(src) + dst_bank.slot_parameters(dst)
            with gathered(params, modify=True):
                for name in ["gate", "up", "down"] if dst_bank.gated else ["up", "down"]:
                    getattr(dst_bank, f"{name}_{dst}").copy_(getattr(src_bank, f"{name}_{src}"))
                if dst_bank.routed:
                    getattr(dst_bank, f"router_{dst}").zero_()
                    getattr(dst_bank, f"router_bias_{dst}").fill_(bias)

    def reset(self, level: str, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Synaptic pruning: re-lock every slot of `level`, redraw its `A` from the slot seeds (so exactly the
        initial values), zero its `B` and router rows, clear its suspension. The model then computes what it
        computed before the level's first slot was unlocked. `teacher_view` is unavailable until the next expand.

        The slots keep their `nn.Parameter` objects, so an optimizer that holds them trains them again after the
        next `expand`; pass that (plain PyTorch) optimizer to drop its state for them (e.g. AdamW moments), so the
        re-unlocked slot starts fresh rather than with the momentum of what was pruned."""
        self._check_not_in_view("reset")
        self.config.level(level)
        for bank in self.banks(level):
            for s in range(bank.num_slots):
                bank.init_slot(s)
        for p in self.parameters(level):
            p.requires_grad_(False)
            p.grad = None
            if optimizer is not None:
                optimizer.state.pop(p, None)
        self.state.unlocked[level] = 0
        self.state.suspended.discard(level)
        for rec in self.history:
            rec.viewable = False

    @contextlib.contextmanager
    def teacher_view(self, suspend: Iterable[str] = (), rows_suspend: dict[str, torch.Tensor] | None = None):
        """Context manager: the model exactly as it was before the newest `expand` (that slot masked, levels
        suspended since then active again), sharing every weight with the student. Self-Knowledge Seeding's
        teacher. Operations that change the memory are refused inside.

        `suspend` silences levels in the view as well: `teacher_view(suspend=["fast"])` is the long-term memory as
        it was before this sleep, the right teacher for replayed old knowledge (the awake fast level may have
        overwritten it). `rows_suspend` does the same for some rows of a batch only: `{"fast": replay}` (a boolean
        `(batch,)` tensor) lets one forward or `generate` call serve new rows (awake view) and replayed rows
        (long-term view) together; every forward inside must then have that batch size."""
        suspend = set(suspend)
        rows_suspend = dict(rows_suspend or {})
        for level in suspend | set(rows_suspend):
            self.config.level(level)
        if self._in_view:
            raise RuntimeError("mem.teacher_view() is already active: views do not nest.")
        if not self.history:
            raise RuntimeError("mem.teacher_view() needs a previous mem.expand(level): there is nothing to hide yet.")
        rec = self.history[-1]
        if not rec.viewable:
            raise RuntimeError(
                "mem.teacher_view(): a mem.reset() happened after the newest expand, so the model before that expand "
                "no longer exists. Take the teacher view before resetting."
            )
        saved = (dict(self.state.unlocked), set(self.state.suspended))
        self.state.unlocked.update(rec.unlocked_before)
        self.state.suspended = set(rec.suspended_before) | suspend
        self.state.row_scale = {level: (~mask.bool()).float() for level, mask in rows_suspend.items()}
        self._in_view = True
        try:
            yield self
        finally:
            self.state.unlocked.update(saved[0])
            self.state.suspended = saved[1]
            self.state.row_scale = {}
            self._in_view = False

    @contextlib.contextmanager
    def recording_gates(self, level: str | None = None, slot: int | None = None):
        """Context manager yielding a list that collects, for every forward inside, the router gate of one routed
        slot in every attached layer, in forward order (one `(batch, seq)` tensor per layer, still in the autograd
        graph). Default: the newest expanded slot (the one a sleep trains). Forwards in which the slot is masked (a
        `teacher_view`) record nothing. Gates are recorded before random-expert sampling."""
        if level is None or slot is None:
            if not self.history:
                raise RuntimeError("mem.recording_gates() without a level and slot needs a previous mem.expand().")
            level, slot = self.history[-1].level, self.history[-1].slot
        if self.config.level(level).resolved_gate != "sigmoid":
            raise ValueError(
                f"mem.recording_gates({level!r}): level {level!r} has gate {self.config.level(level).resolved_gate!r}; "
                "only routed (gate='sigmoid') levels have gates to record."
            )
        if self.state.gate_record is not None:
            raise RuntimeError("mem.recording_gates() is already active: recordings do not nest.")
        record: list[torch.Tensor] = []
        self.state.gate_record = {(level, slot): record}
        try:
            yield record
        finally:
            self.state.gate_record = None

    @contextlib.contextmanager
    def random_experts(self, seed: int | None = None):
        """Context manager for dreaming: in every routed (`"sigmoid"`) bank, one uniformly random unlocked expert
        per token additionally gets gate 1 (the paper: each router picks one random expert). Draws come from a
        `torch.Generator` seeded with `seed` (None: a fresh random seed), in forward order, so the same seed, inputs
        and calls reproduce the same outputs. Levels with `gate="fixed"` already use every unlocked expert, so they
        are unchanged; suspended levels stay silent. Meant for generation: under gradient checkpointing the
        recomputed forward would draw again."""
        gen = torch.Generator()
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        previous = self.state.generator
        self.state.generator = gen
        try:
            yield gen
        finally:
            self.state.generator = previous

    def frozen_trunk(self, max_megabytes: float = 1024.0, last_position_unused: bool = False) -> FrozenTrunk:
        """A context in which the decoder layers below the memory's lowest layer are served from a per-text cache
        while nothing below it learns (`trunk.py`): a phase that re-reads its texts, or trains on what the model just
        generated, pays for those layers once. Exact; a no-op when the memory starts at layer 0."""
        return FrozenTrunk(self.model, self.layers[0], max_megabytes, last_position_unused)

    def freeze_all_but(self, names: Iterable[str], root: nn.Module | None = None) -> int:
        """Set `requires_grad=True` on exactly the named parameters of `root` (default: the attached model) and
        False on every other one, memory and host alike. Returns the number of trainable elements. Unknown names
        are an error (listing them) raised before anything changes."""
        root = root or self.model
        names = set(names)
        params = dict(root.named_parameters(remove_duplicate=False))
        unknown = sorted(names - set(params))
        if unknown:
            raise ValueError(f"freeze_all_but: no parameter called {unknown[:5]} in {type(root).__name__}.")
        keep = {id(params[n]): params[n] for n in names}  # by identity: tied weights have two names
        for p in params.values():
            p.requires_grad_(id(p) in keep)
        return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in keep.values())

    def due_levels(self, global_step: int) -> list[str]:
        """Levels whose boundary falls at `global_step`, slowest first (see `LevelSchedule`)."""
        return self.schedule.due_levels(global_step)

    # ------------------------------------------------------------------ persistence and export
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every memory tensor (CPU copies, gathered under ZeRO-3), keyed `"{layer}.{level}.{param}"`."""
        return persistence.memory_state_dict(self)

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load tensors saved by `state_dict` (shapes and key set must match exactly)."""
        persistence.load_memory_tensors(self, tensors)

    def save(self, directory, is_main_process: bool = True) -> None:
        """Write `memory.safetensors` and `memory_config.json` into `directory` (usually beside the model's own
        files). Call it on every process under ZeRO-3 (parameters are gathered); only the main process writes."""
        persistence.save_memory(self, directory, is_main_process=is_main_process)

    def host_state_dict(self) -> dict[str, torch.Tensor]:
        """The host model's own state dict, without the memory tensors (gathered under ZeRO-3)."""
        memory_names = set(self.names(self.parameters()))
        host_params = [p for n, p in self.model.named_parameters() if n not in memory_names]
        with gathered(host_params):
            return {k: v.detach().clone() for k, v in self.model.state_dict().items() if k not in memory_names}

    def save_pretrained(self, directory, tokenizer=None, is_main_process: bool = True) -> Path:
        """Save the model with its memory: the plain host checkpoint (`save_pretrained` of the host, without the
        memory tensors, so `from_pretrained` of the folder is the unchanged host) plus `memory.safetensors` and
        `memory_config.json`; the tokenizer too if given. `load_memory(from_pretrained(dir), dir)` gives back
        identical logits. Call it on every process under ZeRO-3; only the main process writes."""
        directory = Path(directory)
        state = self.host_state_dict()
        tensors = self.state_dict()
        if is_main_process:
            self.model.save_pretrained(directory, state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
            persistence.save_memory(self, directory, tensors=tensors)
        return directory

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """The host state dict with every `"fixed"` level folded in as extra FFN neurons (see `export_dense`)."""
        return export.dense_state_dict(self)

    def dense_config(self):
        """The host config with `intermediate_size` widened by every `"fixed"` level's slots."""
        return export.dense_config(self)

    def dense_model(self):
        """A plain model (host class, widened config) computing exactly what the model with memory computes."""
        return export.dense_model(self)

    def export_dense(self, out_dir, tokenizer=None, overwrite: bool = False):
        """Save `dense_model()` with `save_pretrained` (and the tokenizer if given) into `out_dir`, loadable with
        `AutoModelForCausalLM.from_pretrained` or vLLM. Refuses a non-empty `out_dir` unless `overwrite=True`."""
        return export.export_dense(self, out_dir, tokenizer=tokenizer, overwrite=overwrite)

    def detach(self) -> None:
        """Remove the memory from the model (hooks, modules, save hooks); the host model is as before attach."""
        detach_memory(self.model)

    def __repr__(self) -> str:
        parts = []
        for lv in self.config.levels:
            flag = ", suspended" if lv.name in self.state.suspended else ""
            parts.append(
                f"{lv.name}: {self.state.unlocked[lv.name]}/{lv.num_slots} slots of rank {lv.rank}, "
                f"{lv.resolved_gate}, every {lv.chunk_size} steps{flag}"
            )
        return f"ContinuumMemory(layers={self.layers}, form={self.form}, " + "; ".join(parts) + ")"


def attach_memory(model: nn.Module, config: MemoryConfig | None = None) -> ContinuumMemory:
    """Attach a continuum memory to `model` in place and return its handle.

    Every new slot starts locked, so the model computes exactly what it computed before. Attach before handing the
    model to a trainer / `accelerate` / DeepSpeed, so the memory parameters exist when optimizers and partitions are
    built. Shapes come from the model config, so a model already partitioned by ZeRO-3 can be used.
    """
    config = config or MemoryConfig()
    if find_memory(model) is not None:
        raise RuntimeError("This model already has a continuum memory: use find_memory(model), or detach_memory.")
    hidden_size = getattr(text_config(model), "hidden_size", None)
    if not isinstance(hidden_size, int):
        raise ValueError(f"{type(text_config).__name__} has no int `hidden_size`: cannot size the experts.")
    prefix, layers = find_decoder_layers(model)
    n = len(layers)
    if config.layers == "all":
        indices = list(range(n))
    else:
        bad = [i for i in config.layers if not -n <= i < n]
        if bad:
            raise ValueError(f"MemoryConfig.layers has indices {bad} outside the model's {n} decoder layers.")
        indices = sorted({i % n for i in config.layers})
    init_std = config.init_std if config.init_std is not None else hidden_size**-0.5
    state = MemoryState(unlocked={lv.name: 0 for lv in config.levels})
    blocks, forms = {}, set()
    for i in indices:
        mlp = layers[i].mlp
        if "memory" in mlp._modules or hasattr(mlp, "memory"):
            raise RuntimeError(f"Layer {i}'s MLP already has a `memory` attribute: cannot attach there.")
        form = detect_mlp_form(mlp)
        forms.add(form)
        ref = next(iter(mlp.parameters()))
        dtype = _DTYPES[config.dtype] if config.dtype else ref.dtype
        banks = {
            lv.name: ExpertBank(
                level=lv.name,
                num_slots=lv.num_slots,
                rank=lv.rank,
                gate=lv.resolved_gate,
                hidden_size=hidden_size,
                gated=form.gated,
                act=getattr(mlp, form.act_attr),
                state=state,
                layer=i,
                init_std=init_std,
                router_init_bias=config.router_init_bias,
                seed=config.seed,
                dtype=dtype,
                device=ref.device,
            )
            for lv in config.levels
        }
        blocks[i] = MemoryBlock(banks, state, layer=i)
    if len({f.gated for f in forms}) > 1:
        raise ValueError("The chosen layers mix gated and plain MLPs: choose layers of one form (MemoryConfig.layers)")
    mem = ContinuumMemory(model, config, blocks, state)
    for i, block in blocks.items():
        mlp = layers[i].mlp
        mlp.add_module("memory", block)
        block.__dict__["memory"] = mem
        mem._hook_ids[i] = mlp.register_forward_hook(block.hook, with_kwargs=True).id
    model.__dict__["_continuum_memory"] = mem
    return mem


def find_memory(model: nn.Module) -> ContinuumMemory | None:
    """The continuum memory attached to `model` or to a model inside it (e.g. under a PEFT wrapper), else None."""
    mem = model.__dict__.get("_continuum_memory")
    if mem is not None:
        return mem
    for module in model.modules():
        if isinstance(module, MemoryBlock) and module.memory is not None:
            return module.memory
    return None


def detach_memory(model: nn.Module) -> None:
    """Remove the memory attached to `model` (or inside it); the model is left exactly as before attach."""
    mem = find_memory(model)
    if mem is None:
        raise RuntimeError("detach_memory: this model has no continuum memory attached.")
    root = mem.model
    _, layers = find_decoder_layers(root)
    for i, block in mem.blocks.items():
        mlp = layers[i].mlp
        mlp._forward_hooks.pop(mem._hook_ids.get(i), None)
        mlp._forward_hooks_with_kwargs.pop(mem._hook_ids.get(i), None)
        if mlp._modules.get("memory") is block:
            del mlp._modules["memory"]
        block.__dict__["memory"] = None
    root.__dict__.pop("_continuum_memory", None)


def load_memory(model: nn.Module, directory):
    """Attach the memory saved in `directory` to `model` (or load into the one already attached, if its config is
    the same) and restore tensors and state. Returns the `ContinuumMemory`."""
    directory = Path(directory)
    meta = read_memory_meta(directory)
    weights = directory / MEMORY_WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has {MEMORY_CONFIG_NAME} but no {MEMORY_WEIGHTS_NAME}.")
    config = MemoryConfig.from_dict(meta["config"])
    mem = find_memory(model)
    if mem is None:
        mem = attach_memory(model, config)
    elif mem.config.to_dict() != config.to_dict():
        raise ValueError(
            "load_memory: the model already has a memory with a different MemoryConfig than the one saved in "
            f"{str(directory)!r}; detach it first (detach_memory(model))."
        )
    bank = next(iter(mem.blocks.values())).banks[mem.levels[0]]
    if meta["form"] != mem.form or meta["hidden_size"] != bank.hidden_size or meta["layers"] != mem.layers:
        raise ValueError(
            f"The memory in {str(directory)!r} was saved for a model with {meta['form']} MLPs, hidden size "
            f"{meta['hidden_size']} and layers {meta['layers']}; this model gives {mem.form}, {bank.hidden_size} and "
            f"{mem.layers}. Load it into the model it was saved with."
        )
    mem.load_state_dict(persistence.read_memory_tensors(weights))
    state = meta["state"]
    for level, k in state["unlocked"].items():
        if not 0 <= k <= config.level(level).num_slots:
            raise ValueError(f"{MEMORY_CONFIG_NAME}: level {level!r} has {k} unlocked slots, out of range.")
    mem.state.unlocked.clear()
    mem.state.unlocked.update({lv: int(state["unlocked"][lv]) for lv in mem.levels})
    mem.state.suspended = set(state["suspended"])
    mem.history = [ExpandRecord(**r) for r in state["history"]]
    for p in mem.parameters():
        p.requires_grad_(False)
    for p in mem.trainable_parameters().values():
        p.requires_grad_(True)
    return mem
