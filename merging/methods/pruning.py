"""Pruning of task vectors (deltas from the base): which entries of each delta a method keeps."""

from __future__ import annotations

import torch

from .selection import bernoulli, uniform

Tensor = torch.Tensor


def _l1_rescaled(delta: Tensor, mask: Tensor, rescale: bool) -> Tensor:
    """Mask `delta`; with `rescale`, scale the survivors to keep the L1 norm (mergekit's rescale)."""
    masked = delta * mask
    if not rescale:
        return masked
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def top_k_mask(values: Tensor, k: int) -> Tensor:
    """Boolean mask of exactly the `k` largest entries of `values` (ties go to lower indices).

    Uses a selection (``kthvalue``), not a sort, so it is linear in the tensor size.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n - k + 1).values
    mask = flat > threshold
    missing = k - int(mask.sum())
    if missing > 0:
        at_threshold = torch.nonzero(flat == threshold).squeeze(1)[:missing]
        mask[at_threshold] = True
    return mask.reshape(values.shape)


def random_keep(seed: int, density: float, like: Tensor, offset: int = 0) -> Tensor:
    """Keep each entry with probability `density` (DARE); reproducible per flat position."""
    return bernoulli(seed, density, offset, offset + like.numel(), like.device).view(like.shape)


def outlier_prune(delta: Tensor, density: float, gamma: float, rescale: bool) -> Tensor:
    """Drop the `gamma` share of largest magnitudes, then the smallest, keeping `density` (breadcrumbs)."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep_count = int(density * n)
    top_count = int(gamma * n)
    bottom_count = max(0, n - keep_count - top_count)
    order = torch.sort(delta.abs().reshape(-1), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[order[bottom_count : bottom_count + keep_count]] = True
    return _l1_rescaled(delta, mask.reshape(delta.shape), rescale)


def rank_prune(delta: Tensor, density: float, epsilon: float, rescale: bool, seed: int) -> Tensor:
    """Keep entries with a probability that grows with their magnitude rank per row (DELLA).

    Planning refuses a density +/- epsilon outside (0, 1) (`della_window_problem`)."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(rows.dtype) + 1
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    spread = ((ranks - low) / (high - low)).clamp(0, 1)
    probability = (density - epsilon) + spread * 2 * epsilon
    keep = uniform(seed, 0, rows.numel(), rows.device).reshape(rows.shape) < probability
    return _l1_rescaled(rows, keep, rescale).reshape(delta.shape)


def sign_consensus(deltas: Tensor) -> Tensor:
    """Mask of entries whose sign agrees with the sign of the summed deltas (TIES 'sum' election)."""
    majority = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    return deltas.sign() == majority
