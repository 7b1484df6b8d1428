"""Turning scores into the exact set of units to keep (METHODS §0.4: top-k, ties by index).

Scopes:

* **local**: every layer keeps ``round((1 − s) · n_l)`` of its own ``n_l`` units.
* **global**: one ranking over the units of all layers; ``round((1 − s) · Σ n_l)`` are kept in
  total, ties broken by layer order, then unit index. Scores are compared raw (for unstructured
  magnitude this is ``torch.nn.utils.prune.global_unstructured``); :func:`normalise` first divides
  each layer's scores by their mean magnitude, so layers of different fan-in compete on equal
  terms (Torch-Pruning's default ``"mean"`` normaliser).

Scores of ``-inf`` mark units that must stay pruned: they rank last.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from prunekit.errors import UserError


def keep_count(total: int, fraction_removed: float) -> int:
    """Units kept when removing ``fraction_removed`` of ``total``: round((1 - s) * n)."""
    if not 0 <= fraction_removed <= 1:
        raise UserError(f"sparsity: expected a fraction in [0, 1], got {fraction_removed!r}")
    return round((1 - fraction_removed) * total)


def _top_k_unordered(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the ``k`` largest scores, ties broken by lower index, in rank order."""
    return torch.sort(-scores.detach().flatten(), stable=True).indices[:k]


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, ties broken by lower index, returned sorted."""
    return _top_k_unordered(scores, k).sort().values


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask shaped like ``scores``: True at exactly the ``k`` largest (ties: lower flat index).

    The same set as a stable sort picks, found in linear time: everything above the k-th largest
    score, then the lowest-index scores equal to it (a sort when there are NaNs, which rank last).
    """
    flat = scores.detach().flatten()
    if k <= 0 or k >= flat.numel() or torch.isnan(flat).any():
        mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        mask[_top_k_unordered(flat, k)] = True
        return mask.view(scores.shape)
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values
    mask = flat > threshold
    ties = torch.nonzero(flat == threshold).flatten()
    mask[ties[:k - int(mask.sum())]] = True
    return mask.view(scores.shape)


def round_kept(kept: int, total: int, round_to: int | None) -> int:
    """``kept`` rounded to the nearest multiple of ``round_to`` (halves up), within [round_to, total].

    0 stays 0 and ``total`` stays ``total`` (a dense layer need not be a multiple).
    """
    if round_to is None or kept in (0, total):
        return kept
    return min(total, max(round_to, round_to * math.floor(kept / round_to + 0.5)))


def local_masks(scores: Mapping[str, torch.Tensor], sparsity: Mapping[str, float],
                round_to: int | None = None) -> dict[str, torch.Tensor]:
    """Per-layer top-k: layer ``name`` keeps ``round((1 − sparsity[name]) · n)`` units."""
    return {name: top_k_mask(s, round_kept(keep_count(s.numel(), sparsity[name]), s.numel(), round_to))
            for name, s in scores.items()}


def global_masks(scores: Mapping[str, torch.Tensor], sparsity: float,
                 round_to: int | None = None) -> dict[str, torch.Tensor]:
    """One ranking across layers; with ``round_to``, each layer's share is then rounded and re-picked."""
    if not scores:
        return {}
    flat = torch.cat([s.detach().flatten().float() for s in scores.values()])
    kept = top_k_mask(flat, keep_count(flat.numel(), sparsity))
    pieces = dict(zip(scores, kept.split([s.numel() for s in scores.values()])))
    if round_to is None:
        return {name: pieces[name].view(s.shape) for name, s in scores.items()}
    return {name: top_k_mask(s, round_kept(int(pieces[name].sum()), s.numel(), round_to))
            for name, s in scores.items()}


def normalise(scores: torch.Tensor) -> torch.Tensor:
    """Scores divided by the mean |score| of their finite entries (unchanged if that is 0)."""
    finite = scores[torch.isfinite(scores)]
    scale = finite.abs().mean() if finite.numel() else scores.new_zeros(())
    return scores / scale if scale > 0 else scores


def nm_mask(groups: torch.Tensor, n: int) -> torch.Tensor:
    """For scores shaped ``[G, M]``: True at the ``n`` largest of each row (ties: lower index)."""
    order = torch.sort(-groups.detach(), dim=1, stable=True).indices[:, :n]
    return torch.zeros(groups.shape, dtype=torch.bool, device=groups.device).scatter_(1, order, True)
