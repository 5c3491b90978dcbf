"""The paper every sleep-trl trainer implements, for TRL's model cards (`_paper`).

arXiv 2606.03979 (v1 June 2026, v2 July 2026; an earlier version was an ICLR 2026 submission).
"""

import textwrap

SLEEP_PAPER = {
    "title": "Language Models Need Sleep: Learning to Self-Modify and Consolidate Memories",
    "id": "2606.03979",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @article{behrouz2026sleep,
            title        = {{Language Models Need Sleep: Learning to Self-Modify and Consolidate Memories}},
            author       = {Behrouz and Hashemi and Javanmard and Mirrokni},
            year         = 2026,
            eprint       = {2606.03979},
            archivePrefix= {arXiv},
            primaryClass = {cs.LG},
        }"""),
}
