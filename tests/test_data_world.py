"""The embedded world: deterministic, new, honest to evaluate (held-out phrasing, chance under 5%)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sleep_trl.data import ATTRIBUTES, KINDS, World, WorldConfig, make_world
from sleep_trl.rewards.qa import contains_match, normalize_answer


@pytest.fixture(scope="module")
def world():
    return make_world()


def test_same_seed_same_world_other_seed_other_world():
    assert make_world(seed=3).to_json() == make_world(seed=3).to_json()
    a, b = make_world(seed=3), make_world(seed=4)
    assert [f.entity for f in a.facts] != [f.entity for f in b.facts]
    assert [f.value for f in a.facts] != [f.value for f in b.facts]


def test_default_world_shape_and_columns(world):
    assert len(world.sessions) == 3
    for i, s in enumerate(world.sessions):
        assert len(s.facts) == 24
        assert {f.session for f in s.facts} == {i}
        assert s.eval_qa.column_names == ["question", "answer", "fact_id", "session", "entity", "attribute"]
        assert len(s.eval_qa) == 24
        assert len(s.train_sft) == 48
        row = s.train_sft[0]
        assert row["prompt"][0]["role"] == "user" and row["completion"][0]["role"] == "assistant"
        assert len(row["prompt"]) == 1 and len(row["completion"]) == 1
        assert set(s.documents.column_names) == {"text", "entity", "session"}
        assert set(s.dream_tasks.column_names) == {"context", "questions", "answers", "entity", "session"}
    fact_ids = [f.fact_id for f in world.facts]
    assert len(set(fact_ids)) == len(fact_ids) == 72


def test_every_rewrite_of_a_document_states_each_fact(world):
    for s in world.sessions:
        docs = Counter(r["entity"] for r in s.document_rows)
        assert set(docs.values()) == {world.config.doc_variants}
        for row in s.document_rows:
            for f in (f for f in s.facts if f.entity == row["entity"]):
                assert contains_match(row["text"], f.value) == 1.0, (row["text"], f.value)
        for task in s.dream_tasks:
            assert len(task["questions"]) == len(task["answers"]) >= 1
            for q, a in zip(task["questions"], task["answers"]):
                assert contains_match(task["context"], a) == 1.0
                assert normalize_answer(task["entity"]) in normalize_answer(q)


def test_names_are_unique_across_sessions_and_never_answers(world):
    entities = [{f.entity for f in s.facts} for s in world.sessions]
    for i in range(len(entities)):
        for j in range(i + 1, len(entities)):
            assert not entities[i] & entities[j]
    all_values = {normalize_answer(v) for space in world.spaces.values() for v in space}
    for entity in set().union(*entities):
        assert normalize_answer(entity) not in all_values
        for word in normalize_answer(entity).split():  # no invented word of a name is an answer either
            assert word not in all_values or word.isdigit()
    # Every answer of the default world is distinct: one constant answer can hit at most one question.
    values = [normalize_answer(f.value) for f in world.facts]
    assert len(set(values)) == len(values)


def test_answer_spaces_are_large_and_never_contain_each_other(world):
    for name in ATTRIBUTES:
        assert len(world.answer_space(name)) >= 40, name
    normalised = [normalize_answer(v) for space in world.spaces.values() for v in space]
    assert len(set(normalised)) == len(normalised), "a value appears in two answer spaces"
    known = set(normalised)
    for value in normalised:  # no value is a whole-word part of another value (contains-match could confuse them)
        words = value.split()
        for n in range(1, len(words)):
            for k in range(len(words) - n + 1):
                assert " ".join(words[k : k + n]) not in known, (value, words[k : k + n])


def test_evaluation_questions_are_held_out_phrasings(world):
    for spec in ATTRIBUTES.values():
        assert not set(spec.eval_questions) & set(spec.train_questions)
        assert not set(spec.eval_questions) & set(spec.documents)
        assert len(spec.documents) >= 3 and len(spec.train_questions) >= 2 and len(spec.eval_questions) >= 2
    for s in world.sessions:
        docs = " ".join(r["text"] for r in s.document_rows)
        for f in s.facts:
            assert f.eval_question not in f.train_questions
            assert normalize_answer(f.eval_question) not in normalize_answer(docs)
            for question in (f.eval_question, *f.train_questions):
                assert contains_match(question, f.value) == 0.0, question  # no question gives its answer away
                assert normalize_answer(f.entity) in normalize_answer(question)


def _session_score(predictions, rows):
    return sum(contains_match(p, r["answer"]) for p, r in zip(predictions, rows)) / len(rows)


def test_guessing_scores_under_five_percent(world):
    rng = random.Random(0)
    for s in world.sessions:
        rows = s.eval_rows
        # A uniformly random value of the right attribute type, averaged over 200 draws per question.
        trials = [
            _session_score([rng.choice(world.answer_space(r["attribute"])) for r in rows], rows) for _ in range(200)
        ]
        assert sum(trials) / len(trials) < 0.05
        # Always the most frequent answer of the whole world (every answer occurs once, so any one of them).
        for constant, _ in Counter(f.value for f in world.facts).most_common(5):
            assert _session_score([constant] * len(rows), rows) < 0.05
        # Per attribute, the most frequent value among the other sessions (what earlier sessions could teach).
        others = [f for f in world.facts if f.session != s.index]
        mode = {a: Counter(f.value for f in others if f.attribute == a).most_common(1)[0][0] for a in ATTRIBUTES}
        assert _session_score([mode[r["attribute"]] for r in rows], rows) < 0.05
        # Repeating the question back.
        assert _session_score([r["question"] for r in rows], rows) == 0.0


def test_json_round_trip_keeps_every_dataset(world, tmp_path):
    again = World.from_json(world.to_json())
    assert again == world
    for a, b in zip(world.sessions, again.sessions):
        for name in ("documents", "train_sft", "eval_qa", "dream_tasks"):
            assert getattr(a, name).to_list() == getattr(b, name).to_list(), name
    assert again.answer_space("colour") == world.answer_space("colour")
    with pytest.raises(ValueError, match="format"):
        World.from_json('{"format": "something else"}')


def test_bad_config_is_refused_with_the_field_name():
    with pytest.raises(ValueError, match="facts_per_session"):
        make_world(facts_per_session=0)
    with pytest.raises(ValueError, match="train_questions_per_fact"):
        WorldConfig(train_questions_per_fact=5)
    with pytest.raises(KeyError, match="unknown attribute|Unknown attribute"):
        make_world().answer_space("shoe size")


def test_large_world_keeps_values_distinct_within_each_session():
    big = make_world(num_sessions=12, facts_per_session=40, seed=1)
    assert len(big.facts) == 480
    entities = [f.entity for f in big.facts]
    assert len({(e, f.attribute) for e, f in zip(entities, big.facts)}) == 480
    for s in big.sessions:
        per_space = Counter((ATTRIBUTES[f.attribute].space, f.value) for f in s.facts)
        assert max(per_space.values()) == 1
    assert {f.kind for f in big.facts} == set(KINDS)


def test_all_texts_covers_documents_questions_and_answers(world):
    texts = world.all_texts()
    f = world.facts[5]
    assert f.eval_question in texts and f.value in texts and f.train_questions[0] in texts
    assert world.sessions[1].document_rows[0]["text"] in texts


def test_trl_sft_trainer_learns_only_the_answer_of_each_pair(world, tmp_path):
    """`train_sft` is TRL's conversational prompt-completion format: the loss covers the answer, not the question."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from sleep_trl.tiny import cached_tiny

    path = cached_tiny(arch="llama", extra_texts=world.all_texts())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    dataset = world.sessions[0].train_sft.select(range(4))
    config = SFTConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, use_cpu=True, bf16=False,
        report_to=[], save_strategy="no", disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    for source, row in zip(dataset, trainer.train_dataset):
        learned = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
        text = tokenizer.decode(learned)
        assert text.strip() == source["completion"][0]["content"] + "<|im_end|>", text
    assert trainer.train().global_step == 1  # the extra columns (fact_id, session) do not get in the way


def test_world_seeding_dataset_puts_each_document_in_the_teachers_context(world):
    from sleep_trl.scripts.seed import world_seeding_dataset

    data = world_seeding_dataset(seed=0)
    assert set(data.column_names) == {"prompt", "teacher_prompt"}
    expected = sum(len([q for f in s.facts for q in f.train_questions]) + len({f.entity for f in s.facts})
                   for s in world.sessions)
    assert len(data) == expected
    for row in data:
        question = row["prompt"][0]["content"]
        teacher = row["teacher_prompt"][0]["content"]
        assert teacher.endswith("\n\n" + question) and len(teacher) > len(question) + 2
