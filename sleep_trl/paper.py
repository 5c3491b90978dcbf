"""The paper every sleep-trl trainer implements, for TRL's model cards (`_paper`) and the sleep job's card.

arXiv 2606.03979 (v1 June 2026, v2 July 2026; an earlier version was an ICLR 2026 submission).
"""

import textwrap

SLEEP_PAPER = {
    "title": "Language Models Need Sleep: Learning to Self-Modify and Consolidate Memories",
    "id": "2606.03979",
    "authors": ["Ali Behrouz", "Farnoosh Hashemi", "Vahab Mirrokni"],
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @article{behrouz2026sleep,
            title        = {{Language Models Need Sleep: Learning to Self-Modify and Consolidate Memories}},
            author       = {Behrouz, Ali and Hashemi, Farnoosh and Mirrokni, Vahab},
            year         = 2026,
            eprint       = {2606.03979},
            archivePrefix= {arXiv},
            primaryClass = {cs.LG},
        }"""),
}
