"""Streams of new knowledge, one session after another: the embedded world, SQuAD-format JSON, or any dataset.

Everything the Sleep cycle learns comes as a `SessionStream`: an ordered list of `SessionData`, each with

- `documents`: text to learn (passages, manuals, the world's entity descriptions);
- `train_qa`: optional training question/answer pairs (`{"question", "answer", "context"?}`);
- `eval_qa`: held-out evaluation questions with one or more reference answers (`{"question", "answers", ...}`),
  used by no training signal;
- `probes`: extra prompts the sleeping model is asked (`{"question", "context"?}`: the world's "Tell me about X.");
- `contexts`: dreaming tasks (`{"context", "questions", "answers"}`, from the training questions).

Sources (`load_stream`):

- `None` / `"world"`: the embedded fictional world (`make_world`), the default.
- SQuAD-format JSON (`data -> paragraphs -> context, qas -> question, answers[]`), recognised by its structure:
  session k holds `passages_per_session` paragraphs of the k-th article (file order), every question of a passage
  held out for evaluation with all its distinct reference answers; `squad_train_questions` of each passage's
  questions may be moved to training instead (`0`: documents only, the knowledge-incorporation protocol of SEAL).
- Any table TRL users pass as `dataset_name` (local jsonl/json/parquet/csv file, `save_to_disk` folder, Hub id),
  one row per item, with the columns

  | column | meaning |
  |---|---|
  | `session` (required) | session key; sessions follow their first appearance (sorted when all keys are ints) |
  | `text` | a document to learn |
  | `prompt` + `completion` | a training pair, in TRL's SFT format (conversational or plain) |
  | `question` + `answer` or `answers` | a pair: training when `split` is `"train"`, evaluation otherwise |
  | `split` | `"train"` or `"eval"` for `question` rows (default `"eval"`) |
  | `context` | the passage a training question is about (for `wake: context`) |

Problems in the data (a missing column, an empty session, a question without an answer, evaluation questions for a
session that has nothing to learn, a file that does not exist) raise a `StreamError` naming the row and the fix,
before any model loads.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import SleepTrlError
from .loading import load_named_dataset
from .world import make_world


class StreamError(SleepTrlError):
    """The data cannot make a stream of sessions (named column, row or file, and the fix)."""


@dataclass
class SessionData:
    """One session of new knowledge (see the module docstring)."""

    name: str
    documents: list[str] = field(default_factory=list)
    train_qa: list[dict] = field(default_factory=list)
    eval_qa: list[dict] = field(default_factory=list)
    probes: list[dict] = field(default_factory=list)
    contexts: list[dict] = field(default_factory=list)

    @property
    def has_training_questions(self) -> bool:
        return bool(self.train_qa)


@dataclass
class SessionStream:
    """The sessions of a run, where they came from, and a fingerprint of their content (a run directory is tied to
    its data: a different stream pointed at it is refused, like a different configuration)."""

    sessions: list[SessionData]
    source: str
    kind: str

    def __len__(self) -> int:
        return len(self.sessions)

    def fingerprint(self) -> str:
        data = json.dumps([asdict(s) for s in self.sessions], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(data.encode()).hexdigest()[:16]

    def describe(self) -> dict:
        """What the report and the model card say about the data."""
        return {
            "source": self.source,
            "kind": self.kind,
            "fingerprint": self.fingerprint(),
            "sessions": [
                {"name": s.name, "documents": len(s.documents), "train_questions": len(s.train_qa),
                 "eval_questions": len(s.eval_qa)}
                for s in self.sessions
            ],
        }


# --------------------------------------------------------------------------------------------------------------------
# The embedded world
# --------------------------------------------------------------------------------------------------------------------


def world_stream(num_sessions: int = 3, facts_per_session: int = 24, seed: int = 0, doc_variants: int = 2):
    """The embedded fictional world as a stream: documents, the facts' training phrasings as pairs (each with its
    entity's document as context), held-out evaluation phrasings, one "Tell me about X." probe per entity."""
    world = make_world(num_sessions, facts_per_session, seed, doc_variants=doc_variants)
    sessions = []
    for s in world.sessions:
        first_doc: dict[str, str] = {}
        for row in s.document_rows:
            first_doc.setdefault(row["entity"], row["text"])
        train = [
            {"question": q, "answer": f.value, "context": first_doc[f.entity]} for f in s.facts for q in f.train_questions
        ]
        evaluation = [
            {**{k: v for k, v in row.items() if k != "answer"}, "answers": [row["answer"]]} for row in s.eval_rows
        ]
        sessions.append(SessionData(
            name=str(s.index),
            documents=[r["text"] for r in s.document_rows],
            train_qa=train,
            eval_qa=evaluation,
            probes=[{"question": f"Tell me about {entity}.", "context": doc} for entity, doc in first_doc.items()],
            contexts=list(s.dream_tasks),
        ))
    return SessionStream(sessions, source=f"embedded world (seed {seed})", kind="world")


# --------------------------------------------------------------------------------------------------------------------
# SQuAD
# --------------------------------------------------------------------------------------------------------------------


def is_squad(data) -> bool:
    """SQuAD's structure: `{"data": [{"paragraphs": [{"context": ..., "qas": [...]}]}]}`."""
    try:
        paragraph = data["data"][0]["paragraphs"][0]
        return isinstance(paragraph["context"], str) and isinstance(paragraph["qas"], list)
    except (KeyError, IndexError, TypeError):
        return False


def squad_stream(
    data: dict, num_sessions: int, passages_per_session: int = 4, train_questions: int = 0, source: str = "SQuAD"
) -> SessionStream:
    """Sessions from SQuAD-format data: session k = the first `passages_per_session` paragraphs of article k."""
    articles = [a for a in data["data"] if a.get("paragraphs")]
    if len(articles) < num_sessions:
        raise StreamError(
            f"{source} has {len(articles)} articles with paragraphs, fewer than `num_sessions` ({num_sessions}): one "
            "session per article. Lower `num_sessions`."
        )
    sessions = []
    for k, article in enumerate(articles[:num_sessions]):
        name = str(article.get("title", k))
        session = SessionData(name=name)
        for paragraph in article["paragraphs"][:passages_per_session]:
            context = paragraph["context"]
            session.documents.append(context)
            questions = []
            for qa in paragraph["qas"]:
                answers = list(dict.fromkeys(a["text"].strip() for a in qa.get("answers", []) if a["text"].strip()))
                if answers:
                    questions.append((qa["question"].strip(), answers, qa.get("id")))
            for q, answers, qid in questions[:train_questions]:
                session.train_qa.append({"question": q, "answer": answers[0], "context": context})
            for q, answers, qid in questions[train_questions:]:
                session.eval_qa.append({"question": q, "answers": answers, "id": qid, "session": k})
            trained = questions[:train_questions]
            if trained:
                session.contexts.append({"context": context, "questions": [q for q, _, _ in trained],
                                         "answers": [a for _, a, _ in trained]})
        sessions.append(session)
    return SessionStream(sessions, source=source, kind="squad")


# --------------------------------------------------------------------------------------------------------------------
# Any table
# --------------------------------------------------------------------------------------------------------------------


def _message_text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content", ""))
    raise StreamError(f"Expected text or chat messages, got {value!r}.")


def _answers(row: dict, index: int) -> list[str]:
    value = row.get("answers") or row.get("answer")
    refs = [value] if isinstance(value, str) else list(value or [])
    refs = [str(r).strip() for r in refs if str(r).strip()]
    if not refs:
        raise StreamError(
            f"Row {index} (session {row.get('session')!r}) has the question {row.get('question')!r} but no answer: "
            "give it an `answer` (text) or `answers` (a list of accepted texts)."
        )
    return refs


def table_stream(rows: Sequence[dict], columns: Sequence[str], source: str) -> SessionStream:
    """Sessions from a table with the columns of the module docstring."""
    if "session" not in columns:
        raise StreamError(
            f"{source} has no `session` column (columns: {sorted(columns)}). Every row needs the session it "
            "belongs to; see the schema in sleep_trl.data.sessions or the README."
        )
    if not set(columns) & {"text", "prompt", "question"}:
        raise StreamError(
            f"{source} has nothing to learn or ask: it needs a `text`, `prompt`/`completion` or `question` column "
            f"(columns: {sorted(columns)})."
        )
    keys = list(dict.fromkeys(r["session"] for r in rows))
    if keys and all(isinstance(k, int) for k in keys):
        keys.sort()
    by_key = {k: SessionData(name=str(k)) for k in keys}
    for i, row in enumerate(rows):
        session = by_key[row["session"]]
        if row.get("text"):
            session.documents.append(str(row["text"]))
        if row.get("prompt") is not None and row.get("completion") is not None:
            session.train_qa.append({"question": _message_text(row["prompt"]), "answer": _message_text(row["completion"]),
                                     **({"context": row["context"]} if row.get("context") else {})})
        elif row.get("question"):
            split = row.get("split") or "eval"
            if split not in ("train", "eval"):
                raise StreamError(f"Row {i}: `split` must be 'train' or 'eval', got {split!r}.")
            answers = _answers(row, i)
            if split == "train":
                session.train_qa.append({"question": row["question"], "answer": answers[0],
                                         **({"context": row["context"]} if row.get("context") else {})})
            else:
                extra = {k: v for k, v in row.items() if k not in ("text", "answer", "answers", "split", "prompt",
                                                                     "completion") and v is not None}
                session.eval_qa.append({**extra, "answers": answers})
    for session in by_key.values():
        if not session.documents and not session.train_qa:
            what = f" but {len(session.eval_qa)} evaluation questions" if session.eval_qa else ""
            raise StreamError(
                f"Session {session.name!r} of {source} has nothing to learn (no `text` and no training pair){what}: "
                "give it documents or training pairs, or drop its rows."
            )
        session.contexts = _contexts(session)
    return SessionStream(list(by_key.values()), source=source, kind="table")


def _contexts(session: SessionData) -> list[dict]:
    """Dreaming tasks of a table session: each document with the training questions about it (by `context`), or
    the session's documents together with all of them."""
    if not session.train_qa:
        return []
    by_context: dict[str, list[dict]] = {}
    for qa in session.train_qa:
        by_context.setdefault(qa.get("context") or "\n\n".join(session.documents), []).append(qa)
    return [{"context": c, "questions": [q["question"] for q in qas], "answers": [[q["answer"]] for q in qas]}
            for c, qas in by_context.items() if c]


# --------------------------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------------------------


def load_stream(
    dataset_name: str | None,
    *,
    num_sessions: int | None = None,
    facts_per_session: int = 24,
    doc_variants: int = 2,
    seed: int = 0,
    passages_per_session: int = 4,
    squad_train_questions: int = 0,
    dataset_config: str | None = None,
    dataset_split: str = "train",
) -> SessionStream:
    """The stream `dataset_name` names (see the module docstring); checked before any model loads."""
    if dataset_name in (None, "", "world"):
        return world_stream(num_sessions or 3, facts_per_session, seed, doc_variants)
    path = Path(dataset_name)
    if path.suffix == ".json" and path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise StreamError(f"`dataset_name` {dataset_name!r} is not valid JSON: {err}.") from None
        if is_squad(data):
            return squad_stream(data, num_sessions or 3, passages_per_session, squad_train_questions, source=str(path))
    hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", dataset_name) and not path.suffix
    if not path.exists() and not hub_id:
        raise StreamError(
            f"`dataset_name` {dataset_name!r} does not exist: give a local file (jsonl, json, parquet, csv), a folder "
            "saved with `save_to_disk`, or a Hub dataset id."
        )
    try:
        table = load_named_dataset(dataset_name, split=dataset_split, config=dataset_config)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds (missing file, no network, bad split)
        raise StreamError(f"`dataset_name` {dataset_name!r} could not be loaded: {type(err).__name__}: {err}") from None
    rows = list(table)
    if not rows:
        raise StreamError(f"`dataset_name` {dataset_name!r} holds no rows.")
    stream = table_stream(rows, table.column_names, source=dataset_name)
    if num_sessions and len(stream) != num_sessions:
        raise StreamError(
            f"{dataset_name} has {len(stream)} sessions but `num_sessions` is {num_sessions}: set `num_sessions: "
            f"{len(stream)}` (a table brings its own sessions)."
        )
    return stream
