"""A handful of fictional passages with no-context questions, for the dreaming example, recipe and smoke tests.

Every fact is invented (places, people and numbers that exist nowhere), so a model can answer the questions only
if it learned the passage. Questions are phrased differently from the passage. Larger, generated benchmark worlds
live in `sleep_trl.data`.
"""

from __future__ import annotations

DEMO_PASSAGES: list[dict] = [
    {
        "context": (
            "The town of Velmora sits on the eastern bank of the river Ostrel. It was founded in 1642 by the "
            "glassmaker Idra Kestrel, and its main trade is blue glass. Every spring the town holds the Lantern "
            "Fair, where the glassmakers sell their lamps."
        ),
        "questions": [
            "Who founded Velmora?",
            "On which river is Velmora?",
            "In what year was Velmora founded?",
            "What is the main trade of Velmora?",
        ],
        "answers": [["Idra Kestrel", "Kestrel"], ["Ostrel", "the river Ostrel"], ["1642"], ["blue glass", "glass"]],
    },
    {
        "context": (
            "Doctor Amsel Rook is a botanist who lives in the mountain village of Tarnwick. She discovered the "
            "silver fern, a plant that only grows above the snow line. Her favourite food is plum bread, and she "
            "keeps three goats named after the winds."
        ),
        "questions": [
            "Where does Amsel Rook live?",
            "What plant did Amsel Rook discover?",
            "What is the favourite food of Amsel Rook?",
            "How many goats does Amsel Rook keep?",
        ],
        "answers": [["Tarnwick"], ["the silver fern", "silver fern"], ["plum bread"], ["three", "3"]],
    },
    {
        "context": (
            "The Quillon Bridge crosses the Marrow Strait between the islands of Sel and Oput. It was built by the "
            "engineer Bastien Holloway and opened in 1911. The bridge is painted green, and it is 940 metres long."
        ),
        "questions": [
            "Which islands does the Quillon Bridge connect?",
            "Who built the Quillon Bridge?",
            "What color is the Quillon Bridge?",
            "When did the Quillon Bridge open?",
        ],
        "answers": [["Sel and Oput", "Oput and Sel"], ["Bastien Holloway", "Holloway"], ["green"], ["1911"]],
    },
    {
        "context": (
            "Captain Orla Venn sails the ship Gray Heron across the Sea of Lume. Her ship carries salt and copper to "
            "the port of Fenhallow. Before she became a captain, Orla Venn worked as a clockmaker in the city of "
            "Bramcote."
        ),
        "questions": [
            "What is the name of Orla Venn's ship?",
            "What did Orla Venn do before she became a captain?",
            "Which port does the Gray Heron sail to?",
            "What does the Gray Heron carry?",
        ],
        "answers": [
            ["Gray Heron", "the Gray Heron"],
            ["clockmaker", "she was a clockmaker"],
            ["Fenhallow"],
            ["salt and copper", "copper and salt"],
        ],
    },
    {
        "context": (
            "The painter Lio Marrant lives in a red house beside Lake Dunmere. He paints only on Thursdays and uses "
            "a brush made from fox hair. His most famous painting, The Amber Hour, hangs in the museum of Castelor."
        ),
        "questions": [
            "Beside which lake does Lio Marrant live?",
            "On which day does Lio Marrant paint?",
            "What is the name of Lio Marrant's most famous painting?",
            "Where does The Amber Hour hang?",
        ],
        "answers": [
            ["Lake Dunmere", "Dunmere"],
            ["Thursday", "Thursdays"],
            ["The Amber Hour", "Amber Hour"],
            ["Castelor", "the museum of Castelor"],
        ],
    },
    {
        "context": (
            "The Order of the Tinder Key is a guild of bakers from the city of Hollin. Its members wear orange "
            "aprons and meet in the old mill on the first night of every month. The guild was led for forty years "
            "by the baker Ysolde Brann."
        ),
        "questions": [
            "Which city do the bakers of the Tinder Key come from?",
            "What color are the aprons of the Tinder Key bakers?",
            "Where does the Order of the Tinder Key meet?",
            "Who led the Order of the Tinder Key?",
        ],
        "answers": [["Hollin"], ["orange"], ["the old mill", "old mill"], ["Ysolde Brann", "Brann"]],
    },
]


def demo_tasks(num_tasks: int | None = None) -> list[dict]:
    """The first `num_tasks` demo passages as dreaming tasks (`context`, `questions`, `answers`)."""
    tasks = DEMO_PASSAGES if num_tasks is None else DEMO_PASSAGES[:num_tasks]
    return [dict(task) for task in tasks]
