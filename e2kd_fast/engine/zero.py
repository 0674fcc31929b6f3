"""The DeepSpeed strategy: ZeRO-1/2 partitioning of the optimiser state (and gradients), and its clipping.

Gradient clipping stays where a single process has it: after the gradients are averaged over ranks
and accumulated over micro-batches, before the optimiser. Under ZeRO-1/2 each rank holds only its
slice of the flat averaged gradient, so AGC's per-unit norms and the global norm are summed over
slices with one all-reduce (`_ZeroPartitionClipper`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from e2kd_fast.config import deep_merge
from e2kd_fast.engine.optim import unitwise_norm
from e2kd_fast.engine.strategy import GradClipping, NonFiniteGradientError, Strategy


def deepspeed_config(
    *, global_batch: int, world_size: int, grad_accum: int, zero_stage: int, extra: dict | None = None
) -> dict:
    """The DeepSpeed JSON config a run's settings describe (``extra`` merged over it).

    DeepSpeed's ``bf16`` mode (bf16 working weights) stays off: the backward of the B-cos ops fails on
    bf16 weights with fp32 activations ("expected scalar type BFloat16 but found Float", measured on
    CPU). ``train.precision: bf16`` is the trainer's autocast (CUDA) with fp32 weights, as under DDP.
    """
    config = {
        "train_batch_size": global_batch * grad_accum,
        "train_micro_batch_size_per_gpu": global_batch // world_size,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": {"stage": zero_stage},
        # Our client optimiser (torch Adam/AdamW/SGD): DeepSpeed's own "AdamW" would JIT-build FusedAdam (~60 s).
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "gradient_clipping": 0.0,  # clipping is ours, on the averaged partitions (see _ZeroPartitionClipper)
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return deep_merge(config, extra or {})


class _ZeroPartitionLayout:
    """Where each trainable parameter lies in this rank's partition of ZeRO-1/2's flat buffer.

    ``slices`` holds ``(param index, param offset, partition offset, length)``: elements
    ``param.view(-1)[p: p + n]`` are ``partition[f: f + n]``. Parameters are laid out in the order of
    the optimiser's single parameter group, at DeepSpeed's per-parameter offsets (alignment padding).
    """

    def __init__(self, zero_opt, params: list[nn.Parameter], rank: int) -> None:
        if len(zero_opt.bit16_groups) != 1:
            raise RuntimeError(f"expected one parameter group in the ZeRO optimiser, got {len(zero_opt.bit16_groups)}")
        group = zero_opt.round_robin_bit16_groups[0]
        if len(group) != len(params) or any(a is not b for a, b in zip(group, params, strict=True)):
            raise RuntimeError(
                "DeepSpeed reordered the parameters (round_robin_gradients?); the checkpoint/clipping layout "
                "expects the optimiser's order"
            )
        offsets = getattr(zero_opt, "round_robin_bit16_offsets", None)
        if offsets is not None:
            offsets = list(offsets[0])
        else:  # before per-parameter padding existed the parameters were packed back to back
            offsets = [sum(p.numel() for p in params[:i]) for i in range(len(params))]
        self.size = int(zero_opt.partition_size[0])
        lo, hi = rank * self.size, (rank + 1) * self.size
        self.slices: list[tuple[int, int, int, int]] = []
        for i, (p, off) in enumerate(zip(params, offsets, strict=True)):
            a, b = max(lo, off), min(hi, off + p.numel())
            if a < b:
                self.slices.append((i, a - off, a - lo, b - a))
        self.offsets = offsets


def _unit_ids(shape: torch.Size) -> Tensor:
    """[numel] id of the AGC unit (as `adaptive_clip_grad_` groups them) of every element."""
    norm_shape = unitwise_norm(torch.zeros(shape, device="meta")).shape
    n = max(int(torch.Size(norm_shape).numel()), 1)
    return torch.arange(n).reshape(norm_shape).expand(shape).reshape(-1)


class _ZeroPartitionClipper:
    """AGC and global-norm clipping on ZeRO-1/2's partitioned gradient, equal to clipping whole grads.

    Each rank sums squares of its slices per AGC unit (gradient and fp32 master weight) and of the
    whole gradient; one all-reduce completes them; each rank then scales its own slices.
    """

    def __init__(self, layout: _ZeroPartitionLayout, params: list[nn.Parameter], clipping: GradClipping, device):
        self.layout, self.clipping = layout, clipping
        counts = [int(_unit_ids(p.shape).max()) + 1 if clipping.agc else 0 for p in params]
        self.num_units = sum(counts)
        bases = [sum(counts[:i]) for i in range(len(counts))]
        self.ids = []
        if clipping.agc:
            for i, p_off, _, n in layout.slices:
                self.ids.append((_unit_ids(params[i].shape)[p_off : p_off + n] + bases[i]).to(device))

    @torch.no_grad()
    def __call__(self, grad: Tensor, master: Tensor) -> None:
        """Clips ``grad`` [partition size] in place; ``master`` [partition size]: fp32 weights."""
        c, slices = self.clipping, self.layout.slices
        if c.agc:
            sums = torch.zeros(2, self.num_units, dtype=torch.float32, device=grad.device)
            for ids, (_, _, f, n) in zip(self.ids, slices, strict=True):
                sums[0].index_add_(0, ids, grad[f : f + n].float().square())
                sums[1].index_add_(0, ids, master[f : f + n].float().square())
            dist.all_reduce(sums)
            grad_norm, weight_norm = sums.sqrt()
            max_norm = weight_norm.clamp(min=c.agc_eps) * c.agc_clip
            factor = torch.where(grad_norm < max_norm, 1.0, max_norm / grad_norm.clamp(min=1e-6))
            for ids, (_, _, f, n) in zip(self.ids, slices, strict=True):
                grad[f : f + n].mul_(factor[ids].to(grad.dtype))
        if c.max_norm is not None:
            total = torch.zeros(1, dtype=torch.float32, device=grad.device)
            for _, _, f, n in slices:
                total += grad[f : f + n].float().square().sum()
            dist.all_reduce(total)
            grad.mul_((c.max_norm / (total.sqrt() + 1e-6)).clamp(max=1.0).to(grad.dtype))


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO stage 1 or 2 with the client optimiser (fp32 weights; bf16 is the trainer's autocast).

    ``engine.backward`` and ``engine.step`` run after every micro-batch (DeepSpeed applies the optimiser
    at its accumulation boundary; skipping ``step`` on the others gives wrong parameters: off by 2.6e-2
    with two micro-batches). Checkpoints are written in the trainer's format: weights whole (from the
    fp32 masters), optimiser state gathered from the partitions into per-parameter tensors, so a
    DeepSpeed run resumes under single/DDP and the other way round.
    """

    name = "deepspeed"

    def __init__(self, env, module, optimizer, clipping, *, global_batch, grad_accum, zero_stage, extra=None):
        super().__init__(env, module, optimizer, clipping)
        import deepspeed

        if len(optimizer.param_groups) != 1:
            raise ValueError(
                f"the DeepSpeed strategy expects one optimiser parameter group, got {len(optimizer.param_groups)}"
            )
        self.params = list(optimizer.param_groups[0]["params"])  # ZeRO's flat order
        self.names = {id(p): n for n, p in module.student.named_parameters()}
        config = deepspeed_config(
            global_batch=global_batch,
            world_size=env.world_size,
            grad_accum=grad_accum,
            zero_stage=zero_stage,
            extra=extra,
        )
        self.engine, self.zero_opt, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=config, dist_init_required=False
        )
        self.wrapped = self.engine
        self.layout = _ZeroPartitionLayout(self.zero_opt, self.params, env.rank)
        self.clipper = _ZeroPartitionClipper(self.layout, self.params, clipping, self._master().device)
        original = self.zero_opt.unscale_and_clip_grads
        self._grad_scale = 1.0  # set by scale_gradients for the next step

        def clip_then_unscale(grad_groups_flat, total_norm):
            # Called once per group in ZeRO's step, on this rank's averaged gradient partition.
            (grad,) = grad_groups_flat
            if self._grad_scale != 1.0:  # before clipping, which must see the final mean gradient
                grad.mul_(self._grad_scale)
            if not getattr(self.zero_opt, "compute_grad_norm", False):  # else ZeRO checked the norm: see step
                self._check_finite(grad)  # before anything is applied to the fp32 masters
            self.clipper(grad, self._master())
            return original(grad_groups_flat, total_norm)

        self.zero_opt.unscale_and_clip_grads = clip_then_unscale

    def _check_finite(self, grad: Tensor) -> None:
        """Raises `NonFiniteGradientError` on every rank when any rank's gradient partition holds inf or
        NaN (one all-reduce of a flag): ZeRO frees the whole gradients before its step, so the check
        runs here, on the partitions, before the update. Only where ZeRO does not compute the global
        gradient norm itself (`step` reads its verdict)."""
        finite = torch.isfinite(grad).all().to(torch.float32).reshape(1)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not bool(finite.item()):
            raise NonFiniteGradientError("the accumulated gradient holds inf or NaN; the optimiser was not applied")

    def _master(self) -> Tensor:
        return self.zero_opt.single_partition_of_fp32_groups[0]

    def backward(self, loss: Tensor, micro_batches: int) -> None:
        self.engine.backward(loss)  # divides by gradient_accumulation_steps itself
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # bookkeeping only; the optimiser runs at the boundary

    def step(self) -> bool:
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed is not at its accumulation boundary: a micro-batch was skipped on this rank")
        try:
            self.engine.step()
        finally:
            self._grad_scale = 1.0
        # ZeRO computes the global gradient norm (one all-reduce) and, when it is inf or NaN, skips the
        # update with no more than a log line: the same verdict on every rank, raised here.
        if getattr(self.zero_opt, "overflow", False):
            raise NonFiniteGradientError("the accumulated gradient holds inf or NaN; ZeRO did not apply the optimiser")
        return True

    def scale_gradients(self, factor: float) -> None:
        # The gradient lives in ZeRO's partitions only inside engine.step: scaled there (clip_then_unscale).
        self._grad_scale = float(factor)

    def skip_step(self) -> None:
        # engine.step keeps DeepSpeed's micro-step and boundary bookkeeping and frees the gradient; the
        # base optimiser's update is what is left out (an instance attribute shadows ZeRO's method).
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed is not at its accumulation boundary: a micro-batch was skipped on this rank")
        self.zero_opt._optimizer_step = lambda group_no: None
        try:
            self.engine.step()
        finally:
            del self.zero_opt._optimizer_step
            self._grad_scale = 1.0

    # ---------------------------------------------------------------- checkpoints

    def _gather_flat(self, local: Tensor) -> Tensor:
        """This rank's partition [P] → the whole flat buffer [world_size · P] (collective)."""
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    def _unflatten(self, flat: Tensor) -> list[Tensor]:
        return [
            flat[off : off + p.numel()].view(p.shape).detach().cpu().clone()
            for p, off in zip(self.params, self.layout.offsets, strict=True)
        ]

    def model_state(self) -> dict[str, Tensor]:
        state = self.module.student.state_dict()
        weights = self._unflatten(self._gather_flat(self._master().detach()))
        for p, w in zip(self.params, weights, strict=True):
            if id(p) in self.names:  # objective-owned parameters (connectors) are not the student's
                state[self.names[id(p)]] = w  # from the fp32 masters
        return state

    def optimizer_state(self) -> dict:
        base = self.zero_opt.optimizer
        (group,) = base.param_groups
        flat_state = base.state.get(self._master(), {})
        per_param: list[dict[str, Any]] = [{} for _ in self.params]
        for key in sorted(flat_state):
            value = flat_state[key]
            if isinstance(value, Tensor) and value.numel() == self.layout.size:
                for entry, t in zip(per_param, self._unflatten(self._gather_flat(value)), strict=True):
                    entry[key] = t
            else:  # per-parameter scalars (Adam's step) are the same for the whole flat partition
                for entry in per_param:
                    entry[key] = value.detach().cpu().clone() if isinstance(value, Tensor) else value
        hyper = {k: v for k, v in group.items() if k != "params"}
        state = {i: entry for i, entry in enumerate(per_param) if entry}
        return {"state": state, "param_groups": [{**hyper, "params": list(range(len(self.params)))}]}

    @torch.no_grad()
    def load_optimizer_state(self, state: dict, model_state: dict[str, Tensor] | None = None) -> None:
        base, master = self.zero_opt.optimizer, self._master()
        (group,) = base.param_groups
        (saved_group,) = state["param_groups"]
        if len(saved_group["params"]) != len(self.params):
            raise ValueError(
                f"the checkpoint's optimiser has {len(saved_group['params'])} parameters, this student "
                f"{len(self.params)}"
            )
        for key, value in saved_group.items():
            if key != "params":
                group[key] = value
        # The fp32 masters from the saved weights, then every rank's working copy from them.
        for i, p_off, f, n in self.layout.slices:
            p = self.params[i]
            name = self.names.get(id(p))
            source = model_state.get(name) if model_state is not None and name is not None else None
            source = p if source is None else source
            master[f : f + n].copy_(source.reshape(-1)[p_off : p_off + n].to(master.dtype))
        saved = {int(k): v for k, v in state["state"].items()}
        flat_state: dict[str, Any] = {}
        if saved:
            keys = set().union(*(entry.keys() for entry in saved.values()))
            for key in sorted(keys):
                sample = next(entry[key] for entry in saved.values() if key in entry)
                if isinstance(sample, Tensor) and sample.dim() > 0:
                    flat = torch.zeros_like(master)
                    for i, p_off, f, n in self.layout.slices:
                        if i in saved and key in saved[i]:
                            flat[f : f + n].copy_(saved[i][key].reshape(-1)[p_off : p_off + n].to(flat.dtype))
                    flat_state[key] = flat
                else:
                    flat_state[key] = sample.clone() if isinstance(sample, Tensor) else sample
        base.state[master] = flat_state
        self.zero_opt.update_lp_params()  # every rank's working weights from the masters (all-gather)


__all__ = ["DeepSpeedStrategy", "deepspeed_config"]
