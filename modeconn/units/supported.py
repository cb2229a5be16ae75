"""What unit inference supports, in words: read by every error that refuses a layer (a leaf, so the
handlers that raise those errors need not import the tracer)."""

SUPPORTED = (
    "nn.Linear (on the last axis of N-D inputs), nn.Conv1d/2d/3d (any groups, depthwise), nn.BatchNorm1d/2d/3d, "
    "nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.PReLU, nn.Embedding, nn.MultiheadAttention, nn.TransformerEncoder(Layer), "
    "F.layer_norm / group_norm / batch_norm / rms_norm with the model's own parameters, stochastic depth, "
    "fused qkv viewed as (B, N, 3, heads, d_head) then unbound or indexed, x @ W or x @ W.T with a model matrix "
    "(tied embeddings), "
    "F.scaled_dot_product_attention or q @ k^T -> softmax -> @ v, F.linear with the model's weights, elementwise activations (ReLU, GELU, "
    "SiLU, Hardswish, ... and their functional forms), Identity, Dropout, Softmax, pooling, nn.Flatten, "
    "view / reshape / flatten / transpose / permute / expand / indexing, torch.cat / split / chunk, mean/sum "
    "over any axes, +, -, *, / between tensors (residual additions merge unit groups) and learned tables "
    "(positional embeddings, class tokens) added or concatenated to units"
)
