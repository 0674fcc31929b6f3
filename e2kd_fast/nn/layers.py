"""The input encoding and the logit layer of B-cos networks."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AddInverse(nn.Module):
    """Encodes an image in [0, 1] as [x, 1 − x] along ``dim`` (RGB → the 6-channel B-cos input).

    Shapes:
        input [N, C, H, W] → output [N, 2C, H, W] (with the default dim=1).
    """

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, 1 - x], dim=self.dim)


class LogitLayer(nn.Module):
    """Divides by a temperature (if given) and adds a constant bias (if given).

    B-cos classifiers use bias −log(C − 1), so that sigmoid(logit) = 1/C at initialisation. The
    bias is a constant, not a parameter: it is not part of the dynamic-linear map W(x).
    """

    def __init__(self, logit_temperature: float | None = None, logit_bias: float | None = None) -> None:
        super().__init__()
        self.logit_temperature = logit_temperature
        self.logit_bias = logit_bias

    def forward(self, x: Tensor) -> Tensor:
        if self.logit_temperature is not None:
            x = x / self.logit_temperature
        if self.logit_bias is not None:
            x = x + self.logit_bias
        return x

    def extra_repr(self) -> str:
        return f"logit_temperature={self.logit_temperature}, logit_bias={self.logit_bias}"
