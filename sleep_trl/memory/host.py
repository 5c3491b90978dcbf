"""What the continuum memory needs to know about a host model: its text config, its decoder layers, its MLP form.

Kept apart from the memory itself so that attaching, saving, exporting and growing can all read the host without
importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# (input projection(s), output projection) names of the MLP forms we know, checked in this order.
_GATED_FORMS = [("gate_proj", "up_proj", "down_proj")]
_PLAIN_FORMS = [("fc1", "fc2"), ("dense_h_to_4h", "dense_4h_to_h"), ("c_fc", "c_proj"), ("up_proj", "down_proj")]
_ACT_ATTRS = ("act_fn", "act", "activation_fn", "activation")


def text_config(model: nn.Module):
    """The text part of a model's config (multimodal configs nest it; plain causal LMs are their own)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no `config`: attach the memory to a Hugging Face model.")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of decoder layers (the `nn.ModuleList` whose blocks each have an `mlp`) and its name."""
    num_layers = getattr(text_config(model), "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(hasattr(b, "mlp") for b in module)
    ]
    exact = [c for c in candidates if len(c[1]) == num_layers]
    if exact or candidates:
        return (exact or candidates)[0]
    raise ValueError(
        f"Cannot find the decoder layers of {type(model).__name__}: expected an nn.ModuleList of blocks that each "
        "have an `mlp` module (as in Llama, Qwen2/3, Mistral, Gemma, Phi, GPT-NeoX, GPT-2)."
    )


@dataclass(frozen=True)
class MLPForm:
    """How a host MLP is built: which projections, gated or not, which activation attribute."""

    gated: bool
    up: str
    down: str
    gate: str | None
    act_attr: str
    conv1d: bool  # GPT-2 style `Conv1D` (weight stored as in x out)


def detect_mlp_form(mlp: nn.Module) -> MLPForm:
    """Recognise the form of a host MLP module; a clear error names the module class otherwise."""
    act_attr = next((a for a in _ACT_ATTRS if callable(getattr(mlp, a, None))), None)

    def has(name):
        return isinstance(getattr(mlp, name, None), nn.Module)

    form = None
    for gate, up, down in _GATED_FORMS:
        if has(gate) and has(up) and has(down):
            form = (True, up, down, gate)
            break
    if form is None:
        for up, down in _PLAIN_FORMS:
            if has(up) and has(down):
                form = (False, up, down, None)
                break
    if form is None or act_attr is None:
        raise ValueError(
            f"Cannot attach a continuum memory to MLP {type(mlp).__name__}: supported forms are gated "
            "(gate_proj/up_proj/down_proj + act_fn, as in Llama, Qwen2/3, Mistral, Gemma) and plain (fc1/fc2, "
            "dense_h_to_4h/dense_4h_to_h, c_fc/c_proj, up_proj/down_proj with an activation attribute)."
        )
    gated, up, down, gate = form
    conv1d = type(getattr(mlp, up)).__name__ == "Conv1D"
    return MLPForm(gated=gated, up=up, down=down, gate=gate, act_attr=act_attr, conv1d=conv1d)
