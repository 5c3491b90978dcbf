"""Growth operators: build an exact "larger self" of a model, for upward seeding between sizes.

`grow_width` (HyperCloning-style, Samragh et al. 2024) multiplies the hidden size, the FFN size and the number of
attention heads (query and key/value) by `factor`; the head dimension stays, so rotary embeddings and the
attention scaling are unchanged. The grown model carries `factor` identical copies of the small model's hidden
state side by side:
- token embeddings are repeated along the hidden axis: `[e, e]`;
- every linear layer inside the blocks maps copies to copies: `W' = [[W/n + N_11, W/n + N_12], [...]]`, with
  noise blocks that sum to zero along each row of blocks (for n=2: `+N` on one input copy, `-N` on the other);
  since the input copies are equal, the noise cancels exactly, and it breaks the symmetry as soon as training
  starts (without it, gradient descent would keep the copies identical forever);
- biases are repeated; RMSNorm over the wider hidden state sees the same mean square, so its weight is repeated;
  per-head norms (Qwen3's q_norm/k_norm) are unchanged;
- duplicated heads are ordered copy-major (`[h_1..h_H, h_1..h_H]`), so the grouped-query mapping of each query head
  to its key/value head is preserved;
- the final norm weight is divided by n, so the (tied or untied) output head `[W, W]` gives the same logits; with
  tied embeddings, the output head stays tied to the repeated embeddings.

`grow_depth` (LLaMA-Pro style, Wu et al. 2024) inserts new decoder blocks, each a copy of the block below it with
its output projections (`o_proj`, `down_proj`) zeroed, so the block starts as the identity on the residual stream.

Both return a new model of the same class (the source is untouched), which saves with `save_pretrained` and loads
with `from_pretrained`. Supported: Llama, Qwen2, Qwen3 and Mistral.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights

from .host import find_decoder_layers
from .memory import find_memory

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def _check_model(model: nn.Module, what: str):
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"{what}: give a transformers PreTrainedModel, not {type(model).__name__} "
                         "(for a PEFT model, merge_and_unload() first).")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{what}: model_type={model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}.")
    if find_memory(model) is not None:
        raise ValueError(f"{what}: the model has a continuum memory attached; grow the host model first and attach "
                         "the memory to the grown model (or export_dense() and grow the export).")


def _clean_config(model):
    config = copy.deepcopy(model.config)
    quant = getattr(config, "quantization_config", None)
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        if str(getattr(method, "value", method)) != "gguf":
            raise ValueError("Growing a quantized model is not supported: load it unquantized first.")
        del config.quantization_config  # GGUF weights are dequantized on load: the grown model is plain float
    return config


def _build(model, config, state: dict[str, torch.Tensor]):
    with no_init_weights():
        grown = type(model)(config)
    missing, unexpected = grown.load_state_dict(state, strict=False, assign=True)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise RuntimeError(f"Growth produced a state dict that does not fit: missing {missing}, unexpected "
                           f"{unexpected}")
    grown.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        grown.generation_config = copy.deepcopy(model.generation_config)
    grown.train(model.training)
    return grown


def _zero_sum_noise(n: int, shape, scale: float, gen: torch.Generator) -> torch.Tensor:
    """`n` noise blocks of `shape` that sum to zero (so they cancel on `n` identical input copies)."""
    noise = torch.randn((n, *shape), generator=gen) * scale
    return noise - noise.mean(dim=0, keepdim=True)


@torch.no_grad()
def grow_width(model: nn.Module, factor: int = 2, noise_std: float = 0.01, seed: int = 0) -> nn.Module:
    """A HyperCloning-style wider copy of `model`: hidden size, FFN size and head counts times `factor`, the
    same function at init (logits equal up to float rounding).

    Args:
        model: a Llama / Qwen2 / Qwen3 / Mistral causal LM (not modified).
        factor: integer width multiplier (>= 2).
        noise_std: symmetry-breaking noise, relative to each weight matrix's standard deviation; it cancels exactly
            on the identical copies. 0 gives an exact clone whose copies stay identical under training.
        seed: seed of the noise.
    """
    _check_model(model, "grow_width")
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 2:
        raise ValueError(f"grow_width: factor={factor!r}; use an int >= 2.")
    if noise_std < 0:
        raise ValueError(f"grow_width: noise_std={noise_std!r}; use a float >= 0.")
    n = factor
    config = _clean_config(model)
    d = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    config.hidden_size = n * d
    config.intermediate_size = n * config.intermediate_size
    config.num_attention_heads = n * config.num_attention_heads
    config.num_key_value_heads = n * kv_heads
    config.head_dim = head_dim
    gen = torch.Generator().manual_seed(seed)
    final_norm = f"{_decoder_prefix(model)}.norm.weight"
    state = {}
    for key, w in model.state_dict().items():
        if key.endswith("embed_tokens.weight") or key.endswith("lm_head.weight"):
            state[key] = w.repeat(1, n)
        elif key == final_norm:
            state[key] = w.repeat(n) / n
        elif ".layers." not in key:
            raise ValueError(f"grow_width: do not know how to widen {key!r}.")
        elif key.endswith("norm.weight") and w.dim() == 1:
            if w.numel() == d:
                state[key] = w.repeat(n)
            elif w.numel() == head_dim:
                state[key] = w.clone()  # per-head norm (Qwen3 q_norm / k_norm): heads keep their dimension
            else:
                raise ValueError(f"grow_width: norm {key!r} of size {w.numel()} is neither hidden nor head size.")
        elif w.dim() == 2:
            out_f, in_f = w.shape
            wide = (w / n).repeat(n, n)
            if noise_std > 0:
                scale = noise_std * w.float().std().item()
                # One zero-sum set of blocks per row of blocks: block (i, j) gets noise[j] of row-block i.
                noise = torch.cat(
                    [torch.cat(list(_zero_sum_noise(n, (out_f, in_f), scale, gen)), dim=1) for _ in range(n)], dim=0
                )
                wide = wide + noise.to(w.dtype)
            state[key] = wide
        elif w.dim() == 1:
            state[key] = w.repeat(n)  # bias of a linear layer: every output copy gets it
        else:
            raise ValueError(f"grow_width: do not know how to widen {key!r} of shape {tuple(w.shape)}.")
    return _build(model, config, state)


def _decoder_prefix(model) -> str:
    prefix, _ = find_decoder_layers(model)
    return prefix.rsplit(".", 1)[0] if "." in prefix else ""


@torch.no_grad()
def grow_depth(model: nn.Module, num_new_layers: int | None = None, positions: list[int] | None = None) -> nn.Module:
    """A LLaMA-Pro-style deeper copy of `model`: new decoder blocks, each a copy of the block it follows with
    `o_proj` and `down_proj` (and their biases) zeroed, so every new block is the identity at init.

    Args:
        model: a Llama / Qwen2 / Qwen3 / Mistral causal LM (not modified).
        num_new_layers: how many blocks to add; by default spread evenly (one after every `L / num_new_layers`
            original blocks, as in LLaMA-Pro).
        positions: or exactly where: indices of the original blocks after which a new block goes (a repeated
            index adds several there). Give either argument, or both if they agree.
    """
    _check_model(model, "grow_depth")
    config = _clean_config(model)
    num_layers = config.num_hidden_layers
    if positions is None:
        if not isinstance(num_new_layers, int) or num_new_layers < 1:
            raise ValueError(f"grow_depth: num_new_layers={num_new_layers!r}; use an int >= 1 (or give positions).")
        if num_new_layers > num_layers:
            positions = sorted(i % num_layers for i in range(num_new_layers))
        else:
            positions = [(k + 1) * num_layers // num_new_layers - 1 for k in range(num_new_layers)]
    else:
        positions = sorted(int(p) for p in positions)
        if not positions or any(not 0 <= p < num_layers for p in positions):
            raise ValueError(f"grow_depth: positions={positions!r}; use indices in [0, {num_layers - 1}].")
        if num_new_layers is not None and num_new_layers != len(positions):
            raise ValueError(f"grow_depth: num_new_layers={num_new_layers} but {len(positions)} positions given.")
    # new order: each original layer i, followed by one copy of it per occurrence of i in `positions`
    order: list[tuple[int, bool]] = []
    for i in range(num_layers):
        order.append((i, False))
        order += [(i, True)] * positions.count(i)
    config.num_hidden_layers = len(order)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == num_layers:
        config.layer_types = [layer_types[i] for i, _ in order]
    prefix, _ = find_decoder_layers(model)
    old = model.state_dict()
    state = {k: v for k, v in old.items() if not k.startswith(prefix + ".")}
    for new_i, (src, is_new) in enumerate(order):
        src_prefix, dst_prefix = f"{prefix}.{src}.", f"{prefix}.{new_i}."
        for key, w in old.items():
            if not key.startswith(src_prefix):
                continue
            rest = key[len(src_prefix):]
            w = w.clone()
            if is_new and (rest.startswith("self_attn.o_proj.") or rest.startswith("mlp.down_proj.")):
                w.zero_()
            state[dst_prefix + rest] = w
    return _build(model, config, state)
