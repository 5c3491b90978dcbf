"""One forward for the distillation sequence and every imitation continuation of a prompt (shared-prefix packing).

Learning to Imitate adds `G` continuations per prompt, each continuing the same teacher prefix. Run as separate
rows, every continuation pays again for the prompt and the prefix (most of its tokens), which made the term cost
several times a distillation step. Packed, a row holds

    [ prompt | distillation sequence | (teacher prefix) | continuation 1 | ... | continuation G ]

and a 4D attention mask lets every segment see only its ancestors: the sequence sees the prompt, each continuation
sees the prompt, the teacher prefix and itself, never another continuation. When the distillation sequence is the
teacher sample the prefix was cut from (off-policy batches), the prefix is its first `cut` tokens and is not
repeated. Position ids restart where each segment's ancestry ends, so every token computes exactly what it computes
in a row of its own (tested to 1e-5). The student's hidden states for both losses are then gathered from one
forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROMPT, SEQUENCE, PREFIX = 0, 1, 2  # segment ids; continuation g is segment 3 + g, padding -1


@dataclass
class PackedRows:
    """A packed batch: inputs of the forward, and where to read each loss's hidden states."""

    input_ids: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, 1, L, L) bool: True = may attend
    sequence_index: torch.Tensor  # (B, K): the position predicting each distillation token
    continuation_index: torch.Tensor  # (B, G, Kc): the position predicting each continuation token


def _valid(ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return ids[mask.bool()].tolist()


def pack_rows(
    prompt_ids, prompt_mask, completion_ids, completion_mask, prefix_ids, prefix_mask, shares_sequence,
    continuation_ids, continuation_mask, pad_id: int,
) -> PackedRows:
    """Pack each prompt's distillation sequence and imitation continuations into one row (see the module docstring).

    Args: the batch's left-padded `prompt_ids`/`prompt_mask` `(B, P)`, right-padded `completion_ids`/`mask` `(B, K)`,
    the teacher prefixes `prefix_ids`/`prefix_mask` `(B, C)`, `shares_sequence` `(B,)` (the prefix is the start of
    the distillation sequence), and the continuations `continuation_ids`/`mask` `(B, G, Kc)`."""
    B, G, Kc = continuation_ids.shape
    K = completion_ids.size(1)
    rows, segs, positions, seq_index, cont_index = [], [], [], [], []
    for b in range(B):
        prompt = _valid(prompt_ids[b], prompt_mask[b])
        sequence = _valid(completion_ids[b], completion_mask[b])
        prefix = _valid(prefix_ids[b], prefix_mask[b])
        shared = bool(shares_sequence[b])
        p = len(prompt)
        tokens, seg, pos = list(prompt), [PROMPT] * p, list(range(p))
        tokens += sequence
        seg += [SEQUENCE] * len(sequence)
        pos += list(range(p, p + len(sequence)))
        seq_index.append([p - 1 + t for t in range(len(sequence))] + [0] * (K - len(sequence)))
        if shared:
            end = p - 1 + len(prefix)  # the last token of the prefix inside the sequence (or of the prompt)
        else:
            start = len(tokens)
            tokens += prefix
            seg += [PREFIX] * len(prefix)
            pos += list(range(p, p + len(prefix)))
            end = start + len(prefix) - 1 if prefix else p - 1
        row_cont = []
        for g in range(G):
            cont = _valid(continuation_ids[b, g], continuation_mask[b, g])
            start = len(tokens)
            tokens += cont
            seg += [3 + g] * len(cont)
            pos += list(range(p + len(prefix), p + len(prefix) + len(cont)))
            index = [end] + [start + j for j in range(len(cont) - 1)] if cont else []
            row_cont.append(index + [0] * (Kc - len(index)))
        cont_index.append(row_cont)
        rows.append(tokens)
        segs.append(seg)
        positions.append(pos)
    L = max(len(r) for r in rows)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    seg_t = torch.full((B, L), -1, dtype=torch.long)
    pos_t = torch.zeros((B, L), dtype=torch.long)
    for b in range(B):
        n = len(rows[b])
        input_ids[b, :n] = torch.tensor(rows[b])
        seg_t[b, :n] = torch.tensor(segs[b])
        pos_t[b, :n] = torch.tensor(positions[b])
    mask = _tree_mask(seg_t, pos_t, torch.as_tensor(shares_sequence).bool(), prefix_mask.sum(-1))
    device = completion_ids.device
    return PackedRows(
        input_ids=input_ids.to(device), position_ids=pos_t.to(device), attention_mask=mask.to(device),
        sequence_index=torch.tensor(seq_index, device=device), continuation_index=torch.tensor(cont_index, device=device),
    )


def _tree_mask(seg: torch.Tensor, pos: torch.Tensor, shared: torch.Tensor, prefix_len: torch.Tensor) -> torch.Tensor:
    """`(B, 1, L, L)`: token i may attend token j (j <= i in the row) when j is in the prompt, in i's own segment, or
    is the teacher prefix a continuation i continues (the first `prefix_len` tokens of the sequence when `shared`,
    else the separate prefix segment). Padding attends to itself only."""
    B, L = seg.shape
    i_seg, j_seg = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool).tril()[None]
    is_cont = i_seg >= 3
    prompt_len = (seg == PROMPT).sum(-1)
    # a sequence token's index in the sequence is its position minus the prompt's length (positions start at 0)
    in_prefix_of_sequence = (j_seg == SEQUENCE) & ((pos - prompt_len[:, None])[:, None, :] < prefix_len[:, None, None])
    ancestor = (j_seg == PROMPT) | (i_seg == j_seg) | (is_cont & shared[:, None, None] & in_prefix_of_sequence) | (
        is_cont & (j_seg == PREFIX)
    )
    mask = causal & ancestor & (i_seg >= 0) & (j_seg >= 0)
    mask |= torch.eye(L, dtype=torch.bool)[None] & (i_seg < 0)
    return mask[:, None]


def gather_positions(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`hidden` `(B, L, H)` read at `index` `(B, ...)` -> `(B, ..., H)`."""
    flat = index.reshape(index.size(0), -1)
    picked = hidden.gather(1, flat[..., None].expand(-1, -1, hidden.size(-1)))
    return picked.view(*index.shape, hidden.size(-1))
