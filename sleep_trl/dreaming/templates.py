"""Dream prompts: what the model is asked to write about a context, and how a dream becomes training text.

A dream (paper notes §4) is synthetic training data the model writes from a context C it just learned: the
implications of a passage, question-answer pairs about it, a rewrite, or more demonstrations of a few-shot task. The
prompt is one user message built from a template and C; `DreamTrainer` hands it to `GRPOTrainer` as a conversational
prompt (the tokenizer's chat template renders it), or as plain text when the tokenizer has no chat template.

Templates are ours (the paper does not publish its prompts). Any string holding a `{context}` placeholder works.
"""

from __future__ import annotations

DREAM_TEMPLATES: dict[str, str] = {
    "implications": (
        "Read the passage below. Then list the facts and implications that follow from it, one per line. "
        "Restate every name, place, number and relation in your own words, so that each line can be "
        "understood without the passage.\n\nPassage:\n{context}"
    ),
    "qa_pairs": (
        "Read the passage below. Then write questions with their answers that cover every fact in it, one pair "
        "per line, in the form 'Question: ... Answer: ...'.\n\nPassage:\n{context}"
    ),
    "rewrite": (
        "Rewrite the passage below in different words. Keep every fact, name and number.\n\nPassage:\n{context}"
    ),
    "demonstrations": (
        "Here are examples of a task. Write new examples of the same task, in exactly the same format, "
        "one per line.\n\nExamples:\n{context}"
    ),
}

DREAM_SPLITS = ("none", "lines", "paragraphs")


def resolve_template(template: str) -> str:
    """Return the template text for a built-in name (`implications`, `qa_pairs`, `rewrite`, `demonstrations`) or a
    custom template string; a custom string must contain `{context}`."""
    if template in DREAM_TEMPLATES:
        return DREAM_TEMPLATES[template]
    if "{context}" not in template:
        raise ValueError(
            f"dream_template={template!r} is neither a built-in template ({', '.join(DREAM_TEMPLATES)}) nor a string "
            "containing the '{context}' placeholder. Pass a built-in name or add '{context}' to your template."
        )
    return template


def build_dream_prompt(
    template: str, context: str, system_prompt: str | None = None, conversational: bool = True
) -> list[dict[str, str]] | str:
    """The prompt that asks for one dream about `context`.

    Args:
        template: a built-in template name or a string with a `{context}` placeholder.
        context: the passage or demonstrations the model dreams about.
        system_prompt: an optional system message (conversational prompts only; prepended to plain prompts).
        conversational: `True` returns chat messages (rendered by the tokenizer's chat template at generation);
            `False` returns a plain string, for tokenizers without a chat template.
    """
    text = resolve_template(template).replace("{context}", context)
    if not conversational:
        return f"{system_prompt}\n\n{text}\n\n" if system_prompt else f"{text}\n\n"
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": text})
    return messages


def split_dream(text: str, mode: str = "none") -> list[str]:
    """Cut a dream into the training sequences of the inner loop (and of the importance score).

    `none`: the whole dream is one sequence. `lines`: every non-empty line is its own sequence (a list of
    implications, one per line, as in SEAL's knowledge-incorporation setup). `paragraphs`: blocks separated by blank
    lines. Whitespace-only pieces are dropped, so an empty dream gives no sequence at all.
    """
    if mode == "none":
        pieces = [text]
    elif mode == "lines":
        pieces = text.splitlines()
    elif mode == "paragraphs":
        pieces = text.split("\n\n")
    else:
        raise ValueError(f"dream_split={mode!r} is not supported: use one of {DREAM_SPLITS}.")
    return [p.strip() for p in pieces if p.strip()]


def completion_text(completion) -> str:
    """The text of a completion as GRPOTrainer hands it to reward functions (a string or assistant messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, list):  # content blocks
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return content or ""
    raise TypeError(f"Unexpected completion format: {type(completion).__name__}.")
