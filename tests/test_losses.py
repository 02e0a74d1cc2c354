"""Losses against values computed by hand on small tensors."""

import math

import pytest
import torch

from napari_selfreg.core.losses import (
    IGNORE,
    painted_cross_entropy,
    painted_dice_loss,
    selfreg_total,
    targets_from_labels,
)
from napari_selfreg.core.selfreg import (
    BlockRoles,
    channel_scores,
    ifd_loss,
    ifd_term,
    scr_loss,
    scr_term,
    selfreg_losses,
)


def test_targets_shift_painting_ids_and_ignore_unpainted():
    labels = torch.tensor([[0, 1, 2, 3]])
    assert targets_from_labels(labels).tolist() == [[IGNORE, 0, 1, 2]]


def test_cross_entropy_counts_painted_pixels_only():
    # one unpainted pixel with huge wrong logits: left out
    logits = torch.tensor([[[[2.0, -50.0]], [[0.0, 50.0]]]])  # B=1, K=2, H=1, W=2
    labels = torch.tensor([[[1, 0]]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert painted_cross_entropy(logits, targets_from_labels(labels)).item() == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_is_the_mean_over_several_painted_pixels():
    # painted background with logits (2, 0), painted structure with (0, 1), unpainted (-50, 50):
    # -log softmax per painted pixel is log(1 + e^-2) = 0.126928 and log(1 + e^-1) = 0.313262
    logits = torch.tensor([[[[2.0, 0.0, -50.0]], [[0.0, 1.0, 50.0]]]])  # B=1, K=2, H=1, W=3
    labels = torch.tensor([[[1, 2, 0]]])
    pixels = [math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1))]
    assert pixels == pytest.approx([0.126928, 0.313262], abs=1e-6)
    ce = painted_cross_entropy(logits, targets_from_labels(labels)).item()
    assert ce == pytest.approx(0.220095, abs=1e-6)  # the mean; a sum would give 0.440190
    assert ce == pytest.approx(sum(pixels) / 2, rel=1e-6)
    # the 0.4 / 0.6 balance of the total rests on that mean
    terms = selfreg_total(logits, labels, None, None)
    assert terms.ce.item() == pytest.approx(0.220095, abs=1e-6)
    assert terms.total.item() == pytest.approx(0.4 * 0.220095 + 0.6 * terms.dice.item(), abs=1e-6)


def test_a_batch_with_nothing_painted_has_zero_loss_and_finite_gradients():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    terms = selfreg_total(logits, torch.zeros(1, 4, 4, dtype=torch.long), None, None)
    assert terms.ce.item() == 0 and terms.dice.item() == 0 and terms.total.item() == 0
    terms.total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert not logits.grad.any()  # nothing painted: the supervised terms pull nowhere


def test_dice_loss_by_hand():
    # 3 pixels, K=2; probabilities chosen through logits (0, log(p1/p0))
    p1 = torch.tensor([0.8, 0.3, 0.6])
    logits = torch.stack([torch.zeros(3), torch.log(p1 / (1 - p1))]).reshape(1, 2, 1, 3)
    labels = torch.tensor([[[2, 1, 0]]])  # third pixel unpainted
    p = [[0.2, 0.7], [0.8, 0.3]]  # class x painted pixel
    t = [[0, 1], [1, 0]]
    smooth = 1e-5
    dices = []
    for c in range(2):
        inter = sum(pi * ti for pi, ti in zip(p[c], t[c], strict=True))
        denom = sum(pi * pi for pi in p[c]) + sum(ti * ti for ti in t[c])
        dices.append((2 * inter + smooth) / (denom + smooth))
    expected = 1 - sum(dices) / 2
    got = painted_dice_loss(logits, targets_from_labels(labels)).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_perfect_prediction_has_near_zero_dice_loss():
    labels = torch.tensor([[[1, 2], [2, 1]]])
    logits = torch.stack([(labels == 1).float(), (labels == 2).float()], 1) * 40
    assert painted_dice_loss(logits, targets_from_labels(labels)).item() < 1e-6


def test_scr_mean_pairing_by_hand():
    student = torch.tensor([[[[1.0, 3.0]], [[5.0, 7.0]]]])  # B1, C2, 1x2
    teacher = torch.tensor([[[[0.0, 2.0, 4.0, 6.0]], [[2.0, 2.0, 2.0, 2.0]]]])  # B1, C2, 1x4
    # pooled teacher over width 4 -> 2: ch0 (1, 5), ch1 (2, 2); channel mean (1.5, 3.5)
    diffs = [1 - 1.5, 3 - 3.5, 5 - 1.5, 7 - 3.5]
    expected = sum(d * d for d in diffs) / 4
    assert scr_term(student, teacher, pairing="mean").item() == pytest.approx(expected)


def test_scr_random_pairing_uses_min_channels_and_detaches_teacher():
    torch.manual_seed(0)
    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 5, 8, 8, requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    loss = scr_term(student, teacher, "random", gen)
    # recompute the same pairing by hand
    gen = torch.Generator().manual_seed(1)
    s_idx = torch.randperm(3, generator=gen)[:3]
    t_idx = torch.randperm(5, generator=gen)[:3]
    pooled = torch.nn.functional.adaptive_avg_pool2d(teacher.detach(), (4, 4))
    expected = ((student[:, s_idx] - pooled[:, t_idx]) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert student.grad is not None and teacher.grad is None


def test_scr_random_equals_mean_variant_in_expectation_plus_constant():
    torch.manual_seed(0)
    student = torch.randn(1, 4, 3, 3)
    teacher = torch.randn(1, 4, 3, 3)
    gen = torch.Generator().manual_seed(0)
    random_mean = torch.stack([scr_term(student, teacher, "random", gen) for _ in range(4000)]).mean()
    # E over pairings = mean over all (s, t) channel pairs of MSE
    all_pairs = ((student[:, :, None] - teacher[:, None]) ** 2).mean()
    assert random_mean.item() == pytest.approx(all_pairs.item(), rel=0.02)


def test_channel_scores_and_ifd_by_hand():
    # channel maps over 1x2 pixels; means of the L2-normalised maps: c0 (3,4)->(0.6,0.8) 0.7;
    # c1 (1,0) 0.5; c2 (1,1) 1/sqrt(2) = 0.7071; c3 (1,2) 3/(2 sqrt(5)) = 0.6708 (no ties).
    # Ranks: c2, c0 | c3, c1, so c2 pairs with c3 and c0 with c1:
    # ((1-1)^2 + (1-2)^2 + (3-1)^2 + (4-0)^2) / 4 values = (0 + 1 + 4 + 16) / 4 = 5.25
    feature = torch.tensor([[[[3.0, 4.0]], [[1.0, 0.0]], [[1.0, 1.0]], [[1.0, 2.0]]]])
    assert channel_scores(feature).tolist() == pytest.approx([0.7, 0.5, 0.70710678, 0.67082039])
    assert ifd_term(feature).item() == pytest.approx(5.25)
    # the training path values the same feature the same way
    roles = BlockRoles(encoder=("E2",), decoder=(), teacher="D1")
    _, ifd = selfreg_losses({"E2": feature, "D1": torch.zeros(1, 2, 1, 2)}, roles, "mean")
    assert ifd.item() == pytest.approx(5.25, rel=1e-6)


def test_ifd_loss_is_encoder_mean_plus_decoder_mean():
    torch.manual_seed(0)
    blocks = {n: torch.randn(1, 4, 4, 4) for n in ("E2", "E3", "D2", "D1")}
    roles = BlockRoles(encoder=("E2", "E3"), decoder=("D2",), teacher="D1")
    expected = (ifd_term(blocks["E2"]) + ifd_term(blocks["E3"])) / 2 + ifd_term(blocks["D2"])
    assert ifd_loss(blocks, roles).item() == pytest.approx(expected.item(), rel=1e-6)
    mean_scr = scr_loss(blocks, roles, "mean")
    each = [scr_term(blocks[n], blocks["D1"], "mean") for n in roles.students]
    assert mean_scr.item() == pytest.approx(torch.stack(each).mean().item(), rel=1e-6)


def test_total_weights_terms_and_switch_off():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    blocks = {n: torch.randn(2, 4, 4, 4) for n in ("E2", "D2", "D1")}
    roles = BlockRoles(encoder=("E2",), decoder=("D2",), teacher="D1")
    terms = selfreg_total(logits, labels, blocks, roles, 0.4, 0.6, 0.015, 0.015, "mean")
    expected = 0.4 * terms.ce + 0.6 * terms.dice + 0.015 * terms.scr + 0.015 * terms.ifd
    assert terms.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms.scr.item() > 0 and terms.ifd.item() > 0
    plain = selfreg_total(logits, labels, None, None)
    assert plain.scr.item() == 0 and plain.ifd.item() == 0
    assert plain.total.item() == pytest.approx((0.4 * plain.ce + 0.6 * plain.dice).item())


def test_blockroles_for_paper_unet():
    roles = BlockRoles.for_unet(4)
    assert roles.encoder == ("E2", "E3", "E4", "E5")
    assert roles.decoder == ("D4", "D3", "D2")
    assert roles.teacher == "D1"
    assert len(roles.students) == 7


def _separated_blocks(dtype=torch.float32, channels_last=True, sizes=((2, 8, 16, 12), (2, 6, 8, 6), (2, 5, 4, 3))):
    """Blocks whose channel scores are far apart (each channel's spread differs), so the IFD
    ranking is the same however the scores are rounded."""
    torch.manual_seed(0)
    blocks = {}
    for name, (b, c, h, w) in zip(("E2", "E3", "D2"), sizes, strict=True):
        spread = torch.linspace(0.2, 3.0, c)[torch.randperm(c)].view(1, c, 1, 1)
        blocks[name] = 1.0 + spread * torch.randn(b, c, h, w)
    blocks["D1"] = torch.randn(2, 4, 32, 24)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return {k: v.to(dtype).contiguous(memory_format=layout) for k, v in blocks.items()}


# students of one size share the pooled teacher and one operand (in pairs): none, two, three
SHARED_SIZES = {
    "distinct": ((2, 8, 16, 12), (2, 6, 8, 6), (2, 5, 4, 3)),
    "E2 and D2": ((2, 8, 16, 12), (2, 6, 8, 6), (2, 5, 16, 12)),
    "all three": ((2, 8, 8, 6), (2, 6, 8, 6), (2, 5, 8, 6)),
}


@pytest.mark.parametrize("pairing", ["random", "mean"])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("sizes", SHARED_SIZES.values(), ids=SHARED_SIZES.keys())
def test_training_terms_match_the_definitions_in_value_and_gradient(pairing, channels_last, sizes):
    roles = BlockRoles(encoder=("E2", "E3"), decoder=("D2",), teacher="D1")
    results = []
    for compute in ("definition", "training"):
        separated = _separated_blocks(channels_last=channels_last, sizes=sizes)
        blocks = {k: v.clone().requires_grad_(True) for k, v in separated.items()}
        gen = torch.Generator().manual_seed(5)
        if compute == "definition":
            scr, ifd = scr_loss(blocks, roles, pairing, gen), ifd_loss(blocks, roles)
        else:
            scr, ifd = selfreg_losses(blocks, roles, pairing, gen)
        (0.3 * scr + 0.7 * ifd).backward()
        results.append((scr.item(), ifd.item(), {k: v.grad for k, v in blocks.items()}))
    (scr_def, ifd_def, grads_def), (scr_tr, ifd_tr, grads_tr) = results
    assert scr_tr == pytest.approx(scr_def, rel=1e-5)
    assert ifd_tr == pytest.approx(ifd_def, rel=1e-5)
    assert grads_tr["D1"] is None and grads_def["D1"] is None  # the teacher is detached
    for name in roles.students:
        assert torch.allclose(grads_tr[name], grads_def[name], rtol=1e-4, atol=1e-7), name


def test_training_terms_in_bfloat16_match_the_definitions_to_its_rounding():
    roles = BlockRoles(encoder=("E2", "E3"), decoder=("D2",), teacher="D1")
    results = []
    for compute in ("definition", "training"):
        blocks = {k: v.clone().requires_grad_(True) for k, v in _separated_blocks(torch.bfloat16).items()}
        gen = torch.Generator().manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if compute == "definition":
                scr, ifd = scr_loss(blocks, roles, "random", gen), ifd_loss(blocks, roles)
            else:
                scr, ifd = selfreg_losses(blocks, roles, "random", gen)
        assert scr.dtype == ifd.dtype == torch.float32
        (scr + ifd).backward()
        results.append((scr.item(), ifd.item(), {n: blocks[n].grad for n in roles.students}))
    (scr_def, ifd_def, grads_def), (scr_tr, ifd_tr, grads_tr) = results
    # the teacher is pooled in bfloat16 by the definition and from its float32 pooling here
    assert scr_tr == pytest.approx(scr_def, rel=1e-2)
    assert ifd_tr == pytest.approx(ifd_def, rel=1e-5)
    for name, grad in grads_tr.items():
        assert grad.dtype == torch.bfloat16 and grad.is_contiguous(memory_format=torch.channels_last)
        reference = grads_def[name].float()
        # elementwise sums of cancelling terms: compare against the gradient's scale
        assert (grad.float() - reference).abs().max() <= 1e-2 * reference.abs().max(), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_gradients_in_half_precision_match_the_float32_gradients(dtype):
    # the backward multiplies in the student's precision (bfloat16) or in float32 (float16)
    roles = BlockRoles(encoder=("E2", "E3"), decoder=("D2",), teacher="D1")
    grads = {}
    for kind in (torch.float32, dtype):
        blocks = {k: v.clone().requires_grad_(True) for k, v in _separated_blocks(kind).items()}
        scr, ifd = selfreg_losses(blocks, roles, "random", torch.Generator().manual_seed(3))
        (0.015 * scr + 0.015 * ifd).backward()
        grads[kind] = {n: blocks[n].grad for n in roles.students}
    for name in roles.students:
        half, full = grads[dtype][name], grads[torch.float32][name]
        assert half.dtype == dtype
        # the half-precision maps round their values by 2^-8 (bfloat16) or 2^-11 (float16)
        assert (half.float() - full).abs().max() <= 2e-2 * full.abs().max(), name


def test_training_terms_pool_the_teacher_to_sizes_that_do_not_divide_it():
    # 7 x 5 and 3 x 2 students of a 15 x 11 teacher: adaptive pooling with uneven windows
    roles = BlockRoles(encoder=("E2",), decoder=("D2",), teacher="D1")
    torch.manual_seed(1)
    blocks = {"E2": torch.randn(1, 4, 7, 5), "D2": torch.randn(1, 3, 3, 2), "D1": torch.randn(1, 6, 15, 11)}
    gen = torch.Generator().manual_seed(2)
    expected = scr_loss(blocks, roles, "random", gen)
    gen = torch.Generator().manual_seed(2)
    scr, ifd = selfreg_losses(blocks, roles, "random", gen)
    assert scr.item() == pytest.approx(expected.item(), rel=1e-5)
    assert ifd.item() == pytest.approx(ifd_loss(blocks, roles).item(), rel=1e-4)


def test_training_terms_handle_a_single_channel_and_skip_terms_not_asked_for():
    roles = BlockRoles(encoder=("E2",), decoder=(), teacher="D1")
    blocks = {"E2": torch.randn(2, 1, 4, 4, requires_grad=True), "D1": torch.randn(2, 3, 8, 8)}
    scr, ifd = selfreg_losses(blocks, roles, "random", torch.Generator().manual_seed(0))
    assert ifd.item() == 0.0  # one channel: no pair to distil
    expected_scr = scr_loss(blocks, roles, "random", torch.Generator().manual_seed(0))
    assert scr.item() == pytest.approx(expected_scr.item(), rel=1e-5)
    scr.backward()
    assert blocks["E2"].grad.abs().sum() > 0
    assert selfreg_losses(blocks, roles, scr=False)[0] is None
    assert selfreg_losses(blocks, roles, ifd=False)[1] is None
