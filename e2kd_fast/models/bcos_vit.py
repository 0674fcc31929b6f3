"""B-cos "simple" ViTs (SimpleViT style: sin-cos positions, no class token, mean pooling).

B-cos changes: B-cos linear layers (patch embedding, attention output, MLP, head), no activation in
the MLP, no-bias layer norms, and a constant logit bias. In explanation mode the attention matrix is
a dynamic weight on the values. The model is not exactly dynamic-linear: the added positional
embedding is an input-independent term that W(x) does not capture (as in the official model).

Official checkpoints wrap the ViT as ``BcosSequential(vit, LogitLayer)`` (keys prefixed ``0.``);
`convert_state_dict` maps them to this module.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial

import torch
from torch import Tensor, nn

from e2kd_fast.models._registry import register_model
from e2kd_fast.nn import BcosLinear, DetachableLayerNorm, DynamicLinearModule, LogitLayer


def sincos_position_embedding(h: int, w: int, dim: int, dtype: torch.dtype, device, temperature: float = 10_000):
    """The fixed 2-d sin-cos embedding of an h × w grid: [h·w, dim] (dim divisible by 4)."""
    if dim % 4:
        raise ValueError(f"the embedding dimension must be a multiple of 4 for sin-cos positions, got {dim}")
    y, x = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, device=device) / (dim // 4 - 1))
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1).to(dtype)


class Attention(DynamicLinearModule):
    """Pre-norm multi-head self-attention; ``to_qkv`` is a plain linear layer, ``to_out`` a B-cos one.

    Shapes:
        [N, T, dim] → [N, T, dim].
    """

    def __init__(self, dim: int, heads: int, dim_head: int, linear, norm) -> None:
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.norm = norm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = linear(heads * dim_head, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        n, t, _ = x.shape
        q, k, v = self.to_qkv(x).view(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # each [N, heads, T, d]
        attn = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
        out = self.dyn_matmul(attn, v)  # the attention matrix is a dynamic weight on the values
        return self.to_out(out.transpose(1, 2).reshape(n, t, -1))


class FeedForward(nn.Module):
    """Pre-norm MLP without activation: norm → B-cos linear → B-cos linear. [N, T, dim] → [N, T, dim]."""

    def __init__(self, dim: int, hidden_dim: int, linear, norm) -> None:
        super().__init__()
        self.net = nn.Sequential(
            OrderedDict(
                norm=norm(dim), linear1=linear(dim, hidden_dim), act=nn.Identity(), linear2=linear(hidden_dim, dim)
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Encoder(nn.Module):
    """One transformer block with residual connections. [N, T, dim] → [N, T, dim]."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, linear, norm) -> None:
        super().__init__()
        self.attn = Attention(dim, heads, dim_head, linear, norm)
        self.ff = FeedForward(dim, mlp_dim, linear, norm)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn(x) + x
        return self.ff(x) + x


class PatchEmbedding(nn.Module):
    """Cuts [N, C, H, W] into p×p patches ordered (p1, p2, c) and embeds them: → [N, H/p, W/p, dim]."""

    def __init__(self, patch_size: int, channels: int, dim: int, linear) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.linear = linear(channels * patch_size**2, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}×{w} is not divisible by the patch size {p}")
        patches = x.view(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(n, h // p, w // p, p * p * c)
        return self.linear(patches)


class BcosViT(nn.Module):
    """A B-cos SimpleViT.

    Args:
        patch_size: square patch side; images of any size divisible by it are accepted.
        dim, depth, heads, mlp_dim: transformer width, blocks, heads and MLP width.
        num_classes: outputs of the B-cos linear head.
        channels: input channels (6 for the [x, 1 − x] encoding).
        b, max_out: B-cos exponent and MaxOut units of every B-cos linear layer.
        logit_bias: constant added to the logits; default −log(num_classes − 1).

    Shapes:
        input [N, channels, H, W] → logits [N, num_classes].
    """

    def __init__(
        self,
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        num_classes: int = 1000,
        channels: int = 6,
        b: float = 2,
        max_out: int = 1,
        logit_bias: float | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        linear = partial(BcosLinear, b=b, max_out=max_out)
        norm = DetachableLayerNorm
        self.to_patch_embedding = PatchEmbedding(patch_size, channels, dim, linear)
        self.transformer = nn.Sequential(
            OrderedDict(
                (f"encoder_{i}", Encoder(dim, heads, dim // heads, mlp_dim, linear, norm)) for i in range(depth)
            )
        )
        self.linear_head = nn.Sequential(OrderedDict(norm=norm(dim), linear=linear(dim, num_classes)))
        self.num_classes = num_classes
        self.logit_layer = LogitLayer(logit_bias=-math.log(num_classes - 1) if logit_bias is None else logit_bias)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.to_patch_embedding(x)  # [N, h, w, dim]
        n, h, w, dim = tokens.shape
        tokens = tokens.reshape(n, h * w, dim) + sincos_position_embedding(h, w, dim, tokens.dtype, tokens.device)
        pooled = self.transformer(tokens).mean(dim=1)
        return self.logit_layer(self.linear_head(pooled))

    @staticmethod
    def convert_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Maps official keys (``0.to_patch_embedding.linear...`` of ``BcosSequential``) to this module."""
        if state_dict and all(k.startswith("0.") for k in state_dict):
            return {k[2:]: v for k, v in state_dict.items()}
        return state_dict


def _vit(num_classes: int, dim: int, heads: int, **kwargs) -> BcosViT:
    return BcosViT(16, dim, depth=12, heads=heads, mlp_dim=4 * dim, num_classes=num_classes, **kwargs)


@register_model("bcos")
def bcos_vit_ti_patch16_224(num_classes: int = 1000, **kwargs) -> BcosViT:
    """B-cos SimpleViT-Ti/16 (dim 192, 3 heads; 5.80M parameters; official top-1 59.96 %)."""
    return _vit(num_classes, 192, 3, **kwargs)


@register_model("bcos")
def bcos_vit_s_patch16_224(num_classes: int = 1000, **kwargs) -> BcosViT:
    """B-cos SimpleViT-S/16 (dim 384, 6 heads; 22.22M; 69.25 %)."""
    return _vit(num_classes, 384, 6, **kwargs)


@register_model("bcos")
def bcos_vit_b_patch16_224(num_classes: int = 1000, **kwargs) -> BcosViT:
    """B-cos SimpleViT-B/16 (dim 768, 12 heads; 86.90M; 74.41 %)."""
    return _vit(num_classes, 768, 12, **kwargs)
