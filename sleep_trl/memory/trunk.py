"""`FrozenTrunk`: the decoder layers below the memory served from a cache while a phase re-reads the same texts.

When the memory sits only in decoder layers `L..` (`MemoryConfig.layers`) and nothing below layer `L` learns, the
hidden state entering layer `L` for a text depends on that text's tokens alone and no training step changes it. A
wake reads each of its texts once per epoch (the main job: 8 epochs), and a sleep distils on sequences its teacher
has just generated, so the forward of layers `0..L-1` is work already done; the backward pass stops at layer `L` by
itself (nothing below it needs a gradient).

Inside `with FrozenTrunk(model, L):` each forward of the backbone looks up, per row, the states entering layer `L`,
skips layers `0..L-1` and runs the rest as usual. The states come from the model's own layers: computed the first
time a text is seen (one batched no-grad pass that stops at layer `L`), or recorded while the model generated the
text (`recording()`: the prefill and every decoding step pass through layer `L` anyway). Results are the full
forward's, to float rounding: loss, logits, the memory's gradients.

Which rows are served: each row's tokens must be one contiguous run of the attention mask. Left or right padding
both qualify for rotary-position models (Llama, Qwen2, Mistral...: attention depends on relative positions only, so a
row's states do not depend on where its run starts); models with absolute positions qualify when the run starts at
0. Given `position_ids` must count from 0 along the run. Any other forward (packed rows, a KV cache, generation,
caller-given `inputs_embeds`, a parameter below `L` that requires a gradient, dropout below `L`) runs in full,
uncached.

A generated sequence's last token is never fed back to the model, so its states are not recorded. With
`last_position_unused=True` (the caller never reads the output at a row's last token: a causal-LM or distillation
loss, where that position predicts past the row) such rows are still served, the last position's input set to zero.

Written here rather than taken from a library: PEFT and TRL have no activation cache for frozen lower layers (TRL's
prefix sharing, `trainers/prefix_sharing.py`, shares prompts within a batch, not states across steps).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Self

import torch
from torch import nn
from trl.trainer.utils import pad

from .host import find_decoder_layers

_ACTIVE: dict[int, FrozenTrunk] = {}  # id(backbone) -> the trunk serving it


class _ReachedLayer(Exception):
    """Raised by the pre-hook of layer `L` to end a capture forward once the states entering it are known."""


def _key(tokens: torch.Tensor) -> bytes:
    return tokens.to("cpu", torch.long).numpy().tobytes()


class FrozenTrunk:
    """Serve decoder layers `0..first_layer-1` of `model` from a per-text cache (see the module docstring).

    Args:
        model: a Hugging Face causal LM (or its backbone's parent) whose decoder layers return a tensor.
        first_layer: the lowest layer that has anything to learn (the memory's lowest layer, `min(mem.layers)`).
            `0` makes the trunk a no-op.
        max_megabytes: cache budget; rows seen once it is full are computed each time (still exact).
        last_position_unused: serve rows whose states are known for every token but the last (see the module
            docstring); only for callers that never read the output at a row's last token.
    """

    def __init__(self, model: nn.Module, first_layer: int, max_megabytes: float = 1024.0,
                 last_position_unused: bool = False):
        name, self.layers = find_decoder_layers(model)
        self.backbone = model.get_submodule(name.rpartition(".")[0])
        self.first_layer = first_layer
        self.max_bytes = max_megabytes * 2**20
        self.last_position_unused = last_position_unused
        self.relative_positions = hasattr(self.backbone, "rotary_emb")
        self.cache: dict[bytes, torch.Tensor] = {}  # token prefix -> its states entering layer L, (tokens, hidden)
        self.cached_bytes = 0
        self.layer_runs = 0  # forwards of layer 0 (captures, generation, uncached forwards): what the cache saves
        self.served_rows = 0  # rows whose states came from the cache
        self._skip = False
        self._served: torch.Tensor | None = None  # the states the current forward was given
        self._capturing = False
        self._generation: dict | None = None  # what `recording()` has seen of the current generate call
        self._handles: list = []
        self._originals: list = []
        bottom = [self.backbone.get_input_embeddings(), *self.layers[:first_layer]]
        self._bottom_parameters = [p for m in bottom for p in m.parameters()]
        self.disabled = first_layer <= 0 or self._has_dropout(bottom)

    @staticmethod
    def _has_dropout(modules) -> bool:
        """Stochastic layers below `L` would make their states differ per step: then nothing is cached."""
        for m in modules:
            for sub in m.modules():
                p = getattr(sub, "p", None) if isinstance(sub, nn.Dropout) else getattr(sub, "attention_dropout", 0.0)
                if isinstance(p, (int, float)) and p > 0:
                    return True
        return False

    @staticmethod
    def active_for(model: nn.Module) -> FrozenTrunk | None:
        """The trunk currently serving `model`'s backbone, if any (for generation code that can record for it)."""
        if not _ACTIVE:
            return None
        name, _ = find_decoder_layers(model)
        return _ACTIVE.get(id(model.get_submodule(name.rpartition(".")[0])))

    # ------------------------------------------------------------------ context
    def __enter__(self) -> Self:
        if id(self.backbone) in _ACTIVE:  # another trunk already serves this model: this one stays out of its way
            self.disabled = True
        if self.disabled:
            return self
        self._handles += [
            self.backbone.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            self.backbone.register_forward_hook(self._post_hook, always_call=True),
            self.layers[0].register_forward_pre_hook(self._count),
            self.layers[self.first_layer].register_forward_pre_hook(self._record, with_kwargs=True),
        ]
        for index, layer in enumerate(self.layers[: self.first_layer]):
            self._originals.append((layer, layer.__dict__.get("forward")))  # an instance forward (accelerate's hooks)
            layer.forward = self._skippable(layer.forward, first=index == 0)
        _ACTIVE[id(self.backbone)] = self
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for layer, own in self._originals:
            if own is None:
                del layer.forward  # the instance attribute set in `__enter__`; the class's forward shows again
            else:
                layer.forward = own
        if _ACTIVE.get(id(self.backbone)) is self:
            del _ACTIVE[id(self.backbone)]
        self._handles, self._originals, self._skip, self._generation = [], [], False, None
        self.cache.clear()
        self.cached_bytes = 0

    def _skippable(self, forward, first: bool):
        def run(hidden_states, *args, **kwargs):
            if self._skip:
                # The first skipped layer hands on the served states themselves: some backbones change
                # `inputs_embeds` before the first layer (Gemma scales them, GPT-2 adds position embeddings).
                return self._served if first else hidden_states
            out = forward(hidden_states, *args, **kwargs)
            if not isinstance(out, torch.Tensor):  # this layer type returns a tuple: serve nothing from the cache
                warnings.warn(f"FrozenTrunk: {type(self.layers[0]).__name__} returns {type(out).__name__}, not a "
                              "tensor; the frozen layers run in full.", stacklevel=2)
                self.disabled = True
            return out

        return run

    def _count(self, module, args) -> None:
        if not self._skip:
            self.layer_runs += 1

    # ------------------------------------------------------------------ serving
    def _pre_hook(self, module, args, kwargs):
        self._skip = False
        if self._capturing or self.disabled or len(args) > 1 or (args and "input_ids" in kwargs):
            return None
        if args:  # GPT-2 style `self.transformer(input_ids, ...)`
            kwargs, args = {**kwargs, "input_ids": args[0]}, ()
        if self._generation is not None and self._generation_step(kwargs):
            return None
        if not self._cacheable(kwargs):
            return None
        ids = kwargs["input_ids"]
        spans = self._spans(ids, kwargs.get("attention_mask"), kwargs.get("position_ids"))
        if spans is None:
            return None
        self._served = self._states(ids, spans)
        kwargs = {**kwargs, "input_ids": None, "inputs_embeds": self._served, "use_cache": False}
        self._skip = True
        return args, kwargs

    def _post_hook(self, module, args, output) -> None:
        self._skip, self._served = False, None

    def _cacheable(self, kwargs) -> bool:
        if kwargs.get("input_ids") is None or kwargs.get("inputs_embeds") is not None:
            return False
        if any(kwargs.get(k) is not None for k in ("past_key_values", "cache", "cache_position")):
            return False
        return not any(p.requires_grad for p in self._bottom_parameters)

    def _spans(self, ids, mask, position_ids) -> list[tuple[int, int]] | None:
        """Each row's `(start, length)` if its tokens are one run of the mask this trunk can serve, else None."""
        rows, width = ids.shape
        if mask is None:
            spans = [(0, width)] * rows
        else:
            if mask.dim() != 2:
                return None
            mask = mask.bool().cpu()
            lengths = mask.sum(dim=1)
            starts = mask.int().argmax(dim=1)
            cols = torch.arange(width)[None, :]
            if not torch.equal(mask, (cols >= starts[:, None]) & (cols < (starts + lengths)[:, None])):
                return None
            spans = list(zip(starts.tolist(), lengths.tolist()))
        if any(n == 0 for _, n in spans):
            return None
        if position_ids is not None:
            if position_ids.shape != (rows, width):
                return None
            positions = position_ids.cpu()
            if any(s or not torch.equal(positions[i, :n], torch.arange(n)) for i, (s, n) in enumerate(spans)):
                return None
        elif not self.relative_positions and any(s for s, _ in spans):
            return None
        return spans

    def _lookup(self, tokens: torch.Tensor) -> torch.Tensor | None:
        states = self.cache.get(_key(tokens))
        if states is None and self.last_position_unused and len(tokens) > 1:
            head = self.cache.get(_key(tokens[:-1]))
            if head is not None:
                states = torch.cat([head, head.new_zeros(1, head.shape[-1])])
        return states

    def _store(self, tokens: torch.Tensor, states: torch.Tensor, prefixes_from: int | None = None) -> None:
        """Keep `states` for `tokens` (and, with `prefixes_from`, for each of its prefixes from that length on, as
        views of the same tensor) while the budget allows."""
        size = states.numel() * states.element_size()
        if self.cached_bytes + size > self.max_bytes:
            return
        self.cached_bytes += size
        for n in range(prefixes_from or len(tokens), len(tokens) + 1):
            self.cache.setdefault(_key(tokens[:n]), states[:n])

    def _states(self, ids: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
        """`(rows, width, hidden)`: each row's states entering layer L on its run, zeros elsewhere."""
        tokens = [ids[i, s : s + n].cpu() for i, (s, n) in enumerate(spans)]
        rows = [self._lookup(t) for t in tokens]
        missing = [i for i, row in enumerate(rows) if row is None]
        self.served_rows += len(rows) - len(missing)
        for i, states in zip(missing, self._capture([tokens[i] for i in missing])):
            rows[i] = states
            self._store(tokens[i], states)
        out = rows[0].new_zeros(ids.shape[0], ids.shape[1], rows[0].shape[-1])
        for i, (row, (s, n)) in enumerate(zip(rows, spans)):
            out[i, s : s + n] = row
        return out.to(ids.device)

    @torch.no_grad()
    def _capture(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """The states entering layer L for each token sequence, by the model's own layers (one right-padded pass)."""
        if not tokens:
            return []
        device = self.backbone.get_input_embeddings().weight.device
        ids = pad(tokens, padding_value=0, padding_side="right")
        mask = pad([torch.ones_like(t) for t in tokens], padding_value=0, padding_side="right")
        seen: list[torch.Tensor] = []

        def stop(module, args, kwargs):
            seen.append((args[0] if args else kwargs["hidden_states"]).detach())
            raise _ReachedLayer

        handle = self.layers[self.first_layer].register_forward_pre_hook(stop, with_kwargs=True)
        self._capturing = True
        try:
            self.backbone(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        except _ReachedLayer:
            pass
        finally:
            self._capturing = False
            handle.remove()
        return [seen[0][i, : len(t)].cpu() for i, t in enumerate(tokens)]

    # ------------------------------------------------------------------ recording a generation
    @contextlib.contextmanager
    def recording(self):
        """Record the states of what the model generates inside this context (one `generate` call at a time, rows
        kept in order: plain sampling or greedy decoding, not beam search), so later forwards over the generated
        sequences are served. The prompt of each row and every fed token are kept, with their prefixes."""
        if self.disabled or not self._handles:
            yield
            return
        self._generation = {"rows": None, "states": None, "armed": False}
        try:
            yield
            self._finish_generation()
        finally:
            self._generation = None

    def repeat_generation(self, index) -> None:
        """In `recording()`, after a prefill of distinct prompts whose KV cache the caller reorders along the batch
        (`cache.reorder_cache(index)`, to sample several rows from one read of a prompt): the rows recorded so far
        follow the same `index`, so the decoding steps that come are recorded against the right prompts."""
        gen = self._generation
        if gen is None or gen["rows"] is None:
            return
        index = [int(i) for i in index]
        gen["rows"] = [list(gen["rows"][i]) for i in index]
        gen["states"] = [list(gen["states"][i]) for i in index]
        if gen.get("real") is not None:
            gen["real"] = gen["real"][index]

    def _generation_step(self, kwargs) -> bool:
        """In `recording()`: note a generate forward (prefill or decoding step) so `_record` keeps its states."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        ids = kwargs.get("input_ids")
        if cache is None or ids is None or kwargs.get("inputs_embeds") is not None:
            return False
        gen = self._generation
        if cache.get_seq_length() == 0:  # a prefill: a new generate call starts
            self._finish_generation()
            mask = kwargs.get("attention_mask")
            real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            gen["rows"] = [[ids[i, real[i]].cpu()] for i in range(ids.shape[0])]
            gen["real"] = real.cpu()
            gen["states"] = [[] for _ in range(ids.shape[0])]
        elif gen["rows"] is not None and ids.shape == (len(gen["rows"]), 1):
            for i, row in enumerate(gen["rows"]):
                row.append(ids[i].cpu())
            gen["real"] = None
        else:
            return False
        gen["armed"] = True
        return True

    def _record(self, module, args, kwargs) -> None:
        gen = self._generation
        if gen is None or not gen["armed"] or self._skip or self._capturing:
            return
        gen["armed"] = False
        hidden = (args[0] if args else kwargs["hidden_states"]).detach().cpu()
        for i, states in enumerate(gen["states"]):
            states.append(hidden[i, gen["real"][i]] if gen["real"] is not None else hidden[i])

    def _finish_generation(self) -> None:
        gen = self._generation
        if gen is None or gen["rows"] is None:
            return
        for row, states in zip(gen["rows"], gen["states"]):
            if len(states) == len(row):  # every fed piece was seen at layer L
                self._store(torch.cat(row), torch.cat(states), prefixes_from=len(row[0]))
        gen["rows"] = gen["states"] = None
