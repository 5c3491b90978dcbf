"""Fold a continuum memory into a plain dense checkpoint (for vanilla `transformers` inference or vLLM).

A `"fixed"`-gate expert is literally `rank` extra FFN neurons, so it folds exactly: its `A` rows are appended to the
host's `gate_proj`/`up_proj` (or `fc1`) rows, its `B` columns to `down_proj` (or `fc2`) columns, and the config's
`intermediate_size` grows by `num_slots * rank` per fixed level. Every slot of every fixed level is always exported,
locked or suspended slots as zero neurons (zero in and out), so the dense shape depends only on the config and a
serving engine started once from an export can receive later exports' weights. Layers without memory get zero
neurons too (one `intermediate_size` for all layers).

A `"sigmoid"` level gates its experts per token with a router, which a dense MLP cannot express: exporting while
such a level has an active (unlocked, not suspended) expert is an error; while it has none it contributes nothing
and is skipped.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights

from ._zero import gathered
from .host import detect_mlp_form, find_decoder_layers


def _check_exportable(mem):
    if not isinstance(mem.model, PreTrainedModel):
        raise ValueError(
            f"Dense export needs the memory attached to a transformers PreTrainedModel, not {type(mem.model).__name__}"
            " (for a PEFT model, merge_and_unload() first and attach the memory to the result)."
        )
    for lv in mem.config.levels:
        if lv.resolved_gate == "sigmoid" and mem.state.active(lv.name):
            raise ValueError(
                f"Memory level {lv.name!r} uses gate='sigmoid' and has {mem.state.unlocked[lv.name]} active expert(s):"
                " "
                "a per-token router cannot be folded exactly into a dense MLP. Use gate='fixed' for levels you want "
                f"to export, or export without this level (mem.suspend({lv.name!r}))."
            )
    if next(iter(mem.blocks.values())).banks[mem.levels[0]].gated is False:
        _, layers = find_decoder_layers(mem.model)
        if detect_mlp_form(layers[mem.layers[0]].mlp).conv1d:
            raise ValueError("Dense export of GPT-2 style Conv1D MLPs is not supported.")
    if not isinstance(getattr(mem.model.config, "intermediate_size", None), int):
        raise ValueError(
            f"{type(mem.model.config).__name__} has no int `intermediate_size`: dense export widens that field, so "
            "it supports Llama/Qwen/Mistral/Gemma/Phi/GPT-NeoX style configs."
        )


def _fixed_levels(mem):
    return [lv for lv in mem.config.levels if lv.resolved_gate == "fixed"]


def extra_neurons(mem) -> int:
    """Neurons added per layer by dense export: every slot of every fixed level."""
    return sum(lv.num_slots * lv.rank for lv in _fixed_levels(mem))


def dense_config(mem):
    _check_exportable(mem)
    config = copy.deepcopy(mem.model.config)
    config.intermediate_size = config.intermediate_size + extra_neurons(mem)
    quant = getattr(config, "quantization_config", None)
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        if str(getattr(method, "value", method)) != "gguf":
            raise ValueError("Dense export of a quantized model is not supported: load it unquantized first.")
        del config.quantization_config  # GGUF weights are dequantized on load: the export is a plain float model
    return config


@torch.no_grad()
def dense_state_dict(mem) -> dict[str, torch.Tensor]:
    _check_exportable(mem)
    model = mem.model
    memory_names = set(mem.names(mem.parameters()))
    all_params = [p for n, p in model.named_parameters() if n not in memory_names]
    with gathered(all_params):
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in memory_names}
    prefix, layers = find_decoder_layers(mem.model)
    fixed = _fixed_levels(mem)
    extra = extra_neurons(mem)
    if extra == 0:
        return state
    mlp_key = {i: f"{prefix}.{i}.mlp" for i in range(len(layers))}
    for i in range(len(layers)):
        form = detect_mlp_form(layers[i].mlp)
        ins = [form.gate, form.up] if form.gated else [form.up]
        block = mem.blocks.get(i)
        pieces = {name: [] for name in ins}
        downs = []
        for lv in fixed:
            bank = block.banks[lv.name] if block is not None else None
            active = bank is not None and mem.state.active(lv.name)
            k = mem.state.unlocked[lv.name] if active else 0
            for s in range(lv.num_slots):
                if s < k:
                    slot = dict(bank.named_parameters(recurse=False))
                    with gathered(bank.slot_parameters(s)):
                        for name in ins:
                            short = "gate" if name == form.gate else "up"
                            pieces[name].append(slot[f"{short}_{s}"].detach().clone())
                        downs.append(slot[f"down_{s}"].detach().clone())
                else:
                    ref_w = state[f"{mlp_key[i]}.{form.down}.weight"]
                    for name in ins:
                        pieces[name].append(ref_w.new_zeros(lv.rank, ref_w.shape[0]))
                    downs.append(ref_w.new_zeros(ref_w.shape[0], lv.rank))
        for name in ins:
            w_key = f"{mlp_key[i]}.{name}.weight"
            w = state[w_key]
            state[w_key] = torch.cat([w] + [p.to(w.dtype) for p in pieces[name]], dim=0)
            b_key = f"{mlp_key[i]}.{name}.bias"
            if b_key in state:
                state[b_key] = torch.cat([state[b_key], state[b_key].new_zeros(extra)])
        d_key = f"{mlp_key[i]}.{form.down}.weight"
        w = state[d_key]
        state[d_key] = torch.cat([w] + [p.to(w.dtype) for p in downs], dim=1)
    return state


def dense_model(mem):
    """Instantiate the host class with the widened config and load the folded state dict into it."""
    config = dense_config(mem)
    state = dense_state_dict(mem)
    cls = type(mem.model)
    with no_init_weights():
        dense = cls(config)
    missing, unexpected = dense.load_state_dict(state, strict=False, assign=True)
    if unexpected or [k for k in missing if not _is_tied(dense, k)]:
        raise RuntimeError(f"Dense export produced a state dict that does not fit: missing {missing}, "
                           f"unexpected {unexpected}.")
    dense.tie_weights()
    if getattr(mem.model, "generation_config", None) is not None:
        dense.generation_config = copy.deepcopy(mem.model.generation_config)
    dense.train(mem.model.training)
    return dense


def _is_tied(model, key: str) -> bool:
    return key.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)


def export_dense(mem, out_dir, tokenizer=None, overwrite: bool = False) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(
            f"export_dense: {str(out_dir)!r} exists and is not empty; choose a new directory or pass overwrite=True."
        )
    dense = dense_model(mem)
    dense.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
