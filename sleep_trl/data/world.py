"""An embedded, seeded world of fictional knowledge: the default stream of new facts for continual learning.

A pretrained model cannot already know these facts: every entity (people, companies, creatures, towns) has an invented
name built from syllables, and every attribute value is drawn at random from an answer space of at least 40 values,
so a model that guesses scores about 1 / |space| (measured in the tests: under 5%). Values are drawn without
replacement, so in the default world every answer is distinct: answering the most frequent value scores 1 / 24, and
values learned from earlier sessions never answer a new one. (A world larger than an answer space reuses values
across sessions, never within one.)

Three disjoint template families keep evaluation honest:
- documents state the facts (several phrasings per attribute, `doc_variants` rewrites per entity);
- training questions (SFT pairs, dream tasks) ask for them one way;
- evaluation questions ask for them another way, and are never used by any training signal.

Usage::

    world = make_world(num_sessions=3, facts_per_session=24, seed=0)
    session = world.sessions[0]
    session.documents      # Dataset: text, entity, session
    session.train_sft      # Dataset: prompt / completion as chat messages (TRL conversational prompt-completion)
    session.eval_qa        # Dataset: question, answer, fact_id, session, entity, attribute
    session.dream_tasks    # Dataset: context (a document), questions, answers, entity, session
    World.from_json(world.to_json()) == world

Generation is pure Python (`random.Random(seed)`), a few milliseconds for the default world.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from functools import cached_property

# ---------------------------------------------------------------------------------------------------------------------
# Answer spaces written out by hand (real words: professions, foods, ...). Each holds at least 40 values, no value is
# a whole-word part of another value in any space (checked in the tests), so contains-matching cannot confuse them.
# ---------------------------------------------------------------------------------------------------------------------

PROFESSIONS = (
    "astronomer", "beekeeper", "blacksmith", "bookbinder", "cartographer", "clockmaker", "cooper", "glassblower",
    "harpist", "locksmith", "stonemason", "miller", "potter", "saddler", "shipwright", "tailor", "tanner", "weaver",
    "falconer", "lighthouse keeper", "ferryman", "chemist", "surgeon", "architect", "botanist", "geologist",
    "librarian", "jeweller", "violinist", "sculptor", "carpenter", "fisherman", "brewer", "candlemaker", "cobbler",
    "dyer", "engraver", "farrier", "glazier", "herbalist", "innkeeper", "juggler", "lawyer", "midwife", "notary",
    "organist", "perfumer", "pilot", "plumber", "printer", "rope maker", "shepherd", "tutor", "vintner", "zoologist",
)
FOODS = (
    "barley soup", "plum cake", "pickled herring", "roast chestnuts", "lentil stew", "fig tart", "rye bread",
    "goat cheese", "leek pie", "honey cake", "oyster stew", "pear cider", "pumpkin bread", "onion tart",
    "cabbage rolls", "apple dumplings", "mushroom risotto", "walnut cake", "cherry pie", "bean chowder",
    "cheese scones", "potato pancakes", "carrot soup", "spiced lamb", "smoked trout", "ginger biscuits",
    "almond porridge", "blueberry muffins", "turnip mash", "sweetcorn fritters", "rhubarb crumble", "pea soup",
    "baked quince", "cinnamon buns", "oat cakes", "duck stew", "lemon tart", "sardine toast", "beetroot salad",
    "rice pudding", "raisin loaf", "chicken broth", "tomato pie", "hazelnut fudge", "salted pretzels",
    "mackerel pie", "apricot jam", "spinach pasties",
)
DIETS = (
    "moss", "lichen", "acorns", "beetles", "snails", "earthworms", "crickets", "moths", "clover", "ferns",
    "toadstools", "pine seeds", "minnows", "tadpoles", "frogs", "crabs", "shrimp", "kelp", "algae", "nettles",
    "thistles", "tree bark", "roots", "tulip bulbs", "grubs", "termites", "ants", "wasps", "mice", "voles", "lizards",
    "eggs", "nectar", "pollen", "reeds", "water lilies", "dandelions", "sorrel", "rosehips", "cockles", "mussels",
    "sea urchins", "grasshoppers", "dragonflies", "holly berries", "seaweed",
)
COLOURS = (
    "crimson", "scarlet", "vermilion", "maroon", "burgundy", "coral", "amber", "ochre", "gold", "chartreuse", "jade",
    "emerald", "teal", "turquoise", "cyan", "aquamarine", "azure", "cobalt", "sapphire", "navy", "indigo",
    "periwinkle", "lavender", "lilac", "violet", "magenta", "fuchsia", "mauve", "pink", "ivory", "beige", "tan",
    "khaki", "rust", "mahogany", "charcoal", "slate", "pearl", "ebony", "orange", "yellow", "green", "blue",
    "purple", "brown", "grey", "white", "black",
)
PRODUCTS = (
    "copper kettles", "wool blankets", "paper lanterns", "glass beads", "leather boots", "tin whistles",
    "wooden toys", "silk scarves", "clay pipes", "brass compasses", "iron stoves", "music boxes", "pocket watches",
    "fishing nets", "rope ladders", "wax candles", "cotton sails", "stone mortars", "felt hats", "bicycle bells",
    "umbrellas", "telescopes", "weather vanes", "sewing needles", "snow sledges", "rocking chairs", "typewriters",
    "harmonicas", "ink pens", "picture frames", "garden hoses", "hot air balloons", "oil lamps", "kites",
    "chess sets", "spinning tops", "barometers", "hourglasses", "bird cages", "steam whistles", "dinner plates",
    "soap bars", "canvas tents", "door knockers", "fountain pens", "marbles",
)
_MATERIALS = ("marble", "granite", "cedar", "iron", "glass", "sandstone", "brick", "bronze", "timber")
_STRUCTURES = (
    "clock tower", "bridge", "lighthouse", "fountain", "windmill", "observatory", "amphitheatre", "aqueduct",
)
LANDMARKS = tuple(f"{m} {s}" for m in _MATERIALS for s in _STRUCTURES)
ANIMALS = ("newt", "moth", "toad", "heron", "otter", "beetle", "lizard", "vole", "finch", "eel", "hare", "owl")
COMPANY_SUFFIXES = ("Works", "Holdings", "Trading", "Company", "Guild", "Industries", "Brothers", "Partners")
LANDFORMS = ("Marsh", "Forest", "Hills", "Fen", "Moor", "Glade", "Caves", "Dunes", "Valley", "Heath")

# Syllables for invented names: onsets and endings chosen to give pronounceable, unfamiliar words. Combinations that
# are real words or names were removed as far as we could find them: every combination was checked against the
# vocabulary of a large English tokenizer (a single-token word is a common word or name) and read by eye for real
# places and people; those are listed in `_REAL_WORDS` and never generated.
_ONSETS = (
    "Bra", "Cor", "Dal", "Eth", "Fen", "Gar", "Hal", "Isk", "Jor", "Kel", "Lor", "Mav", "Ner", "Oth", "Pel", "Quin",
    "Ros", "Sel", "Tav", "Ulm", "Vor", "Wen", "Yar", "Zel", "Brin", "Cael", "Dro", "Fal", "Grim", "Hesk", "Lun",
    "Mor", "Nim", "Pry", "Rav", "Skar", "Thal", "Vesk", "Wyl", "Zor",
)
_PERSON_ENDS = ("ric", "wen", "vo", "ria", "mel", "tha", "dun", "ko", "sa", "nor", "lin", "bek", "dra", "vel", "ith")
_SURNAME_ENDS = ("brook", "wick", "mantle", "berg", "ley", "dane", "croft", "well", "by", "hollow", "stone", "rin")
_TOWN_ENDS = ("mere", "holt", "stead", "thorpe", "vale", "combe", "haven", "ford", "bury", "moor")
_RIVER_ENDS = ("el", "wy", "an", "ess", "ant", "ira", "une", "ock")
_COUNTRY_ENDS = ("land", "ia", "mark", "avia", "ora", "esh")
_COMPANY_ENDS = ("ton", "ery", "ell", "ash", "ard", "ick", "ane", "orn")
_HABITAT_ENDS = ("ug", "ombe", "ask", "irn", "aleth", "ost")
_SPECIES_ENDS = ("ling", "wort", "kin", "ix", "ow", "ap")
_REAL_WORDS = frozenset({
    # single tokens in the vocabulary check
    "dalton", "ethan", "falling", "morton", "ravel", "selling",
    # real names, places and brands found by reading the lists
    "bravo", "corvo", "corsa", "falko", "garland", "halland", "fenland", "moravia", "morland", "moria", "dalia",
    "coria", "loria", "thalia", "corley", "morley", "roswell", "morwell", "fenwick", "halley", "kelley", "selby",
    "corby", "dalby", "grimley", "brinley", "halstead", "halford", "garford", "corwen", "morwen", "ethel", "moran",
    "morant", "corel", "lunel", "corton", "halton", "kelton", "brinton", "pelton", "brinell", "morell", "corell",
    "morane", "bramling",
})

# ---------------------------------------------------------------------------------------------------------------------
# Templates. `{e}` = entity name, `{E}` = entity name capitalised, `{v}` = value, `{a}` = value with an article.
# Documents, training questions and evaluation questions are three separate families: an evaluation question is never
# a copy of a document sentence or a training question (checked in the tests).
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttributeSpec:
    """One attribute of an entity kind: its answer space and its three template families."""

    name: str
    space: str  # name of the answer space the values are drawn from
    documents: tuple[str, ...]
    train_questions: tuple[str, ...]
    eval_questions: tuple[str, ...]


KINDS: dict[str, tuple[AttributeSpec, ...]] = {
    "person": (
        AttributeSpec(
            "home_town", "town",
            ("{E} lives in {v}.", "{E} has made a home in the town of {v}.", "The town of {v} is where {e} lives."),
            ("In which town does {e} live?", "Where is {e}'s home?"),
            ("What town is {e} a resident of?", "Name the town that {e} calls home."),
        ),
        AttributeSpec(
            "profession", "profession",
            ("{E} works as {a}.", "By trade, {e} is {a}.", "{E} earns a living as {a}."),
            ("What does {e} do for a living?", "What is {e}'s job?"),
            ("What is the profession of {e}?", "Which occupation does {e} have?"),
        ),
        AttributeSpec(
            "favourite_food", "food",
            ("{E}'s favourite dish is {v}.", "{E} loves to eat {v}.", "Nothing pleases {e} more than {v}."),
            ("What food does {e} like best?", "Which dish does {e} enjoy most?"),
            ("What is {e}'s favourite food?", "Which meal would please {e} the most?"),
        ),
        AttributeSpec(
            "favourite_colour", "colour",
            (
                "{E}'s favourite colour is {v}.",
                "{E} likes the colour {v} more than any other.",
                "{E} always dresses in {v}.",
            ),
            ("Which colour does {e} like best?", "What colour does {e} prefer?"),
            ("What is the favourite colour of {e}?", "Name the colour {e} is fondest of."),
        ),
        AttributeSpec(
            "employer", "company",
            ("{E} is employed by {v}.", "{E} works for {v}.", "{E} has a job at {v}."),
            ("Which company employs {e}?", "Who does {e} work for?"),
            ("What is the name of {e}'s employer?", "For which firm does {e} work?"),
        ),
    ),
    "company": (
        AttributeSpec(
            "founding_year", "year",
            ("{E} was founded in {v}.", "{E} opened its doors in {v}.", "{E} has been in business since {v}."),
            ("When was {e} founded?", "In what year did {e} start?"),
            ("What year was {e} established?", "Since which year has {e} existed?"),
        ),
        AttributeSpec(
            "headquarters", "town",
            ("{E} has its headquarters in {v}.", "{E} is based in the town of {v}.", "The offices of {e} are in {v}."),
            ("Where is {e} based?", "In which town are {e}'s offices?"),
            ("Which town hosts the headquarters of {e}?", "Where does {e} have its main office?"),
        ),
        AttributeSpec(
            "product", "product",
            ("{E} makes {v}.", "{E} is known for its {v}.", "{E} produces {v}."),
            ("What does {e} make?", "What product is {e} known for?"),
            ("What does {e} manufacture?", "Which goods come out of {e}'s workshops?"),
        ),
        AttributeSpec(
            "founder", "founder",
            ("{E} was started by {v}.", "{v} founded {e}.", "The founder of {e} is {v}."),
            ("Who started {e}?", "Who founded {e}?"),
            ("Which person established {e}?", "Who created the company {e}?"),
        ),
    ),
    "creature": (
        AttributeSpec(
            "habitat", "habitat",
            ("{E} lives in the {v}.", "{E} is found only in the {v}.", "{E} makes its home in the {v}."),
            ("Where does {e} live?", "Where can {e} be found?"),
            ("What is the habitat of {e}?", "In which wild place would you find {e}?"),
        ),
        AttributeSpec(
            "colour", "colour",
            ("{E} is {v} in colour.", "The body of {e} is {v}.", "{E} has a {v} coat."),
            ("What colour is {e}?", "Which colour is the coat of {e}?"),
            ("What is the colour of {e}?", "If you saw {e}, what colour would it be?"),
        ),
        AttributeSpec(
            "diet", "diet",
            ("{E} feeds on {v}.", "{E} eats mostly {v}.", "The diet of {e} is {v}."),
            ("What does {e} eat?", "What food does {e} look for?"),
            ("What is {e}'s main food?", "What does {e} survive on?"),
        ),
        AttributeSpec(
            "lifespan", "lifespan",
            ("{E} lives for about {v} years.", "{E} can reach an age of {v} years.", "{E} grows old at {v} years."),
            ("How long does {e} live?", "How many years does {e} live?"),
            ("What is the lifespan of {e} in years?", "To what age does {e} survive?"),
        ),
    ),
    "town": (
        AttributeSpec(
            "river", "river",
            (
                "The river {v} flows through {e}.",
                "{E} stands on the banks of the {v}.",
                "{E} lies beside the river {v}.",
            ),
            ("Which river flows through {e}?", "What river is {e} on?"),
            ("Name the river that runs past {e}.", "On which river was {e} built?"),
        ),
        AttributeSpec(
            "settled_year", "year",
            ("{E} was settled in {v}.", "The first houses of {e} were built in {v}.", "{E} dates back to {v}."),
            ("When was {e} settled?", "In which year was {e} first built?"),
            ("What year was {e} founded?", "In what year did people first settle in {e}?"),
        ),
        AttributeSpec(
            "landmark", "landmark",
            ("{E} is famous for its {v}.", "Visitors to {e} come to see its {v}.", "The pride of {e} is its {v}."),
            ("What is {e} famous for?", "What do visitors see in {e}?"),
            ("Which landmark is {e} known for?", "What is the best-known sight in {e}?"),
        ),
        AttributeSpec(
            "country", "country",
            ("{E} is a town in {v}.", "{E} belongs to the land of {v}.", "{E} lies in the country of {v}."),
            ("Which country is {e} in?", "In what land is {e}?"),
            ("Name the country where {e} is located.", "Of which nation is {e} a part?"),
        ),
    ),
}
ATTRIBUTES: dict[str, AttributeSpec] = {spec.name: spec for specs in KINDS.values() for spec in specs}

# Sizes of the invented-name answer spaces (the hand-written ones are fixed by the lists above).
NAME_SPACE_SIZE = 120
YEARS = tuple(str(y) for y in range(1610, 1990))
LIFESPANS = tuple(str(n) for n in range(3, 100))


# ---------------------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    """One fact: `entity`'s `attribute` is `value`. `fact_id` is unique in the world (`s{session}-f{index:03d}`)."""

    fact_id: str
    session: int
    entity: str
    kind: str
    attribute: str
    value: str
    train_questions: tuple[str, ...]
    eval_question: str


@dataclass
class Session:
    """The new knowledge of one session: its facts, documents, and rows for training, dreaming and evaluation."""

    index: int
    facts: list[Fact]
    document_rows: list[dict]

    @cached_property
    def documents(self):
        """Dataset with columns `text`, `entity`, `session`: one row per (entity, rewrite)."""
        from datasets import Dataset

        return Dataset.from_list(self.document_rows)

    def _qa_rows(self, prompt, completion):
        from datasets import Dataset

        rows = [
            {"prompt": prompt(q), "completion": completion(f.value), "fact_id": f.fact_id, "session": f.session}
            for f in self.facts
            for q in f.train_questions
        ]
        return Dataset.from_list(rows)

    @cached_property
    def train_sft(self):
        """Dataset in TRL's conversational prompt-completion format: `prompt` = [user message], `completion` =
        [assistant message] holding the bare answer; plus `fact_id`, `session`. One row per training phrasing."""
        return self._qa_rows(
            lambda q: [{"role": "user", "content": q}], lambda v: [{"role": "assistant", "content": v}]
        )

    @cached_property
    def eval_qa(self):
        """Held-out evaluation: `question` (a phrasing used by no training data), `answer`, `fact_id`, `session`,
        `entity`, `attribute`. One row per fact."""
        from datasets import Dataset

        return Dataset.from_list(self.eval_rows)

    @property
    def eval_rows(self) -> list[dict]:
        return [
            {
                "question": f.eval_question,
                "answer": f.value,
                "fact_id": f.fact_id,
                "session": f.session,
                "entity": f.entity,
                "attribute": f.attribute,
            }
            for f in self.facts
        ]

    @cached_property
    def dream_tasks(self):
        """Tasks for dreaming: `context` = an entity's document, `questions`/`answers` = that entity's facts asked
        with the training phrasing (the downstream score tau; never the evaluation phrasing), `entity`, `session`."""
        from datasets import Dataset

        first_doc = {}
        for row in self.document_rows:
            first_doc.setdefault(row["entity"], row["text"])
        rows = []
        for entity, context in first_doc.items():
            facts = [f for f in self.facts if f.entity == entity]
            rows.append(
                {
                    "context": context,
                    "questions": [f.train_questions[0] for f in facts],
                    "answers": [f.value for f in facts],
                    "entity": entity,
                    "session": self.index,
                }
            )
        return Dataset.from_list(rows)


@dataclass(frozen=True)
class WorldConfig:
    """How a world is generated.

    Args:
        num_sessions: number of sessions (the continual-learning stream); each introduces new entities.
        facts_per_session: facts per session. With 21 or more, answering one constant value scores under 5%.
        seed: everything (names, values, templates, order) is a function of this seed.
        doc_variants: rewrites of each entity's document (different templates and sentence order); more rewrites
            help a model store a fact (augmentation), at the cost of more training text.
        train_questions_per_fact: training phrasings per fact in `train_sft` (at most the number of training
            templates, 2).
    """

    num_sessions: int = 3
    facts_per_session: int = 24
    seed: int = 0
    doc_variants: int = 2
    train_questions_per_fact: int = 2

    def __post_init__(self):
        for name in ("num_sessions", "facts_per_session", "doc_variants", "train_questions_per_fact"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"WorldConfig.{name}={value!r}: must be a positive integer.")
        max_train = min(len(s.train_questions) for s in ATTRIBUTES.values())
        if self.train_questions_per_fact > max_train:
            raise ValueError(
                f"WorldConfig.train_questions_per_fact={self.train_questions_per_fact}: at most {max_train} training "
                "phrasings exist per attribute; lower it."
            )


@dataclass
class World:
    """A generated world: its config, its answer spaces and its sessions. Build with `make_world`."""

    config: WorldConfig
    spaces: dict[str, list[str]]
    sessions: list[Session] = field(default_factory=list)

    @property
    def facts(self) -> list[Fact]:
        return [f for s in self.sessions for f in s.facts]

    def answer_space(self, attribute: str) -> list[str]:
        """All values the generator could have drawn for `attribute` (chance level is 1 / len of this)."""
        if attribute not in ATTRIBUTES:
            raise KeyError(f"Unknown attribute {attribute!r}; known: {sorted(ATTRIBUTES)}.")
        return list(self.spaces[ATTRIBUTES[attribute].space])

    def eval_rows(self, sessions: list[int] | None = None) -> list[dict]:
        """Evaluation rows of the given sessions (all by default), as plain dicts."""
        chosen = range(len(self.sessions)) if sessions is None else sessions
        return [row for i in chosen for row in self.sessions[i].eval_rows]

    def all_texts(self) -> list[str]:
        """Every string the world can show a model (documents, questions, answers): e.g. to train a tiny tokenizer."""
        texts = [r["text"] for s in self.sessions for r in s.document_rows]
        for f in self.facts:
            texts.extend([*f.train_questions, f.eval_question, f.value])
        return texts

    def to_dict(self) -> dict:
        return {
            "format": "sleep_trl.world/1",
            "config": asdict(self.config),
            "spaces": self.spaces,
            "sessions": [
                {"index": s.index, "facts": [asdict(f) for f in s.facts], "documents": s.document_rows}
                for s in self.sessions
            ],
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict) -> World:
        if data.get("format") != "sleep_trl.world/1":
            raise ValueError(f"Not a sleep_trl world (format={data.get('format')!r}); expected 'sleep_trl.world/1'.")
        sessions = [
            Session(
                index=s["index"],
                facts=[Fact(**{**f, "train_questions": tuple(f["train_questions"])}) for f in s["facts"]],
                document_rows=s["documents"],
            )
            for s in data["sessions"]
        ]
        return cls(config=WorldConfig(**data["config"]), spaces=data["spaces"], sessions=sessions)

    @classmethod
    def from_json(cls, text: str) -> World:
        return cls.from_dict(json.loads(text))

    def __eq__(self, other) -> bool:
        return isinstance(other, World) and self.to_dict() == other.to_dict()


# ---------------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------------


_PLURAL_POSSESSIVE = re.compile(r"(?<=[a-z])s's\b")


def _article(value: str) -> str:
    return ("an " if value[0].lower() in "aeiou" else "a ") + value


def _fill(template: str, entity: str, value: str) -> str:
    text = template.format(e=entity, E=entity[0].upper() + entity[1:], v=value, a=_article(value))
    text = _PLURAL_POSSESSIVE.sub("s'", text)  # "Iskash Brothers's offices" -> "Iskash Brothers' offices"
    return text[0].upper() + text[1:]


class _Names:
    """Invented words, unique across the whole world (a word is never reused in another role or session).

    Each family of endings has its own shuffled stream of syllable combinations, drawn lazily, so a world takes only
    the names it needs and generation stays deterministic for a seed.
    """

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()
        self.streams: dict[tuple[str, ...], list[str]] = {}

    def word(self, ends: tuple[str, ...]) -> str:
        if ends not in self.streams:
            candidates = [o + e for o in _ONSETS for e in ends]
            self.rng.shuffle(candidates)
            self.streams[ends] = candidates
        stream = self.streams[ends]
        while stream:
            word = stream.pop()
            key = word.lower()
            if key not in self.used and key not in _REAL_WORDS:
                self.used.add(key)
                return word
        raise ValueError(
            f"The world is too large: the invented names ending in {ends} are used up. Lower num_sessions or "
            "facts_per_session."
        )

    def new(self, kind: str) -> str:
        if kind == "town":
            return self.word(_TOWN_ENDS)
        if kind == "river":
            return self.word(_RIVER_ENDS)
        if kind == "country":
            return self.word(_COUNTRY_ENDS)
        if kind == "company":
            return f"{self.word(_COMPANY_ENDS)} {self.rng.choice(COMPANY_SUFFIXES)}"
        if kind == "habitat":
            return f"{self.word(_HABITAT_ENDS)} {self.rng.choice(LANDFORMS)}"
        if kind == "creature":
            return f"the {self.word(_SPECIES_ENDS).lower()} {self.rng.choice(ANIMALS)}"
        if kind in ("person", "founder"):
            return f"{self.word(_PERSON_ENDS)} {self.word(_SURNAME_ENDS)}"
        raise KeyError(kind)


class _Pool:
    """Draws values of one answer space without replacement; when a large world exhausts it, reshuffles and goes on
    (values then repeat across sessions, never within one)."""

    def __init__(self, values: list[str], rng: random.Random):
        self.values, self.rng = list(values), rng
        self.queue: list[str] = []

    def draw(self, avoid: set[str]) -> str:
        if not self.queue:
            self.queue = list(self.values)
            self.rng.shuffle(self.queue)
        for i, value in enumerate(self.queue):
            if value not in avoid:
                return self.queue.pop(i)
        raise RuntimeError("A session asks for more values of one attribute than its answer space holds.")


def make_world(
    num_sessions: int = 3,
    facts_per_session: int = 24,
    seed: int = 0,
    doc_variants: int = 2,
    train_questions_per_fact: int = 2,
) -> World:
    """Generate a world of fictional knowledge split into sessions (see `WorldConfig` for the arguments)."""
    config = WorldConfig(num_sessions, facts_per_session, seed, doc_variants, train_questions_per_fact)
    rng = random.Random(seed)
    names = _Names(rng)
    # Answer spaces have a fixed size (chance = 1 / size).
    spaces = {
        "profession": list(PROFESSIONS),
        "food": list(FOODS),
        "diet": list(DIETS),
        "colour": list(COLOURS),
        "product": list(PRODUCTS),
        "landmark": list(LANDMARKS),
        "year": list(YEARS),
        "lifespan": list(LIFESPANS),
    }
    for space in ("town", "river", "country", "company", "habitat", "founder"):
        spaces[space] = [names.new(space) for _ in range(NAME_SPACE_SIZE)]
    # Entities get fresh invented names, disjoint from every answer space (a town entity is never a town answer).
    pools = {space: _Pool(values, rng) for space, values in spaces.items()}
    kinds = list(KINDS)

    sessions = []
    for s in range(num_sessions):
        facts: list[Fact] = []
        session_values: dict[str, set[str]] = {space: set() for space in spaces}
        entities: list[tuple[str, str, list[Fact]]] = []
        order = kinds[:]
        rng.shuffle(order)
        k = 0
        while len(facts) < facts_per_session:
            kind = order[k % len(order)]
            k += 1
            entity = names.new(kind)
            specs = list(KINDS[kind])[: facts_per_session - len(facts)]
            entity_facts = []
            for spec in specs:
                value = pools[spec.space].draw(session_values[spec.space])
                session_values[spec.space].add(value)
                train_q = rng.sample(spec.train_questions, train_questions_per_fact)
                fact = Fact(
                    fact_id=f"s{s}-f{len(facts):03d}",
                    session=s,
                    entity=entity,
                    kind=kind,
                    attribute=spec.name,
                    value=value,
                    train_questions=tuple(_fill(q, entity, value) for q in train_q),
                    eval_question=_fill(rng.choice(spec.eval_questions), entity, value),
                )
                facts.append(fact)
                entity_facts.append(fact)
            entities.append((entity, kind, entity_facts))
        document_rows = []
        for entity, kind, entity_facts in entities:
            for variant in range(doc_variants):
                # Each rewrite uses a different template per attribute where possible, in a shuffled order.
                sentences = []
                for fact in entity_facts:
                    templates = ATTRIBUTES[fact.attribute].documents
                    offset = rng.randrange(len(templates))
                    sentences.append(_fill(templates[(offset + variant) % len(templates)], entity, fact.value))
                if variant:
                    rng.shuffle(sentences)
                document_rows.append({"text": " ".join(sentences), "entity": entity, "session": s})
        sessions.append(Session(index=s, facts=facts, document_rows=document_rows))
    return World(config=config, spaces=spaces, sessions=sessions)

