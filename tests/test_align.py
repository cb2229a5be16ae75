"""Permutation alignment: exact recovery of permuted networks, function preservation, and barriers."""
import pytest
import torch
import torchvision
from torch import nn
from torch.func import functional_call

from modeconn.align import activation_matching, repair, weight_matching
from modeconn.evaluation.evaluate import evaluate_path
from modeconn.models import build
from modeconn.paths import linear
from modeconn.params.path import float_state
from modeconn.units import infer
from nets import trained_pair

IMAGE = (1, 8, 8)
CIFAR = (3, 32, 32)
MODELS = {  # name: (model factory, input shape)
    "mlp": (lambda: build("mlp", (64,), 10, hidden=(32, 24)), (64,)),
    "convnet": (lambda: build("convnet", IMAGE, 10, width=8, bias=True), IMAGE),
    "vgg11": (lambda: build("vgg11", IMAGE, 10, width=0.125, fc_width=32), IMAGE),
    "vgg11_bn": (lambda: build("vgg11_bn", IMAGE, 10, width=0.125, fc_width=32), IMAGE),
    "preresnet20": (lambda: build("preresnet20", IMAGE, 10, width=0.5), IMAGE),
    "torchvision_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), CIFAR),
    # blocked groups: conv groups (a tie of input and output blocks), attention heads (q/k and v/out)
    "grouped_conv": (lambda: nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                                           nn.Conv2d(8, 8, 3, groups=4, padding=1), nn.ReLU(),
                                           nn.Flatten(), nn.Linear(8 * 64, 10)), IMAGE),
    "transformer_encoder": (lambda: TokenClassifier(), (5, 8)),
}


class TokenClassifier(nn.Module):
    """Tokens -> Linear -> two post-norm transformer layers (4 heads) -> mean over tokens -> Linear."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.inp, self.out = nn.Linear(8, 32), nn.Linear(32, 10)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x):
        return self.out(self.enc(self.inp(x)).mean(1))


def _state(model: torch.nn.Module, seed: int) -> dict:
    """The model's state with every float entry drawn at random (BatchNorm statistics included), so that
    matching has nothing but the weights to go on."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            v = torch.randn(v.shape, generator=gen) * (v.std() if v.numel() > 1 and v.std() > 0 else 1.0)
            if "running_var" in k:
                v = v.abs() + 0.5
        out[k] = v
    return out


def _outputs(model, state, x):
    with torch.no_grad():
        return functional_call(model.eval(), state, (x,))


@pytest.fixture(scope="module", params=list(MODELS))
def permuted(request):
    make, shape = MODELS[request.param]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(1))
    spec = infer(model, x[:2])
    theta_a = _state(model, 2)
    theta_b = spec.permute(theta_a, spec.random_perms(torch.Generator().manual_seed(3)))
    dtype = torch.float32 if request.param.startswith("torchvision") else torch.float64
    return request.param, model, x, spec, theta_a, theta_b, weight_matching(model, theta_a, theta_b, spec=spec, dtype=dtype)


def test_weight_matching_recovers_a_random_permutation_exactly(permuted):
    name, model, x, spec, theta_a, theta_b, al = permuted
    assert al.moved and sum(al.moved.values()) > 0
    for k, v in theta_a.items():
        if v.is_floating_point():
            torch.testing.assert_close(al.theta[k], v, atol=1e-6, rtol=0, msg=f"{name}: {k}")
        else:
            assert torch.equal(al.theta[k], v)
    assert al.fraction_permuted > 0.99
    # the aligned straight line is flat: every point is theta_A
    ev = evaluate_path(model, linear(theta_a, al.theta), (x, torch.arange(len(x)) % 10), num_points=3,
                       bn_items=len(x), device="cpu", progress=False)
    loss = ev.metrics["train_loss"]
    assert max(loss) - min(loss) <= 1e-5 * max(1.0, abs(loss[0]))


def test_aligned_state_computes_the_same_function_as_b(permuted):
    name, model, x, spec, theta_a, theta_b, al = permuted
    torch.testing.assert_close(_outputs(model, al.theta, x), _outputs(model, theta_b, x), atol=1e-5, rtol=1e-5)
    assert set(al.theta) == set(theta_b)


def test_weight_matching_objective_never_decreases(permuted):
    *_, al = permuted
    obj = al.objective
    assert len(obj) == al.info["sweeps"] + 1 and al.info["converged"]
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(obj, obj[1:]))
    assert obj[-1] > obj[0]


def test_activation_matching_recovers_a_permuted_mlp():
    make, shape = MODELS["mlp"]
    model = make().eval()
    x = torch.randn(512, *shape, generator=torch.Generator().manual_seed(0))
    spec = infer(model, x[:2])
    theta_a = float_state(model.state_dict())
    theta_b = spec.permute(theta_a, spec.random_perms(torch.Generator().manual_seed(4)))
    al = activation_matching(model, theta_a, theta_b, (x, torch.zeros(len(x), dtype=torch.long)), spec=spec)
    for k in theta_a:
        torch.testing.assert_close(al.theta[k], theta_a[k], atol=1e-6, rtol=0)
    assert al.objective[1] == pytest.approx(sum(g.size for g in spec.groups), rel=1e-6)


@pytest.fixture(scope="module")
def digits_mlps(flat):
    a, b = trained_pair("align-mlp-64", lambda: build("mlp", (64,), 10, hidden=(64, 64)), flat)
    return a, a.state_dict(), b.state_dict()


def _barrier(model, path, data) -> float:
    ev = evaluate_path(model, path, data, num_points=11, device="cpu", progress=False)
    return ev.barriers["train_loss"]["mean"]


def test_alignment_halves_the_barrier_of_two_trained_mlps(digits_mlps, flat):
    model, theta_a, theta_b = digits_mlps
    naive = _barrier(model, linear(theta_a, theta_b), flat)
    assert naive > 0.05
    for al in (weight_matching(model, theta_a, theta_b, example_input=flat[0][:2]),
               activation_matching(model, theta_a, theta_b, flat)):
        torch.testing.assert_close(_outputs(model, al.theta, flat[0]), _outputs(model, theta_b, flat[0]),
                                   atol=1e-5, rtol=1e-5)
        assert _barrier(model, linear(theta_a, al.theta), flat) <= naive / 2, al.method


def test_repair_keeps_the_endpoints_and_lowers_the_midpoint(digits_mlps, flat):
    model, theta_a, theta_b = digits_mlps
    al = weight_matching(model, theta_a, theta_b, example_input=flat[0][:2])
    line = linear(theta_a, al.theta)
    fixed = repair(line, model, flat)
    assert fixed.knots == line.knots and fixed.keys() == line.keys()
    for t in (0.0, 1.0):
        for k, v in line(t).items():
            assert torch.equal(fixed(t)[k], v)
    ends = fixed.points([0.0, 0.5, 1.0])
    assert torch.equal(ends["1.weight"][0], line(0.0)["1.weight"])
    assert torch.equal(ends["1.weight"][2], line(1.0)["1.weight"])
    assert _barrier(model, fixed, flat) < _barrier(model, line, flat)


def test_repair_matches_the_interpolated_statistics_with_batchnorm(images):
    """A BN net whose BN does not follow a layer directly (PreResNet): REPAIR's points reach the
    interpolated per-unit statistics at every corrected layer."""
    make = lambda: build("preresnet20", IMAGE, 10, width=0.5)  # noqa: E731
    torch.manual_seed(0)
    a, b = make().eval(), make().eval()
    line = linear(a.state_dict(), b.state_dict())
    fixed = repair(line, a, images, max_items=256)
    assert fixed.sites and fixed.info["repair"]["spread_only"]  # the bias-free convs into the stream
    stats, _ = fixed._run(fixed(0.5))
    for site in fixed.sites:
        target_std = 0.5 * (fixed.stats_a[site][1] + fixed.stats_b[site][1])
        torch.testing.assert_close(stats[site][1], target_std, atol=1e-4, rtol=1e-3)


def test_alignment_needs_a_spec_or_an_example_input(digits_mlps):
    model, theta_a, theta_b = digits_mlps
    with pytest.raises(ValueError, match="example_input"):
        weight_matching(model, theta_a, theta_b)
    with pytest.raises(KeyError, match="1.weight"):
        weight_matching(model, {k: v for k, v in theta_a.items() if k != "1.weight"}, theta_b,
                        example_input=torch.zeros(2, 64))


def test_run_step_reports_each_path_naive_aligned_and_repaired(digits_mlps, flat, tmp_path):
    from modeconn.align.step import align_endpoints, path_variants
    from modeconn.paths.registry import PathContext, build_path

    model, theta_a, theta_b = digits_mlps
    ctx = PathContext(model=model, theta_a=float_state(theta_a), theta_b=float_state(theta_b), data=flat,
                      device=torch.device("cpu"), work_dir=tmp_path, progress=False)
    options = {"method": "weights", "repair": True}
    al = align_endpoints(options, ctx)
    rows = list(path_variants({"linear": {}}.items(), ctx, options, al))
    assert [r[2] for r in rows] == ["linear", "linear (aligned)", "linear (aligned+REPAIR)"]
    paths = [finish(build_path(name, c, opts)) for name, opts, _, c, finish in rows]
    for k in theta_a:
        assert torch.equal(paths[0](1.0)[k], theta_b[k])
        assert torch.equal(paths[1](1.0)[k], al.theta[k]) and torch.equal(paths[2](1.0)[k], al.theta[k])
    assert al.summary()["method"] == "weights" and al.summary()["units_moved"] > 0


@pytest.mark.parametrize("overrides, message", [
    (["align=weights", "align.method=weight"], "align must be one of none, weights, activations"),
    (["align=weights", "align.repair=yes"], "align.repair must be true or false"),
    (["align=activations", "align.max_items=0"], "align.max_items must be a positive integer"),
    (["align=weights", "+align.iters=3"], r"align has unknown option\(s\) \['iters'\]"),
])
def test_bad_align_options_are_refused_by_name(overrides, message):
    from hydra import compose, initialize_config_dir

    from modeconn.run.cli import CONF_DIR
    from modeconn.run.config import ConfigError, validate

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_the_preset_aligns_a_3x512_mlp_with_repair():
    from hydra import compose, initialize_config_dir

    from modeconn.run.cli import CONF_DIR
    from modeconn.run.config import validate

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=ainsworth2023_mlp_quick"])
    validate(cfg)
    assert list(cfg.model.hidden) == [512, 512, 512] and cfg.align.method == "weights" and cfg.align.repair
    assert list(cfg.path) == ["linear"]


def _conv_bn_net() -> nn.Module:
    """Every hidden unit group feeds a BatchNorm directly (as in torchvision's ResNets)."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def _random_affine(net: nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    for k, v in state.items():
        if k.endswith(("1.weight", "4.weight")) and v.dim() == 1:  # BatchNorm gamma: positive, spread out
            state[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith(("1.bias", "4.bias")):
            state[k] = torch.randn(v.shape, generator=g)
    return state


def test_repair_on_an_all_batchnorm_net_only_moves_the_affine_by_eps(images):
    """Why the run skips it: on such a net REPAIR's straight-line points equal the plain ones except for the
    BatchNorm affine, and that by BatchNorm's eps only; nets with other sites are still repaired."""
    from modeconn.align.repair import only_batchnorm

    torch.manual_seed(0)
    a, b = _conv_bn_net().eval(), _conv_bn_net().eval()
    assert only_batchnorm(a, images[0][:2])
    line = linear(float_state(_random_affine(a, 1)), float_state(_random_affine(b, 2)))
    fixed = repair(line, a, images, max_items=256)
    plain, repaired = line(0.5), fixed(0.5)
    bn_affine = {f"{i}.{p}" for i in (1, 4) for p in ("weight", "bias")}
    for k in plain:
        if k in bn_affine:
            torch.testing.assert_close(repaired[k], plain[k], atol=1e-3, rtol=1e-3)
        else:
            assert torch.equal(repaired[k], plain[k]), k
    assert any(not torch.equal(repaired[k], plain[k]) for k in bn_affine)  # REPAIR did run
    for name in ("mlp", "vgg11_bn", "preresnet20"):  # hidden Linear layers / pre-activation BN: not skipped
        make, shape = MODELS[name]
        assert not only_batchnorm(make(), torch.randn(2, *shape)), name


def test_run_step_skips_repair_on_an_all_batchnorm_net_with_a_notice(images, tmp_path, caplog):
    from modeconn.align.step import path_variants
    from modeconn.paths.registry import PathContext

    torch.manual_seed(0)
    a, b = _conv_bn_net().eval(), _conv_bn_net().eval()
    ctx = PathContext(model=a, theta_a=float_state(a.state_dict()), theta_b=float_state(b.state_dict()),
                      data=images, device=torch.device("cpu"), work_dir=tmp_path, progress=False)
    with caplog.at_level("WARNING", logger="modeconn"):
        rows = list(path_variants({"linear": {}}.items(), ctx, {"method": "none", "repair": True}, None))
    assert [r[2] for r in rows] == ["linear"]
    notices = [r.getMessage() for r in caplog.records if "align.repair skipped" in r.getMessage()]
    assert len(notices) == 1 and "BatchNorm" in notices[0]


def test_auto_keeps_the_lower_midpoint_loss_and_reports_both(digits_mlps, flat):
    """align=auto's midpoint losses equal the evaluator's at t = 1/2; the kept alignment is the lower one's."""
    from modeconn.align.auto import auto_matching

    model, theta_a, theta_b = digits_mlps
    al = auto_matching(model, theta_a, theta_b, flat, max_items=len(flat[0]))
    info = al.info
    for method, theta in (("naive", theta_b), ("weights", weight_matching(model, theta_a, theta_b,
                                                                          example_input=flat[0][:2]).theta),
                          ("activations", activation_matching(model, theta_a, theta_b, flat).theta)):
        ev = evaluate_path(model, linear(theta_a, theta), flat, ts=[0.0, 0.5, 1.0], device="cpu", progress=False)
        assert info[f"midpoint_loss_{method}"] == pytest.approx(ev.metrics["train_loss"][1], rel=1e-5), method
    lower = min(("weights", "activations"), key=lambda m: info[f"midpoint_loss_{m}"])
    assert info["auto"] and al.method == info["kept"] == lower
    assert info[f"midpoint_loss_{lower}"] < info["midpoint_loss_naive"]
    only = auto_matching(model, theta_a, theta_b, None, example_input=flat[0][:2])
    assert only.method == "weights" and "midpoint_loss_activations" not in only.info


def test_auto_keeps_activations_when_their_midpoint_is_lower(digits_mlps, flat, monkeypatch, tmp_path):
    from modeconn.align import auto
    from modeconn.align.step import align_endpoints, report_lines
    from modeconn.paths.registry import PathContext

    model, theta_a, theta_b = digits_mlps
    acts = activation_matching(model, theta_a, theta_b, flat)
    fake = lambda m, a, b, x, y: 0.25 if torch.equal(b["1.weight"], acts.theta["1.weight"]) else 2.0  # noqa: E731
    monkeypatch.setattr(auto, "midpoint_loss", fake)
    ctx = PathContext(model=model, theta_a=float_state(theta_a), theta_b=float_state(theta_b), data=flat,
                      device=torch.device("cpu"), work_dir=tmp_path, progress=False)
    al = align_endpoints({"method": "auto"}, ctx)
    assert al.method == "activations" and torch.equal(al.theta["1.weight"], acts.theta["1.weight"])
    text = " ".join(report_lines({"alignment": al.summary()}))
    assert "kept activations matching" in text and "weight matching 2.0000, activation matching 0.2500" in text


def test_align_auto_config_composes_and_validates():
    from hydra import compose, initialize_config_dir

    from modeconn.run.cli import CONF_DIR
    from modeconn.run.config import validate

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["align=auto", "align.repair=true"])
    validate(cfg)
    assert cfg.align.method == "auto" and cfg.align.repair and cfg.align.max_items == 2048
