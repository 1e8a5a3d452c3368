import math

import numpy as np
import pytest
import torch

from skdict.losses import (
    AdaptiveSparsityScheduler,
    auxk_loss,
    balanced_loss,
    fvu_loss,
    sparsity_loss,
)


def test_sparsity_loss_kinds():
    c = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    t = 0.2
    assert float(sparsity_loss(c, t, "l2")) == pytest.approx(np.mean([0.01, 0.01, 0.16]))
    assert float(sparsity_loss(c, t, "l1")) == pytest.approx(np.mean([0.1, 0.1, 0.4]))
    kl = [t * math.log(t / x) + (1 - t) * math.log((1 - t) / (1 - x)) for x in (0.1, 0.3, 0.6)]
    assert float(sparsity_loss(c, t, "kl")) == pytest.approx(np.mean(kl))
    assert float(sparsity_loss(c, t, "kl", reduction="sum")) == pytest.approx(sum(kl))
    hub = [0.5 * 0.01, 0.5 * 0.01, 0.1 * (0.4 - 0.05)]
    assert float(sparsity_loss(c, t, "huber", delta=0.1)) == pytest.approx(np.mean(hub))
    out = sparsity_loss(c, t, "l1", reduction="none")
    assert out.shape == (3,)
    assert float(sparsity_loss(0.2, 0.2, "kl")) == pytest.approx(0.0, abs=1e-12)


def test_sparsity_loss_is_differentiable():
    c = torch.tensor([0.1, 0.5], dtype=torch.float64, requires_grad=True)
    sparsity_loss(c, 0.2, "kl", reduction="sum").backward()
    # d/dc KL = -t/c + (1-t)/(1-c)
    expected = [-0.2 / 0.1 + 0.8 / 0.9, -0.2 / 0.5 + 0.8 / 0.5]
    np.testing.assert_allclose(c.grad.numpy(), expected)


def test_sparsity_loss_errors():
    with pytest.raises(ValueError, match="kind"):
        sparsity_loss(0.1, 0.2, "l3")
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        sparsity_loss(0.1, 1.0, "kl")
    with pytest.raises(ValueError, match="reduction"):
        sparsity_loss(0.1, 0.2, reduction="max")


def test_balanced_loss():
    losses = {"mse": torch.tensor(4.0, requires_grad=True), "l1": torch.tensor(1.0)}
    total, parts = balanced_loss(losses, {"l1": 0.5})
    assert float(total.detach()) == pytest.approx(4.5) and parts == {"mse": 4.0, "l1": 0.5}
    total, parts = balanced_loss(losses, shares={"mse": 3, "l1": 1})
    assert parts["mse"] == pytest.approx(3.75) and parts["l1"] == pytest.approx(1.25)
    total.backward()
    assert float(losses["mse"].grad) == pytest.approx(3.75 / 4.0)
    with pytest.raises(ValueError, match="unknown"):
        balanced_loss(losses, shares={"x": 1})
    with pytest.raises(ValueError, match="at least one"):
        balanced_loss({})


def test_scheduler_linear_cosine_step():
    lin = AdaptiveSparsityScheduler(100, 20, warmup_steps=4)
    assert lin.value == 100
    assert [lin.step() for _ in range(5)] == [80, 60, 40, 20, 20]
    cos = AdaptiveSparsityScheduler(1.0, 0.0, warmup_steps=4, schedule="cosine")
    vals = [cos.value_at(i) for i in range(5)]
    np.testing.assert_allclose(vals, [0.5 + 0.5 * math.cos(math.pi * i / 4) for i in range(5)])
    st = AdaptiveSparsityScheduler(64, 16, warmup_steps=8, schedule="step", n_steps=2)
    assert [st.value_at(i) for i in range(9)] == [64] * 4 + [40] * 4 + [16]
    assert AdaptiveSparsityScheduler(5, 1, warmup_steps=0).value == 1


def test_scheduler_accuracy_threshold():
    s = AdaptiveSparsityScheduler(10, 2, warmup_steps=2, accuracy_threshold=0.9)
    assert s.step(accuracy=0.5) == 10  # reconstruction too poor: hold
    assert s.step() == 10
    assert s.step(accuracy=0.95) == 6
    assert s.step(accuracy=0.99) == 2
    assert s.reset().value == 10


def test_scheduler_errors():
    with pytest.raises(ValueError, match="schedule"):
        AdaptiveSparsityScheduler(1, 2, 3, schedule="exp")
    with pytest.raises(ValueError, match="warmup_steps"):
        AdaptiveSparsityScheduler(1, 2, -1)


def test_fvu_loss_matches_numpy():
    rng = np.random.default_rng(0)
    x, x_hat = rng.normal(size=(20, 5)), rng.normal(size=(20, 5))
    want = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    got = fvu_loss(torch.from_numpy(x), torch.from_numpy(x_hat))
    assert float(got) == pytest.approx(want, rel=1e-12)
    # a constant batch: the floor keeps the ratio finite
    c = torch.ones(4, 3, dtype=torch.float64)
    assert torch.isfinite(fvu_loss(c, c + 1))


def test_auxk_loss_matches_dense_oracle():
    g = torch.Generator().manual_seed(0)
    K, d, B, k_aux = 10, 4, 6, 2
    P = {"W_enc": torch.randn(K, d, generator=g, dtype=torch.float64),
         "b_enc": torch.randn(K, generator=g, dtype=torch.float64),
         "W_dec": torch.randn(K, d, generator=g, dtype=torch.float64, requires_grad=True),
         "b_dec": torch.randn(d, generator=g, dtype=torch.float64)}
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    x_hat = torch.randn(B, d, generator=g, dtype=torch.float64)
    dead = torch.zeros(K, dtype=torch.bool)
    dead[[1, 4, 7]] = True
    pre = (x - P["b_dec"]) @ P["W_enc"].T + P["b_enc"]
    loss = auxk_loss(x, x_hat, pre, P, dead, k_aux)
    # oracle: each row's top-2 dead pre-activations, ReLU, decode, FVU of the residual
    Z = torch.zeros(B, K, dtype=torch.float64)
    masked = pre.masked_fill(~dead, float("-inf"))
    vals, idx = masked.topk(k_aux, dim=1)
    Z.scatter_(1, idx, vals.relu())
    e = x - x_hat
    want = ((e - Z @ P["W_dec"]) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
    loss.backward()
    live = ~dead
    assert (P["W_dec"].grad[live] == 0).all() and P["W_dec"].grad[dead].abs().sum() > 0
    assert float(auxk_loss(x, x_hat, pre, P, torch.zeros(K, dtype=torch.bool), 2)) == 0.0
