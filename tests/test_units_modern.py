"""Unit inference on the layers modern nets use: a permutation by the inferred spec leaves every output unchanged.

Look-alike modules stand in for timm (optional): a ConvNeXt with a LayerNorm2d subclass calling F.layer_norm,
layer scale and stochastic depth; a DeiT with a fused qkv projection viewed as (B, N, 3, heads, d_head); a GPT
whose logits are ``h @ tok.weight.T``. torchvision's efficientnet_b0 is tested as it ships.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import StochasticDepth, stochastic_depth

from modeconn.align import weight_matching
from modeconn.units import UnsupportedLayerError, infer


def randomized(model: nn.Module, seed: int = 1) -> nn.Module:
    """``model`` in float64 and eval mode with every 1-D float entry (norm affines, running statistics, layer
    scales, biases) drawn at random, so that a wrongly permuted per-unit tensor shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for _, v in model.state_dict().items():
            if v.is_floating_point() and v.dim() == 1:
                v.copy_(0.5 + torch.rand(v.shape, generator=g, dtype=v.dtype))
    return model


def permuted_outputs_agree(model: nn.Module, x, seed: int = 0):
    """Infer ``model``'s spec (strict), permute its state by random moving permutations, compare outputs."""
    model = randomized(model)
    x = x.double() if x.is_floating_point() else x
    spec = infer(model, x[:1])
    assert spec.covered == 1.0 and spec.unaligned == [] and not spec.skipped
    perms = spec.random_perms(torch.Generator().manual_seed(seed))
    assert all(not torch.equal(p, torch.arange(len(p))) for p in perms.values() if len(p) > 2)
    other = copy.deepcopy(model)
    other.load_state_dict(spec.permute(model.state_dict(), perms))
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=1e-9, atol=1e-9)
        assert not all(torch.equal(a, b) for a, b in zip(other.parameters(), model.parameters()))
    return spec


# ---------------------------------------------------------------------------------------------- ConvNeXt
class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: a subclass of nn.LayerNorm (so fx traces into it) calling F.layer_norm."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class LayerNorm(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int, drop: float):
        super().__init__()
        self.conv_dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 1e-6))
        self.drop_path = StochasticDepth(drop, "row")

    def forward(self, x):
        y = self.norm(self.conv_dw(x).permute(0, 2, 3, 1))
        y = self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        return x + self.drop_path(y.mul(self.gamma.reshape(1, -1, 1, 1)))


class ConvNeXt(nn.Module):
    """convnext_atto-shaped (two stages): patchify stem + LayerNorm2d, blocks, downsample, pooled head."""

    def __init__(self, dims=(8, 16), classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0]))
        self.stage0 = nn.Sequential(ConvNeXtBlock(dims[0], 0.1), ConvNeXtBlock(dims[0], 0.1))
        self.down = nn.Sequential(LayerNorm2d(dims[0]), nn.Conv2d(dims[0], dims[1], 2, stride=2))
        self.stage1 = nn.Sequential(ConvNeXtBlock(dims[1], 0.2))
        self.head_norm, self.fc = LayerNorm(dims[1]), nn.Linear(dims[1], classes)

    def forward(self, x):
        x = self.stage1(self.down(self.stage0(self.stem(x))))
        return self.fc(self.head_norm(x.mean((2, 3))))


# ---------------------------------------------------------------------------------------------- DeiT
class FusedAttention(nn.Module):
    """timm's Attention: qkv = Linear(d, 3d) viewed as (B, N, 3, heads, d_head), permuted, unbound."""

    def __init__(self, d: int, heads: int, fused: bool):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if self.fused:
            q, k, v = qkv.unbind(0)
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            q, k, v = qkv[0], qkv[1], qkv[2]
            attn = ((q * (C // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = attn @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class DeiTBlock(nn.Module):
    def __init__(self, d: int, heads: int, fused: bool):
        super().__init__()
        self.norm1, self.norm2 = LayerNorm(d), LayerNorm(d)
        self.attn = FusedAttention(d, heads, fused)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        x = x + F.dropout(self.attn(self.norm1(x)), 0.1, self.training)
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class DeiT(nn.Module):
    """deit_tiny-shaped: patch embedding, class token, positional table, fused-qkv blocks, class-token head."""

    def __init__(self, d=16, heads=4, depth=2, fused=True, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 17, d))
        self.blocks = nn.Sequential(*[DeiTBlock(d, heads, fused) for _ in range(depth)])
        self.norm, self.head = LayerNorm(d), nn.Linear(d, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


# ---------------------------------------------------------------------------------------------- GPT
class GPT(nn.Module):
    """A GPT with tied embeddings: nanoGPT's split qkv, causal attention, ``logits = h @ tok.weight.T``
    (``tie="matmul"``), ``F.linear(h, tok.weight)`` or an nn.Linear sharing the embedding's weight."""

    def __init__(self, vocab=11, d=16, heads=2, depth=2, context=8, tie="matmul"):
        super().__init__()
        self.heads, self.tie = heads, tie
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(d), attn=nn.Linear(d, 3 * d), proj=nn.Linear(d, d), ln2=nn.LayerNorm(d),
            fc=nn.Linear(d, 4 * d), out=nn.Linear(4 * d, d))) for _ in range(depth))
        self.ln_f = nn.LayerNorm(d)
        if tie == "module":
            self.lm_head = nn.Linear(d, vocab, bias=False)
            self.lm_head.weight = self.tok.weight

    def forward(self, idx):
        B, T = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for b in self.blocks:
            q, k, v = b.attn(b.ln1(x)).split(x.shape[-1], dim=2)
            q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, -1)
            x = x + b.proj(y)
            x = x + b.out(F.gelu(b.fc(b.ln2(x))))
        h = self.ln_f(x)
        if self.tie == "matmul":
            return h @ self.tok.weight.T
        if self.tie == "linear":
            return F.linear(h, self.tok.weight)
        return self.lm_head(h)


IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_convnext_lookalike_fully_covered():
    spec = permuted_outputs_agree(ConvNeXt(), IMAGES)
    stream = next(g for g in spec.groups if "stem.0" in g.layers)
    keys = {ax.name for ax in stream.axes}
    assert {"stem.1.weight", "stage0.0.gamma", "stage0.1.norm.weight", "down.0.bias"} <= keys
    assert any("layer_norm" in m and "stem.1" in m for m in stream.mixing)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "written-out"])
def test_deit_lookalike_fused_qkv_fully_covered(fused):
    spec = permuted_outputs_agree(DeiT(fused=fused), IMAGES)
    qk = next(g for g in spec.groups if any(ax.name == "blocks.0.attn.qkv.weight" and ax.offset == 0
                                           for ax in g.producers))
    rows = sorted(ax.offset for ax in qk.producers if ax.name == "blocks.0.attn.qkv.weight")
    assert qk.blocks == 4 and rows == [0, 16]  # q and k rows share one group, in head blocks
    vo = next(g for g in spec.groups if g.tie == qk.tie and g is not qk)
    assert [ax.offset for ax in vo.producers if ax.name == "blocks.0.attn.qkv.weight"] == [32]


@pytest.mark.parametrize("tie", ["matmul", "linear", "module"])
def test_gpt_with_tied_embeddings_fully_covered(tie):
    idx = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(0))
    spec = permuted_outputs_agree(GPT(tie=tie), idx)
    stream = next(g for g in spec.groups if any(ax.name == "tok.weight" for ax in g.producers))
    assert [ax.axis for ax in stream.axes if ax.name == "tok.weight"] == [1]  # read and written on one axis
    assert "tok.weight" in spec.output or "lm_head.weight" in spec.output


def test_torchvision_efficientnet_b0_fully_covered():
    """Stochastic depth (torchvision.ops.stochastic_depth) in every residual block."""
    spec = permuted_outputs_agree(torchvision.models.efficientnet_b0(num_classes=10), IMAGES[:2])
    assert len(spec.groups) == 40


class FunctionalNorms(nn.Module):
    """F.batch_norm on the module's own buffers, F.group_norm, and dropout-like functions."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)
        self.bn = nn.BatchNorm2d(8)
        self.gn_w, self.gn_b = nn.Parameter(torch.ones(8)), nn.Parameter(torch.zeros(8))

    def forward(self, x):
        h = F.batch_norm(self.c1(x), self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias)
        h = torch.dropout(F.relu(h), 0.3, False)
        h = h + stochastic_depth(F.group_norm(self.c2(h), 2, self.gn_w, self.gn_b), 0.5, "row", False)
        return self.fc(F.dropout2d(h, 0.2, False).mean((2, 3)))


def test_functional_norms_and_dropout_like_functions():
    spec = permuted_outputs_agree(FunctionalNorms(), IMAGES)
    (g,) = spec.groups
    assert g.blocks == 2 and {"bn.running_mean", "bn.running_var", "gn_w", "c2.bias"} <= {ax.name for ax in g.axes}


def test_functional_norm_with_a_computed_weight_is_refused():
    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.w = nn.Linear(3, 4), nn.Linear(4, 2), nn.Parameter(torch.ones(4))

        def forward(self, x):
            return self.b(F.layer_norm(self.a(x), (4,), self.w * 2))

    with pytest.raises(UnsupportedLayerError, match="layer_norm.*weight is not a parameter or buffer"):
        infer(Computed(), torch.randn(2, 3))


# ---------------------------------------------------------------------------------------------- coverage
@torch.fx.wrap
def opaque(x):
    return x.flip(-1)  # a function inference does not know: it reverses the units


class Residual(nn.Module):
    """in(6->8) -> [stream of 8, through an unknown function] -> f1(8->16) -> f2(16->8) + stream -> out(8->3)."""

    def __init__(self):
        super().__init__()
        self.inp, self.f1, self.f2, self.out = nn.Linear(6, 8), nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = opaque(self.inp(x))
        return self.out(h + self.f2(torch.relu(self.f1(h))))


def test_coverage_counts_weight_entries_whose_unit_axes_are_all_permuted():
    model = Residual()
    with pytest.raises(UnsupportedLayerError, match="opaque"):
        infer(model, torch.randn(2, 6))
    spec = infer(model, torch.randn(2, 6), strict=False)
    # only f1's 16 units move; the stream (inp's rows, f1's columns, f2's rows, out's columns) stays: by hand,
    # entries with no unpermuted index: f1.bias (16) and out.bias (3); f1.weight reads the stream, f2 writes it
    assert spec.sizes == {"f1": 16}
    total = sum(p.numel() for p in model.parameters())
    assert spec.covered == pytest.approx((16 + 3) / total)
    assert spec.unaligned_layers(model) == ["inp", "f1", "f2", "out"]
    # the old measure (tensors some group touches) would have claimed f1 and f2 and the output: far more
    touched = sum(p.numel() for k, p in model.named_parameters() if k.split(".")[0] in ("f1", "f2", "out"))
    assert touched / total > 3 * spec.covered


def test_alignment_warns_naming_the_unaligned_layers():
    model = Residual()
    spec = infer(model, torch.randn(2, 6), strict=False)
    theta = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match=r"leaves \d+\.\d% of the weights unaligned.*'inp'.*'f2'"):
        weight_matching(model, theta, theta, spec=spec)
    full = infer(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(2, 6))
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weight_matching(net, net.state_dict(), net.state_dict(), spec=full)


# ---------------------------------------------------------------------------------------------- real timm
@pytest.mark.parametrize("name, kwargs", [
    ("convnext_atto", {}),
    ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}),
])
def test_timm_models_fully_covered(name, kwargs):
    timm = pytest.importorskip("timm")
    permuted_outputs_agree(timm.create_model(name, num_classes=10, **kwargs), IMAGES[:2])
