"""Normalisation layers for B-cos networks: no bias, and 1/std as a dynamic weight.

An additive bias would make the network affine instead of dynamic-linear, so every norm here has
none (``bias=False`` by default; the official models build them through ``NoBias``). Each divides by
a data-dependent std; in explanation mode 1/std is a dynamic weight (constant for the explanation,
differentiated for the loss). Mean subtraction is linear and stays as it is.

State-dict keys match the official `bcos` norms (``weight``, and for batch norm the running
statistics buffers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2kd_fast.nn.explanation import DynamicLinearModule


def _drop_bias(norm: nn.Module, bias: bool) -> None:
    if not bias and getattr(norm, "bias", None) is not None:
        norm.bias = None


def batch_norm_group_indices(n: int, groups: int, device: torch.device | None = None) -> list[Tensor]:
    """The images of each batch-norm group: image i belongs to group i mod k.

    Data-parallel samplers deal a batch's images to the ranks in turn (rank r gets positions r,
    r + W, r + 2W, ...), so group r holds the images rank r would normalise together; a smaller last
    batch is dealt the same way. Groups that would be empty (n < k) are left out.

    Args:
        n: images in the batch.
        groups: k >= 1.

    Returns:
        min(k, n) int64 index tensors; group g is [g, g + k, g + 2k, ...] below n.
    """
    return [torch.arange(g, n, groups, device=device) for g in range(min(groups, n))]


class GhostBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` whose training statistics are those of ``batch_groups`` image groups.

    Each group (`batch_norm_group_indices`) is normalised by its own mean and variance, as on its own
    data-parallel rank without SyncBN; the running statistics follow group 0 alone, the rank whose
    buffers DDP broadcasts. Eval mode, and ``batch_groups`` = 1, are plain batch norm. Built from a
    batch norm by `set_batch_norm_groups` (same parameters, buffers and state-dict keys).

    Shapes:
        input [N, C, H, W] → output [N, C, H, W].
    """

    batch_groups: int = 1

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.batch_groups > 1 and x.shape[0] > 1):
            return super().forward(x)
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.momentum is None and self.track_running_stats:
            momentum = 1.0 / float(self.num_batches_tracked)  # cumulative average, as nn.BatchNorm2d
        out = torch.empty_like(x)
        for g, index in enumerate(batch_norm_group_indices(x.shape[0], self.batch_groups, x.device)):
            track = g == 0 and self.track_running_stats
            out[index] = F.batch_norm(
                x[index],
                self.running_mean if track else None,
                self.running_var if track else None,
                self.weight,
                self.bias,
                True,
                momentum,
                self.eps,
            )
        return out


def set_batch_norm_groups(model: nn.Module, groups: int) -> int:
    """Normalises every batch norm of ``model`` over ``groups`` image groups in training (k = 1: over the batch).

    `BatchNormUncentered2d` takes the setting as it is; a plain `nn.BatchNorm2d` (torchvision models)
    is replaced by a `GhostBatchNorm2d` holding the same parameters and buffers.

    Args:
        model: changed in place; call before an optimiser or DDP wraps it (parameters stay the same
            objects, so an existing optimiser keeps working).
        groups: k >= 1 groups per training batch (`batch_norm_group_indices`).

    Returns:
        the number of batch-norm layers set.
    """
    if groups < 1:
        raise ValueError(f"batch-norm groups must be >= 1, got {groups}")
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BatchNormUncentered2d | GhostBatchNorm2d):
                child.batch_groups = groups
            elif type(child) is nn.BatchNorm2d:
                ghost = GhostBatchNorm2d(
                    child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
                )
                ghost.weight, ghost.bias = child.weight, child.bias
                for key, buffer in child.named_buffers(recurse=False):
                    setattr(ghost, key, buffer)
                ghost.train(child.training)
                ghost.batch_groups = groups
                setattr(parent, name, ghost)
            else:
                continue
            count += 1
    return count


class BatchNormUncentered2d(DynamicLinearModule, nn.BatchNorm2d):
    """Uncentred batch norm ("bnu-linear", the official ImageNet default): y = γ · x / sqrt(var + eps).

    The input is not mean-subtracted. In training, var is the biased batch variance over
    (N, H, W) (computed centred) and ``running_var`` follows it with ``momentum``; in eval mode the
    running variance is used. ``running_mean`` exists for state-dict compatibility and is unused.
    With ``batch_groups`` = k > 1 (`set_batch_norm_groups`), training uses each of k image groups'
    own variance, as k data-parallel ranks without SyncBN would (`batch_norm_group_indices`).

    Shapes:
        input [N, C, H, W] → output [N, C, H, W].
    """

    batch_groups: int = 1

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, bias: bool = False, **kw):
        super().__init__(num_features, eps=eps, momentum=momentum, **kw)
        _drop_bias(self, bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.normalise(x)[0]

    def normalise(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(output, 1/std [1, C, 1, 1], or [N, C, 1, 1] with batch groups); updates the running
        variance in training. The explanation sweep records the 1/std from here, so the statistics
        are computed once."""
        if x.dim() != 4:
            raise ValueError(f"BatchNormUncentered2d expects [N, C, H, W] input, got shape {tuple(x.shape)}")
        use_batch_stats = self.training or self.running_var is None
        if use_batch_stats and self.training and self.batch_groups > 1 and x.shape[0] > 1:
            n, k = x.shape[0], min(self.batch_groups, x.shape[0])
            if n % k == 0:  # one reduction: image a·k + g is row a of group g
                per_group = x.unflatten(0, (n // k, k)).var(dim=(0, 3, 4), unbiased=False)  # [k, C]
                var = per_group.repeat(n // k, 1)  # [N, C]: row i is group i mod k
            else:  # a smaller last batch: groups of unequal size
                groups = batch_norm_group_indices(n, k, x.device)
                per_group = torch.stack([x[g].var(dim=(0, 2, 3), unbiased=False) for g in groups])
                var = per_group[torch.arange(n, device=x.device) % k]
            if self.track_running_stats and self.running_var is not None:
                self._update_running_var(per_group[0].detach())  # rank 0's statistics, as DDP broadcasts them
        elif use_batch_stats:
            var = x.var(dim=(0, 2, 3), unbiased=False)
            if self.training and self.track_running_stats and self.running_var is not None:
                self._update_running_var(var.detach())
        else:
            var = self.running_var
        inv_std = (var + self.eps).rsqrt()
        inv_std = inv_std[:, :, None, None] if inv_std.dim() == 2 else inv_std[None, :, None, None]
        y = self.dyn_mul(inv_std, x)
        if self.weight is not None:
            y = self.weight[None, :, None, None] * y
        if self.bias is not None:
            y = y + self.bias[None, :, None, None]
        return y, inv_std

    def _update_running_var(self, var: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_var.mul_(1 - factor).add_(factor * var)


class DetachableLayerNorm(DynamicLinearModule, nn.LayerNorm):
    """Layer norm over the last dimension(s) with 1/std as a dynamic weight (the B-cos ViT's norm).

    Shapes:
        input [*, *normalized_shape] → same shape.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = False, **kw):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias, **kw)

    def forward(self, x: Tensor) -> Tensor:
        if not self.explaining:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return self.normalise(x)[0]

    def normalise(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(output, 1/std [*, 1]) computed explicitly, with 1/std as the dynamic weight."""
        dims = tuple(range(-len(self.normalized_shape), 0))
        var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
        inv_std = (var + self.eps).rsqrt()
        y = self.dyn_mul(inv_std, x - mean)
        if self.weight is not None:
            y = self.weight * y
        if self.bias is not None:
            y = y + self.bias
        return y, inv_std


class DetachableGroupNorm2d(DynamicLinearModule, nn.GroupNorm):
    """Group norm of [N, C, H, W] maps with 1/std as a dynamic weight.

    Shapes:
        input [N, C, H, W] → output [N, C, H, W]; C must be divisible by ``num_groups``.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, bias: bool = False):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        _drop_bias(self, bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] % self.num_groups:
            raise ValueError(
                f"{type(self).__name__} expects [N, C, H, W] with C divisible by {self.num_groups}, "
                f"got shape {tuple(x.shape)}"
            )
        if not self.explaining:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return self.normalise(x)[0]

    def normalise(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(output, 1/std [N, G, 1, 1, 1]) computed explicitly, with 1/std as the dynamic weight."""
        grouped = x.unflatten(1, (self.num_groups, -1))
        var, mean = torch.var_mean(grouped, dim=(2, 3, 4), unbiased=False, keepdim=True)
        inv_std = (var + self.eps).rsqrt()
        y = self.dyn_mul(inv_std, grouped - mean).flatten(1, 2)
        if self.weight is not None:
            y = self.weight[None, :, None, None] * y
        if self.bias is not None:
            y = y + self.bias[None, :, None, None]
        return y, inv_std


class DetachableGNLayerNorm2d(DetachableGroupNorm2d):
    """Layer norm of conv maps (group norm with one group): normalises over (C, H, W)."""

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, bias: bool = False):
        super().__init__(1, num_channels, eps=eps, affine=affine, bias=bias)


class DetachablePositionNorm2d(DynamicLinearModule, nn.LayerNorm):
    """Position norm: layer norm over the channels at every spatial position (v2's default CNN norm).

    Shapes:
        input [N, C, H, W] → output [N, C, H, W].
    """

    def __init__(self, features: int, eps: float = 1e-5, affine: bool = True, bias: bool = False, **kw):
        super().__init__(features, eps=eps, elementwise_affine=affine, bias=bias and affine, **kw)
        self.features = features

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"DetachablePositionNorm2d expects [N, C, H, W] input, got shape {tuple(x.shape)}")
        if not self.explaining:
            y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
            return y.permute(0, 3, 1, 2)
        return self.normalise(x)[0]

    def normalise(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(output, 1/std [N, 1, H, W]) computed explicitly, with 1/std as the dynamic weight."""
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        inv_std = (var + self.eps).rsqrt()
        y = self.dyn_mul(inv_std, x - mean)
        if self.weight is not None:
            y = self.weight[None, :, None, None] * y
        if self.bias is not None:
            y = y + self.bias[None, :, None, None]
        return y, inv_std


NORM_LAYERS: dict[str, type[nn.Module] | None] = {
    "bnu": BatchNormUncentered2d,
    "pn": DetachablePositionNorm2d,
    "ln": DetachableGNLayerNorm2d,
    "none": None,
}


def make_norm2d(kind: str):
    """The constructor ``f(num_channels) -> nn.Module`` for a 2-d norm named ``kind``.

    Kinds: ``bnu`` (uncentred batch norm, the ImageNet zoo's), ``pn`` (position norm), ``ln``
    (layer norm over C, H, W), ``gn<G>`` (group norm with G groups, e.g. ``gn2``), ``none``.
    """
    if kind.startswith("gn") and kind[2:].isdigit():
        groups = int(kind[2:])
        return lambda channels: DetachableGroupNorm2d(groups, channels)
    if kind not in NORM_LAYERS:
        raise ValueError(f"unknown norm {kind!r}; expected one of {sorted(NORM_LAYERS)} or 'gn<groups>'")
    layer = NORM_LAYERS[kind]
    return nn.Identity if layer is None else layer
