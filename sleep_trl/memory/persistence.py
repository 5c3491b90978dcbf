"""Saving and loading a continuum memory: `memory.safetensors` (tensors) + `memory_config.json` (config and state).

The files sit beside the model's own (`save_pretrained`) files, which never contain the memory, so the directory
stays a plain host checkpoint for every other tool. `load_memory(model, dir)` (in `memory.py`) attaches the memory
described by the JSON to a freshly loaded host model and restores its tensors and state (unlocked slots, suspended
levels, expand history, hence `teacher_view` and the trainable slot), giving identical logits. The functions here
take the memory handle as their argument and never import `memory.py`, so the two modules do not form a circle.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..io import atomic_write, atomic_write_text
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


def save_memory(mem, directory, tensors: dict[str, torch.Tensor] | None = None, is_main_process: bool = True) -> None:
    """Write the memory's tensors and its config + state into `directory` (atomically, file by file)."""
    if tensors is None:
        tensors = memory_state_dict(mem)  # collective under ZeRO-3: every process takes part
    if not is_main_process:
        return
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"mem.save({str(directory)!r}): that path is a file; give a directory.")
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / MEMORY_WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write_text(directory / MEMORY_CONFIG_NAME, json.dumps(_meta(mem), indent=2))


def read_memory_config(directory) -> MemoryConfig:
    """The `MemoryConfig` saved in `directory` (without touching any model)."""
    return MemoryConfig.from_dict(read_memory_meta(Path(directory))["config"])


def read_memory_meta(directory: Path) -> dict:
    """The parsed `memory_config.json` of `directory` (config, form, layers, state); clear errors naming the file
    when it is missing, truncated or not ours."""
    path = Path(directory) / MEMORY_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No {MEMORY_CONFIG_NAME} in {str(directory)!r}: save a memory there first with mem.save(dir) or "
            "mem.save_pretrained(dir)."
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is damaged (not valid JSON: {err}); restore it or save the memory again.") from err
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a sleep-trl memory file (format={meta.get('format')!r}).")
    if meta.get("version", 0) > _VERSION:
        raise ValueError(f"{path} has format version {meta['version']}; this sleep-trl reads up to {_VERSION}.")
    return meta


def has_memory(directory) -> bool:
    """True when `directory` holds a saved memory."""
    return (Path(directory) / MEMORY_CONFIG_NAME).is_file() and (Path(directory) / MEMORY_WEIGHTS_NAME).is_file()


def read_memory_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `memory.safetensors` file; a clear error naming the file when it is damaged."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is damaged ({err}); restore it or save the memory again.") from err
