"""Effective number and class-balanced weights: exact values (mpmath at 50 digits), limits,
normalisation, the zero-count policy and counting helpers."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

import cbfused


def exact_effective(n: int, beta: float) -> float:
    mpmath.mp.dps = 50
    b = mpmath.mpf(beta)
    return float((1 - b**n) / (1 - b))


@pytest.mark.parametrize(
    "beta", [0.0, 1e-300, 2.2e-311, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999, 1 - 1e-12]
)
def test_effective_number_exact(beta):
    counts = [1, 2, 3, 10, 100, 1234, 50000, 10**7]
    e = cbfused.effective_number(counts, beta)
    assert e.dtype == torch.float64
    for n, v in zip(counts, e.tolist(), strict=True):
        assert v == pytest.approx(exact_effective(n, beta), rel=1e-13)


def test_naive_formula_loses_digits_where_ours_does_not():
    beta, n = 1 - 1e-10, 3
    exact = exact_effective(n, beta)
    naive = (1 - beta**n) / (1 - beta)  # 1 - beta**n cancels: ~5 of 16 digits lost
    ours = cbfused.effective_number([n], beta).item()
    assert abs(ours - exact) / exact < 1e-13
    assert abs(naive - exact) / exact > 1e-11


def test_limits():
    counts = torch.tensor([1, 10, 100, 1000])
    assert torch.equal(cbfused.class_balanced_weights(counts, 0.0), torch.ones(4, dtype=torch.float64))
    w = cbfused.class_balanced_weights(counts, 1 - 1e-12)  # -> inverse frequency
    inv = 1.0 / counts.double()
    torch.testing.assert_close(w, inv / inv.sum() * 4, rtol=1e-8, atol=0)
    assert cbfused.effective_number([0, 5], 0.9)[0].item() == 0.0


def test_weights_formula_and_normalisation():
    counts = [5000, 1200, 300, 40, 7]
    beta = 0.999
    w = cbfused.class_balanced_weights(counts, beta)
    raw = torch.tensor([(1 - beta) / (1 - beta**n) for n in counts], dtype=torch.float64)
    torch.testing.assert_close(w, raw / raw.sum() * len(counts), rtol=1e-12, atol=0)
    assert w.sum().item() == pytest.approx(len(counts))
    raw2 = cbfused.class_balanced_weights(counts, beta, normalize=False)
    torch.testing.assert_close(raw2, raw, rtol=1e-12, atol=0)
    assert w.argmax().item() == 4  # the rarest class weighs most


def test_zero_count_policy():
    with pytest.raises(ValueError, match=r"classes \[1, 3\] have zero samples.*whole training set"):
        cbfused.class_balanced_weights([10, 0, 5, 0], 0.9)
    w = cbfused.class_balanced_weights([10, 0, 5, 0], 0.9, zero_count="zero")
    assert w[1] == 0 and w[3] == 0
    assert w.sum().item() == pytest.approx(2.0)
    assert torch.isfinite(w).all()
    with pytest.raises(ValueError, match="every class has zero samples"):
        cbfused.class_balanced_weights([0, 0], 0.9, zero_count="zero")


@pytest.mark.parametrize(
    "counts, match",
    [
        ([3, -2, 4], r"negative count -2 for class 1"),
        ([3, float("nan")], r"non-finite count nan for class 1"),
        ([[1, 2], [3, 4]], r"must be 1-D"),
        ([], r"must be 1-D"),
    ],
)
def test_bad_counts(counts, match):
    with pytest.raises(ValueError, match=match):
        cbfused.class_balanced_weights(counts, 0.9)


@pytest.mark.parametrize("beta", [1.0, -0.1, 1.5, float("nan"), float("inf")])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\), got"):
        cbfused.class_balanced_weights([1, 2], beta)


def test_class_counts():
    y = torch.tensor([0, 2, 2, -100, 1, 2])
    assert cbfused.class_counts(y, 4).tolist() == [1, 1, 3, 0]
    t = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert cbfused.class_counts(t, 3).tolist() == [1.0, 0.0, 2.0]
    with pytest.raises(ValueError, match="target 4 is out of range for 4 classes"):
        cbfused.class_counts(torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match="target -3 is out of range"):
        cbfused.class_counts(torch.tensor([-3, 1]), 4)


def test_weights_device_and_dtype():
    w = cbfused.class_balanced_weights([3, 4], 0.9, device="meta", dtype=torch.float32)
    assert w.device.type == "meta" and w.dtype == torch.float32
    assert math.isclose(cbfused.class_balanced_weights([3, 4], 0.9).sum().item(), 2.0)


def test_functional_weights_follow_the_counts_they_were_computed_from():
    """The functional API caches the weights it derives from samples_per_class: a count
    changed in place, a new tensor or a new list must give the new weights."""
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.arange(16) % 4
    counts = torch.tensor([100, 10, 5, 1])

    def ours(c, beta=0.99):
        return cbfused.class_balanced_loss(x, y, samples_per_class=c, beta=beta, loss_type="softmax")

    def ref(c, beta=0.99):
        w = cbfused.class_balanced_weights(c, beta)
        return cbfused.reference.class_balanced_loss(x, y, w, "softmax")

    torch.testing.assert_close(ours(counts), ref(counts), rtol=1e-12, atol=0)
    counts[0] = 3  # in place
    torch.testing.assert_close(ours(counts), ref(counts), rtol=1e-12, atol=0)
    torch.testing.assert_close(ours(counts, 0.5), ref(counts, 0.5), rtol=1e-12, atol=0)
    as_list = [7, 1, 1, 2]
    torch.testing.assert_close(ours(as_list), ref(as_list), rtol=1e-12, atol=0)
    as_list[0] = 1
    torch.testing.assert_close(ours(as_list), ref(as_list), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="classes \\[1\\] have zero samples"):
        ours([3, 0, 1, 1])
