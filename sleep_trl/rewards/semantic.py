"""The frozen semantic judge: says whether two texts mean the same thing.

Learning to Imitate (paper notes §3c) rewards a student completion with `r_sem = 1` when "a frozen model says both
mean the same". The paper does not name the model. Our default is the all-MiniLM-L6-v2 sentence-embedding model
(Apache-2.0, shipped inside a PyPI package, so it works offline): two texts mean the same when the cosine similarity
of their normalised embeddings is at least `threshold`. Any callable `(predictions, references) -> list[float]` can
replace it.

Threshold: measured with this model, a paraphrase of "Paris is the capital of France" scores 0.97-0.99 and the same
sentence about another city/country 0.35; rewrites of one generated fact that keep its content score above 0.8 while
swapping the entity or the attribute drops below it. 0.8 is our default; calibrate it on your own data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..assets import resolve_model_path


class SemanticJudge:
    """Cosine-similarity judge over a sentence-transformers model.

    Args:
        model_name_or_path: a sentence-transformers folder, or `"all-minilm-l6-v2"` for the packaged default.
        threshold: cosine similarity at or above which two texts count as meaning the same.
        binary: `True` returns 1.0/0.0 (the paper's judge); `False` returns the cosine clipped to [0, 1].
        device: where the judge runs (it is small; "cpu" keeps accelerator memory for the policy).
        batch_size: encoding batch size.
    """

    def __init__(
        self,
        model_name_or_path: str = "all-minilm-l6-v2",
        threshold: float = 0.8,
        binary: bool = True,
        device: str = "cpu",
        batch_size: int = 64,
    ):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"semantic threshold must be in [0, 1], got {threshold}.")
        from sentence_transformers import SentenceTransformer  # heavy: loaded only when a judge is made

        self.model = SentenceTransformer(resolve_model_path(model_name_or_path), device=device)
        self.model.eval()
        self.threshold = threshold
        self.binary = binary
        self.batch_size = batch_size

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised embeddings of `texts` (`(n, dim)`, CPU), to compare later with `compare` (e.g. the teacher's
        texts, embedded once)."""
        if not texts:
            return torch.zeros(0, 0)
        emb = self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_tensor=True,
            show_progress_bar=False,
        )
        return emb.float().cpu()

    def similarity(self, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
        """Cosine similarity of each prediction with its reference (pairwise, not all-pairs)."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
        if not predictions:
            return []
        emb = self.embed(list(predictions) + list(references))
        n = len(predictions)
        return (emb[:n] * emb[n:]).sum(-1).tolist()

    def verdict(self, similarities: Sequence[float]) -> list[float]:
        """The judge's reward for cosine similarities: 1/0 at `threshold` (binary), else the cosine in [0, 1]."""
        if self.binary:
            return [1.0 if s >= self.threshold else 0.0 for s in similarities]
        return [min(max(s, 0.0), 1.0) for s in similarities]

    def compare(self, prediction_embeddings: torch.Tensor, reference_embeddings: torch.Tensor) -> list[float]:
        """The reward of each prediction against its reference, from embeddings made by `embed` (pairwise)."""
        return self.verdict((prediction_embeddings * reference_embeddings).sum(-1).tolist())

    def __call__(self, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
        return self.verdict(self.similarity(predictions, references))
