"""Inception Score (Salimans et al. 2016): ``exp E_x KL(p(y|x) || p(y))`` over ``splits`` equal parts of the
samples, reported as the mean and standard deviation over the parts (the original implementation's convention,
kept by StyleGAN2-ADA and torch-fidelity)."""

from __future__ import annotations

import numpy as np

from atdiff.validate import check_int

__all__ = ["inception_score", "softmax"]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``logits`` ``(n, C)`` in float64 (for classifiers that return logits)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS from class probabilities ``probs`` ``(n, C)`` (rows sum to 1): (mean, std) over ``splits`` parts."""
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or p.shape[0] < 1:
        raise ValueError(f"probs: expected (n, C) probabilities, got shape {p.shape}")
    if (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-3):
        raise ValueError("probs: rows must be non-negative and sum to 1 (pass softmax(logits) for logits)")
    splits = check_int(splits, "splits", minimum=1, maximum=p.shape[0])
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
