import copy

import pytest
import torch
from torch import nn

from modeconn.models import build
from modeconn.units import UnitAxis, UnitGroup, UnitSpec, UnsupportedLayerError, infer, unit_slices


def randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return model


def assert_permutation_invariant(model, shape, seed=0):
    torch.manual_seed(seed)
    model = randomize_bn(model).double().eval()
    x = torch.randn(3, *shape, dtype=torch.float64)
    spec = infer(model, x[:1])
    assert spec.groups, "expected hidden units"
    perms = spec.random_perms(torch.Generator().manual_seed(seed))
    for name, p in perms.items():  # make sure every permutation moves something
        if torch.equal(p, torch.arange(len(p))):
            perms[name] = p.roll(1)
    state = model.state_dict()
    new = spec.permute(state, perms)
    assert set(new) == set(state)
    assert any(not torch.equal(new[k], state[k]) for k in state)
    for g in spec.groups:  # every group's producing weight really moved
        w = g.producers[0].name
        assert not torch.equal(new[w], state[w]), g.name
    other = copy.deepcopy(model)
    other.load_state_dict(new)
    torch.testing.assert_close(other(x), model(x), rtol=1e-5, atol=1e-5)
    # inverse permutation restores the original state
    inv = {k: torch.argsort(p) for k, p in perms.items()}
    back = spec.permute(new, inv)
    for k in state:
        assert torch.equal(back[k], state[k]), k
    return spec


BUILTIN = [
    ("mlp", (1, 8, 8), dict(hidden=(5,))),
    ("mlp", (64,), dict(hidden=(5, 7))),
    ("mlp", (64,), dict(hidden=(5, 7, 6), bias=False)),
    ("mlp", (1, 8, 8), dict(hidden=(4, 4), dropout=0.5)),
    ("convnet", (1, 8, 8), dict(width=6)),
    ("convnet", (3, 6, 6), dict(width=4, bias=True, channel_dropout=0.1)),
    ("vgg11", (1, 8, 8), dict(width=1 / 16, fc_width=8)),
    ("vgg11_bn", (3, 16, 16), dict(width=1 / 16, fc_width=8)),
    ("vgg11_dropout", (3, 8, 8), dict(width=1 / 16, fc_width=8)),
    ("preresnet20", (3, 8, 8), dict(width=0.25)),
    ("preresnet", (1, 8, 8), dict(depth=11, block="bottleneck", width=0.25)),
]


@pytest.mark.parametrize("name,shape,kw", BUILTIN, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BUILTIN)])
def test_builtin_models_permutation_invariant(name, shape, kw):
    assert_permutation_invariant(build(name, shape, 5, **kw), shape)


USER = {
    "linear_relu": (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.Tanh(),
                                          nn.Linear(5, 3)), (6,)),
    "conv_pool_flatten": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                                nn.Conv2d(4, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 2 * 2, 3)),
                          (2, 8, 8)),
    "conv_bn_gap": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                          nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
                                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2)), (3, 6, 6)),
    "linear_bn1d": (lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.LeakyReLU(0.1), nn.Dropout(0.2),
                                          nn.Linear(8, 3)), (6,)),
}


@pytest.mark.parametrize("name", sorted(USER))
def test_user_sequential_permutation_invariant(name):
    make, shape = USER[name]
    torch.manual_seed(0)
    spec = assert_permutation_invariant(make(), shape)
    assert spec.is_chain()


class Functional(nn.Module):
    """view(x.size(0), -1), functional ops, scalar arithmetic and a residual addition."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = h + 0.5 * self.conv2(h)
        h = nn.functional.max_pool2d(h, 2)
        h = h.view(h.size(0), -1)
        return nn.functional.log_softmax(self.out(nn.functional.relu(self.fc(h))), dim=1)


def test_functional_model():
    spec = assert_permutation_invariant(Functional(), (3, 6, 6))
    assert spec.sizes == {"conv": 4, "fc": 6}
    assert {a.name for a in spec.group("conv").producers} >= {"conv.weight", "conv2.weight", "conv2.bias"}
    assert UnitAxis("fc.weight", 1, 9) in spec.group("conv").consumers
    assert not spec.is_chain()


def test_mlp_groups():
    m = build("mlp", (64,), 10, hidden=(5, 7))
    spec = infer(m, torch.randn(1, 64))
    assert [(g.name, g.size) for g in spec.groups] == [("1", 5), ("3", 7)]
    assert spec.group("1").producers == [UnitAxis("1.weight", 0), UnitAxis("1.bias", 0)]
    assert spec.group("1").consumers == [UnitAxis("3.weight", 1)]
    assert spec.output == ["5.weight", "5.bias"]
    assert spec.is_chain()
    no_bias = infer(build("mlp", (64,), 10, hidden=(5,), bias=False), torch.randn(1, 64))
    assert no_bias.group("1").producers == [UnitAxis("1.weight", 0)]
    assert no_bias.output == ["3.weight"]


def test_convnet_groups_and_block():
    m = build("convnet", (1, 8, 8), 10)
    spec = infer(m, torch.randn(1, 1, 8, 8))
    assert [g.size for g in spec.groups] == [32, 32, 32]
    assert [g.name for g in spec.groups] == ["0", "2", "4"]
    assert spec.groups[-1].consumers == [UnitAxis("7.weight", 1, block=64)]
    assert spec.output == ["7.weight"]
    assert spec.is_chain()


def test_vgg_bn_groups():
    m = build("vgg11_bn", (3, 32, 32), 10, width=1 / 16, fc_width=8)
    spec = infer(m, torch.randn(1, 3, 32, 32))
    assert len(spec.groups) == 8 + 2
    first = {a.name for a in spec.groups[0].producers}
    assert first == {"features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias",
                     "features.1.running_mean", "features.1.running_var"}
    assert "features.1.num_batches_tracked" not in spec.keys()
    assert spec.output == ["classifier.7.weight", "classifier.7.bias"]
    assert spec.is_chain()


def test_preresnet_residual_groups_merged():
    m = build("preresnet20", (3, 8, 8), 10, width=0.25)
    spec = infer(m, torch.randn(1, 3, 8, 8))
    # one residual stream per stage plus one inner group per block (9 basic blocks)
    assert len(spec.groups) == 3 + 9
    stream = spec.group("conv1")
    assert stream.size == 4
    assert set(stream.layers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"}
    assert {"layer1.0.bn1.running_mean", "layer2.0.bn1.weight"} <= {a.name for a in stream.producers}
    assert {a.name for a in stream.consumers} == {"layer1.0.conv1.weight", "layer1.1.conv1.weight",
                                                  "layer1.2.conv1.weight", "layer2.0.conv1.weight",
                                                  "layer2.0.downsample.weight"}
    last = spec.group("layer3.0.downsample")
    assert UnitAxis("fc.weight", 1) in last.consumers and UnitAxis("bn.running_var", 0) in last.producers
    assert not spec.is_chain()


def test_infer_restores_training_mode_and_state():
    m = build("vgg11_bn", (3, 8, 8), 10, width=1 / 16, fc_width=8).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    infer(m, torch.randn(2, 3, 8, 8))
    assert m.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_linear_model_has_no_hidden_groups():
    spec = infer(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), torch.randn(1, 2, 2))
    assert spec.groups == [] and spec.output == ["1.weight", "1.bias"] and spec.is_chain()


class WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 6, batch_first=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("model,x,match", [
    (WithLSTM(), torch.randn(2, 5, 4), r"'rnn' \(LSTM\)"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 2)),
     torch.randn(1, 3, 6, 6), r"'2' \(Conv2d\).*groups=2"),
    (nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)), torch.randn(2, 4), r"'1' \(LayerNorm\)"),
])
def test_unsupported_layer_named(model, x, match):
    with pytest.raises(UnsupportedLayerError, match=match) as info:
        infer(model, x)
    assert "Supported layers" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_cat_and_shared_weights_rejected():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.o = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(8, 2)

        def forward(self, x):
            return self.o(torch.cat([self.a(x), self.b(x)], dim=1))

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.o = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.o(self.a(torch.relu(self.a(x))))

    with pytest.raises(UnsupportedLayerError, match="cat"):
        infer(Cat(), torch.randn(1, 3))
    with pytest.raises(UnsupportedLayerError, match="'a'.*more than once"):
        infer(Shared(), torch.randn(1, 4))


def test_unit_slices_and_permute_blocks():
    ax = UnitAxis("w", 1, block=3)
    assert unit_slices(ax, torch.tensor([2, 0]), 3).tolist() == [6, 7, 8, 0, 1, 2]
    assert unit_slices(UnitAxis("b", 0), torch.tensor([1, 0]), 2).tolist() == [1, 0]
    with pytest.raises(IndexError):
        unit_slices(ax, torch.tensor([3]), 3)
    spec = UnitSpec([UnitGroup("h", 2, [UnitAxis("a", 0)], [UnitAxis("w", 1, block=2)])], output=["w"])
    state = {"a": torch.tensor([10.0, 20.0]), "w": torch.arange(8.0).reshape(2, 4), "n": torch.tensor(5)}
    new = spec.permute(state, {"h": torch.tensor([1, 0])})
    assert new["a"].tolist() == [20.0, 10.0]
    assert new["w"].tolist() == [[2, 3, 0, 1], [6, 7, 4, 5]]
    assert new["n"] is state["n"] and state["a"].tolist() == [10.0, 20.0]
    assert spec.is_chain()
    with pytest.raises(ValueError, match="not a permutation"):
        spec.permute(state, {"h": torch.tensor([0, 0])})
    with pytest.raises(KeyError):
        spec.permute(state, {"nope": torch.tensor([0, 1])})
    # parameters-only dicts (no buffers) are fine
    assert spec.permute({"a": state["a"]}, {"h": [1, 0]})["a"].tolist() == [20.0, 10.0]
