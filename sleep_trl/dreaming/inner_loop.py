"""The dream reward's inner loop: fine-tune an isolated LoRA copy on one dream, measure tau (paper notes §4, step 3).

"Isolated copy" without copying the model: a fresh PEFT LoRA adapter is injected into the policy's own modules, on
top of its frozen weights; only the adapter trains. Because LoRA's B matrix starts at zero, the adapted model equals
the policy exactly until the adapter learns. For several dreams the adapter is injected once and reset to its
(seeded) initial values before each dream, so no dream ever reloads or copies the base model. On exit every module,
parameter, `requires_grad` flag, train/eval mode, active-adapter setting and `peft_config` attribute of the policy is
put back exactly as it was: the policy's weights are never touched (tests check it bit for bit).

This works whether the policy is a plain `PreTrainedModel`, a `PeftModel` with its own adapters (they stay active
under the inner adapter, so the copy is "the policy as it is, plus a dream") or a model carrying other trainable
modules (e.g. continuum-memory experts): all of them are frozen while the inner adapter trains.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Self

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from rich.progress import track

from ..generation.hf import pad_token_id
from .sft_data import batches, encode_example, token_nll_sum

INNER_ADAPTER_NAME = "sleep_dream_inner"
REWARD_TYPES = ("binary", "improvement")


@dataclass(frozen=True)
class InnerLoopConfig:
    """The isolated inner loop behind one dream's reward: the LoRA's shape, its optimiser, the reward rule.

    `DreamConfig.inner_loop()` builds it from the `inner_*` fields of a recipe; every function of this module takes
    it as one argument.

    Args:
        r, lora_alpha, lora_dropout: the inner LoRA's shape.
        target_modules: module names (PEFT matching: exact names or name suffixes); `None` = every linear layer of
            the blocks (`default_target_modules`).
        steps, learning_rate, batch_size, weight_decay: AdamW steps of SFT on the dream's sequences.
        max_length: truncation length of one training sequence.
        reward_type, threshold: see `compute_reward`.
        seed: seeds the adapter's initial values (the global RNG is left as it was).
    """

    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None
    steps: int = 10
    learning_rate: float = 1e-3
    batch_size: int = 8
    weight_decay: float = 0.0
    max_length: int = 512
    reward_type: str = "binary"
    threshold: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.reward_type not in REWARD_TYPES:
            raise ValueError(f"reward_type={self.reward_type!r} is not supported: use one of {REWARD_TYPES}.")


def _hf_model(model):
    """The transformers model inside a PeftModel (where LoRA layers live), or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def default_target_modules(model) -> list[str]:
    """Full names of every linear layer inside the model's blocks (what `all-linear` means in PEFT), resolved by hand
    so that layers already wrapped by the policy's own LoRA are named by their wrapper, never by their `base_layer`
    or `lora_A/B` internals, and the output head is left out."""
    hf = _hf_model(model)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    names = []
    for name, module in hf.named_modules():
        if module is head or ".lora_" in f".{name}" or name.endswith("base_layer") or ".base_layer." in name:
            continue
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            if isinstance(base, torch.nn.Linear) and base is not head:
                names.append(name)
        elif isinstance(module, torch.nn.Linear):
            names.append(name)
    if not names:
        raise ValueError("The model has no linear layer for the inner LoRA: set `inner_lora_target_modules`.")
    return names


class IsolatedAdapter:
    """Context manager: a fresh LoRA adapter inside `model` for the duration of the block, then exactly nothing.

    Args:
        model: the policy (plain transformers model or PeftModel). Pass the unwrapped module, not a DDP wrapper.
        config: the `InnerLoopConfig` (its `r`, `lora_alpha`, `lora_dropout`, `target_modules`, `seed` shape the
            adapter).
        adapter_name: the adapter's name; it must not clash with the policy's adapters.

    Inside the block: `parameters` are the only tensors with `requires_grad=True`, the model is in eval mode (no
    dropout, so a dream's reward is deterministic), and `reset()` puts the adapter back to its initial values.
    """

    def __init__(self, model, config: InnerLoopConfig | None = None, adapter_name: str = INNER_ADAPTER_NAME):
        self.model = model
        self.hf_model = _hf_model(model)
        self.config = config or InnerLoopConfig()
        self.adapter_name = adapter_name
        self.parameters: list[torch.nn.Parameter] = []
        self._initial: list[torch.Tensor] = []
        self._active = False

    # ---- enter -------------------------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        if self._active:
            raise RuntimeError("IsolatedAdapter is not re-entrant.")
        hf = self.hf_model
        if any(
            isinstance(m, BaseTunerLayer) and self.adapter_name in m._all_available_adapter_names()
            for m in hf.modules()
        ):
            raise ValueError(f"The model already has an adapter named {self.adapter_name!r}.")
        # Snapshot everything the injection can change.
        self._modules = list(self.model.named_modules())
        self._hf_modules = dict(hf.named_modules())
        self._flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self._modes = [(m, m.training) for _, m in self._modules]
        self._tuner_state = [
            (
                m,
                m._active_adapter if isinstance(m._active_adapter, str) else list(m._active_adapter),
                m._disable_adapters,
            )
            for m in hf.modules()
            if isinstance(m, BaseTunerLayer)
        ]
        self._had_peft_config = "peft_config" in hf.__dict__
        self._peft_config = hf.__dict__.get("peft_config")
        # PEFT's tuner finds an existing `peft_config` dict through the model and adds the new adapter to it in place.
        self._peft_config_keys = list(self._peft_config) if isinstance(self._peft_config, dict) else None

        cfg = self.config
        targets = cfg.target_modules
        if targets is None:
            targets = default_target_modules(self.model)
        elif not isinstance(targets, str):
            targets = list(targets)
        config = LoraConfig(
            r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets, bias="none"
        )
        self._active = True
        try:
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                # Expected when the policy is a PeftModel: the inner adapter joins its adapters until exit.
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                torch.manual_seed(cfg.seed)
                inject_adapter_in_model(config, hf, adapter_name=self.adapter_name)
            layers = [
                m
                for m in hf.modules()
                if isinstance(m, BaseTunerLayer) and self.adapter_name in m._all_available_adapter_names()
            ]
            # Activate the inner adapter on top of whatever adapters each layer already runs (the policy's own).
            previous = {id(m): (a if isinstance(a, list) else [a]) for m, a, _ in self._tuner_state}
            for layer in layers:
                active = [a for a in previous.get(id(layer), []) if a != self.adapter_name]
                layer.set_adapter([*active, self.adapter_name])
            self.parameters = [
                p for layer in layers for n, p in layer.named_parameters() if f".{self.adapter_name}." in f".{n}."
            ]
            if not self.parameters:
                raise ValueError(f"The inner LoRA matched no module (target_modules={cfg.target_modules!r}).")
            for p, _ in self._flags:
                p.requires_grad_(False)
            for p in self.parameters:
                p.requires_grad_(True)
            self._initial = [p.detach().clone() for p in self.parameters]
            self.model.eval()
        except BaseException:
            self._restore()
            raise
        return self

    def reset(self) -> None:
        """Put the adapter back to its initial values (B = 0: the adapted model equals the policy again)."""
        with torch.no_grad():
            for p, init in zip(self.parameters, self._initial, strict=True):
                p.copy_(init)
                p.grad = None

    # ---- exit --------------------------------------------------------------------------------------------------
    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        if not self._active:
            return
        hf = self.hf_model
        for module in list(hf.modules()):
            if isinstance(module, BaseTunerLayer) and self.adapter_name in module._all_available_adapter_names():
                module.delete_adapter(self.adapter_name)
        # Put back every module object that injection replaced (new LoRA wrappers around plain layers), parents first.
        for name, original in sorted(self._hf_modules.items(), key=lambda kv: kv[0].count(".") if kv[0] else -1):
            if not name:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = hf.get_submodule(parent_name) if parent_name else hf
            if parent._modules.get(child) is not original:
                parent._modules[child] = original
        for module, active, disabled in self._tuner_state:
            module._active_adapter = active
            module._disable_adapters = disabled
        if self._had_peft_config:
            hf.peft_config = self._peft_config
            if self._peft_config_keys is not None:
                for key in [k for k in self._peft_config if k not in self._peft_config_keys]:
                    del self._peft_config[key]
        elif "peft_config" in hf.__dict__:
            del hf.peft_config
        for p, flag in self._flags:
            p.requires_grad_(flag)
        for module, mode in self._modes:
            module.training = mode
        self.parameters, self._initial = [], []
        self._active = False
        if [n for n, _ in self.model.named_modules()] != [n for n, _ in self._modules]:
            raise RuntimeError(
                "The inner LoRA could not be removed cleanly: the module tree differs from the policy's."
            )


@dataclass
class DreamEvaluation:
    """Outcome of one dream's inner loop."""

    reward: float
    tau_before: float
    tau_after: float
    train_seconds: float
    eval_seconds: float
    num_tokens: int

    @property
    def seconds(self) -> float:
        return self.train_seconds + self.eval_seconds


def compute_reward(tau_before: float, tau_after: float, reward_type: str = "binary", threshold: float = 0.0) -> float:
    """`binary` (the paper): 1.0 when tau_after > tau_before + threshold, else 0.0. `improvement`: tau_after -
    tau_before (negative when the dream hurts)."""
    if reward_type == "binary":
        return 1.0 if tau_after > tau_before + threshold else 0.0
    if reward_type == "improvement":
        return float(tau_after - tau_before)
    raise ValueError(f"reward_type={reward_type!r} is not supported: use 'binary' or 'improvement'.")


def train_adapter(model, tokenizer, adapter: IsolatedAdapter, sequences: Sequence[str]) -> int:
    """`adapter.config.steps` AdamW steps of SFT on the dream's sequences (batches taken in order, cycling); returns
    the number of training tokens. Only `adapter.parameters` change."""
    cfg = adapter.config
    encoded = [encode_example(tokenizer, "", s, cfg.max_length) for s in sequences]
    encoded = [e for e in encoded if len(e[0]) > 1]
    if not encoded or cfg.steps <= 0:
        return sum(len(ids) - 1 for ids, _ in encoded)
    device = adapter.parameters[0].device
    data = batches(encoded, cfg.batch_size, pad_token_id(tokenizer), device)
    optimizer = torch.optim.AdamW(adapter.parameters, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    with torch.enable_grad():
        for step in range(cfg.steps):
            nll, count = token_nll_sum(model, data[step % len(data)])
            (nll / max(count, 1)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return sum(len(ids) - 1 for ids, _ in encoded)


def evaluate_dreams(
    model,
    tokenizer,
    tau: Callable,
    tasks: Sequence[Mapping],
    dreams: Sequence[Sequence[str]],
    tau_before: Sequence[float],
    config: InnerLoopConfig | None = None,
    progress: bool = False,
) -> list[DreamEvaluation]:
    """Reward of each dream: train a fresh isolated adapter on it, evaluate tau on its task, compare with `tau_before`.

    `dreams[i]` is the list of training sequences of dream i (`split_dream`), `tasks[i]` its task and
    `tau_before[i]` tau of the un-adapted model on that task. One adapter is injected for all dreams and reset
    between them; `progress` shows a rich progress bar (a dream's reward takes seconds on a CPU). A dream with no tokens cannot change the model: its reward is computed from tau_after = tau_before
    without running the inner loop.
    """
    if not (len(tasks) == len(dreams) == len(tau_before)):
        raise ValueError("evaluate_dreams needs one task and one tau_before per dream.")
    config = config or InnerLoopConfig()
    results: list[DreamEvaluation] = []
    if not dreams:
        return results

    def reward(before, after):
        return compute_reward(before, after, config.reward_type, config.threshold)

    work = list(zip(tasks, dreams, tau_before, strict=True))
    if progress:
        work = track(work, description="reward of each dream (inner LoRA loop + tau)", transient=True)
    with IsolatedAdapter(model, config) as adapter:
        for task, sequences, before in work:
            if not sequences:
                results.append(DreamEvaluation(reward(before, before), before, before, 0.0, 0.0, 0))
                continue
            adapter.reset()
            t0 = time.perf_counter()
            tokens = train_adapter(model, tokenizer, adapter, sequences)
            t1 = time.perf_counter()
            after = float(tau(model, tokenizer, task))
            t2 = time.perf_counter()
            results.append(DreamEvaluation(reward(before, after), before, after, t1 - t0, t2 - t1, tokens))
    return results
