"""The ``garipov`` schedule is the reference's ``learning_rate_schedule`` over its 1-based epochs."""
from __future__ import annotations

import pytest

from modeconn.training.loop import Schedule


def reference_factor(epoch: int, epochs: int) -> float:
    """Garipov et al.'s formula at their 1-based ``epoch`` (alpha = epoch / epochs)."""
    alpha = epoch / epochs
    if alpha <= 0.5:
        return 1.0
    if alpha <= 0.9:
        return 1.0 - (alpha - 0.5) / 0.4 * 0.99
    return 0.01


@pytest.mark.parametrize("epochs,factors", [
    (5, [1.0, 1.0, 0.7525, 0.2575, 0.01]),
    (20, [1.0] * 10 + [1 - k * 0.05 / 0.4 * 0.99 for k in range(1, 9)] + [0.01, 0.01]),
])
def test_garipov_schedule_is_the_references_one_based(epochs, factors):
    s = Schedule("garipov", 0.2, epochs)
    got = [s.at(e) / 0.2 for e in range(epochs)]  # the loop's 0-based epoch index
    assert got == pytest.approx(factors, abs=1e-12)
    assert got == pytest.approx([reference_factor(e, epochs) for e in range(1, epochs + 1)], abs=1e-12)
    assert got[-1] == pytest.approx(0.01)  # the last epoch runs at 1% of the base rate, as the reference's


def test_loop_uses_the_schedule_per_epoch():
    """A fitted curve's recorded per-epoch lr is the schedule's at each 0-based epoch."""
    import torch

    from modeconn.paths.curve_fit import fit_curve

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = {k: v + 0.1 for k, v in a.items()}
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    path = fit_curve(model, a, b, (x, y), epochs=5, lr=0.1, batch_size=16, progress=False)
    assert [lr / 0.1 for lr in path.info["lr"]] == pytest.approx([1.0, 1.0, 0.7525, 0.2575, 0.01])
