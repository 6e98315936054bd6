"""ClassBalancedLoss as an nn.Module (buffers, state_dict, pickling) and the paper's
bias-initialisation helpers."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from testing import make_counts, make_inputs

import cbfused


def test_weight_buffer_state_dict_and_to():
    counts = make_counts(12)
    m = cbfused.ClassBalancedLoss(counts, beta=0.99, loss_type="softmax_focal", gamma=0.5)
    torch.testing.assert_close(m.weight, cbfused.class_balanced_weights(counts, 0.99))
    assert "weight" in m.state_dict()
    m2 = cbfused.ClassBalancedLoss(weights=torch.ones(12), loss_type="softmax_focal", gamma=0.5)
    m2.load_state_dict(m.state_dict())
    x, y = make_inputs(16, 12, torch.float32, "cpu", "hard", seed=1)
    assert torch.equal(m(x, y), m2(x, y))
    assert m.to("meta").weight.device.type == "meta"
    assert "loss_type='softmax_focal'" in repr(m) and "gamma=0.5" in repr(m)


def test_pickle_and_deepcopy_and_torch_save():
    m = cbfused.ClassBalancedLoss(make_counts(7), beta=0.999, loss_type="focal", alpha=0.25)
    x, y = make_inputs(9, 7, torch.float32, "cpu", "hard", seed=2)
    ref = m(x, y)
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert torch.equal(clone(x, y), ref)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x, y), ref)


def test_module_train_step_reduces_loss():
    torch.manual_seed(0)
    counts = make_counts(5)
    x = torch.randn(256, 8)
    y = x[:, :5].argmax(1)
    lin = cbfused.init_sigmoid_bias_(torch.nn.Linear(8, 5))
    crit = cbfused.ClassBalancedLoss(counts, beta=0.99, loss_type="focal", gamma=0.5)
    opt = torch.optim.SGD(cbfused.param_groups_no_bias_decay(lin, 1e-3), lr=0.5)
    first = None
    for _ in range(30):
        loss = crit(lin(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_init_sigmoid_bias_and_param_groups():
    lin = torch.nn.Linear(4, 10)
    cbfused.init_sigmoid_bias_(lin)
    assert torch.allclose(lin.bias, torch.full((10,), -math.log(9.0)))
    assert torch.allclose(torch.sigmoid(lin.bias), torch.full((10,), 0.1))
    cbfused.init_sigmoid_bias_(lin, prior=0.01)
    assert torch.allclose(torch.sigmoid(lin.bias), torch.full((10,), 0.01))
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), lin)
    groups = cbfused.param_groups_no_bias_decay(model, weight_decay=5e-4)
    assert groups[0]["weight_decay"] == 5e-4 and groups[1]["weight_decay"] == 0.0
    assert len(groups[1]["params"]) == 1 and groups[1]["params"][0] is lin.bias
    assert len(groups[0]["params"]) == 3
    torch.optim.SGD(groups, lr=0.1)  # accepted by an optimizer
    with pytest.raises(ValueError, match="no bias"):
        cbfused.init_sigmoid_bias_(torch.nn.Linear(3, 4, bias=False))
    with pytest.raises(ValueError, match=r"prior must be in \(0, 1\), got 1.0 \(1/C with C = 1 class\)"):
        cbfused.init_sigmoid_bias_(torch.nn.Linear(3, 1))


def test_public_api_names():
    for name in cbfused.__all__:
        assert hasattr(cbfused, name), name
    assert cbfused.BUILD_INFO["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512", "AVX512_BF16")


@pytest.mark.parametrize("cast", ["half", "bfloat16", "float", "to_bf16"])
def test_dtype_casts_keep_the_float64_class_weights(cast):
    """nn.Module casts (model.half(), .to(torch.bfloat16)) reach the loss modules too: their
    class weights stay float64 with the same values, and the loss still matches."""
    counts = [1000, 300, 17, 2, 1]
    crit = cbfused.ClassBalancedLoss(counts, beta=0.9999, loss_type="softmax")
    head = cbfused.ClassBalancedLinearLoss(3, counts, beta=0.9999, loss_type="softmax")
    before = crit.weight.clone()
    for m in (crit, head):
        getattr(m, cast)() if cast != "to_bf16" else m.to(torch.bfloat16)
    assert crit.weight.dtype == torch.float64 and torch.equal(crit.weight, before)
    assert head.class_weight.dtype == torch.float64 and torch.equal(head.class_weight, before)
    x = torch.randn(8, 5, dtype=torch.float64)
    y = torch.arange(8) % 5
    torch.testing.assert_close(
        crit(x, y), cbfused.reference.class_balanced_loss(x, y, before, "softmax"), rtol=1e-12, atol=0
    )


def test_numpy_integer_ignore_index_is_accepted():
    import numpy as np

    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([0, 255, 2, 1])
    a = cbfused.class_balanced_loss(
        x, y, weights=torch.ones(3), loss_type="softmax", ignore_index=np.int64(255)
    )
    b = cbfused.class_balanced_loss(x, y, weights=torch.ones(3), loss_type="softmax", ignore_index=255)
    assert torch.equal(a, b)
