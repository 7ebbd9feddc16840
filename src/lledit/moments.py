"""Per-feature count, mean and squared deviations, merged exactly batch by batch.

UltraEdit's lifelong normalisation and the hypernetwork's input normaliser
both keep the statistics of every row they have seen without keeping the
rows: each batch's statistics are merged into the running ones with Chan et
al.'s pairwise formula, in float64, so the result equals a one-shot
computation over all the rows, whatever the batching (and whichever process
saw which batch).
"""

from __future__ import annotations

import torch

Moments = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(count, mean, sum of squared deviations) of each feature, float64."""


def feature_moments(features: torch.Tensor) -> Moments:
    """The moments of (rows, features) on their own."""
    features = features.double()
    mean = features.mean(dim=0)
    squares = ((features - mean) ** 2).sum(dim=0)
    count = torch.tensor(float(features.shape[0]), dtype=torch.float64, device=features.device)
    return count, mean, squares


def merged_moments(first: Moments | None, second: Moments) -> Moments:
    """The moments of two sets of rows together; either may hold no rows."""
    if first is None or float(first[0]) == 0:
        return second
    count_a, mean_a, squares_a = first
    count_b, mean_b, squares_b = (part.to(mean_a.device) for part in second)
    if float(count_b) == 0:
        return first
    count = count_a + count_b
    shift = mean_b - mean_a
    mean = mean_a + shift * count_b / count
    squares = squares_a + squares_b + shift**2 * count_a * count_b / count
    return count, mean, squares
