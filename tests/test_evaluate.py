import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modeconn.evaluation import stacked
from modeconn.params.batchnorm import load_point, recompute_statistics
from modeconn.evaluation.evaluate import PathEval, evaluate_path, grid
from modeconn.models import build
from modeconn.paths import PiecewiseLinearPath, linear
from modeconn.reporting.plots import plot_paths
from modeconn.evaluation.sequential import SequentialStack, sequential_layers
from modeconn.evaluation.stacked import StackedModel, first_layer

STACKS = (StackedModel, SequentialStack)


def data(n=300, d=10, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, :classes] * 2).argmax(1)
    return x, y


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))


def bn_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def bn_deep(seed):
    """Every way a BatchNorm1d can sit in a plain MLP: after the first Linear, after a Linear through a
    Dropout, after a Linear without bias, without affine parameters, and after a ReLU instead of a Linear."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, 12), nn.Dropout(0.2), nn.BatchNorm1d(12), nn.ReLU(),
                         nn.Linear(12, 12, bias=False), nn.BatchNorm1d(12, affine=False), nn.ReLU(),
                         nn.Linear(12, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 3))


def plain_metrics(model, x, y):
    with torch.no_grad():
        out = model.eval()(x)
    return F.cross_entropy(out, y).item(), (out.argmax(1) != y).float().mean().item()


def test_batched_and_one_at_a_time_agree(device):
    x, y = data()
    model, a, b = mlp(0), mlp(1).state_dict(), mlp(2).state_dict()
    path = linear(a, b)
    kw = dict(num_points=13, batch_size=64, progress=False, device=device)
    fast = evaluate_path(model, path, (x, y), (x[:100], y[:100]), **kw)
    slow = evaluate_path(model, path, (x, y), (x[:100], y[:100]), batched=False, **kw)
    for key in fast.metrics:
        torch.testing.assert_close(torch.tensor(fast.metrics[key]), torch.tensor(slow.metrics[key]), atol=1e-5, rtol=0)
    assert fast.ts == slow.ts and len(fast.ts) == 13


def test_endpoints_reproduce_their_own_metrics(device):
    x, y = data()
    model, a, b = mlp(0), mlp(1), mlp(2)
    ev = evaluate_path(model, linear(a.state_dict(), b.state_dict()), (x, y), num_points=5, progress=False, device=device)
    for t_index, end in ((0, a), (-1, b)):
        loss, err = plain_metrics(end, x, y)
        assert ev.metrics["train_loss"][t_index] == pytest.approx(loss, abs=1e-6)
        assert ev.metrics["train_error"][t_index] == pytest.approx(err, abs=1e-7)


def test_batchnorm_statistics_are_recomputed_at_every_point_endpoints_included(device):
    x, y = data()
    model, a, b = bn_net(0), bn_net(1), bn_net(2)
    for end in (a, b):  # checkpoint statistics computed the way the evaluator computes them
        recompute_statistics(end, x[:128], batch_size=512)
    ev = evaluate_path(model, linear(a.state_dict(), b.state_dict()), (x, y), num_points=5, bn_items=128,
                       progress=False, device=device)
    for t_index, end in ((0, a), (-1, b)):
        loss, err = plain_metrics(end, x, y)
        assert ev.metrics["train_loss"][t_index] == pytest.approx(loss, abs=1e-6)
        assert ev.metrics["train_error"][t_index] == pytest.approx(err, abs=1e-7)
    # stale statistics (fresh buffers) would give another number: the recomputation matters
    stale = bn_net(1)
    stale.load_state_dict({k: v for k, v in a.state_dict().items() if "running" not in k}, strict=False)
    assert plain_metrics(stale, x, y)[0] != pytest.approx(ev.metrics["train_loss"][0], abs=1e-4)
    mid = load_point(bn_net(0), linear(a.state_dict(), b.state_dict())(0.5), x[:128])
    assert ev.metrics["train_loss"][ev.ts.index(0.5)] == pytest.approx(plain_metrics(mid, x, y)[0], abs=1e-6)


def test_grid_holds_uniform_points_every_knot_and_the_midpoint():
    assert grid(3, [0, 0.1, 1]) == [0.0, 0.1, 0.5, 1.0]
    assert grid(4) == pytest.approx([0, 1 / 3, 0.5, 2 / 3, 1])
    with pytest.raises(ValueError, match="num_points"):
        grid(1)


def test_piecewise_knots_are_evaluated_and_labelled(tmp_path, device):
    x, y = data()
    ws = [mlp(s).state_dict() for s in range(3)]
    path = PiecewiseLinearPath(ws, knots=[0, 0.3, 1], labels=["first", "second"])
    path.bound = 10.0
    ev = evaluate_path(mlp(0), path, (x, y), num_points=5, progress=False, name="pw")
    assert 0.3 in ev.ts and ev.segments[ev.ts.index(0.3)] == 1
    assert ev.within_bound is True
    ev.save(tmp_path)
    again = PathEval.load(tmp_path / "pw.json")
    assert again.metrics == ev.metrics and again.barriers == ev.barriers
    csv = (tmp_path / "pw.csv").read_text().splitlines()
    assert csv[0].startswith("t,train_loss,train_error") and "second" in csv[-1]
    assert json.loads((tmp_path / "pw.json").read_text())["within_bound"] is True
    other = evaluate_path(mlp(0), linear(ws[0], ws[2]), (x, y), num_points=5, progress=False, device=device)
    png = plot_paths([ev, other], tmp_path / "fig.png")
    assert png.stat().st_size > 1000


def test_steps_measure_parameter_distance(device):
    x, y = data()
    a, b = mlp(1).state_dict(), mlp(2).state_dict()
    ev = evaluate_path(mlp(0), linear(a, b), (x, y), num_points=11, progress=False, device=device)
    dist = torch.sqrt(sum(((a[k] - b[k]).double() ** 2).sum() for k in a)).item()
    assert ev.barriers["train_loss"]["length"] == pytest.approx(dist, rel=1e-9)


def test_a_path_for_another_model_is_refused(device):
    x, y = data()
    path = linear({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    with pytest.raises(KeyError, match="another model"):
        evaluate_path(mlp(0), path, (x, y), num_points=3, progress=False, device=device)


class Doubled(nn.Module):
    """An MLP whose first layer reads twice the input (not a view of it)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.body(2 * x)


def test_first_layer_is_shared_only_where_it_reads_the_input(device):
    x, _ = data()
    assert first_layer(mlp(0), x) == ("0", (10,))
    flat_first = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    assert first_layer(flat_first, torch.randn(5, 3, 4)) == ("1", (12,))
    assert first_layer(Doubled(), x) is None
    tied = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10))
    tied[2].weight = tied[0].weight
    assert first_layer(tied, x) is None
    a, b = mlp(1).state_dict(), mlp(2).state_dict()
    assert StackedModel(mlp(0), linear(a, b), x).first is not None


def _bn_variant(make, seed):
    """A net from ``make`` with BatchNorm scales and shifts away from 1 and 0, so statistics matter."""
    torch.manual_seed(seed)
    net = make()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return net


BN_MODELS = {  # make, input shape, items (> one statistics batch of 512), point chunk (None: the evaluator's)
    "bn-mlp": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2),
                                     nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)),
               (12,), 1100, None),
    "vgg11-bn": (lambda: build("vgg11_bn", (3, 8, 8), 3, width=1 / 16), (3, 8, 8), 600, 4),
    "preresnet20": (lambda: build("preresnet20", (3, 8, 8), 3, width=0.25), (3, 8, 8), 600, 4),
}


@pytest.mark.parametrize("name", BN_MODELS)
def test_batchnorm_chunks_match_one_point_at_a_time(name, device, monkeypatch):
    make, shape, n, chunk = BN_MODELS[name]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, *shape, generator=g), torch.randint(0, 3, (n,), generator=g)
    nets = [_bn_variant(make, seed) for seed in range(3)]
    path = PiecewiseLinearPath([net.state_dict() for net in nets], knots=[0, 0.4, 1])
    chunks = []
    for cls in STACKS:  # whichever evaluator takes the model (the plain MLP: SequentialStack)
        monkeypatch.setattr(cls, "statistics", lambda self, inputs, f=cls.statistics: chunks.append(len(self.ts))
                            or f(self, inputs))
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(ts=[0, 0.15, 0.3, 0.4, 0.55, 0.8, 1], bn_items=n, progress=False, device=device)
    fast = evaluate_path(model, path, (x, y), (x[:100], y[:100]), point_chunk=chunk, **kw)
    slow = evaluate_path(model, path, (x, y), (x[:100], y[:100]), batched=False, **kw)
    assert chunks and max(chunks) > 1  # the statistics of several points were computed together
    for key in fast.metrics:
        torch.testing.assert_close(torch.tensor(fast.metrics[key]), torch.tensor(slow.metrics[key]), atol=1e-5, rtol=0)
    assert fast.metrics["train_loss"][0] == pytest.approx(slow.metrics["train_loss"][0], abs=1e-6)
    for k, v in model.state_dict().items():  # the caller's model keeps its own statistics
        assert torch.equal(v.cpu(), before[k]), k


def test_out_of_memory_halves_the_point_chunk_and_retries(device, monkeypatch):
    x, y = data()
    path = linear(mlp(1).state_dict(), mlp(2).state_dict())
    sizes = []
    logits = SequentialStack.logits  # the MLP's evaluator

    def short_of_memory(self, inputs):
        sizes.append(len(self.ts))
        if len(self.ts) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return logits(self, inputs)

    monkeypatch.setattr(SequentialStack, "logits", short_of_memory)
    fast = evaluate_path(mlp(0), path, (x, y), num_points=9, point_chunk=8, progress=False, device=device)
    assert sizes[:2] == [8, 4] and max(sizes[2:]) == 2  # 8 and 4 points ran short, 2 at a time went through
    monkeypatch.setattr(SequentialStack, "logits", logits)
    slow = evaluate_path(mlp(0), path, (x, y), num_points=9, batched=False, progress=False, device=device)
    assert fast.ts == slow.ts
    torch.testing.assert_close(torch.tensor(fast.metrics["train_loss"]), torch.tensor(slow.metrics["train_loss"]),
                               atol=1e-5, rtol=0)
    assert fast.steps == pytest.approx(slow.steps, rel=1e-9)


def test_chunks_follow_the_memory_budget():
    cpu = torch.device("cpu")
    budget = stacked.budgets(cpu)
    chunk = stacked.point_chunk(61, n_params=85_000, widest=256, rows=512, device=cpu)
    assert chunk * 512 * 256 <= budget.activation and chunk > 1
    assert stacked.point_chunk(61, n_params=budget.parameters, widest=1, rows=1, device=cpu) == 1
    rows = stacked.batch_rows(chunk, 1437, 2048, 256, cpu)
    assert chunk * rows * 256 <= budget.activation


CUDA_MODELS = {"vgg16-bn": (lambda: build("vgg16_bn", (3, 32, 32), 10, width=0.5), (3, 32, 32)),
               "preresnet20": (lambda: build("preresnet20", (3, 32, 32), 10), (3, 32, 32))}


def _cuda_case(name, n=3000):
    make, shape = CUDA_MODELS[name]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)
    nets = [_bn_variant(make, seed) for seed in range(2)]
    return make, linear(nets[0].state_dict(), nets[1].state_dict()), (x.cuda(), y.cuda())


@pytest.mark.cuda
@pytest.mark.parametrize("name", CUDA_MODELS)
def test_cuda_batched_batchnorm_matches_the_reference(name):
    """cuDNN picks its kernels (some non-deterministic) by shape: chunks and one point differ in rounding only."""
    torch.backends.cudnn.benchmark = True
    try:
        make, path, split = _cuda_case(name)
        kw = dict(num_points=9, bn_items=2048, progress=False, device="cuda")
        fast = evaluate_path(make(), path, split, **kw)
        slow = evaluate_path(make(), path, split, batched=False, **kw)
    finally:
        torch.backends.cudnn.benchmark = False
    for key in fast.metrics:
        torch.testing.assert_close(torch.tensor(fast.metrics[key]), torch.tensor(slow.metrics[key]), atol=1e-5, rtol=0)


@pytest.mark.cuda
def test_cuda_memory_stays_within_the_budget(monkeypatch):
    """Peak memory of a batched evaluation: the stacked parameters plus a few widest activations."""
    make, path, split = _cuda_case("vgg16-bn")
    budget = stacked.Budget(parameters=200_000_000, activation=1 << 26)
    monkeypatch.setattr(stacked, "budgets", lambda device: budget)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    evaluate_path(make(), path, split, num_points=9, progress=False, device="cuda")
    peak = torch.cuda.max_memory_allocated() - base
    params = sum(p.numel() for p in make().parameters())
    widest = stacked.widest_activation(make().cuda().eval(), split[0])
    chunk = stacked.point_chunk(9, params, widest, 512, torch.device("cuda"))
    assert chunk > 1
    assert peak <= 4 * (3 * chunk * params + 8 * budget.activation)


def test_batchnorm_without_running_statistics_goes_one_point_at_a_time(device):
    x, y = data()

    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16, track_running_stats=False), nn.ReLU(), nn.Linear(16, 3))

    path = linear(net(1).state_dict(), net(2).state_dict())
    kw = dict(num_points=5, batch_size=100, progress=False, device=device)
    fast = evaluate_path(net(0), path, (x, y), point_chunk=4, **kw)  # normalised by each eval batch's statistics
    slow = evaluate_path(net(0), path, (x, y), batched=False, **kw)
    assert fast.metrics == slow.metrics


def test_plain_mlps_take_the_buffered_path_and_match_one_point_at_a_time_in_float64(device):
    """SequentialStack (batched products into reused buffers, BatchNorm folded into the Linear before it)
    gives the reference's numbers: float64 to 1e-12, with and without BatchNorm wherever it sits, on a linear
    and a piecewise-linear path; a model it cannot run exactly is refused."""
    x, y = data()
    x = x.double()
    assert sequential_layers(mlp(0), x) is not None and sequential_layers(Doubled(), x) is None
    for make in (mlp, bn_net, bn_deep):
        nets = [_bn_variant(lambda s=s: make(s), s).double() for s in range(3)]
        for path in (linear(nets[0].state_dict(), nets[1].state_dict()),
                     PiecewiseLinearPath([n.state_dict() for n in nets], knots=[0, 0.4, 1])):
            kw = dict(num_points=9, bn_items=300, progress=False, device=device)
            fast = evaluate_path(make(0).double(), path, (x, y), (x[:50], y[:50]), point_chunk=4, **kw)
            slow = evaluate_path(make(0).double(), path, (x, y), (x[:50], y[:50]), batched=False, **kw)
            for key in fast.metrics:
                torch.testing.assert_close(torch.tensor(fast.metrics[key]), torch.tensor(slow.metrics[key]),
                                           atol=1e-12, rtol=0)


@pytest.mark.parametrize("limit", [1, 700, 10**9])  # a flush per point, every few points, once at the end
def test_one_at_a_time_scores_queued_points_exactly_as_each_point_alone(limit, device, monkeypatch):
    """The one-point mode scores the logits of many points in one call (ScoreQueue): whatever the queue's
    size, every point's numbers are bit for bit those of the point scored alone, in the grid's order."""
    from modeconn.evaluation import single
    x, y = data(n=250)
    path = linear(mlp(1).state_dict(), mlp(2).state_dict())
    monkeypatch.setattr(single, "QUEUED_LOGITS", limit)
    ev = evaluate_path(mlp(0), path, (x, y), (x[:70], y[:70]), num_points=7, batch_size=64, batched=False,
                       progress=False, device=device)
    point = mlp(0).to(device).eval()
    xd, yd = x.to(device), y.to(device)
    for i, t in enumerate(ev.ts):
        point.load_state_dict(path.state_dict(t))
        assert (ev.metrics["train_loss"][i], ev.metrics["train_error"][i]) == single.profile_point(point, xd, yd, 64)
        alone = single.profile_point(point, xd[:70], yd[:70], 64)
        assert (ev.metrics["test_loss"][i], ev.metrics["test_error"][i]) == alone
