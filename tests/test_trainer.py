"""The Trainer: epochs / steps, tolerance, callbacks, history, transactional state."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from sklearn.base import BaseEstimator

from skdict.data.sources import as_source
from skdict.training import Trainer, TrainState, make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class MeanState(TrainState):
    mu: torch.Tensor = None
    gen: torch.Generator = None


class MeanLearner:
    """SGD on 0.5 * ||x - mu||^2: the loss falls and converges to a known value."""

    device = "cpu"

    def __init__(self, lr=0.5, fail_at=None):
        self.lr = lr
        self.fail_at = fail_at

    def init_state(self, source, generator):
        return MeanState(mu=torch.zeros(source.n_features, dtype=torch.float64),
                         gen=torch.Generator().manual_seed(0))

    def step(self, state, Xb):
        if self.fail_at is not None and state.n_steps == self.fail_at:
            raise ValueError("bad batch")
        loss = 0.5 * ((Xb - state.mu) ** 2).sum(1).mean()
        state.mu += self.lr * (Xb.mean(0) - state.mu)
        return {"loss": loss, "rows": float(Xb.shape[0])}


class _Est(BaseEstimator):
    pass


@pytest.fixture
def src(rng):
    return as_source(rng.standard_normal((100, 3)) + 5.0, estimator=_Est(), reset=True)


def test_epochs_steps_and_history(src):
    res = Trainer(max_iter=3, batch_size=32).run(MeanLearner(), src,
                                                 generator=torch.Generator().manual_seed(0))
    st = res.state
    assert (res.n_epochs, res.n_steps, res.stopped) == (3, 12, "max_iter")
    assert (st.n_epochs, st.n_steps, st.n_seen) == (3, 12, 300)
    assert len(st.history["loss"]) == 12 and all(isinstance(v, float) for v in st.history["loss"])
    assert st.history["rows"][:4] == [32.0, 32.0, 32.0, 4.0]
    assert len(st.epoch_loss) == 3
    np.testing.assert_allclose(st.epoch_loss[0], np.mean(st.history["loss"][:4]))
    assert st.epoch_loss[-1] < st.epoch_loss[0]
    res = Trainer(n_steps=10, batch_size=32).run(MeanLearner(), src,
                                                 generator=torch.Generator())
    assert (res.n_steps, res.stopped, res.state.n_epochs) == (10, "n_steps", 3)


def test_tol_stops_when_the_epoch_loss_stalls(src):
    res = Trainer(max_iter=100, tol=1e-3, batch_size=100, shuffle=False).run(MeanLearner(0.9),
                                                                            src)
    assert res.stopped == "tol" and res.n_epochs < 20
    losses = res.state.epoch_loss
    assert losses[-2] - losses[-1] < 1e-3 * abs(losses[-2])


def test_callbacks_see_metrics_and_can_stop(src):
    seen = []

    def cb(info):
        seen.append(info)
        return info["step"] < 5

    res = Trainer(max_iter=10, batch_size=10, callbacks=[cb]).run(MeanLearner(), src,
                                                                  generator=torch.Generator())
    assert res.stopped == "callback" and res.n_steps == 5 and len(seen) == 5
    assert set(seen[0]) >= {"step", "epoch", "loss", "rows"}
    assert isinstance(seen[0]["loss"], float)


def test_failed_run_leaves_a_cloned_state_intact(src):
    first = Trainer(max_iter=1, batch_size=25).run(MeanLearner(), src,
                                                   generator=torch.Generator()).state
    before = first.state_dict()
    with pytest.raises(ValueError, match="bad batch"):
        Trainer(max_iter=1, batch_size=25).run(MeanLearner(fail_at=5), src,
                                               state=first.clone(), generator=torch.Generator())
    after = first.state_dict()
    np.testing.assert_array_equal(before["mu"], after["mu"])
    assert first.n_steps == 4 and len(first.history["loss"]) == 4


def test_state_dict_round_trip_resumes_exactly(src):
    gen = torch.Generator().manual_seed(0)
    full = Trainer(max_iter=4, batch_size=16).run(MeanLearner(), src, generator=gen).state
    gen = torch.Generator().manual_seed(0)
    half = Trainer(max_iter=2, batch_size=16).run(MeanLearner(), src, generator=gen).state
    d = half.state_dict()
    assert isinstance(d["mu"], np.ndarray) and isinstance(d["history"]["loss"], np.ndarray)
    restored = MeanState.from_state_dict(d, device="cpu")
    assert isinstance(restored.gen, torch.Generator)
    rest = Trainer(max_iter=2, batch_size=16).run(MeanLearner(), src, state=restored,
                                                  generator=gen).state
    torch.testing.assert_close(rest.mu, full.mu, rtol=0, atol=0)
    assert rest.history["loss"] == full.history["loss"]
    with pytest.raises(ValueError, match="no fields"):
        MeanState.from_state_dict({**d, "bogus": 1})


def test_row_budget_makes_whole_passes(src, rng):
    # n_rows: the fewest whole passes whose rows reach the budget, within [1, max_iter]
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    res = Trainer(max_iter=100, n_rows=250, batch_size=32).run(MeanLearner(), src, generator=gen())
    assert (res.n_epochs, res.n_steps, res.state.n_seen, res.stopped) == (3, 12, 300, "n_rows")
    res = Trainer(max_iter=100, n_rows=300, batch_size=32).run(MeanLearner(), src, generator=gen())
    assert (res.n_epochs, res.state.n_seen) == (3, 300)
    res = Trainer(max_iter=2, n_rows=1000, batch_size=32).run(MeanLearner(), src, generator=gen())
    assert (res.n_epochs, res.stopped) == (2, "max_iter")
    res = Trainer(max_iter=100, n_rows=10, batch_size=32).run(MeanLearner(), src, generator=gen())
    assert (res.n_epochs, res.n_steps) == (1, 4)
    t = Trainer(max_iter=100, n_rows=250)
    assert [t.n_passes(n) for n in (100, 250, 251, 10**6, 1)] == [3, 1, 1, 1, 100]
    assert Trainer(max_iter=7).n_passes(100) == 7
    # n_steps overrides the budget
    res = Trainer(n_steps=5, n_rows=10, batch_size=32).run(MeanLearner(), src, generator=gen())
    assert res.n_steps == 5
    # a re-iterable stream of unknown length is counted as it is read
    blocks = [rng.standard_normal((10, 2)) for _ in range(3)]
    res = Trainer(max_iter=100, n_rows=65, batch_size=4).run(
        MeanLearner(), as_source(blocks, estimator=_Est(), reset=True))
    assert (res.n_epochs, res.state.n_seen) == (3, 90)
    # a one-pass generator is read once, without the ran-out warning (the budget
    # is not a request for more passes)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = Trainer(max_iter=100, n_rows=65, batch_size=4).run(
            MeanLearner(), as_source((b for b in blocks), estimator=_Est(), reset=True))
    assert (res.n_epochs, res.state.n_seen) == (1, 30)


def test_one_pass_stream_is_read_once(rng):
    blocks = [rng.standard_normal((10, 2)) for _ in range(3)]
    src = as_source((b for b in blocks), estimator=_Est(), reset=True)
    with pytest.warns(UserWarning, match="ran out after 9 steps \\(max_iter=5"):
        res = Trainer(max_iter=5, batch_size=4).run(MeanLearner(), src)
    assert res.n_epochs == 1 and res.n_steps == 9 and res.stopped == "exhausted"
    src = as_source((b for b in blocks), estimator=_Est(), reset=True)
    with pytest.warns(UserWarning, match="ran out after 9 steps \\(n_steps=50"):
        res = Trainer(n_steps=50, batch_size=4).run(MeanLearner(), src)
    assert res.n_steps == 9


def test_one_pass_stream_read_once_as_asked_does_not_warn(rng):
    import warnings

    blocks = [rng.standard_normal((10, 2)) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for trainer in (Trainer(max_iter=1, batch_size=4), Trainer(n_steps=5, batch_size=4)):
            src = as_source((b for b in blocks), estimator=_Est(), reset=True)
            trainer.run(MeanLearner(), src)


def test_non_finite_loss_is_a_clear_error(rng):
    src = as_source(rng.standard_normal((10, 2)), estimator=_Est(), reset=True)
    with pytest.raises(ValueError, match="non-finite"):
        Trainer(max_iter=3, batch_size=5).run(MeanLearner(lr=1e200), src)


def test_verbose_progress_bar(src, capsys):
    Trainer(max_iter=1, batch_size=50, verbose=1, desc="Mean").run(MeanLearner(), src)
    assert "Mean" in capsys.readouterr().err


def test_make_optimizer_uses_torch_optim():
    p = torch.zeros(3, requires_grad=True)
    opt = make_optimizer("adam", [p], 0.1)
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["fused"]
    (p - 1.0).pow(2).sum().backward()
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.1))  # Adam's first step is lr
    assert isinstance(make_optimizer("sgd", [p], 0.1), torch.optim.SGD)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer("lbfgs", [p], 0.1)


def test_an_iterable_that_does_not_start_over_warns(rng):
    blocks = [rng.standard_normal((10, 2)) for _ in range(3)]

    class SharedIterator:  # re-iterable in appearance; its second pass is empty
        def __init__(self):
            self._it = iter(blocks)

        def __iter__(self):
            return self._it

    src = as_source(SharedIterator(), estimator=_Est(), reset=True)
    with pytest.warns(UserWarning, match="yielded nothing on pass 2 \\(after 9 steps\\)"):
        res = Trainer(max_iter=3, batch_size=4).run(MeanLearner(), src)
    assert res.n_epochs == 1 and res.n_steps == 9
