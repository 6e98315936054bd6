"""The long-tail helpers: class prior, post-hoc logit adjustment (Menon et al.), LDAM's
margins (Cao et al.) and deferred re-weighting (DRW) of ClassBalancedLoss, against their
definitions in plain torch, and their errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from testing import LOSS_TYPES, make_counts

import cbfused


def test_class_prior_and_post_hoc_adjustment():
    counts = make_counts(7)
    pi = counts.double() / counts.sum()
    torch.testing.assert_close(cbfused.class_prior(counts), pi, rtol=0, atol=0)
    x = torch.randn(5, 7, 3, 4)
    for tau in (1.0, 0.5, 0.0):
        want = x - tau * pi.log().float().view(1, 7, 1, 1)
        torch.testing.assert_close(cbfused.adjust_logits(x, counts, tau), want)
    torch.testing.assert_close(cbfused.adjust_logits(x[0, :, 0, 0], counts), x[0, :, 0, 0] - pi.log().float())
    # a given prior (need not sum to 1: only its log's differences matter for the argmax)
    torch.testing.assert_close(
        cbfused.adjust_logits(x, prior=pi * 3, tau=1.0), x - (3 * pi).log().float().view(1, 7, 1, 1)
    )
    # the adjustment moves predictions toward rare classes: the argmax of equal logits is the rarest class
    flat = torch.zeros(1, 7)
    assert cbfused.adjust_logits(flat, counts).argmax().item() == int(counts.argmin())
    assert cbfused.adjust_logits(x.half(), counts).dtype == torch.float16


def test_ldam_margins_definition():
    counts = make_counts(10)
    m = cbfused.ldam_margins(counts, max_margin=0.5)
    d = counts.double() ** -0.25
    torch.testing.assert_close(m, d * (0.5 / d.max()))
    assert m.max().item() == pytest.approx(0.5) and int(m.argmax()) == int(counts.argmin())


def test_long_tail_helpers_reject_bad_values():
    with pytest.raises(ValueError, match=r"classes \[2\] have none"):
        cbfused.class_prior([5, 3, 0])
    with pytest.raises(ValueError, match=r"ldam_margins needs every class to have samples; classes \[0\]"):
        cbfused.ldam_margins([0, 3])
    with pytest.raises(ValueError, match=r"max_margin must be a finite number > 0, got -1"):
        cbfused.ldam_margins([1, 3], max_margin=-1)
    with pytest.raises(
        ValueError, match=r"prior must be finite and > 0 for every class, got 0.0 for class 1"
    ):
        cbfused.adjust_logits(torch.zeros(2, 3), prior=torch.tensor([0.5, 0.0, 0.5]))
    with pytest.raises(ValueError, match=r"the prior has 3 classes but the logits have 4 \(dimension 1\)"):
        cbfused.adjust_logits(torch.zeros(2, 4), [1, 2, 3])
    with pytest.raises(ValueError, match=r"give exactly one of samples_per_class or prior"):
        cbfused.adjust_logits(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"tau must be a finite number, got nan"):
        cbfused.adjust_logits(torch.zeros(2, 3), [1, 2, 3], tau=float("nan"))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_deferred_reweighting(loss_type):
    """DRW: weights of 1 before drw_epoch, the class-balanced weights from it on."""
    counts = make_counts(6)
    crit = cbfused.ClassBalancedLoss(counts, beta=0.9999, loss_type=loss_type, gamma=2.0, drw_epoch=3)
    unweighted = cbfused.ClassBalancedLoss(weights=torch.ones(6), loss_type=loss_type, gamma=2.0)
    weighted = cbfused.ClassBalancedLoss(counts, beta=0.9999, loss_type=loss_type, gamma=2.0)
    x, y = torch.randn(9, 6), torch.randint(0, 6, (9,))
    for epoch in range(5):
        crit.set_epoch(epoch)
        want = unweighted(x, y) if epoch < 3 else weighted(x, y)
        assert crit.weights_active == (epoch >= 3)
        torch.testing.assert_close(crit(x, y), want, rtol=0, atol=0)
    assert "drw_epoch=3, epoch=4" in repr(crit)
    # the weights that apply later are saved, the deferral state is not a buffer
    assert set(crit.state_dict()) == {"weight"}
    with pytest.raises(ValueError, match=r"epoch must be an int >= 0, got -1"):
        crit.set_epoch(-1)
    with pytest.raises(ValueError, match=r"drw_epoch must be an int >= 0, got 1.5"):
        cbfused.ClassBalancedLoss(counts, drw_epoch=1.5)


def test_ldam_style_margin_through_the_logits_matches_its_definition():
    """What ldam_margins is for today: LDAM's loss written with cbfused's softmax on
    s * (z - Delta_y e_y) equals its definition with F.cross_entropy."""
    counts = make_counts(5)
    delta = cbfused.ldam_margins(counts, 0.5).float()
    x, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    z = 30.0 * (x - delta[y].unsqueeze(1) * F.one_hot(y, 5))
    ours = cbfused.class_balanced_loss(z, y, weights=torch.ones(5), loss_type="softmax")
    torch.testing.assert_close(ours, F.cross_entropy(z, y))
