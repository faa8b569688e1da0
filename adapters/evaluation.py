"""Evaluating one adapter set: caption perplexity, exact match of greedy captions, and BLEU-4 /
CIDEr from pycocoevalcap (the reference COCO-caption implementations; pure Python for these
two scorers, no Java).

    report = evaluate(model, adapter, encode_source(model.backbone, test_source))
    print(report.exact_match, report.cider)

Perplexity is exp of the token-weighted mean cross-entropy on the reference captions (+EOS),
as in training. Exact match compares the greedy caption with any reference after lowercasing
and collapsing whitespace: the synthetic tasks have one canonical caption per image, so this
is the correctness metric there. BLEU-4 and CIDEr are corpus scores over all images; both say
little about one- or two-word captions (no 4-grams), which is why the synthetic tasks are
judged by exact match.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from tqdm.auto import tqdm

from adapters.adapter_set import AdapterSet
from adapters.decoding import generate
from adapters.model import ContextPEFTModel
from adapters.training import EncodedCaptions, mean_loss


@dataclass(frozen=True)
class EvalReport:
    """Metrics of one adapter set on one dataset, plus a few examples to read."""

    images: int
    captions: int
    loss: float
    perplexity: float
    exact_match: float
    bleu4: float
    cider: float
    examples: list[tuple[str, str]] = field(default_factory=list)  # (prediction, reference)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "images": self.images,
            "captions": self.captions,
            "loss": round(self.loss, 6),
            "perplexity": round(self.perplexity, 6),
            "exact_match": round(self.exact_match, 6),
            "bleu4": round(self.bleu4, 6),
            "cider": round(self.cider, 6),
        }


def normalise(text: str) -> str:
    """Lowercase and collapse whitespace: how captions are compared."""
    return " ".join(text.lower().split())


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Fraction of predictions equal to one of their references (after `normalise`)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
    if not predictions:
        return 0.0
    hits = sum(
        normalise(p) in {normalise(r) for r in refs}
        for p, refs in zip(predictions, references, strict=True)
    )
    return hits / len(predictions)


def bleu4_cider(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[float, float]:
    """Corpus BLEU-4 and CIDEr (pycocoevalcap) of predictions against their references."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
    if not predictions:
        return 0.0, 0.0
    # The scorers split on whitespace; normalising first stands in for COCO's PTB tokenizer
    # (Java), which our lowercase, space-separated captions do not need.
    res = {i: [normalise(p)] for i, p in enumerate(predictions)}
    gts = {i: [normalise(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return float(bleu[3]), float(cider)


def generate_captions(
    model: ContextPEFTModel,
    adapter: AdapterSet,
    features: torch.Tensor,
    batch_size: int = 64,
    max_new_tokens: int = 32,
    progress: bool = False,
) -> list[str]:
    """Greedy captions of encoded images with one adapter set (slot 0 of the set)."""
    adapter.eval()
    device = model.backbone.device
    adapter.to(device)
    captions: list[str] = []
    for start in tqdm(
        range(0, features.shape[0], batch_size), desc="captioning", disable=not progress
    ):
        chunk = features[start : start + batch_size]
        slots = torch.zeros(chunk.shape[0], dtype=torch.long, device=device)
        ids = generate(model, chunk, adapter, slots, max_new_tokens)
        captions.extend(model.decode(row) for row in ids)
    return captions


def evaluate(
    model: ContextPEFTModel,
    adapter: AdapterSet,
    data: EncodedCaptions,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    progress: bool = False,
    examples: int = 5,
) -> EvalReport:
    """All metrics of `adapter` on `data`. max_new_tokens defaults to the longest reference's
    token count plus 4, so a model that never stops is cut off (and scored) promptly."""
    if len(data) == 0:
        raise ValueError("nothing to evaluate: the dataset has no captions")
    if max_new_tokens is None:
        max_new_tokens = max(len(t) for t in data.tokens) + 4
    loss = mean_loss(model, adapter.to(model.backbone.device), data, batch_size)
    predictions = generate_captions(
        model, adapter, data.features, batch_size, max_new_tokens, progress
    )
    bleu, cider = bleu4_cider(predictions, data.references)
    return EvalReport(
        images=data.num_images,
        captions=len(data),
        loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        exact_match=exact_match(predictions, data.references),
        bleu4=bleu,
        cider=cider,
        examples=[(p, refs[0]) for p, refs in zip(predictions, data.references, strict=True)][
            :examples
        ],
    )
