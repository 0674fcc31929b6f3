"""The XDistillation convolutional autoencoders (paper Table I): image -> explanation map [N, 1, H, W].

Both are convolution-only with tanh after every layer (the paper: tanh keeps feature maps in [−1, 1]
and lets the CAE converge), so the output lies in [−1, 1].

* **Small_CAE** (MNIST in the paper), 1,077 parameters with a 1-channel input:
  Conv2d(1→16, 3, p1) · MaxPool2d(2) · Conv2d(16→4, 3, p1) · MaxPool2d(2) ·
  ConvTranspose2d(4→16, 2, s2) · ConvTranspose2d(16→1, 2, s2).
* **Large_CAE** (CIFAR-10), 198,796 parameters with a 3-channel input: four Conv2d(k4, s2, p1) and
  four ConvTranspose2d(k4, s2, p1). The paper prints no widths; no doubling plan reaches 198,796, so
  we use the mirror-symmetric plan 3 → 10 → 28 → 48 → 95 → 48 → 28 → 10 → 1, which gives exactly
  198,796 (490 + 4,508 + 21,552 + 73,055 + 73,008 + 21,532 + 4,490 + 161).

Inputs whose sides are not multiples of the total stride (4 resp. 16) are edge-padded up to one and
the output is cropped back, so any H × W works.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

CAE_VARIANTS = ("small", "large")
SMALL_CAE_PARAMS = 1077
LARGE_CAE_PARAMS = 198796
LARGE_CAE_WIDTHS = (10, 28, 48, 95)


class ConvAutoencoder(nn.Module):
    """A convolution-only autoencoder with tanh activations and an ``in_channels`` -> 1 mapping.

    Args:
        layers: the layer sequence (convs, pools, transposed convs); tanh follows each conv layer.
        in_channels: channels the first layer expects.
        multiple: the total down-sampling factor; inputs are padded to a multiple of it.
        variant: ``"small"`` or ``"large"`` (recorded for checkpoints and reports).
    """

    def __init__(self, layers: Sequence[nn.Module], in_channels: int, multiple: int, variant: str) -> None:
        super().__init__()
        body: list[nn.Module] = []
        for layer in layers:
            body.append(layer)
            if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d):
                body.append(nn.Tanh())
        self.body = nn.Sequential(*body)
        self.in_channels = in_channels
        self.multiple = multiple
        self.variant = variant

    def adapt_input(self, images: Tensor) -> Tensor:
        """Matches the channel count: grey = channel mean of RGB; RGB = grey repeated."""
        c = images.shape[1]
        if c == self.in_channels:
            return images
        if self.in_channels == 1:
            return images.mean(1, keepdim=True)
        if c == 1:
            return images.expand(-1, self.in_channels, -1, -1)
        raise ValueError(f"the {self.variant} CAE takes {self.in_channels} channels; images have {c}")

    def forward(self, images: Tensor) -> Tensor:
        """[N, C, H, W] images in [0, 1] -> [N, 1, H, W] explanation maps in [−1, 1]."""
        x = self.adapt_input(images)
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return self.body(x)[..., :h, :w]


def small_cae(in_channels: int = 1) -> ConvAutoencoder:
    """Small_CAE; 1,077 parameters for ``in_channels == 1`` (the paper's MNIST setting)."""
    layers = [
        nn.Conv2d(in_channels, 16, 3, padding=1),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(16, 4, 3, padding=1),
        nn.MaxPool2d(2, 2),
        nn.ConvTranspose2d(4, 16, 2, stride=2),
        nn.ConvTranspose2d(16, 1, 2, stride=2),
    ]
    return ConvAutoencoder(layers, in_channels, multiple=4, variant="small")


def large_cae(in_channels: int = 3, widths: Sequence[int] = LARGE_CAE_WIDTHS) -> ConvAutoencoder:
    """Large_CAE; 198,796 parameters with the default widths and ``in_channels == 3`` (CIFAR-10)."""
    if len(widths) != 4 or any(int(w) < 1 for w in widths):
        raise ValueError(f"large_cae: widths must be 4 positive channel counts, got {widths!r}")
    enc = [in_channels, *[int(w) for w in widths]]
    dec = [*reversed(enc[1:]), 1]
    layers: list[nn.Module] = [nn.Conv2d(a, b, 4, stride=2, padding=1) for a, b in zip(enc[:-1], enc[1:], strict=True)]
    layers += [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1) for a, b in zip(dec[:-1], dec[1:], strict=True)]
    return ConvAutoencoder(layers, in_channels, multiple=16, variant="large")


def build_cae(variant: str, in_channels: int | None = None) -> ConvAutoencoder:
    """The CAE by name; ``in_channels`` None takes the paper's (1 for small, 3 for large)."""
    if variant == "small":
        return small_cae(1 if in_channels is None else in_channels)
    if variant == "large":
        return large_cae(3 if in_channels is None else in_channels)
    raise ValueError(f"unknown CAE variant {variant!r}; available: {', '.join(CAE_VARIANTS)}")


def count_parameters(module: nn.Module) -> int:
    """Number of parameters, frozen ones included (weights and biases: the paper's counts)."""
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "CAE_VARIANTS",
    "LARGE_CAE_PARAMS",
    "LARGE_CAE_WIDTHS",
    "SMALL_CAE_PARAMS",
    "ConvAutoencoder",
    "build_cae",
    "count_parameters",
    "large_cae",
    "small_cae",
]
