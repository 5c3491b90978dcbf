"""Tiny, locally built tokenizers and causal LMs (Llama / Qwen2) for tests, recipes and examples.

Nothing here touches the Hugging Face Hub: the tokenizer is trained on an embedded corpus with the `tokenizers`
library (byte-level BPE, so any text is encodable), the models are built from a config and saved with
`save_pretrained`, and every trainer in sleep-trl accepts the saved directory as a model path.

Attention head dimension defaults to 32: vLLM's CPU backend rejects head dims below 32.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]

# A small, varied English corpus: enough for byte-level BPE merges that cover everyday words, so tokenized text is
# short. The fictional-world generator's own words are added on top (see `build_tokenizer(extra_texts=...)`).
_EMBEDDED_CORPUS = """
The quick brown fox jumps over the lazy dog. A model that learned something new while awake goes to sleep.
During sleep it consolidates memories into long term capacity and then it dreams about what it learned.
Question: What is the capital of the country? Answer: The capital is a city in the north of the country.
She was born in a small town near the river and later moved to the city where she worked as a teacher.
He founded the company in the spring, and the company makes boats, clocks, bread, paper and glass.
The mountain is tall and cold; the lake beside it is deep, blue and quiet. The forest is green in summer.
Who wrote the book? Where does the painter live? When was the bridge built? Which color does she like?
What does the engineer build? What is the favourite food of the doctor? How old is the old castle?
One two three four five six seven eight nine ten eleven twelve twenty thirty forty fifty hundred.
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June July.
red orange yellow green blue purple violet black white grey silver gold brown pink amber teal crimson.
The scientist studies stars, the farmer grows wheat, the sailor crosses the sea, the baker bakes bread.
Implications: if the river floods, the town is wet. Rewrite: the town near the river was flooded.
Let us write questions and answers about the passage so that we remember every fact in it.
""".strip()


def build_tokenizer(vocab_size: int = 1024, extra_texts: list[str] | None = None):
    """Train a byte-level BPE tokenizer with a ChatML-style chat template and return a `PreTrainedTokenizerFast`.

    Args:
        vocab_size: target vocabulary size (special tokens included).
        extra_texts: more training text (e.g. the documents of a benchmark world) so its words tokenize compactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = _EMBEDDED_CORPUS.splitlines() + list(extra_texts or [])
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(
    tokenizer,
    arch: str = "qwen2",
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    vocab_size: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = True,
    seed: int = 0,
):
    """Build a randomly initialised `Qwen2ForCausalLM` or `LlamaForCausalLM` matching `tokenizer`.

    `vocab_size` defaults to `len(tokenizer)`; pass a larger value to pad the embedding table (as real checkpoints
    do, e.g. 151936 vs 152064 rows), which the trainers handle by using the tokenizer's length.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    head_dim = hidden_size // num_attention_heads
    if head_dim < 32:
        raise ValueError(
            f"hidden_size / num_attention_heads = {head_dim}: use a head dim of at least 32 (vLLM's CPU backend "
            "rejects smaller ones). Raise `hidden_size` or lower `num_attention_heads`."
        )
    common = dict(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    if arch == "qwen2":
        config, model_cls = Qwen2Config(**common, use_sliding_window=False), Qwen2ForCausalLM
    elif arch == "llama":
        config, model_cls = LlamaConfig(**common, head_dim=head_dim), LlamaForCausalLM
    else:
        raise ValueError(f"arch={arch!r} is not supported: use 'qwen2' or 'llama'.")
    torch.manual_seed(seed)
    # The class constructor, not `from_config`: under an active DeepSpeed ZeRO-3 config `from_config` would build a
    # partitioned model, and these models are built to be saved whole.
    model = model_cls(config).to(torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny(
    directory: str | os.PathLike,
    arch: str = "qwen2",
    tokenizer=None,
    extra_texts: list[str] | None = None,
    tokenizer_vocab_size: int = 1024,
    **model_kwargs,
) -> Path:
    """Build a tiny tokenizer + model and `save_pretrained` both into `directory`; return the path."""
    directory = Path(directory)
    tokenizer = tokenizer or build_tokenizer(vocab_size=tokenizer_vocab_size, extra_texts=extra_texts)
    model = build_model(tokenizer, arch=arch, **model_kwargs)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def cached_tiny(
    arch: str = "qwen2", cache_dir: str | os.PathLike | None = None, extra_texts: list[str] | None = None, **kwargs
) -> Path:
    """Like `save_tiny`, into a cache directory keyed by the arguments; built once, reused afterwards."""
    key = json.dumps({"arch": arch, "extra": extra_texts, **kwargs}, sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    root = Path(cache_dir or os.environ.get("SLEEP_TRL_CACHE", Path.home() / ".cache" / "sleep_trl"))
    path = root / "tiny" / f"{arch}-{digest}"
    if (path / "config.json").exists():
        return path
    import time

    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    # Under `accelerate launch` every process asks at once. `save_pretrained` writes only on the main process, so the
    # local main process builds (under a lock, against other launches) and the others wait for the folder.
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        deadline = time.monotonic() + 600
        while not (path / "config.json").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"Waited 10 minutes for the local main process to build {path}.")
            time.sleep(0.5)
        return path
    with FileLock(str(path) + ".lock"):
        if not (path / "config.json").exists():
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            save_tiny(tmp, arch=arch, extra_texts=extra_texts, **kwargs)
            os.replace(tmp, path)
    return path
