"""The extra training text of the baselines that never sleep (`SleepConfig.method`), written by the model itself.

- `replay`: pseudo-rehearsal. Before session k, the model answers `replay_prompts` questions of every earlier
  session (the same prompts a sleep would replay: training questions, or document prefixes of documents-only
  sessions), greedily; the pairs join the session's training text. No answer is read from the data unless
  `replay_source: stored` (an upper bound: it keeps the old data).
- `dream_only`: before session k, the model writes `dream_args.num_dreams` dreams per document with
  `dream_args.dream_template` (SEAL-style self-written training data); they join the session's training text.
"""

from __future__ import annotations

from transformers import GenerationConfig

from ..dreaming.templates import build_dream_prompt
from ..eval.qa import has_chat_template
from ..generation.distributed import gathered_whole
from ..generation.hf import encode_prompts, generate_ids, pad_token_id, sample_continuations
from .data import qa_text, question_prompt, replay_items


def rehearsal_texts(cycle, k: int, seed: int) -> list[str]:
    """Training texts rehearsing earlier sessions, answered by the model as it is before session `k`."""
    cfg, tok = cycle.config, cycle.tokenizer
    items = replay_items(cycle.stream, k, cfg.replay_prompts, seed, cycle.replay_document_prompts)
    if cfg.replay_source == "model":
        prompts = [question_prompt(tok, it["text"], cycle.system_prompt) if it["kind"] == "question" else it["text"]
                   for it in items]
        ids = encode_prompts(tok, prompts, add_special_tokens=not has_chat_template(tok))
        with gathered_whole(cycle.model) as model:  # ZeRO-3: the whole model on every process
            completions = generate_ids(
                model, ids, pad_id=pad_token_id(tok), batch_size=cfg.eval_batch_size, do_sample=False,
                max_new_tokens=cfg.phase_fields("consolidation_args")["max_completion_length"], temperature=None,
                top_p=None, top_k=None,
            )
        answers = [tok.decode(c, skip_special_tokens=True).strip() for c in completions]
    else:
        answers = [it["answer"] for it in items]
    return [
        qa_text(tok, it["text"], answer, cycle.system_prompt) if it["kind"] == "question" else f"{it['text']} {answer}"
        for it, answer in zip(items, answers, strict=True)
    ]


def dream_texts(cycle, k: int, seed: int) -> list[str]:
    """Dreams the model writes about each document of session `k` (the `dream_only` arm's extra training text)."""
    cfg, tok = cycle.config, cycle.tokenizer
    dream = cfg.phase_fields("dream_args")
    chat = has_chat_template(tok)
    prompts = []
    for document in cycle.stream.sessions[k].documents:
        prompt = build_dream_prompt(dream.get("dream_template", "implications"), document, cycle.system_prompt, chat)
        prompts.append(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) if chat else prompt)
    ids = encode_prompts(tok, prompts, add_special_tokens=not chat)
    config = GenerationConfig(
        max_new_tokens=dream.get("max_completion_length", 96), do_sample=True, temperature=dream.get("temperature", 1.0),
        top_p=None, top_k=None, pad_token_id=pad_token_id(tok),
    )
    with gathered_whole(cycle.model) as model:  # ZeRO-3: the whole model on every process
        dreams = sample_continuations(
            model, ids, dream.get("num_dreams", 4), pad_id=pad_token_id(tok), eos_token_ids=[tok.eos_token_id],
            generation_config=config,
        )
    return [text for text in (tok.decode(d, skip_special_tokens=True).strip() for d in dreams) if text]
