import pytest
import torch
from torch import nn

from modeconn.models import MODELS, build
from modeconn.models.preresnet import BasicBlock, Bottleneck

SMALL = {  # keep CPU tests fast
    "mlp": dict(hidden=(16, 8)),
    "convnet": dict(width=4),
    "vgg": dict(depth=11, width=1 / 16, fc_width=16),
    "vgg11": dict(width=1 / 16, fc_width=16),
    "vgg11_bn": dict(width=1 / 16, fc_width=16),
    "vgg11_dropout": dict(width=1 / 16, fc_width=16),
    "vgg16": dict(width=1 / 16, fc_width=16),
    "vgg16_bn": dict(width=1 / 16, fc_width=16),
    "preresnet": dict(depth=20, width=0.25),
    "preresnet20": dict(width=0.25),
    "preresnet110": dict(width=0.125),
    "preresnet164": dict(width=0.125),
}


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def convs(m):
    return [l for l in m.modules() if isinstance(l, nn.Conv2d)]


def test_every_name_has_a_small_config():
    assert set(SMALL) == set(MODELS)


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 8, 8), (64,)])
def test_forward_shapes(name, shape):
    torch.manual_seed(0)
    m = build(name, shape, 7, **SMALL[name])
    assert isinstance(m, nn.Module)
    m.eval()
    y = m(torch.randn(2, *shape))
    assert y.shape == (2, 7)
    assert torch.isfinite(y).all()
    m.train()
    assert m(torch.randn(3, *shape)).shape == (3, 7)


def test_build_unknown_name():
    with pytest.raises(ValueError, match="available"):
        build("resnet-9000", (3, 32, 32), 10)
    assert build("VGG-11", (3, 32, 32), 10, width=1 / 16, fc_width=8) is not None


def test_mlp_structure():
    m = build("mlp", (1, 8, 8), 10, hidden=(5, 7), dropout=0.1)
    assert isinstance(m, nn.Sequential)
    lin = [l for l in m if isinstance(l, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lin] == [(64, 5), (5, 7), (7, 10)]
    assert sum(isinstance(l, nn.Dropout) for l in m) == 2
    assert "1.weight" in m.state_dict()
    m = build("mlp", (64,), 10, hidden=(5,), bias=False)
    assert all(l.bias is None for l in m if isinstance(l, nn.Linear))
    assert n_params(m) == 64 * 5 + 5 * 10


def test_convnet_is_kuditipudi():
    m = build("convnet", (1, 28, 28), 10)
    cs = convs(m)
    assert len(cs) == 3
    assert all(c.out_channels == 32 and c.kernel_size == (3, 3) and c.padding == (1, 1) and c.stride == (1, 1)
               and c.bias is None for c in cs)
    assert not any(isinstance(l, (nn.MaxPool2d, nn.AvgPool2d)) for l in m.modules())
    fc = m[-1]
    assert isinstance(fc, nn.Linear) and fc.in_features == 32 * 28 * 28 and fc.bias is None
    assert n_params(m) == 1 * 32 * 9 + 2 * 32 * 32 * 9 + 32 * 28 * 28 * 10
    m = build("convnet", (1, 8, 8), 10, width=4, depth=2, bias=True, channel_dropout=0.2)
    assert len(convs(m)) == 2 and sum(isinstance(l, nn.Dropout2d) for l in m) == 2


def test_vgg_layouts():
    m11 = build("vgg11", (3, 32, 32), 10)
    m16 = build("vgg16", (3, 32, 32), 10)
    assert len(convs(m11)) == 8 and len(convs(m16)) == 13
    assert sum(isinstance(l, nn.MaxPool2d) for l in m16.modules()) == 5
    # Garipov's VGG16 for CIFAR-10: ~15.25M parameters
    assert 15.0e6 < n_params(m16) < 15.5e6
    assert 9.5e6 < n_params(m11) < 10.0e6
    lin = [l for l in m11.classifier if isinstance(l, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lin] == [(512, 512), (512, 512), (512, 10)]
    bn = build("vgg11_bn", (3, 32, 32), 10, width=0.25)
    assert sum(isinstance(l, nn.BatchNorm2d) for l in bn.modules()) == 8
    assert convs(bn)[-1].out_channels == 128


def test_vgg_small_inputs_skip_pools():
    m = build("vgg11", (1, 8, 8), 10, width=1 / 16, fc_width=8)
    assert sum(isinstance(l, nn.MaxPool2d) for l in m.modules()) == 3
    assert m.classifier[2].in_features == 32


def test_vgg_channel_dropout():
    m = build("vgg11_dropout", (3, 32, 32), 10, width=1 / 16, fc_width=8)
    ps = [l.p for l in m.features if isinstance(l, nn.Dropout2d)]
    assert ps == [0.25] * 3 + [0.5] * 5
    m = build("vgg16", (3, 32, 32), 10, width=1 / 16, channel_dropout=0.1, fc_dropout=0.0)
    assert sum(isinstance(l, nn.Dropout2d) for l in m.modules()) == 13
    assert not any(type(l) is nn.Dropout for l in m.modules())
    with pytest.raises(ValueError, match="conv layers"):
        build("vgg11", (3, 32, 32), 10, channel_dropout=[0.1] * 3)


def test_preresnet_blocks():
    m20 = build("preresnet20", (3, 32, 32), 10)
    blocks = [b for b in m20.modules() if isinstance(b, BasicBlock)]
    assert len(blocks) == 9 and not any(isinstance(b, Bottleneck) for b in m20.modules())
    assert 0.26e6 < n_params(m20) < 0.28e6
    m164 = build("preresnet164", (3, 32, 32), 10, width=0.25)
    assert sum(isinstance(b, Bottleneck) for b in m164.modules()) == 54
    assert m164.fc.in_features == 64 * 4 // 4
    m110 = build("preresnet110", (3, 32, 32), 10, width=0.25)
    assert sum(isinstance(b, BasicBlock) for b in m110.modules()) == 54
    g110 = build("preresnet", (3, 32, 32), 10, depth=110, block="bottleneck", width=0.25)
    assert sum(isinstance(b, Bottleneck) for b in g110.modules()) == 36
    with pytest.raises(ValueError):
        build("preresnet", (3, 32, 32), 10, depth=21)
    full164 = build("preresnet164", (3, 32, 32), 10)
    assert 1.6e6 < n_params(full164) < 1.8e6


@pytest.mark.parametrize("name", ["convnet", "vgg11_bn", "preresnet20"])
def test_models_are_fx_traceable(name):
    m = build(name, (3, 16, 16), 5, **SMALL[name]).eval()
    gm = torch.fx.symbolic_trace(m)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(gm(x), m(x))
