"""Streams of sessions (the world, SQuAD-format JSON, any table) and what each phase of the cycle learns from them."""

from __future__ import annotations

import json

import pytest

from sleep_trl.data.sessions import StreamError, load_stream, world_stream
from sleep_trl.sleep.data import consolidation_prompts, document_prefixes, wake_texts


@pytest.fixture(scope="module")
def stream():
    return world_stream(num_sessions=3, facts_per_session=24, seed=0)


@pytest.mark.parametrize("with_context", [False, True])
def test_consolidation_prompts_hold_the_session_its_documents_and_marked_replay(stream, tiny_tokenizer, with_context):
    k, replay = 2, 5
    data = consolidation_prompts(stream, k, replay, seed=0, with_context=with_context, tokenizer=tiny_tokenizer,
                                 system_prompt="")
    session = stream.sessions[k]
    assert len(data) == len(session.train_qa) + len(session.probes) + k * replay
    assert sum(data["replay"]) == k * replay
    earlier = {qa["question"] for j in range(k) for qa in stream.sessions[j].train_qa}
    own = {qa["question"]: qa["context"] for qa in session.train_qa} | {p["question"]: p["context"]
                                                                        for p in session.probes}
    for row in data:
        assert row["prompt"].startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")  # an empty system turn
        assert row["prompt"].endswith("<|im_start|>assistant\n")
        question = row["prompt"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        if row["replay"]:
            assert question in earlier  # replay asks earlier sessions' training questions, never their answers
            if with_context:
                assert row["teacher_prompt"] == row["prompt"]  # old knowledge is not in the context
            continue
        assert question in own
        if with_context:
            assert f"{own[question]}\n\n{question}" in row["teacher_prompt"]
    assert ("teacher_prompt" in data.column_names) == with_context


def test_wake_texts_are_documents_and_pairs_without_the_templates_default_system_prompt(stream, tiny_tokenizer):
    session = stream.sessions[0]
    texts = wake_texts(session, tiny_tokenizer, system_prompt="")
    assert texts[: len(session.documents)] == session.documents
    pairs = texts[len(session.documents):]
    assert len(pairs) == len(session.train_qa)
    qa = session.train_qa[0]
    assert pairs[0] == (f"<|im_start|>system\n<|im_end|>\n<|im_start|>user\n{qa['question']}<|im_end|>\n"
                        f"<|im_start|>assistant\n{qa['answer']}<|im_end|>\n")


def test_document_prefixes_cut_at_sentence_starts():
    doc = "Alpha is a town. It has a river! The river is long? Yes. The end."
    assert document_prefixes(doc, 1) == ["Alpha is a town."]
    assert document_prefixes(doc, 3) == ["Alpha is a town.", "Alpha is a town. It has a river! The river is long?",
                                         "Alpha is a town. It has a river! The river is long? Yes."]
    assert document_prefixes("One sentence only.", 4) == [] and document_prefixes(doc, 0) == []


def test_document_prefixes_of_a_passage_with_few_sentences_cut_at_words_spread_to_the_end():
    """Real passages have few long sentences: the cuts then fall on word starts, evenly from the first six words
    to the last word, so the teacher's continuations reach every part of the passage."""
    doc = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16. Then w18 w19 w20 w21 w22."
    got = document_prefixes(doc, 4)
    # 16 candidate cuts (before word 7 ... before word 22), 4 of them evenly: before words 7, 12, 17 and 22
    assert got == ["w1 w2 w3 w4 w5 w6", "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11",
                   "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16.",
                   "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16. Then w18 w19 w20 w21"]
    assert all(doc.startswith(p) for p in got)
    # a short first sentence is the anchor when it is shorter than six words
    assert document_prefixes("Short one. " + " ".join(f"x{i}" for i in range(10)), 2)[0] == "Short one."


def squad_file(tmp_path, articles=3, paragraphs=3):
    data = {"version": "1.1", "data": [
        {"title": f"Article{a}", "paragraphs": [
            {"context": f"Article {a} paragraph {p} says the river is blue. It was built in 19{a}{p}.",
             "qas": [{"id": f"{a}{p}q{i}", "question": f"Question {i} about {a}.{p}?",
                      "answers": [{"text": f"answer {a}{p}{i}", "answer_start": 0},
                                  {"text": f"answer {a}{p}{i}", "answer_start": 0},  # duplicates are merged
                                  {"text": f"alt {a}{p}{i}", "answer_start": 0}]} for i in range(3)]}
            for p in range(paragraphs)]}
        for a in range(articles)]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data))
    return path


def test_squad_json_is_recognised_and_split_into_sessions(tmp_path, tiny_tokenizer):
    path = squad_file(tmp_path)
    s = load_stream(str(path), num_sessions=2, passages_per_session=2)
    assert s.kind == "squad" and len(s) == 2 and [x.name for x in s.sessions] == ["Article0", "Article1"]
    first = s.sessions[0]
    assert len(first.documents) == 2 and not first.train_qa  # documents only
    assert len(first.eval_qa) == 6 and first.eval_qa[0]["answers"] == ["answer 000", "alt 000"]
    with_train = load_stream(str(path), num_sessions=2, passages_per_session=2, squad_train_questions=1)
    session = with_train.sessions[1]
    assert len(session.train_qa) == 2 and len(session.eval_qa) == 4
    assert session.train_qa[0]["context"] == session.documents[0]
    assert with_train.fingerprint() != s.fingerprint()
    # a documents-only session is consolidated on its documents: the teacher continues sentence-start prefixes
    data = consolidation_prompts(s, 1, 2, seed=0, with_context=False, tokenizer=tiny_tokenizer, document_prompts=1)
    own = [r for r in data if not r["replay"]]
    assert [r["prompt"] for r in own] == [d.split(". ")[0] + "." for d in s.sessions[1].documents]
    assert sum(data["replay"]) == 2  # earlier sessions are replayed from their document prefixes too
    # the replay pool of a documents-only session holds `replay_document_prompts` prefixes of each of its documents
    pool = consolidation_prompts(s, 1, 100, seed=0, with_context=False, tokenizer=tiny_tokenizer,
                                 document_prompts=1, replay_document_prompts=3)
    replayed = [r["prompt"] for r in pool if r["replay"]]
    assert len(replayed) == 2 * 3 and all(any(d.startswith(p) for d in s.sessions[0].documents) for p in replayed)
    with pytest.raises(StreamError, match="fewer than `num_sessions`"):
        load_stream(str(path), num_sessions=5)


@pytest.mark.parametrize("share, repeats", [(0.5, 2), (0.75, 6), (0.2, 1)])
def test_new_prompt_share_repeats_the_new_sessions_rows_until_they_make_that_share(stream, tiny_tokenizer, share,
                                                                                   repeats):
    k, replay = 2, 48  # 96 replayed rows against the session's own 54 prompts
    plain = consolidation_prompts(stream, k, replay, seed=0, with_context=False, tokenizer=tiny_tokenizer)
    shared = consolidation_prompts(stream, k, replay, seed=0, with_context=False, tokenizer=tiny_tokenizer,
                                   new_share=share)
    own = [r["prompt"] for r in plain if not r["replay"]]
    assert len(own) == len(stream.sessions[k].train_qa) + len(stream.sessions[k].probes) == 54
    assert sum(shared["replay"]) == sum(plain["replay"]) == 96  # replayed rows are untouched
    assert [r["prompt"] for r in shared if not r["replay"]] == own * repeats
    # the fewest whole repeats that reach the share: 54 x repeats / (54 x repeats + 96) >= share > one repeat less
    assert 54 * repeats / (54 * repeats + 96) >= share
    assert repeats == 1 or 54 * (repeats - 1) / (54 * (repeats - 1) + 96) < share
    first = consolidation_prompts(stream, 0, replay, seed=0, with_context=False, tokenizer=tiny_tokenizer,
                                  new_share=share)
    assert len(first) == 54  # nothing replayed: nothing to repeat against


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_a_table_of_sessions_with_documents_pairs_and_several_answers(tmp_path):
    rows = [
        {"session": 1, "text": "Velmora sits on the river Ostrel."},
        {"session": 0, "text": "Tarnwick is a mountain village."},
        {"session": 0, "prompt": [{"role": "user", "content": "Where is Tarnwick?"}],
         "completion": [{"role": "assistant", "content": "in the mountains"}]},
        {"session": 0, "question": "What is Tarnwick?", "answers": ["a village", "a mountain village"]},
        {"session": 1, "question": "Which river?", "answer": "Ostrel", "split": "train"},
        {"session": 1, "question": "On what river is Velmora?", "answer": "Ostrel"},
    ]
    s = load_stream(write_jsonl(tmp_path / "s.jsonl", rows))
    assert [x.name for x in s.sessions] == ["0", "1"]  # integer keys are sorted
    zero, one = s.sessions
    assert zero.documents == ["Tarnwick is a mountain village."]
    assert zero.train_qa == [{"question": "Where is Tarnwick?", "answer": "in the mountains"}]
    assert zero.eval_qa[0]["answers"] == ["a village", "a mountain village"]
    assert one.train_qa[0]["question"] == "Which river?" and len(one.eval_qa) == 1
    assert one.contexts and one.contexts[0]["questions"] == ["Which river?"]  # dreaming tasks from its pairs


@pytest.mark.parametrize("rows, match", [
    ([{"text": "a"}], r"no `session` column \(columns: \['text'\]\)"),
    ([{"session": 0, "text": "a"}, {"session": 1, "question": "q?", "answer": "a"}],
     "Session '1' .* has nothing to learn .* but 1 evaluation questions"),
    ([{"session": 0, "text": "a"}, {"session": 0, "question": "q?"}], "Row 1 .* but no answer"),
    ([{"session": 0, "text": "a"}, {"session": 0, "question": "q?", "answer": "x", "split": "test"}], "`split`"),
])
def test_bad_tables_are_refused_naming_the_row_or_column(tmp_path, rows, match):
    with pytest.raises(StreamError, match=match):
        load_stream(write_jsonl(tmp_path / "bad.jsonl", rows))


def test_missing_files_and_empty_tables_are_clear_errors(tmp_path):
    with pytest.raises(StreamError, match="does not exist"):
        load_stream(str(tmp_path / "nothing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(StreamError, match="could not be loaded|holds no rows"):
        load_stream(str(tmp_path / "empty.jsonl"))
