"""What each phase of the cycle trains on, built from a session of the stream (`sleep_trl.data.sessions`)."""

from __future__ import annotations

import math
import random
import re

from datasets import Dataset

from ..data.sessions import SessionData, SessionStream
from ..eval.qa import PLAIN_QA_TEMPLATE, has_chat_template, plain_qa_text


def system_messages(system_prompt: str | None) -> list[dict]:
    """The system turn every conversation of a run starts with: none (`None`: the chat template's own default, e.g.
    SmolLM2's "You are a helpful AI assistant named SmolLM, trained by Hugging Face"), or the given text (`""`: an
    empty system turn, which keeps such a default out of every training text and prompt)."""
    return [] if system_prompt is None else [{"role": "system", "content": system_prompt}]


def qa_text(tokenizer, question: str, answer: str, system_prompt: str | None = None) -> str:
    """A question/answer pair as training text: through the chat template, or in the plain QA layout."""
    if has_chat_template(tokenizer):
        messages = system_messages(system_prompt) + [
            {"role": "user", "content": question}, {"role": "assistant", "content": answer}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return plain_qa_text(question, answer)


def question_prompt(tokenizer, question: str, system_prompt: str | None = None) -> str:
    """A question as a generation prompt, exactly as `qa_text` (and the evaluation) asks it."""
    if has_chat_template(tokenizer):
        messages = system_messages(system_prompt) + [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return PLAIN_QA_TEMPLATE.format(question=question)


def wake_texts(session: SessionData, tokenizer, system_prompt: str | None = None) -> list[str]:
    """The session's documents as plain text, plus its training question/answer pairs (language modelling over
    both: the documents carry the facts, the pairs teach answering them)."""
    return list(session.documents) + [
        qa_text(tokenizer, qa["question"], qa["answer"], system_prompt) for qa in session.train_qa
    ]


_SENTENCE_START = re.compile(r"(?<=[.!?])\s+(?=\S)")
_WORD = re.compile(r"\S+")
# A prefix holds at least this many words (or the whole first sentence): enough to say which document it is.
MIN_PREFIX_WORDS = 6


def document_prefixes(document: str, num: int) -> list[str]:
    """Up to `num` prefixes of a document: during sleep the teacher continues each, so what the document said is
    consolidated even where no question asks about it. With at least `num` sentence starts the cuts are sentence
    starts spread evenly (the first one holds the first sentence); with fewer (real passages often have 3-6 long
    sentences, so sentence cuts left most of a passage unread by any continuation) the cuts are word starts spread
    evenly from the first sentence (or the first `MIN_PREFIX_WORDS` words, if shorter) to the end."""
    if num <= 0:
        return []
    starts = [m.end() for m in _SENTENCE_START.finditer(document)]
    if len(starts) >= num:
        picks = sorted({starts[round(i * (len(starts) - 1) / max(num - 1, 1))] for i in range(num)})
    else:
        words = [m.start() for m in _WORD.finditer(document)]
        anchor = min(starts[0] if starts else len(document),
                     words[MIN_PREFIX_WORDS] if len(words) > MIN_PREFIX_WORDS else len(document))
        cuts = [w for w in words if w >= anchor]
        picks = sorted({cuts[round(i * (len(cuts) - 1) / max(num - 1, 1))] for i in range(min(num, len(cuts)))})
    return [document[:cut].rstrip() for cut in picks]


def session_prompts(session: SessionData, documents_per_prompt: int) -> list[dict]:
    """Everything the sleeping model is asked about one session: its training questions, its probes, and
    `documents_per_prompt` sentence-start prefixes of each document. Each item: `{"kind", "text", "context"}`."""
    items = [{"kind": "question", "text": qa["question"], "context": qa.get("context")} for qa in session.train_qa]
    items += [{"kind": "question", "text": p["question"], "context": p.get("context")} for p in session.probes]
    for document in session.documents:
        items += [{"kind": "document", "text": prefix, "context": document}
                  for prefix in document_prefixes(document, documents_per_prompt)]
    return items


def replay_items(stream: SessionStream, k: int, per_session: int, seed: int, document_prompts: int = 4) -> list[dict]:
    """The items of earlier sessions a sleep (or the replay arm) rehearses before session `k`: `per_session` of each
    earlier session's training questions (with their stored answers), or of its document prefixes
    (`document_prompts` per document) when it has none (with the rest of the document as the stored answer)."""
    rng = random.Random(seed)
    items = []
    for j in range(k):
        earlier = stream.sessions[j]
        pool = session_prompts(earlier, 0 if earlier.train_qa else document_prompts)
        if earlier.train_qa:
            pool = [dict(item, answer=qa["answer"]) for item, qa in zip(pool, earlier.train_qa, strict=False)]
        else:
            pool = [dict(item, answer=item["context"][len(item["text"]):].strip()) for item in pool]
        items += rng.sample(pool, min(per_session, len(pool)))
    return items


def consolidation_prompts(
    stream: SessionStream,
    k: int,
    replay_per_session: int,
    seed: int,
    with_context: bool,
    tokenizer,
    system_prompt: str | None = None,
    document_prompts: int = 0,
    replay_document_prompts: int = 4,
    new_share: float | None = None,
) -> Dataset:
    """Prompts (rendered strings) for consolidating session `k`: its own (`session_prompts`), plus
    `replay_per_session` of every earlier session (its training questions, or, for a documents-only session, its
    document prompts, `replay_document_prompts` per document); the teacher writes every answer, replayed ones
    included.

    With `with_context`, the session's own rows get a `teacher_prompt` holding their document before the question
    (the knowledge is in the teacher's context, not in its weights); replayed rows keep the bare prompt. Replayed
    rows are marked `replay`: the trainer teaches them from the long-term memory as it was before this sleep, not
    from the awake model, whose fast memory may have overwritten the old answers.

    With `new_share`, the session's own rows are repeated (the fewest whole times) until they make at least that
    share of the rows, so that a sleep late in a long stream, whose replayed rows grow with every earlier session,
    still spends that share of its batches on what it is there to consolidate.
    """
    rows = []

    def render(item: dict, context: str | None = None) -> str:
        if item["kind"] == "document":  # the teacher continues the passage, as it learnt it: plain text
            return f"{context}\n\n{item['text']}" if context else item["text"]
        question = f"{context}\n\n{item['text']}" if context else item["text"]
        return question_prompt(tokenizer, question, system_prompt)

    for item in session_prompts(stream.sessions[k], document_prompts):
        teacher = render(item, item["context"]) if with_context and item["context"] else render(item)
        rows.append({"prompt": render(item), "teacher_prompt": teacher, "replay": False})
    replayed = [{"prompt": render(item), "teacher_prompt": render(item), "replay": True}
                for item in replay_items(stream, k, replay_per_session, seed, replay_document_prompts)]
    rows = rows * new_row_repeats(len(rows), len(replayed), new_share) + replayed
    data = Dataset.from_list(rows)
    return data if with_context else data.remove_columns("teacher_prompt")


def new_row_repeats(num_new: int, num_replayed: int, share: float | None) -> int:
    """How often each new row is repeated so that new rows make at least `share` of all rows (1 without a share)."""
    if share is None or num_new == 0 or num_replayed == 0:
        return 1
    # r new copies give r * n / (r * n + m) >= share  <=>  r >= share * m / ((1 - share) * n); the epsilon keeps a
    # ratio that is whole up to rounding (0.5 * 54 / (0.5 * 54)) from being rounded up to the next repeat
    return max(1, math.ceil(share * num_replayed / ((1.0 - share) * num_new) - 1e-9))


def length_grouped_order(lengths: list[int], num_rows: int, batch_size: int, seed: int) -> list[int]:
    """Row order for `num_rows` training rows (epochs of the texts, the last one partial) whose batches hold texts of
    similar length: each epoch is shuffled, sorted by length (stable, so equal lengths stay shuffled), cut into
    batches, and the batches shuffled. Written here because transformers' `LengthGroupedSampler` groups inside
    mega-batches of `min(n // (4 * batch), 50)` batches, which for a session's few dozen texts is one batch: no
    grouping at all. Measured on the embedded world with SmolLM2 (documents of ~52 tokens, question/answer pairs of
    ~29): random batches pad to 1.51x the real tokens, grouped ones to 1.09x."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < num_rows:
        epoch = list(range(len(lengths)))
        rng.shuffle(epoch)
        epoch.sort(key=lambda i: lengths[i])
        batches = [epoch[b : b + batch_size] for b in range(0, len(epoch), batch_size)]
        rng.shuffle(batches)
        order += [i for batch in batches for i in batch]
    return order[:num_rows]
