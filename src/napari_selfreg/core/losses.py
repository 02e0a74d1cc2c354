"""Supervised losses over painted pixels only, and the SelfReg total (METHOD.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .selfreg import BlockRoles, ifd_loss, scr_loss, selfreg_losses  # noqa: F401

IGNORE = -100


def targets_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """Painting ids (0 = unpainted, 1 = background, 2.. ) to class indices (ignored, 0, 1..)."""
    return torch.where(labels > 0, labels - 1, torch.full_like(labels, IGNORE))


def painted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if not (targets != IGNORE).any():
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE)


def painted_dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 - soft Dice over painted pixels: sums over the whole batch, squared denominators,
    averaged over all classes including background."""
    probs = torch.softmax(logits.float(), dim=1)
    mask = (targets != IGNORE).unsqueeze(1).float()
    one_hot = F.one_hot(targets.clamp(min=0), probs.shape[1]).permute(0, 3, 1, 2).float() * mask
    probs = probs * mask
    dims = (0, 2, 3)
    intersection = (probs * one_hot).sum(dims)
    denominator = (probs * probs).sum(dims) + (one_hot * one_hot).sum(dims)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    return 1.0 - dice.mean()


@dataclass
class LossTerms:
    ce: torch.Tensor
    dice: torch.Tensor
    scr: torch.Tensor
    ifd: torch.Tensor
    total: torch.Tensor


def selfreg_total(
    logits: torch.Tensor,
    labels: torch.Tensor,
    blocks: Mapping[str, torch.Tensor] | None,
    roles: BlockRoles | None,
    ce_weight: float = 0.4,
    dice_weight: float = 0.6,
    lambda_scr: float = 0.015,
    lambda_ifd: float = 0.015,
    scr_pairing: str = "random",
    generator: torch.Generator | None = None,
) -> LossTerms:
    """L = a*CE + b*Dice + lambda_scr*SCR + lambda_ifd*IFD; SelfReg terms skipped when blocks is None."""
    targets = targets_from_labels(labels)
    ce = painted_cross_entropy(logits, targets)
    dice = painted_dice_loss(logits, targets)
    total = ce_weight * ce + dice_weight * dice
    zero = total.new_zeros(())
    scr = ifd = zero
    if blocks is not None and roles is not None:
        scr_value, ifd_value = selfreg_losses(
            blocks, roles, scr_pairing, generator, scr=bool(lambda_scr), ifd=bool(lambda_ifd)
        )
        if scr_value is not None:
            scr = scr_value
            total = total + lambda_scr * scr
        if ifd_value is not None:
            ifd = ifd_value
            total = total + lambda_ifd * ifd
    return LossTerms(ce=ce, dice=dice, scr=scr, ifd=ifd, total=total)
