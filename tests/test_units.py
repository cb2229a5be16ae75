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


def moving_perms(spec, seed):
    """A random permutation of every group (blocks and ties respected) that moves every group of > 1 unit."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(20):
        perms = spec.random_perms(g)
        if all(not torch.equal(p, torch.arange(len(p))) for p in perms.values() if len(p) > 1):
            return perms
    raise AssertionError("could not draw moving permutations")


def assert_permutation_invariant(model, shape, seed=0, x=None, min_coverage=0.99):
    torch.manual_seed(seed)
    model = randomize_bn(model).double().eval()
    if x is None:
        x = torch.randn(3, *shape, dtype=torch.float64)
    spec = infer(model, x[:1])
    assert spec.groups, "expected hidden units"
    assert spec.covered >= min_coverage and spec.covered == spec.coverage(model), spec.covered
    perms = moving_perms(spec, seed)
    state = model.state_dict()
    new = spec.permute(state, perms)
    assert set(new) == set(state)
    for g in spec.groups:  # every group's producing weight really moved
        w = g.producers[0].name
        assert not torch.equal(new[w], state[w]), g.name
    other = copy.deepcopy(model)
    other.load_state_dict(new)
    with torch.no_grad():
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
    ("vgg16", (3, 32, 32), dict(width=1 / 16, fc_width=8)),
    ("vgg16_bn", (3, 32, 32), dict(width=1 / 16, fc_width=8)),
    ("preresnet20", (3, 8, 8), dict(width=0.25)),
    ("preresnet110", (3, 8, 8), dict(width=0.25)),
    ("preresnet164", (3, 8, 8), dict(width=0.25)),
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
    assert_permutation_invariant(make(), shape)


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


def test_mlp_groups():
    m = build("mlp", (64,), 10, hidden=(5, 7))
    spec = infer(m, torch.randn(1, 64))
    assert [(g.name, g.size) for g in spec.groups] == [("1", 5), ("3", 7)]
    assert spec.group("1").producers == [UnitAxis("1.weight", 0), UnitAxis("1.bias", 0)]
    assert spec.group("1").consumers == [UnitAxis("3.weight", 1)]
    assert spec.output == ["5.weight", "5.bias"]
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


def test_vgg_bn_groups():
    m = build("vgg11_bn", (3, 32, 32), 10, width=1 / 16, fc_width=8)
    spec = infer(m, torch.randn(1, 3, 32, 32))
    assert len(spec.groups) == 8 + 2
    first = {a.name for a in spec.groups[0].producers}
    assert first == {"features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias",
                     "features.1.running_mean", "features.1.running_var"}
    assert "features.1.num_batches_tracked" not in spec.keys()
    assert spec.output == ["classifier.7.weight", "classifier.7.bias"]


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


def test_infer_restores_training_mode_and_state():
    m = build("vgg11_bn", (3, 8, 8), 10, width=1 / 16, fc_width=8).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    infer(m, torch.randn(2, 3, 8, 8))
    assert m.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_linear_model_has_no_hidden_groups():
    spec = infer(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), torch.randn(1, 2, 2))
    assert spec.groups == [] and spec.output == ["1.weight", "1.bias"]


class WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 6, batch_first=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


def test_unsupported_layer_named():
    with pytest.raises(UnsupportedLayerError, match=r"'rnn' \(LSTM\)") as info:
        infer(WithLSTM(), torch.randn(2, 5, 4))
    assert "Supported layers" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unsupported_function_names_node_and_module():
    class Stack(nn.Module):
        def forward(self, x):
            return torch.stack([x, x], dim=1).flatten(1)

    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.ReLU(), Stack()), nn.Linear(8, 2))
    with pytest.raises(UnsupportedLayerError, match=r"torch.stack \(node 'stack' in module '1.1'\)"):
        infer(model, torch.randn(1, 3))


def test_shared_weights_rejected():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.o = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.o(self.a(torch.relu(self.a(x))))

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
    with pytest.raises(ValueError, match="not a permutation"):
        spec.permute(state, {"h": torch.tensor([0, 0])})
    with pytest.raises(KeyError):
        spec.permute(state, {"nope": torch.tensor([0, 1])})
    # parameters-only dicts (no buffers) are fine
    assert spec.permute({"a": state["a"]}, {"h": [1, 0]})["a"].tolist() == [20.0, 10.0]


# ============================================================================ models outside the zoo

torchvision = pytest.importorskip("torchvision")


def vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=4,
                                                hidden_dim=64, mlp_dim=128, num_classes=10)


TORCHVISION = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "resnet50": lambda: torchvision.models.resnet50(num_classes=10),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "vit": vit,
}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_models_permutation_invariant(name):
    assert_permutation_invariant(TORCHVISION[name](), (3, 32, 32), x=torch.randn(2, 3, 32, 32, dtype=torch.float64))


def test_vit_structure():
    spec = infer(vit(), torch.randn(1, 3, 32, 32))
    stream = spec.group("conv_proj")  # patch embedding, class token, positional table and every block's output
    keys = {a.name for a in stream.producers}
    assert {"class_token", "encoder.pos_embedding", "encoder.layers.encoder_layer_1.mlp.3.bias",
            "encoder.layers.encoder_layer_0.self_attention.out_proj.weight", "encoder.ln.weight"} <= keys
    qk = spec.group("encoder.layers.encoder_layer_0.self_attention.qk")
    vo = spec.group("encoder.layers.encoder_layer_0.self_attention.vo")
    assert (qk.blocks, vo.blocks, qk.size) == (4, 4, 64) and qk.tie == vo.tie is not None
    assert [a.offset for a in qk.producers if a.name.endswith("in_proj_weight")] == [0, 64]
    assert any("LayerNorm" in m for m in stream.mixing)


class Encoder(nn.Module):
    def __init__(self, d=16, heads=2, norm_first=False):
        super().__init__()
        self.inp = nn.Linear(5, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=24, dropout=0.1, batch_first=True,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.encoder(self.inp(x)).mean(dim=1))


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder(norm_first):
    spec = assert_permutation_invariant(Encoder(norm_first=norm_first), (6, 5))
    assert len(spec.ties()) == 2  # one per attention
    assert spec.group("encoder.layers.0.self_attn.qk").blocks == 2


class GPT(nn.Module):
    """A GPT-style decoder: tied embeddings, learned positions, causal SDPA over a fused q/k/v projection."""

    def __init__(self, vocab=11, d=16, heads=4, layers=2, context=8, functional_head=False, manual=False):
        super().__init__()
        self.heads, self.functional_head, self.manual = heads, functional_head, manual
        self.register_buffer("mask", torch.tril(torch.ones(context, context)).view(1, 1, context, context))
        self.wte = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(1, context, d))
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(d), qkv=nn.Linear(d, 3 * d), proj=nn.Linear(d, d), ln2=nn.LayerNorm(d),
            fc=nn.Linear(d, 4 * d), out=nn.Linear(4 * d, d))) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        B, T = idx.shape
        x = self.wte(idx) + self.pos[:, :T]
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](x)).split(x.size(-1), dim=2)
            q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
            if self.manual:  # attention written out, with a causal mask buffer
                att = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5
                att = torch.softmax(att.masked_fill(self.mask == 0, float("-inf")), dim=-1)  # T == context
                y = att @ v
            else:
                y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + blk["proj"](y.transpose(1, 2).reshape(B, T, -1))
            x = x + blk["out"](nn.functional.gelu(blk["fc"](blk["ln2"](x))))
        if self.functional_head:
            return nn.functional.linear(self.ln_f(x), self.wte.weight)
        return self.lm_head(self.ln_f(x))


def test_gpt_decoder_attention_written_out():
    spec = assert_permutation_invariant(GPT(manual=True), None, x=torch.randint(0, 11, (3, 8)))
    qk, v = spec.group("blocks.0.qkv:0"), spec.group("blocks.0.qkv:2")
    assert (qk.blocks, v.blocks) == (4, 4) and qk.tie == v.tie is not None


def test_gpt_decoder_functional_tied_head():
    spec = assert_permutation_invariant(GPT(functional_head=True), None, x=torch.randint(0, 11, (3, 8)))
    assert spec.output == ["wte.weight"] and [a.name for a in spec.group("wte").consumers].count("wte.weight") == 0


def test_gpt_decoder():
    idx = torch.randint(0, 11, (3, 8))
    spec = assert_permutation_invariant(GPT(), None, x=idx)
    qk, v = spec.group("blocks.0.qkv:0"), spec.group("blocks.0.qkv:2")  # q and k: one group
    assert (qk.size, qk.blocks, v.blocks) == (16, 4, 4) and qk.tie == v.tie is not None
    assert UnitAxis("blocks.0.qkv.weight", 0, 1, 16) in qk.producers  # k rows
    assert {"pos", "blocks.1.out.bias", "ln_f.weight"} <= {a.name for a in spec.group("wte").producers}
    assert UnitAxis("lm_head.weight", 1) in spec.group("wte").axes and spec.output == ["lm_head.weight"]


class DenseBlock(nn.Module):
    def __init__(self, c=4, growth=3, layers=3):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.layers = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(c + i * growth), nn.ReLU(),
                                                  nn.Conv2d(c + i * growth, growth, 3, padding=1))
                                    for i in range(layers))
        self.bn = nn.BatchNorm2d(c + layers * growth)
        self.fc = nn.Linear(c + layers * growth, 2)

    def forward(self, x):
        h = self.stem(x)
        for layer in self.layers:
            h = torch.cat([h, layer(h)], dim=1)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(h)), 1), 1))


def test_densenet_cat_keeps_each_group():
    spec = assert_permutation_invariant(DenseBlock(), (3, 6, 6))
    assert spec.sizes == {"stem": 4, "layers.0.2": 3, "layers.1.2": 3, "layers.2.2": 3}
    assert UnitAxis("layers.2.2.weight", 1, 1, 4) in spec.group("layers.0.2").consumers
    assert UnitAxis("bn.running_mean", 0, 1, 10) in spec.group("layers.2.2").producers


class GatedSplit(nn.Module):
    """chunk along the channels (a GLU) and split into two heads of different widths."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = nn.Linear(4, 10), nn.Linear(5, 7), nn.Linear(7, 2)

    def forward(self, x):
        u, g = self.a(x).chunk(2, dim=1)
        h = u * torch.sigmoid(g)
        left, right = torch.split(self.b(h), [3, 4], dim=-1)
        return self.o(torch.cat([torch.relu(left), right.tanh()], 1))


def test_split_and_chunk():
    spec = assert_permutation_invariant(GatedSplit(), (4,))
    assert spec.sizes == {"a:0": 5, "b:0": 3, "b:1": 4}
    assert UnitAxis("a.weight", 0, 1, 5) in spec.group("a:0").producers


def test_layernorm_permutes_but_refuses_per_unit_constructions():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 2))
    spec = assert_permutation_invariant(model, (4,))
    assert {"1.weight", "1.bias"} <= {a.name for a in spec.group("0").producers}
    with pytest.raises(UnsupportedLayerError, match=r"'1' \(LayerNorm\): it normalizes across units"):
        spec.check_per_unit("channel dropout")
    infer(build("mlp", (8,), 3, hidden=(4,)), torch.randn(1, 8)).check_per_unit()  # per-unit: fine


def test_groupnorm_blocks():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(),
                          nn.Linear(16, 2))
    spec = assert_permutation_invariant(model, (3, 6, 6))
    g = spec.group("0")
    assert (g.blocks, g.block_size) == (2, 4)
    with pytest.raises(ValueError, match="splits a block"):
        spec.permute(model.state_dict(), {"0": torch.tensor([0, 1, 2, 4, 3, 5, 6, 7])})
    swapped = spec.permute(model.state_dict(), {"0": torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])})
    assert torch.equal(swapped["1.weight"][:4], model.state_dict()["1.weight"][4:])


def test_grouped_and_depthwise_convs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, groups=2), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, groups=6), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 6, 1), nn.Conv2d(6, 12, 1, groups=6), nn.Flatten(), nn.Linear(192, 2))
    spec = assert_permutation_invariant(model, (3, 8, 8))
    a, b = spec.group("0"), spec.group("2")
    assert (a.blocks, b.blocks) == (2, 2) and a.tie == b.tie is not None
    assert UnitAxis("2.weight", 1, within=0) in a.consumers
    assert UnitAxis("4.weight", 0) in b.producers  # depthwise: one group in and out
    c, d = spec.group("7"), spec.group("8")  # channel multiplier 2: block i of "8" reads unit i of "7"
    assert (c.blocks, d.blocks, d.block_size) == (6, 6, 2) and c.tie == d.tie
    with pytest.raises(ValueError, match="differently"):
        spec.permute(model.state_dict(), {"0": torch.arange(8).roll(4), "2": torch.arange(6)})


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.kv = nn.Linear(3, 8), nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, bias=True, add_bias_kv=True)
        self.o = nn.Linear(8, 2)

    def forward(self, x):
        kv = self.kv(x)
        y, _ = self.attn(self.q(x), kv, kv.relu())
        return self.o(y)


def test_multihead_attention_heads_and_inner_perms():
    model = CrossAttention()
    spec = assert_permutation_invariant(model, (5, 3))
    qk, vo = spec.group("attn.qk"), spec.group("attn.vo")
    assert UnitAxis("attn.bias_k", 2) in qk.producers and UnitAxis("attn.out_proj.weight", 1) in vo.consumers
    state = model.state_dict()
    heads_only = {"attn.qk": torch.arange(8).roll(4), "attn.vo": torch.arange(8).roll(4)}
    spec.permute(state, heads_only)
    with pytest.raises(ValueError, match="not permuted"):
        spec.permute(state, {"attn.qk": torch.arange(8).roll(4)})


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.rnn, self.b, self.o = nn.Linear(4, 6), nn.LSTM(6, 6, batch_first=True), nn.Linear(6, 5), \
            nn.Linear(5, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.o(torch.relu(self.b(h + self.rnn(h)[0])))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(x) if x.sum() > 0 else -x


class WithUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.inner, self.b, self.o = nn.Linear(3, 4), DataDependent(), nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.o(torch.relu(self.b(self.inner(self.a(x)))))


def test_strict_false_partial_spec():
    with pytest.raises(UnsupportedLayerError, match=r"'rnn' \(LSTM\)"):
        infer(Branchy(), torch.randn(1, 3, 4))
    model = Branchy().double().eval()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    spec = infer(model, x, strict=False)
    assert spec.sizes == {"b": 5} and any("'rnn' (LSTM)" in s for s in spec.skipped)
    # entries with every unit index permuted: b's bias and the output layer's; b's weight reads a's units,
    # which the LSTM leaves in place, so none of its entries counts (nor a's or the LSTM's)
    covered = (5 + 2 * 5 + 2) / sum(p.numel() for p in model.parameters())
    assert spec.covered == pytest.approx(covered)
    other = copy.deepcopy(model)
    other.load_state_dict(spec.permute(model.state_dict(), moving_perms(spec, 0)))
    torch.testing.assert_close(other(x), model(x))

    with pytest.raises(UnsupportedLayerError, match=r"module 'inner' \(DataDependent"):
        infer(WithUntraceable(), torch.randn(1, 3))
    spec = infer(WithUntraceable(), torch.randn(1, 3), strict=False)
    assert spec.sizes == {"b": 5} and "'inner'" in spec.skipped[0] and 0 < spec.covered < 1
    nothing = infer(DataDependent(), torch.randn(1, 4), strict=False)  # the top level itself: an empty spec
    assert nothing.groups == [] and nothing.covered == 0.0 and "could not trace the model" in nothing.skipped[0]


def test_from_axes_git_rebasin_form():
    model = build("convnet", (1, 8, 8), 3, width=4, depth=2).double().eval()
    spec = infer(model, torch.randn(1, 1, 8, 8, dtype=torch.float64))
    axes = {}
    for g in spec.groups:
        for ax in g.axes:
            per = list(axes.get(ax.name, [None] * model.state_dict()[ax.name].dim()))
            per[ax.axis] = g.name
            axes[ax.name] = tuple(per)
    hand = UnitSpec.from_axes(axes, model, output=spec.output)
    assert hand.sizes == spec.sizes
    perms = spec.random_perms(torch.Generator().manual_seed(0))
    a, b = spec.permute(model.state_dict(), perms), hand.permute(model.state_dict(), perms)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(KeyError, match="nope"):
        UnitSpec.from_axes({"nope": ("P",)}, model)
