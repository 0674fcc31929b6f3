"""The explanation as an explicit reverse sweep (docs/architecture.md#explicit-reverse-sweep-no-double-backward).

In explanation mode a B-cos network is dynamic-linear: logit = W(x)·x + b, where W(x) is a product
of per-layer linear maps whose data-dependent factors (B-cos scales s, the norms' 1/std, attention
matrices, MaxOut selections) are held fixed. So W = ∂logit_c/∂x is obtained without autograd:

1. a *taped forward* computes the ordinary forward and records, per module, what its adjoint needs;
2. the *adjoint sweep* starts from the one-hot of the class and applies each module's adjoint in
   reverse: the scale, the transposed conv/linear with the unit-norm weight that the forward
   recorded, the norms' 1/std with their centring, pool adjoints, residual sums, concat splits.

The recorded factors stay attached to the forward's autograd graph. For a student, the ordinary
(first-order) backward of a loss on W therefore differentiates through them into the parameters:
the exact total derivative of the official e²KD implementation. For a teacher the whole sweep runs
under ``no_grad`` and builds no graph. No double backward and no ``autograd.Function`` are involved.

Each supported module type registers a pair ``(taped_forward, adjoint)``; ``taped_forward(m, x, tape)``
returns what ``m(x)`` returns and appends each leaf's records to ``tape`` (a B-cos layer two: its
ŵ, then its scale record); ``adjoint(m, g, tape)`` pops them in reverse and returns
∂⟨g, m(x)⟩/∂x with the dynamic factors fixed.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2kd_fast import ops
from e2kd_fast.models.bcos_densenet import BcosDenseNet, DenseBlock, DenseLayer
from e2kd_fast.models.bcos_resnet import BasicBlock, BcosResNet, Bottleneck
from e2kd_fast.models.bcos_vit import Attention, BcosViT, Encoder, PatchEmbedding, sincos_position_embedding
from e2kd_fast.nn import (
    BatchNormUncentered2d,
    BcosConv2d,
    BcosLinear,
    DetachableGroupNorm2d,
    DetachableLayerNorm,
    DetachablePositionNorm2d,
    LogitLayer,
)
from e2kd_fast.nn.activation_checkpointing import is_checkpointed, run_checkpointed
from e2kd_fast.ops.bcos_conv2d import inline_box_sum, route_avg_pool_adjoint
from e2kd_fast.reference.bcos import (
    LINEAR_NORM_EPS,
    conv_adjoint,
    conv_dynamic_scale,
    conv_linear,
    dynamic_scale,
    folded_head_weight,
    patch_norm_slow,
    scaled_conv_adjoint,
    unit_norm_weight,
)
from e2kd_fast.reference.explain import check_target

Tape = list
TapedForward = Callable[[nn.Module, Tensor, Tape], Tensor]
Adjoint = Callable[[nn.Module, Tensor, Tape], Tensor]

_SWEEP: dict[type, tuple[TapedForward, Adjoint]] = {}


def register_sweep(cls: type) -> Callable:
    """Registers the sweep of a module type: ``register_sweep(Cls)((taped_forward, adjoint))``."""

    def wrap(pair: tuple[TapedForward, Adjoint]) -> tuple[TapedForward, Adjoint]:
        _SWEEP[cls] = pair
        return pair

    return wrap


def _lookup(module: nn.Module) -> tuple[TapedForward, Adjoint]:
    for cls in type(module).__mro__:
        if cls in _SWEEP:
            return _SWEEP[cls]
    raise NotImplementedError(
        f"the explanation sweep has no adjoint for {type(module).__name__}; "
        "use dynamic_weights(..., algorithm='autograd') for this model"
    )


def taped_forward(module: nn.Module, x: Tensor, tape: Tape) -> Tensor:
    """``module(x)``, recording in ``tape`` what the adjoint sweep needs.

    A stage marked by `enable_activation_checkpointing` runs checkpointed: its records are outputs
    of the checkpointed region (the sweep needs them), everything else it saved is recomputed.
    """
    forward = _lookup(module)[0]
    if is_checkpointed(module):

        def region(x: Tensor) -> tuple[Tensor, Tape]:
            records: Tape = []
            return forward(module, x, records), records

        out, records = run_checkpointed(module, region, x)
        tape.extend(records)
        return out
    return forward(module, x, tape)


def adjoint(module: nn.Module, g: Tensor, tape: Tape) -> Tensor:
    """The adjoint of ``module``'s dynamic-linear map applied to ``g`` (pops the module's records)."""
    return _lookup(module)[1](module, g, tape)


# Repeated blocks (residual blocks, the second half of dense layers, ViT encoder blocks) run their
# taped forward and their adjoint as nested compile regions: under torch.compile each distinct block
# shape is traced and compiled once and reused by every block like it, so the step's compile time
# grows with the number of distinct blocks, not with the depth. Eagerly a region is a plain call.
# Blocks that update buffers (batch norm in training) are inlined (`_inlined`): a trained student
# with batch norms compiles as before, a teacher and a layer-norm student use regions.
# Regions need `nested_compile_region` with an adjustable reuse limit (each distinct shape is one
# entry; the default of 8 is an error past eight); without it the blocks are inlined as before.
_REGION_ENTRIES = 256
_nested_region = getattr(torch.compiler, "nested_compile_region", None)
_regions_supported = _nested_region is not None and "max_reuse_entries" in inspect.signature(_nested_region).parameters
compile_regions = _regions_supported
"""Whether compiled sweeps use regions (set False to inline every block: one flat graph, as a baseline)."""


def _drops_paths(m: nn.Module) -> bool:
    """Whether the block has active stochastic depth (only then does it record its row mask)."""
    sd = getattr(m, "stochastic_depth", None)
    return sd is not None and sd.training and sd.p > 0.0


def _inlined(m: nn.Module) -> bool:
    """Whether a block is traced inline rather than as a region.

    A block in training mode with buffers updates them (batch-norm running statistics), and regions
    with buffer mutations cannot be trained through (torch 2.14); a block with active stochastic
    depth draws random numbers, which a reused region would replay.
    """
    if not compile_regions:
        return True
    if m.training and next(m.buffers(), None) is not None:
        return True
    return _drops_paths(m)


def _region(forward: TapedForward, backward: Adjoint) -> tuple[TapedForward, Adjoint]:
    """``(forward, backward)`` as nested compile regions; the block's records travel as one tape entry."""
    if not _regions_supported:
        return forward, backward

    @torch.compiler.nested_compile_region(max_reuse_entries=_REGION_ENTRIES)
    def forward_region(m: nn.Module, x: Tensor) -> tuple:
        records: Tape = []
        out = forward(m, x, records)
        # Dynamo reuses a traced region for a block like it only if the region returns tensors alone.
        if all(isinstance(r, Tensor) for r in records):
            return (out, *records)
        return out, tuple(records)

    @torch.compiler.nested_compile_region(max_reuse_entries=_REGION_ENTRIES)
    def backward_region(m: nn.Module, g: Tensor, records: tuple) -> Tensor:
        return backward(m, g, list(records))

    def regional_forward(m: nn.Module, x: Tensor, tape: Tape) -> Tensor:
        if _inlined(m):
            return forward(m, x, tape)
        out, *records = forward_region(m, x)
        tape.append(records[0] if records and isinstance(records[0], tuple) else tuple(records))
        return out

    def regional_backward(m: nn.Module, g: Tensor, tape: Tape) -> Tensor:
        if _inlined(m):
            return backward(m, g, tape)
        return backward_region(m, _dense(g) if torch.compiler.is_compiling() else g, tape.pop())

    return regional_forward, regional_backward


def _dense(g: Tensor) -> Tensor:
    """``g``, copied into dense memory in its own layout if it is a strided view (a dense block's
    channel slice). Dynamo reuses a region only for inputs of equal strides, and a slice's strides
    carry the width of the tensor it was cut from: each dense layer would trace its own copy."""
    if g.is_contiguous() or g.is_contiguous(memory_format=torch.channels_last):
        return g
    return g.clone(memory_format=torch.preserve_format)


def dynamic_weights_sweep(
    model: nn.Module,
    x6: Tensor,
    target: Tensor | None = None,
    *,
    create_graph: bool | None = None,
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """W = ∂logit_target/∂x6 in explanation mode, by a taped forward and an explicit adjoint sweep.

    Same contract as `e2kd_fast.reference.explain.dynamic_weights_autograd` (equal to float64
    rounding): ``create_graph`` (default: grad mode on and trainable parameters) keeps W attached to
    the dynamic factors for the official total-derivative gradient; without it everything runs
    under ``no_grad``. ``target=None`` explains the model's own top-1.

    Returns:
        W [N, C, H, W] (and the logits [N, num_classes] of the same forward if asked).
    """
    if target is not None:
        check_target(target, x6.shape[0])
    if create_graph is None:
        create_graph = torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
    with torch.set_grad_enabled(create_graph):
        tape: Tape = []
        logits = taped_forward(model, x6, tape)
        target = logits.argmax(1) if target is None else target.to(logits.device)
        check_target(target, logits.shape[0], logits.shape[1])
        seed = F.one_hot(target.long(), logits.shape[1]).to(logits.dtype)
        weights = adjoint(model, seed, tape)
    if tape:
        raise RuntimeError(f"explanation sweep left {len(tape)} unused records: a taped forward and its adjoint differ")
    return (weights, logits) if return_logits else weights


# ---------------------------------------------------------------------------------------------- leaves


def _record_unit_weight(m: BcosConv2d | BcosLinear, tape: Tape) -> Tensor:
    """ŵ of ``m``, recorded for the adjoint, which applies the same ŵ. Computed again there, it fused
    into the kernel of the adjoint's scale, whose shape is otherwise shared by every layer of a dense
    block or stage: one compiled kernel per layer instead of one per block."""
    w_hat = unit_norm_weight(m.linear.weight)
    tape.append(w_hat)
    return w_hat


def _conv_fwd(m: BcosConv2d, x: Tensor, tape: Tape) -> Tensor:
    w_hat = _record_unit_weight(m, tape)
    parts = m.fused_parts(x)
    if parts is not None:  # a fast back end: conv plus fused epilogue in one op (its autograd is the full derivative)
        linear, scale = parts
        tape.append(_conv_record(m, scale, None, x))
        return scale * linear
    linear = conv_linear(x, w_hat, m.stride, m.padding, m.dilation, m.groups)
    selection = None
    if m.max_out > 1:  # the selected unit of each MaxOut group is part of the dynamic map
        linear, selection = linear.unflatten(1, (m.out_channels, m.max_out)).max(dim=2)
    if m.b == 1:
        tape.append((None, selection, x.shape[-2:]))
        return linear
    if m.dilation != (1, 1):
        w_shape = (m.out_channels, *m.linear.weight.shape[1:])
        scale = dynamic_scale(linear, patch_norm_slow(x, w_shape, m.stride, m.padding, m.dilation, m.groups), m.b)
    elif ops.use_fused("e2kd::patch_norm", x.device.type, m.shape_class):
        norm = ops.patch_norm(x, list(m.kernel_size), list(m.stride), list(m.padding), m.groups, m.out_channels)
        scale = dynamic_scale(linear, norm, m.b)
    else:  # the reference maths inline, where Inductor fuses it (as the layer's own forward does)
        box_sum = inline_box_sum(x.device.type)
        scale = conv_dynamic_scale(linear, x, m.kernel_size, m.b, m.stride, m.padding, m.groups, box_sum)
    tape.append(_conv_record(m, scale, selection, x))
    return scale * linear


def _conv_record(m: BcosConv2d, scale: Tensor, selection: Tensor | None, x: Tensor) -> Tensor | tuple:
    """A conv's scale record (pushed after its ŵ): the scale as a bare tensor where the rest follows
    from the module and the output gradient (no MaxOut selection; stride 1, where the input size
    follows from the output size), else (scale, selection, input size). A region whose records are
    all tensors is reused untraced."""
    if selection is None and m.stride == (1, 1):
        return scale
    return (scale, selection, x.shape[-2:])


def _unselect(g: Tensor, selection: Tensor | None, units: int, dim: int) -> Tensor:
    """Adjoint of MaxOut: route each gradient to its selected unit."""
    if selection is None:
        return g
    dim = dim % g.dim()
    full = torch.zeros(*g.shape[: dim + 1], units, *g.shape[dim + 1 :], dtype=g.dtype, device=g.device)
    full = full.scatter(dim + 1, selection.unsqueeze(dim + 1), g.unsqueeze(dim + 1))
    return full.flatten(dim, dim + 1)


def _conv_adj(m: BcosConv2d, g: Tensor, tape: Tape) -> Tensor:
    record = tape.pop()
    if isinstance(record, Tensor):  # stride 1: in = out − 2·padding + dilation·(kernel − 1)
        scale, selection = record, None
        geometry = zip(g.shape[-2:], m.padding, m.dilation, m.kernel_size, strict=True)
        in_size = [size - 2 * pad + dil * (k - 1) for size, pad, dil, k in geometry]
    else:
        scale, selection, in_size = record
    w_hat = tape.pop()
    if scale is not None and selection is None:  # the common case: one op, the fusion target
        if ops.use_fused("e2kd::scaled_conv_adjoint", g.device.type, m.shape_class):
            geometry = (list(m.stride), list(m.padding), list(m.dilation), m.groups)
            return ops.scaled_conv_adjoint(g, scale, w_hat, list(in_size), *geometry)
        return scaled_conv_adjoint(g, scale, w_hat, in_size, m.stride, m.padding, m.dilation, m.groups)
    if scale is not None:
        g = scale * g
    g = _unselect(g, selection, m.max_out, 1)
    return conv_adjoint(g, w_hat, in_size, m.stride, m.padding, m.dilation, m.groups)


register_sweep(BcosConv2d)((_conv_fwd, _conv_adj))


def _linear_fwd(m: BcosLinear, x: Tensor, tape: Tape) -> Tensor:
    linear = F.linear(x, _record_unit_weight(m, tape))
    selection = None
    if m.max_out > 1:
        linear, selection = linear.unflatten(-1, (m.out_features, m.max_out)).max(dim=-1)
    if m.b == 1:
        tape.append((None, selection))
        return linear
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True) + LINEAR_NORM_EPS
    scale = dynamic_scale(linear, norm, m.b)
    tape.append(scale if selection is None else (scale, selection))  # a lone scale: see _conv_record
    return scale * linear


def _linear_adj(m: BcosLinear, g: Tensor, tape: Tape) -> Tensor:
    record = tape.pop()
    scale, selection = (record, None) if isinstance(record, Tensor) else record
    w_hat = tape.pop()
    if scale is not None:
        g = scale * g
    g = _unselect(g, selection, m.max_out, -1)
    return g @ w_hat


register_sweep(BcosLinear)((_linear_fwd, _linear_adj))


def _bnu_fwd(m: BatchNormUncentered2d, x: Tensor, tape: Tape) -> Tensor:
    y, inv_std = m.normalise(x)  # one pass: statistics, running-variance update and output
    tape.append(inv_std if m.weight is None else m.weight[None, :, None, None] * inv_std)
    return y


def _scale_adj(m: nn.Module, g: Tensor, tape: Tape) -> Tensor:
    return tape.pop() * g


register_sweep(BatchNormUncentered2d)((_bnu_fwd, _scale_adj))


def _centred_norm_fwd(m: nn.Module, x: Tensor, tape: Tape) -> Tensor:
    """A centred norm y = γ ⊙ (x − mean)·r with r = 1/std fixed: its adjoint is r·(h − mean h), h = γ ⊙ g."""
    y, inv_std = m.normalise(x)
    tape.append(inv_std)
    return y


def _layer_norm_adj(m: DetachableLayerNorm, g: Tensor, tape: Tape) -> Tensor:
    inv_std = tape.pop()
    h = g * m.weight if m.weight is not None else g
    dims = tuple(range(-len(m.normalized_shape), 0))
    return inv_std * (h - h.mean(dim=dims, keepdim=True))


register_sweep(DetachableLayerNorm)((_centred_norm_fwd, _layer_norm_adj))


def _group_norm_adj(m: DetachableGroupNorm2d, g: Tensor, tape: Tape) -> Tensor:
    inv_std = tape.pop()
    h = g * m.weight[None, :, None, None] if m.weight is not None else g
    h = h.unflatten(1, (m.num_groups, -1))
    return (inv_std * (h - h.mean(dim=(2, 3, 4), keepdim=True))).flatten(1, 2)


register_sweep(DetachableGroupNorm2d)((_centred_norm_fwd, _group_norm_adj))


def _position_norm_adj(m: DetachablePositionNorm2d, g: Tensor, tape: Tape) -> Tensor:
    inv_std = tape.pop()
    h = g * m.weight[None, :, None, None] if m.weight is not None else g
    return inv_std * (h - h.mean(dim=1, keepdim=True))


register_sweep(DetachablePositionNorm2d)((_centred_norm_fwd, _position_norm_adj))


def _identity_fwd(m: nn.Module, x: Tensor, tape: Tape) -> Tensor:
    return m(x)


def _identity_adj(m: nn.Module, g: Tensor, tape: Tape) -> Tensor:
    return g


register_sweep(nn.Identity)((_identity_fwd, _identity_adj))


def _logit_adj(m: LogitLayer, g: Tensor, tape: Tape) -> Tensor:
    return g if m.logit_temperature is None else g / m.logit_temperature


register_sweep(LogitLayer)((_identity_fwd, _logit_adj))


def _avg_pool_fwd(m: nn.AvgPool2d, x: Tensor, tape: Tape) -> Tensor:
    if m.ceil_mode or not m.count_include_pad or m.divisor_override is not None:
        raise NotImplementedError("the sweep supports AvgPool2d with count_include_pad=True, floor mode, no divisor")
    tape.append(x.shape)
    return m(x)


def _avg_pool_adj(m: nn.AvgPool2d, g: Tensor, tape: Tape) -> Tensor:
    stride = m.stride if m.stride is not None else m.kernel_size
    return route_avg_pool_adjoint(g, tape.pop()[-2:], m.kernel_size, stride, m.padding)


register_sweep(nn.AvgPool2d)((_avg_pool_fwd, _avg_pool_adj))


def _global_pool_fwd(m: nn.Module, x: Tensor, tape: Tape) -> Tensor:
    tape.append(x.shape)
    return F.adaptive_avg_pool2d(x, 1)


def _global_pool_adj(m: nn.Module, g: Tensor, tape: Tape) -> Tensor:
    shape = tape.pop()
    return g.expand(shape) / (shape[-1] * shape[-2])


def _adaptive_pool_fwd(m: nn.AdaptiveAvgPool2d, x: Tensor, tape: Tape) -> Tensor:
    if nn.modules.utils._pair(m.output_size) != (1, 1):
        raise NotImplementedError("the sweep supports AdaptiveAvgPool2d only to 1×1 (global average pooling)")
    return _global_pool_fwd(m, x, tape)


register_sweep(nn.AdaptiveAvgPool2d)((_adaptive_pool_fwd, _global_pool_adj))


def _flatten_fwd(m: nn.Flatten, x: Tensor, tape: Tape) -> Tensor:
    tape.append(x.shape)
    return m(x)


def _flatten_adj(m: nn.Flatten, g: Tensor, tape: Tape) -> Tensor:
    return g.reshape(tape.pop())


register_sweep(nn.Flatten)((_flatten_fwd, _flatten_adj))


# ---------------------------------------------------------------------------------------------- containers


def _sequential_fwd(m: nn.Sequential, x: Tensor, tape: Tape) -> Tensor:
    for child in m:
        x = taped_forward(child, x, tape)
    return x


def _sequential_adj(m: nn.Sequential, g: Tensor, tape: Tape) -> Tensor:
    for child in reversed(m):
        g = adjoint(child, g, tape)
    return g


register_sweep(nn.Sequential)((_sequential_fwd, _sequential_adj))


def _drop_path(m: nn.Module, out: Tensor, tape: Tape) -> Tensor:
    """Stochastic depth as torchvision computes it, with the row mask recorded (a dynamic weight)."""
    if not _drops_paths(m):
        return out
    sd = m.stochastic_depth
    survival = 1.0 - sd.p
    noise = torch.empty([out.shape[0]] + [1] * (out.ndim - 1), dtype=out.dtype, device=out.device)
    noise = noise.bernoulli_(survival)
    if survival > 0.0:
        noise.div_(survival)
    tape.append(noise)
    return out * noise


def _drop_path_adj(m: nn.Module, g: Tensor, tape: Tape) -> Tensor:
    return g * tape.pop() if _drops_paths(m) else g


def _block_fwd(m: BasicBlock | Bottleneck, x: Tensor, tape: Tape) -> Tensor:
    convs = [(m.conv1, m.bn1), (m.conv2, m.bn2)] + ([(m.conv3, m.bn3)] if isinstance(m, Bottleneck) else [])
    out = x
    for conv, norm in convs:
        out = taped_forward(norm, taped_forward(conv, out, tape), tape)
    out = _drop_path(m, out, tape)
    identity = x if m.downsample is None else taped_forward(m.downsample, x, tape)
    return out + identity


def _block_adj(m: BasicBlock | Bottleneck, g: Tensor, tape: Tape) -> Tensor:
    g_identity = g if m.downsample is None else adjoint(m.downsample, g, tape)
    g_main = _drop_path_adj(m, g, tape)
    convs = [(m.conv1, m.bn1), (m.conv2, m.bn2)] + ([(m.conv3, m.bn3)] if isinstance(m, Bottleneck) else [])
    for conv, norm in reversed(convs):
        g_main = adjoint(conv, adjoint(norm, g_main, tape), tape)
    return g_main + g_identity


register_sweep(BasicBlock)(_region(_block_fwd, _block_adj))
register_sweep(Bottleneck)(_region(_block_fwd, _block_adj))


def _resnet_stages(m: BcosResNet) -> list[nn.Module]:
    stem = [m.conv1, m.bn1] + ([m.pool] if m.pool is not None else [])
    stages = [m.layer1, m.layer2, m.layer3] + ([m.layer4] if m.layer4 is not None else [])
    return [*stem, *stages, m.fc, m.avgpool]


def _resnet_fwd(m: BcosResNet, x: Tensor, tape: Tape) -> Tensor:
    for child in _resnet_stages(m):
        x = taped_forward(child, x, tape)
    tape.append(x.shape)
    return taped_forward(m.logit_layer, x.flatten(1), tape)


def _resnet_adj(m: BcosResNet, g: Tensor, tape: Tape) -> Tensor:
    g = adjoint(m.logit_layer, g, tape).reshape(tape.pop())
    for child in reversed(_resnet_stages(m)):
        g = adjoint(child, g, tape)
    return g


register_sweep(BcosResNet)((_resnet_fwd, _resnet_adj))


def _dense_layer_fwd(m: DenseLayer, features: list[Tensor], tape: Tape, fold_head: bool) -> Tensor:
    if m.drop_rate > 0 and m.training:
        raise NotImplementedError("the sweep does not support dropout in dense layers during training")
    if fold_head and _head_runs_as_op(m):
        out, scale, folded = ops.bcos_dense_head(
            features, m.norm1.running_var, m.norm1.weight, m.norm1.eps, m.conv1.linear.weight, float(m.conv1.b)
        )
        tape.append(folded)  # [bn_size·growth, C_in], as the fold below
        tape.append(scale)
        return _dense_tail_fwd(m, out, tape)
    out = torch.cat(features, 1)
    # The bottleneck half reads the growing concatenation, a new shape in every layer; the rest has
    # one shape per dense block and is a compile region.
    for child in (m.norm1, m.conv1):
        out = taped_forward(child, out, tape)
    if fold_head:  # conv1's scale record and ŵ, norm1's scale → ŵ·diag(scale), scale
        scale, w_hat, norm_scale = tape.pop(), tape.pop(), tape.pop()
        tape.append(folded_head_weight(w_hat, norm_scale))  # [bn_size·growth, C_in]
        tape.append(scale)
    return _dense_tail_fwd(m, out, tape)


dense_heads_as_op = True
"""Whether a teacher's sweep runs its foldable dense heads as the op ``e2kd::bcos_dense_head`` (set
False to inline them: fused by Inductor, a little faster per step, compiled once per dense layer)."""


def _head_runs_as_op(m: DenseLayer) -> bool:
    """Whether a foldable head runs as the one op ``e2kd::bcos_dense_head``: in a sweep that carries
    no gradient (a teacher's), with the norm on its running variance and without a shift. Inline,
    Inductor compiles every head for its own channel count; as the op, no head compiles."""
    norm = m.norm1
    if not dense_heads_as_op or torch.is_grad_enabled():
        return False
    return not norm.training and norm.running_var is not None and norm.bias is None


def _folds_heads(m: DenseBlock, device_type: str) -> bool:
    """Whether the sweep folds each layer's head (norm1 → 1×1 conv) into one matrix for its adjoint.

    A head's adjoint is norm1's per-channel scale after the 1×1 conv's transpose, then an add onto
    the block's gradient: with the scale folded into the weight, batched matrix products add onto
    the gradient directly (`_add_pointwise_conv_adjoint`), external kernels where a compiled graph
    otherwise needs a kernel per layer, each for the layer's own channel count. Not under autocast,
    where the products and the block's gradient they add onto would run in the low precision.
    """
    if _autocast_on(device_type):
        return False
    return _heads_foldable(m)


@torch.compiler.assume_constant_result  # the block's structure: traced, these checks cost a second per D169
def _heads_foldable(m: DenseBlock) -> bool:
    """Whether the block has layers and every layer's head is an uncentred batch norm with one scale
    for the batch and a plain 1×1 B-cos conv (B ≠ 1). (With batch-norm groups in training the scales
    are per image, and the folded weights would be too: a [N, bn_size·growth, C_in] matrix per layer.)"""
    return len(m) > 0 and all(
        isinstance(layer.norm1, BatchNormUncentered2d)
        and not (layer.norm1.training and layer.norm1.batch_groups > 1)
        and isinstance(conv := layer.conv1, BcosConv2d)
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.groups == 1
        and conv.max_out == 1
        and conv.b != 1
        for layer in m.values()
    )


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know: it cannot be on there
        return False


def _add_pointwise_conv_adjoint(base: Tensor, g: Tensor, w_t: Tensor) -> Tensor:
    """``base`` plus the adjoint of a 1×1 conv (stride 1, one group) applied to ``g``, as one batched
    matrix product that adds onto ``base``; the same maths as ``base + conv_adjoint(g, w_hat, ...)``
    with ``w_t = w_hat[:, :, 0, 0].t()`` (times any per-input-channel factor).

    Shapes: base [N, R, H, W] (a channel slice is fine), g [N, K, H, W], w_t [R, K] → [N, R, H, W],
    dense: channels-last where ``g`` is, else contiguous.
    """
    n, k, h, w = g.shape
    r = w_t.shape[0]
    w_t = w_t.expand(n, r, k)
    if g.is_contiguous(memory_format=torch.channels_last) and not g.is_contiguous():
        rows = base.permute(0, 2, 3, 1).reshape(n, h * w, r)
        out = torch.baddbmm(rows, g.permute(0, 2, 3, 1).reshape(n, h * w, k), w_t.transpose(1, 2))
        return out.view(n, h, w, r).permute(0, 3, 1, 2)
    out = torch.baddbmm(base.reshape(n, r, h * w), w_t, g.reshape(n, k, h * w))
    return out.view(n, r, h, w)


def _dense_layer_adj(m: DenseLayer, g: Tensor, tape: Tape) -> Tensor:
    """[N, growth, H, W] → the gradient of the layer's input concatenation [N, C_in, H, W]."""
    g = _dense_tail_adj(m, g, tape)
    for child in (m.conv1, m.norm1):
        g = adjoint(child, g, tape)
    return g


def _dense_tail_fwd_inline(m: DenseLayer, x: Tensor, tape: Tape) -> Tensor:
    return taped_forward(m.conv2, taped_forward(m.norm2, x, tape), tape)


def _dense_tail_adj_inline(m: DenseLayer, g: Tensor, tape: Tape) -> Tensor:
    return adjoint(m.norm2, adjoint(m.conv2, g, tape), tape)


_dense_tail_fwd, _dense_tail_adj = _region(_dense_tail_fwd_inline, _dense_tail_adj_inline)


def _dense_block_fwd(m: DenseBlock, x: Tensor, tape: Tape) -> Tensor:
    features, fold_heads = [x], _folds_heads(m, x.device.type)
    for layer in m.values():
        features.append(_dense_layer_fwd(layer, features, tape, fold_heads))
    tape.append((fold_heads, [f.shape[1] for f in features]))  # the adjoint follows the forward's choice
    return torch.cat(features, 1)


def _dense_block_adj(m: DenseBlock, g: Tensor, tape: Tape) -> Tensor:
    # Layer j reads the first C_j channels of the block's output (the block input and the outputs of
    # layers < j). Going down from the last layer, the channels past C_j have received every
    # contribution, so layer j's output gradient is complete, and its input gradient adds onto the
    # first C_j channels in one add per layer: each feature map's gradient sums the same terms in the
    # same order as with one add per (layer, feature map), a graph a fraction the size to compile.
    fold_heads, channels = tape.pop()
    ends = list(itertools.accumulate(channels))  # C_j: the block input's channels, then + each layer's
    layers = list(m.values())
    if fold_heads:
        return _dense_block_adj_folded(layers, g, ends, tape)
    for j, layer in reversed(list(enumerate(layers))):
        g = g[:, : ends[j]] + _dense_layer_adj(layer, g[:, ends[j] : ends[j + 1]], tape)
    return g


def _dense_block_adj_folded(layers: list[DenseLayer], g: Tensor, ends: list[int], tape: Tape) -> Tensor:
    """`_dense_block_adj` for layers whose heads the forward folded (`_folds_heads`). Layer j's input
    gradient goes onto the first C_j channels in two products: onto the channels of layer j − 1's
    output, which is then complete and comes out dense, ready for that layer's tail region, and onto
    the channels below them."""
    below, g_out = g[:, : ends[-2]], g[:, ends[-2] :]
    for j in reversed(range(len(layers))):
        g_head = _dense_tail_adj(layers[j], g_out, tape)
        g_head = tape.pop() * g_head  # conv1's scale
        w_t = tape.pop().t()  # [C_j, bn_size·growth]
        if j == 0:
            return _add_pointwise_conv_adjoint(below, g_head, w_t)
        split = ends[j - 1]
        g_out = _add_pointwise_conv_adjoint(below[:, split:], g_head, w_t[split:])
        below = _add_pointwise_conv_adjoint(below[:, :split], g_head, w_t[:split])
    raise AssertionError("a dense block has at least one layer")


register_sweep(DenseBlock)((_dense_block_fwd, _dense_block_adj))


def _densenet_fwd(m: BcosDenseNet, x: Tensor, tape: Tape) -> Tensor:
    x = taped_forward(m.classifier, taped_forward(m.features, x, tape), tape)
    x = _global_pool_fwd(m, x, tape)
    tape.append(x.shape)
    return taped_forward(m.logit_layer, x.flatten(1), tape)


def _densenet_adj(m: BcosDenseNet, g: Tensor, tape: Tape) -> Tensor:
    g = adjoint(m.logit_layer, g, tape).reshape(tape.pop())
    g = _global_pool_adj(m, g, tape)
    return adjoint(m.features, adjoint(m.classifier, g, tape), tape)


register_sweep(BcosDenseNet)((_densenet_fwd, _densenet_adj))


def _attention_fwd(m: Attention, x: Tensor, tape: Tape) -> Tensor:
    x = taped_forward(m.norm, x, tape)
    n, t, _ = x.shape
    q, k, v = m.to_qkv(x).view(n, t, 3, m.heads, -1).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-1, -2) * m.scale, dim=-1)
    tape.append(attn)  # [N, heads, T, T]; the values' shape follows from it and the gradient's
    out = (attn @ v).transpose(1, 2).reshape(n, t, -1)
    return taped_forward(m.to_out, out, tape)


def _attention_adj(m: Attention, g: Tensor, tape: Tape) -> Tensor:
    g = adjoint(m.to_out, g, tape)
    attn = tape.pop()
    n, heads, t, _ = attn.shape
    d = g.shape[-1] // heads
    g_v = attn.transpose(-1, -2) @ g.view(n, t, heads, d).transpose(1, 2)  # [N, heads, T, d]
    w_v = m.to_qkv.weight[2 * heads * d :]  # only the values are linear in x; q and k act through attn
    g = g_v.transpose(1, 2).reshape(n, t, heads * d) @ w_v
    return adjoint(m.norm, g, tape)


register_sweep(Attention)((_attention_fwd, _attention_adj))


def _encoder_fwd(m: Encoder, x: Tensor, tape: Tape) -> Tensor:
    x = taped_forward(m.attn, x, tape) + x
    return taped_forward(m.ff.net, x, tape) + x


def _encoder_adj(m: Encoder, g: Tensor, tape: Tape) -> Tensor:
    g = adjoint(m.ff.net, g, tape) + g
    return adjoint(m.attn, g, tape) + g


register_sweep(Encoder)(_region(_encoder_fwd, _encoder_adj))


def _patch_fwd(m: PatchEmbedding, x: Tensor, tape: Tape) -> Tensor:
    tape.append(x.shape)
    n, c, h, w = x.shape
    p = m.patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}×{w} is not divisible by the patch size {p}")
    patches = x.view(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(n, h // p, w // p, p * p * c)
    return taped_forward(m.linear, patches, tape)


def _patch_adj(m: PatchEmbedding, g: Tensor, tape: Tape) -> Tensor:
    g = adjoint(m.linear, g, tape)
    n, c, h, w = tape.pop()
    p = m.patch_size
    return g.view(n, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, h, w)


register_sweep(PatchEmbedding)((_patch_fwd, _patch_adj))


def _vit_fwd(m: BcosViT, x: Tensor, tape: Tape) -> Tensor:
    patches = taped_forward(m.to_patch_embedding, x, tape)
    n, h, w, dim = patches.shape
    # The positional embedding is an input-independent term: it is not part of W(x).
    tokens = patches.reshape(n, h * w, dim) + sincos_position_embedding(h, w, dim, patches.dtype, patches.device)
    pooled = taped_forward(m.transformer, tokens, tape).mean(dim=1)
    tape.append(patches.shape)  # pushed after the transformer's records: popped before them
    return taped_forward(m.logit_layer, taped_forward(m.linear_head, pooled, tape), tape)


def _vit_adj(m: BcosViT, g: Tensor, tape: Tape) -> Tensor:
    g = adjoint(m.linear_head, adjoint(m.logit_layer, g, tape), tape)
    token_shape = tape.pop()
    tokens = token_shape[1] * token_shape[2]
    g = adjoint(m.transformer, g[:, None, :].expand(-1, tokens, -1) / tokens, tape)
    return adjoint(m.to_patch_embedding, g.reshape(token_shape), tape)


register_sweep(BcosViT)((_vit_fwd, _vit_adj))
