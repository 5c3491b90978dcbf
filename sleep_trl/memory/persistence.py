"""Saving and loading a continuum memory: `memory.safetensors` (tensors) + `memory_config.json` (config and state).

The files sit beside the model's own (`save_pretrained`) files, which never contain the memory, so the directory
stays a plain host checkpoint for every other tool. `load_memory(model, dir)` attaches the memory described by the
JSON to a freshly loaded host model and restores its tensors and state (unlocked slots, suspended levels, expand
history, hence `teacher_view` and the trainable slot), giving identical logits.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

from ._zero import gathered
from .config import MemoryConfig

MEMORY_WEIGHTS_NAME = "memory.safetensors"
MEMORY_CONFIG_NAME = "memory_config.json"
_FORMAT = "sleep-trl-continuum-memory"
_VERSION = 1


def _key(layer: int, level: str, param: str) -> str:
    return f"{layer}.{level}.{param}"


def _bank_items(mem):
    for i in mem.layers:
        for level in mem.levels:
            bank = mem.blocks[i].banks[level]
            yield i, level, list(bank.named_parameters(recurse=False))


def memory_state_dict(mem) -> dict[str, torch.Tensor]:
    out = {}
    for i, level, params in _bank_items(mem):
        with gathered([p for _, p in params]):
            for name, p in params:
                out[_key(i, level, name)] = p.detach().to("cpu", copy=True).contiguous()
    return out


def memory_tensors_from_model_state_dict(mem, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The memory's tensors taken from a full model state dict (as a trainer passes to `save_pretrained`), or None
    when it does not hold all of them."""
    out = {}
    for i, level, params in _bank_items(mem):
        full_names = mem.names([p for _, p in params])
        for (name, _), full in zip(params, full_names):
            if full not in state_dict:
                return None
            out[_key(i, level, name)] = state_dict[full].detach().to("cpu", copy=True).contiguous()
    return out


def load_memory_tensors(mem, tensors: dict[str, torch.Tensor]) -> None:
    expected = {}
    for i, level, params in _bank_items(mem):
        for name, p in params:
            expected[_key(i, level, name)] = p
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"Memory tensors do not match this memory: missing {missing[:5]}, unexpected {unexpected[:5]}. "
            "Load them into a memory attached with the same MemoryConfig on the same model."
        )
    for i, level, params in _bank_items(mem):
        ps = [p for _, p in params]
        with gathered(ps, modify=True), torch.no_grad():
            for name, p in params:
                t = tensors[_key(i, level, name)]
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"Memory tensor {_key(i, level, name)} has shape {tuple(t.shape)}, "
                                     f"expected {tuple(p.shape)}.")
                p.copy_(t)


def _meta(mem) -> dict:
    bank = next(iter(mem.blocks.values())).banks[mem.levels[0]]
    return {
        "format": _FORMAT,
        "version": _VERSION,
        "config": mem.config.to_dict(),
        "form": mem.form,
        "hidden_size": bank.hidden_size,
        "layers": mem.layers,
        "state": {
            "unlocked": dict(mem.state.unlocked),
            "suspended": sorted(mem.state.suspended),
            "history": [dataclasses.asdict(r) for r in mem.history],
        },
    }


def _atomic_write(path: Path, write) -> None:
    # Write to a temporary name, then rename: a run killed mid-save never leaves a truncated file behind.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_memory(mem, directory, tensors: dict[str, torch.Tensor] | None = None, is_main_process: bool = True) -> None:
    from safetensors.torch import save_file

    if tensors is None:
        tensors = memory_state_dict(mem)  # collective under ZeRO-3: every process takes part
    if not is_main_process:
        return
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"mem.save({str(directory)!r}): that path is a file; give a directory.")
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / MEMORY_WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(_meta(mem), indent=2)
    _atomic_write(directory / MEMORY_CONFIG_NAME, lambda p: p.write_text(text))


def read_memory_config(directory) -> MemoryConfig:
    """The `MemoryConfig` saved in `directory` (without touching any model)."""
    return MemoryConfig.from_dict(_read_meta(Path(directory))["config"])


def _read_meta(directory: Path) -> dict:
    path = directory / MEMORY_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No {MEMORY_CONFIG_NAME} in {str(directory)!r}: save a memory there first with mem.save(dir) (or "
            "model.save_pretrained(dir) with MemoryConfig.save_with_model=True)."
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a sleep-trl memory file (format={meta.get('format')!r}).")
    if meta.get("version", 0) > _VERSION:
        raise ValueError(f"{path} has format version {meta['version']}; this sleep-trl reads up to {_VERSION}.")
    return meta


def has_memory(directory) -> bool:
    """True when `directory` holds a saved memory."""
    return (Path(directory) / MEMORY_CONFIG_NAME).is_file() and (Path(directory) / MEMORY_WEIGHTS_NAME).is_file()


def load_memory(model: nn.Module, directory):
    """Attach the memory saved in `directory` to `model` (or load into the one already attached, if its config is
    the same) and restore tensors and state. Returns the `ContinuumMemory`."""
    from safetensors.torch import load_file

    from .memory import ExpandRecord, attach_memory, find_memory

    directory = Path(directory)
    meta = _read_meta(directory)
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
    mem.load_state_dict(load_file(str(weights)))
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
