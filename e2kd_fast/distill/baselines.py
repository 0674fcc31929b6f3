"""Feature-based KD baselines as distillation objectives: AT, NST, AB, CAT-KD and ReviewKD.

Definitions and defaults follow the papers and their reference code (``HobbitLong/RepDistiller``,
``szagoruyko/attention-transfer``, ``GzyAftermath/CAT-KD``, ``megvii-research/mdistiller``); formulas
and every choice made here: ``docs/baselines.md``. Each objective is an `nn.Module` whose parameters
are its learned connectors (AB's 1×1 conv + BN, ReviewKD's ABF modules); the trainer optimises and
checkpoints them with the student. Every objective computes, for one batch,

    L = L_label(z_S, y) + kd_coef · τ² · KL(p_T^τ ‖ p_S^τ) + ramp · weight · L_feature

where L_label is the student family's supervised loss (B-cos: binary cross-entropy with uniform
off-labels, as B-cos models are trained; standard networks: cross-entropy), ``kd_coef`` is 0 by
default (the papers' "-a 0" settings) and ``ramp`` is 1 except for ReviewKD's warm-up. AB differs:
during its first ``init_epochs`` the loss is ``weight · L_AB`` alone (the initialisation phase),
afterwards L_label (+ KD) without the AB term.

Small functional forms (`at_loss`, `nst_loss`, `ab_loss`, `cat_loss`, `hcl_loss`) hold the maths;
tests compare them with independent computations.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2kd_fast.config import BASELINE_DEFAULTS
from e2kd_fast.distill.features import Stages, check_supported, forward_stages, stage_shapes
from e2kd_fast.reference.losses import kd_kl, uniform_off_label_bce

BASELINES = tuple(BASELINE_DEFAULTS)


# ----------------------------------------------------------------------------------------------------------------------
# The losses
# ----------------------------------------------------------------------------------------------------------------------


def match_spatial(fs: Tensor, ft: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pools the larger of two maps [N, *, H, W] down to the smaller's size (RepDistiller)."""
    hs, ht = fs.shape[-2:], ft.shape[-2:]
    if hs == ht:
        return fs, ft
    if hs[0] * hs[1] > ht[0] * ht[1]:
        return F.adaptive_avg_pool2d(fs, ht), ft
    return fs, F.adaptive_avg_pool2d(ft, hs)


def attention_map(f: Tensor, p: float = 2.0) -> Tensor:
    """AT's spatial attention: q = vec(mean_c |A_c|^p) / ‖·‖₂. [N, C, H, W] → [N, H·W] (float32)."""
    a = f.float().abs().pow(p).mean(1).flatten(1)
    return F.normalize(a, dim=1)


def at_loss(fs: list[Tensor], ft: list[Tensor], p: float = 2.0) -> Tensor:
    """Σ_j mean_{n, hw} (q_S^j − q_T^j)² over stage pairs (maps pooled to the smaller size). → []"""
    total = fs[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(fs, ft, strict=True):
        s, t = match_spatial(s, t)
        total = total + (attention_map(s, p) - attention_map(t, p)).pow(2).mean()
    return total


def _poly_gram(a: Tensor, b: Tensor) -> Tensor:
    """k(a_i, b_j) = (a_iᵀ b_j)² for the channels of [N, Ca, HW] and [N, Cb, HW] → [N, Ca, Cb]."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2)


def nst_loss(fs: list[Tensor], ft: list[Tensor]) -> Tensor:
    """Σ_j MMD² with the polynomial kernel (d = 2, c = 0) between L2-normalised channel responses.

    MMD² = mean k(t, t') + mean k(s, s') − 2 mean k(s, t), means over channel pairs and the batch;
    the teacher–teacher term is a constant (detached). → []
    """
    total = fs[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(fs, ft, strict=True):
        s, t = match_spatial(s, t)
        s = F.normalize(s.float().flatten(2), dim=2)
        t = F.normalize(t.float().flatten(2), dim=2)
        total = total + _poly_gram(t, t).mean().detach() + _poly_gram(s, s).mean() - 2 * _poly_gram(s, t).mean()
    return total


def ab_margin(source: Tensor, target: Tensor, margin: float = 1.0) -> Tensor:
    """AB's squared-hinge activation-boundary loss, summed over all elements. → []

    Where the teacher neuron is active (t > 0) the student response r is pushed to r > m; where it
    is inactive (t ≤ 0), to r < −m: (r − m)²·1[r ≤ m, t > 0] + (r + m)²·1[r > −m, t ≤ 0].
    """
    r = source.float()
    active = target > 0
    loss = torch.where(active & (r <= margin), (r - margin).pow(2), r.new_zeros(()))
    loss = loss + torch.where(~active & (r > -margin), (r + margin).pow(2), r.new_zeros(()))
    return loss.sum()


def ab_loss(fs: list[Tensor], ft: list[Tensor], margin: float = 1.0) -> Tensor:
    """RepDistiller's AB: Σ_i 2^{i−L+1} · margin loss_i / batch · 3/1000 (the deepest stage weighs 1). → []"""
    n, stages = fs[0].shape[0], len(fs)
    total = fs[0].new_zeros((), dtype=torch.float32)
    for i, (s, t) in enumerate(zip(fs, ft, strict=True)):
        total = total + 2.0 ** (i - stages + 1) * ab_margin(s, t, margin)
    return total / n * 3 / 1000


def cat_loss(cam_s: Tensor, cam_t: Tensor, pool_size: int = 4, normalize: bool = False) -> Tensor:
    """CAT-KD: MSE between CAMs [N, K, H, W] average-pooled to r×r (optionally L2-normalised per CAM). → []"""
    s = F.adaptive_avg_pool2d(cam_s.float(), pool_size)
    t = F.adaptive_avg_pool2d(cam_t.float(), pool_size)
    if normalize:
        s, t = F.normalize(s.flatten(2), dim=2), F.normalize(t.flatten(2), dim=2)
    return F.mse_loss(s, t)


def hcl_loss(fs: list[Tensor], ft: list[Tensor], levels: tuple[int, ...] = (4, 2, 1)) -> Tensor:
    """ReviewKD's hierarchical context loss, summed over stage pairs of equal shape [N, C, H, W]. → []

    Per stage: MSE at full resolution (weight 1) plus MSE after adaptive average pooling to 4×4, 2×2
    and 1×1 (levels smaller than H only) with weights ½, ¼, …, divided by the sum of the weights.
    """
    total = fs[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(fs, ft, strict=True):
        s, t = s.float(), t.float()
        loss, weight, weights = F.mse_loss(s, t), 1.0, 1.0
        for level in levels:
            if level >= s.shape[-2]:
                continue
            weight /= 2
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level))
            weights += weight
        total = total + loss / weights
    return total


# ----------------------------------------------------------------------------------------------------------------------
# The objectives
# ----------------------------------------------------------------------------------------------------------------------


def _in_chans(model: nn.Module) -> int:
    return 6 if getattr(model, "e2kd_family", "bcos") == "bcos" else 3


class FeatureDistillation(nn.Module):
    """Base class: label loss (+ KD) + ramp · weight · feature loss (see the module docstring).

    Args:
        student, teacher: the models (only inspected here: for connector shapes and support checks;
            they are passed to `forward` and are not submodules, so they are not in ``state_dict``).
        weight: weight of the feature term; None = the paper default (`BASELINE_DEFAULTS`).
        kd_coef: weight of the τ²·KL term.
        tau: KD temperature.
        **options: method options (`BASELINE_DEFAULTS[method]`).
    """

    method: ClassVar[str] = ""
    needs_cam: ClassVar[bool] = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        weight: float | None = None,
        kd_coef: float = 0.0,
        tau: float = 1.0,
        **options: Any,
    ) -> None:
        super().__init__()
        defaults = BASELINE_DEFAULTS[self.method]
        unknown = sorted(set(options) - set(defaults) - {"weight"})
        if unknown:
            allowed = ", ".join(k for k in defaults if k != "weight")
            raise ValueError(f"{self.method}: unknown options {unknown}; allowed: {allowed}")
        check_supported(student, cam=self.needs_cam, role="student")
        check_supported(teacher, cam=self.needs_cam, role="teacher")
        self.weight = float(defaults["weight"] if weight is None else weight)
        self.kd_coef, self.tau = float(kd_coef), float(tau)
        self.options = {k: v for k, v in defaults.items() if k != "weight"} | options
        self.student_bcos = getattr(student, "e2kd_family", "bcos") == "bcos"

    def schedule(self, epoch: int) -> tuple[str, float]:
        """(phase, ramp) at 0-based ``epoch``: the phase picks a compiled graph, the ramp scales the feature term."""
        return "main", 1.0

    def feature_loss(self, s: Stages, t: Stages) -> Tensor:  # pragma: no cover - every method overrides it
        raise NotImplementedError

    def forward(
        self,
        student: nn.Module,
        teacher: nn.Module,
        x: Tensor,
        labels: Tensor,
        ramp: Tensor | None = None,
        phase: str = "main",
    ) -> dict[str, Tensor]:
        """One batch.

        Args:
            student, teacher: the models (teacher frozen, eval mode).
            x: [N, C, H, W] the batch both models see.
            labels: [N] class indices or [N, K] dense (mixup) targets.
            ramp: [] scale of the feature term (a tensor, so a changing value does not recompile).
            phase: ``"main"``, or ``"init"`` for AB's initialisation phase.

        Returns:
            ``loss`` (differentiable) and detached ``feat`` (the unweighted feature term), ``kd``,
            ``gt`` (the label loss), ``agreement``, ``target`` ([N] teacher top-1),
            ``student_logits``, ``teacher_logits``.
        """
        with torch.no_grad():
            t = forward_stages(teacher, x, cam=self.needs_cam)
        s = forward_stages(student, x, cam=self.needs_cam)
        teacher_logits = t.logits.detach().to(s.logits.dtype)
        feat = self.feature_loss(s, t)
        if phase == "init":  # AB's initialisation: the feature term alone
            gt, kd = s.logits.new_zeros(()), kd_kl(s.logits, teacher_logits, self.tau)
            loss = self.weight * feat
        else:
            gt, kd, loss = self.label_loss(s.logits, teacher_logits, labels)
            if self.weight > 0:
                scaled = self.weight * feat
                loss = loss + (scaled if ramp is None else ramp * scaled)
        return _outputs(loss, feat, kd, gt, s.logits, teacher_logits)

    def label_loss(self, logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(L_label, KD, L_label + kd_coef · KD): the supervised part of every objective."""
        kd = kd_kl(logits, teacher_logits, self.tau)
        gt = uniform_off_label_bce(logits, labels) if self.student_bcos else F.cross_entropy(logits, labels)
        return gt, kd, (gt + self.kd_coef * kd if self.kd_coef > 0 else gt)


class AttentionTransfer(FeatureDistillation):
    """AT (Zagoruyko & Komodakis): β·Σ_j mean (q_S^j − q_T^j)², β = 1000, p = 2, on every stage."""

    method = "at"

    def feature_loss(self, s: Stages, t: Stages) -> Tensor:
        _check_stage_count(s, t, self.method)
        return at_loss(s.feats, t.feats, float(self.options["p"]))


class NeuronSelectivityTransfer(FeatureDistillation):
    """NST (Huang & Wang): weight 50 · Σ_j MMD²(poly kernel d = 2, c = 0) on every stage."""

    method = "nst"

    def feature_loss(self, s: Stages, t: Stages) -> Tensor:
        _check_stage_count(s, t, self.method)
        return nst_loss(s.feats, t.feats)


class Connector(nn.Module):
    """AB's connector: 1×1 conv + BN to the teacher's channels (identity when they agree), then the
    teacher's spatial size (average pooling down, bilinear up). [N, C_s, H_s, W_s] → [N, C_t, H_t, W_t]."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.proj = (
            nn.Identity()
            if c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: Tensor, size: torch.Size) -> Tensor:
        x = self.proj(x)
        if x.shape[-2:] == size:
            return x
        if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
            return F.adaptive_avg_pool2d(x, size)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ActivationBoundaries(FeatureDistillation):
    """AB (Heo et al.): an initialisation phase of ``init_epochs`` with the AB loss on pre-activations
    alone, then the label loss (+ KD) without it. Connectors: one `Connector` per stage."""

    method = "ab"

    def __init__(self, student: nn.Module, teacher: nn.Module, **kwargs: Any) -> None:
        super().__init__(student, teacher, **kwargs)
        s_shapes = stage_shapes(student, _in_chans(student))
        t_shapes = stage_shapes(teacher, _in_chans(teacher))
        if len(s_shapes) != len(t_shapes):
            raise ValueError(f"ab: the student has {len(s_shapes)} stages, the teacher {len(t_shapes)}")
        self.connectors = nn.ModuleList(Connector(s[0], t[0]) for s, t in zip(s_shapes, t_shapes, strict=True))

    def schedule(self, epoch: int) -> tuple[str, float]:
        return ("init" if epoch < int(self.options["init_epochs"]) else "main"), 1.0

    def feature_loss(self, s: Stages, t: Stages) -> Tensor:
        _check_stage_count(s, t, self.method)
        sources = [c(f, g.shape[-2:]) for c, f, g in zip(self.connectors, s.preact, t.preact, strict=True)]
        return ab_loss(sources, t.preact, float(self.options["margin"]))

    def forward(
        self,
        student: nn.Module,
        teacher: nn.Module,
        x: Tensor,
        labels: Tensor,
        ramp: Tensor | None = None,
        phase: str = "main",
    ) -> dict[str, Tensor]:
        if phase == "init":
            return super().forward(student, teacher, x, labels, ramp, phase)
        # After initialisation AB trains on the label loss (+ KD) only: plain forwards, no features.
        with torch.no_grad():
            teacher_logits = teacher(x)
        logits = student(x)
        teacher_logits = teacher_logits.detach().to(logits.dtype)
        gt, kd, loss = self.label_loss(logits, teacher_logits, labels)
        return _outputs(loss, logits.new_zeros(()), kd, gt, logits, teacher_logits)


class CATKD(FeatureDistillation):
    """CAT-KD (Guo et al.): β·MSE(Pool_r(CAM_S), Pool_r(CAM_T)); ImageNet R34→R18 defaults r = 4, β = 0.5."""

    method = "catkd"
    needs_cam = True

    def feature_loss(self, s: Stages, t: Stages) -> Tensor:
        if s.cam.shape[1] != t.cam.shape[1]:
            raise ValueError(f"catkd: the student has {s.cam.shape[1]} classes, the teacher {t.cam.shape[1]}")
        return cat_loss(s.cam, t.cam, int(self.options["pool_size"]), bool(self.options["normalize"]))


class ABF(nn.Module):
    """ReviewKD's attention-based fusion module.

    ``conv1`` (1×1 conv + BN) maps the student stage to ``mid`` channels; if ``fuse``, the deeper
    ABF's residual (resized, nearest) is mixed in with two sigmoid attention maps from a 1×1 conv on
    the concatenation; the result is resized (nearest) to the teacher's size and ``conv2`` (3×3 conv
    + BN) gives the output compared with the teacher.

    Shapes:
        x [N, C_in, H, W], residual [N, mid, h, w] → (out [N, C_out, H_t, W_t], residual [N, mid, H_t, W_t]).
    """

    def __init__(self, c_in: int, mid: int, c_out: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.conv2 = nn.Sequential(nn.Conv2d(mid, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)  # as the reference implementation
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: torch.Size) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            z = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * z[:, :1] + residual * z[:, 1:]
        if x.shape[-2:] != out_size:
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.conv2(x), x


class ReviewKD(FeatureDistillation):
    """ReviewKD (Chen et al.): w·min(epoch/warmup, 1)·HCL between the ABF outputs (fused deep-to-shallow
    from the student's pre-activation stages and pooled feature) and the teacher's pre-activation
    stages and pooled feature; w = 1, warmup 20 epochs (mdistiller's ImageNet config: 1)."""

    method = "reviewkd"

    def __init__(self, student: nn.Module, teacher: nn.Module, **kwargs: Any) -> None:
        super().__init__(student, teacher, **kwargs)
        s_ch = [c for c, _, _ in stage_shapes(student, _in_chans(student))]
        t_ch = [c for c, _, _ in stage_shapes(teacher, _in_chans(teacher))]
        if len(s_ch) != len(t_ch):
            raise ValueError(f"reviewkd: the student has {len(s_ch)} stages, the teacher {len(t_ch)}")
        s_ch, t_ch = [*s_ch, s_ch[-1]], [*t_ch, t_ch[-1]]  # + the pooled feature as a 1×1 map
        mid = min(int(self.options["max_mid_channels"]), s_ch[-1])
        # Listed deep-to-shallow; the deepest (pooled) one has nothing deeper to fuse with.
        self.abfs = nn.ModuleList(
            ABF(s_ch[i], mid, t_ch[i], fuse=i < len(s_ch) - 1) for i in reversed(range(len(s_ch)))
        )

    def schedule(self, epoch: int) -> tuple[str, float]:
        # mdistiller counts epochs from 1: min(epoch / warmup, 1) reaches 1 after `warmup` epochs.
        return "main", min((epoch + 1) / float(self.options["warmup_epochs"]), 1.0)

    def feature_loss(self, s: Stages, t: Stages) -> Tensor:
        _check_stage_count(s, t, self.method)
        xs = [*s.preact, s.pooled[:, :, None, None]][::-1]
        ts = [*t.preact, t.pooled[:, :, None, None]][::-1]
        outs, residual = [], None
        for abf, x, target in zip(self.abfs, xs, ts, strict=True):
            out, residual = abf(x, residual, target.shape[-2:])
            outs.append(out)
        return hcl_loss(outs, ts)


def _check_stage_count(s: Stages, t: Stages, method: str) -> None:
    if len(s.feats) != len(t.feats):
        raise ValueError(f"{method}: the student has {len(s.feats)} stages, the teacher {len(t.feats)}")


def _outputs(loss: Tensor, feat: Tensor, kd: Tensor, gt: Tensor, logits: Tensor, teacher_logits: Tensor) -> dict:
    """The dict every objective returns (see `FeatureDistillation.forward`)."""
    target = teacher_logits.argmax(1)
    return {
        "loss": loss,
        "feat": feat.detach(),
        "kd": kd.detach(),
        "gt": gt.detach(),
        "agreement": (logits.argmax(1) == target).float().mean().detach(),
        "target": target,
        "student_logits": logits.detach(),
        "teacher_logits": teacher_logits,
    }


_CLASSES: dict[str, type[FeatureDistillation]] = {
    cls.method: cls for cls in (AttentionTransfer, NeuronSelectivityTransfer, ActivationBoundaries, CATKD, ReviewKD)
}


def build_baseline(
    method: str,
    student: nn.Module,
    teacher: nn.Module,
    *,
    weight: float | None = None,
    kd_coef: float = 0.0,
    tau: float = 1.0,
    options: dict | None = None,
) -> FeatureDistillation:
    """The objective of ``method`` (one of `BASELINES`), on the student's device.

    Raises:
        ValueError: unknown method or option. TypeError: unsupported student or teacher architecture.
    """
    if method not in _CLASSES:
        raise ValueError(f"unknown baseline {method!r}; expected one of {', '.join(BASELINES)}")
    if teacher is None:
        raise ValueError(f"baseline {method!r} needs a live teacher model")
    objective = _CLASSES[method](student, teacher, weight=weight, kd_coef=kd_coef, tau=tau, **(options or {}))
    p = next(student.parameters())
    return objective.to(p.device)
