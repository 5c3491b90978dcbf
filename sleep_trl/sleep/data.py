"""What each phase of the cycle trains on, built from the embedded world's sessions."""

from __future__ import annotations

import random

from datasets import Dataset

from ..eval.qa import has_chat_template, plain_qa_text


def system_messages(system_prompt: str | None) -> list[dict]:
    """The system turn every conversation of a run starts with: none (`None`: the chat template's own default, e.g.
    SmolLM2's "You are a helpful AI assistant named SmolLM, trained by Hugging Face"), or the given text (`""`: an
    empty system turn, which keeps such a default out of every training text and prompt)."""
    return [] if system_prompt is None else [{"role": "system", "content": system_prompt}]


def wake_texts(session, tokenizer, system_prompt: str | None = None) -> list[str]:
    """The session's documents as plain text, plus its training question/answer pairs through the chat template
    (language modelling over both: the documents carry the facts, the pairs teach answering them). Without a chat
    template the pairs take the plain QA layout the evaluation asks in."""
    texts = list(session.documents["text"])
    chat = has_chat_template(tokenizer)
    system = system_messages(system_prompt)
    for row in session.train_sft:
        if chat:
            texts.append(tokenizer.apply_chat_template(system + row["prompt"] + row["completion"], tokenize=False))
        else:
            texts.append(plain_qa_text(row["prompt"][0]["content"], row["completion"][0]["content"]))
    return texts


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


def _documents_by_entity(session) -> dict[str, str]:
    docs: dict[str, str] = {}
    for row in session.document_rows:
        docs.setdefault(row["entity"], row["text"])
    return docs


def consolidation_prompts(
    world, k: int, replay_per_session: int, seed: int, with_context: bool, system_prompt: str | None = None
) -> Dataset:
    """Prompts for consolidating session `k`: its training questions and one "tell me about" per entity, plus
    `replay_per_session` training questions of every earlier session (the teacher regenerates their answers).

    With `with_context`, the session's own rows get a `teacher_prompt` holding the entity's document before the
    question (the knowledge is in the teacher's context, not in its weights); replayed rows keep the bare prompt.
    Replayed rows are marked `replay`: the trainer teaches them from the long-term memory as it was before this
    sleep, not from the awake model, whose fast memory may have overwritten the old answers.
    """
    rng = random.Random(seed)
    session = world.sessions[k]
    docs = _documents_by_entity(session)
    rows = []
    system = system_messages(system_prompt)

    def add(question: str, context: str | None, replay: bool = False):
        prompt = system + [{"role": "user", "content": question}]
        teacher = system + [{"role": "user", "content": f"{context}\n\n{question}"}] if context else prompt
        rows.append({"prompt": prompt, "teacher_prompt": teacher, "replay": replay})

    for fact in session.facts:
        for question in fact.train_questions:
            add(question, docs[fact.entity] if with_context else None)
    for entity, doc in docs.items():
        add(f"Tell me about {entity}.", doc if with_context else None)
    for j in range(k):
        questions = [q for f in world.sessions[j].facts for q in f.train_questions]
        for question in rng.sample(questions, min(replay_per_session, len(questions))):
            add(question, None, replay=True)
    data = Dataset.from_list(rows)
    return data if with_context else data.remove_columns("teacher_prompt")
