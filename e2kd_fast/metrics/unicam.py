"""UniCAM maps and the FSS / RS scores (Adhane et al., WACV 2025), reconstructed from the authors' code.

* **UniCAM** (`unicam`): for a batch of n ≥ 4 images, model X's features F_X (at a cut: a stage map
  or the pooled last stage, flattened) and model Y's features F_Y give U-centred distance matrices
  Ã and B̃; R = P_{B⊥}(Ã) is the distance structure of X that Y does not explain. A scalar s of R is
  back-propagated to X's target-stage activations A and weighted Grad-CAM style:
  α_ik = mean_uv ∂s/∂A_ikuv, M_i = ReLU(Σ_k α_ik A_ik), per-image min–max to [0, 1], bilinear resize
  to the input. ``mode="pdcor"`` (default; the authors' newest code and Zhen et al.'s PDC-CAM):
  s = R*(R, G̃) with G the class-label embeddings of the batch (semi-partial; ``partial="full"``
  also projects G̃). ``mode="argmax"`` (the paper-period code): s = Σ_i max_j R_ij, no labels.
* **Distilled-feature map** = UniCAM(X = KD student, Y = base model); **residual-feature map** =
  UniCAM(X = base, Y = KD student) (`distilled_feature_map`, `residual_feature_map`).
* **FSS** (`feature_similarity_score`): per stage, a distance correlation between two models'
  flattened stage features on one pooled sample. Estimator ``"u"`` (default, bias-corrected R*),
  ``"v"`` (biased dCor²) or ``"v_rownorm"`` (biased after L2-normalising each sample, the newest code).
* **RS** (`relevance_score`): per stage, R*(F_M, G); with ``given=other`` the (semi-)partial
  pd(M | other, G), the score that separates distilled from residual features.

Label embeddings are one-hot by default (BERT/CLIP weights are not downloaded); for 2 classes RS is
exactly independent of the embedding. Every map depends on the whole batch (s is a batch
statistic). Stages are those of `e2kd_fast.distill.features.forward_stages` (ResNets: layer1…layer4),
numbered from 1; docs/metrics.md lists every choice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2kd_fast.distill.features import forward_stages
from e2kd_fast.metrics import dcor

StageFn = Callable[[nn.Module, Tensor], object]  # returns an object with .feats (list) and .pooled
POOLED = "pooled"
MODES = ("pdcor", "argmax")
PARTIALS = ("semi", "full")
ESTIMATORS = ("u", "v", "v_rownorm")


def _default_stage_fn(model: nn.Module, x: Tensor):
    return forward_stages(model, x)


# ---------------------------------------------------------------------------------------------------
# labels


def label_embedding(
    labels: Tensor,
    embedding: str | Tensor = "onehot",
    *,
    num_classes: int | None = None,
    dim: int = 64,
    seed: int = 0,
) -> Tensor:
    """Class-label embeddings G of a batch.

    Args:
        labels: [n] class indices.
        embedding: ``"onehot"`` (default; all classes equidistant), ``"random"`` (fixed Gaussian
            class vectors of size ``dim`` drawn with ``seed``; row c is the same for any
            ``num_classes`` ≥ c + 1), or a table [num_classes, d] (e.g. text embeddings computed
            elsewhere).
        num_classes: number of classes (default: max label + 1).

    Returns:
        [n, d] float64.
    """
    labels = labels.long().reshape(-1)
    if labels.numel() and labels.min() < 0:
        raise ValueError(f"labels must be non-negative class indices, got min {int(labels.min())}")
    classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if labels.numel() and int(labels.max()) >= classes:
        raise ValueError(f"label {int(labels.max())} out of range for num_classes={classes}")
    if isinstance(embedding, Tensor):
        if embedding.dim() != 2 or embedding.shape[0] <= int(labels.max()):
            raise ValueError(
                f"an embedding table must be [num_classes, d] with a row per label, got {tuple(embedding.shape)}"
            )
        return embedding.to(device=labels.device, dtype=torch.float64)[labels]
    if embedding == "onehot":
        return F.one_hot(labels, classes).to(torch.float64)
    if embedding == "random":
        gen = torch.Generator().manual_seed(seed)
        # one draw per class, in order: row c is the same whatever num_classes is
        table = torch.stack([torch.randn(dim, generator=gen, dtype=torch.float64) for _ in range(classes)])
        return table.to(labels.device)[labels]
    raise ValueError(f"embedding must be 'onehot', 'random' or a [num_classes, d] tensor, got {embedding!r}")


def check_label_batch(labels: Tensor, min_per_class: int = 2) -> None:
    """Raises unless the batch has ≥ 4 samples, ≥ 2 classes and ≥ ``min_per_class`` samples per class.

    Otherwise the U-centred label matrix G̃ is undefined or degenerate (the newest UniCAM code skips
    such batches; here the caller must choose a valid sample).
    """
    labels = labels.reshape(-1)
    if labels.numel() < 4:
        raise ValueError(f"U-centred scores need at least 4 images, got {labels.numel()}")
    _, counts = labels.unique(return_counts=True)
    if counts.numel() < 2:
        raise ValueError("the sample has a single class: the label distance matrix carries no information")
    if int(counts.min()) < min_per_class:
        raise ValueError(
            f"every class present needs at least {min_per_class} images, got counts {counts.tolist()} "
            "(choose a larger or stratified sample, or lower min_per_class)"
        )


# ---------------------------------------------------------------------------------------------------
# features


def _in_eval(models: Sequence[nn.Module]):
    class _Ctx:
        def __enter__(self):
            self.modes = [(m, m.training) for model in models for m in model.modules()]
            for model in models:
                model.eval()

        def __exit__(self, *exc):
            for m, mode in self.modes:
                m.training = mode

    return _Ctx()


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _select(stages, stage: int | str, who: str) -> Tensor:
    if stage == POOLED:
        return stages.pooled
    count = len(stages.feats)
    if not isinstance(stage, int) or not 1 <= stage <= count:
        raise ValueError(f"stage {stage!r} of the {who} is not one of 1..{count} or {POOLED!r}")
    return stages.feats[stage - 1]


@torch.no_grad()
def stage_features(
    model: nn.Module,
    images: Tensor,
    stages: Sequence[int | str] | None = None,
    *,
    batch_size: int | None = None,
    stage_fn: StageFn | None = None,
) -> dict[int | str, Tensor]:
    """Flattened stage features of ``model`` (eval mode) on ``images``, one pooled sample.

    Args:
        model: a zoo model (or any model ``stage_fn`` understands).
        images: [n, C, H, W] model input (moved to the model's device).
        stages: 1-based stage numbers and/or ``"pooled"``; default all stages.
        batch_size: forward in chunks of this size (default: all at once).
        stage_fn: ``f(model, x)`` returning an object with ``feats`` (list of [n, C, h, w]) and
            ``pooled`` ([n, C]); default `e2kd_fast.distill.features.forward_stages`.

    Returns:
        {stage: [n, d] float tensor on the CPU}.
    """
    stage_fn = stage_fn or _default_stage_fn
    device = _device_of(model)
    chunks = [images] if batch_size is None else list(images.split(batch_size))
    collected: dict[int | str, list[Tensor]] = {}
    with _in_eval([model]):
        for chunk in chunks:
            out = stage_fn(model, chunk.to(device))
            wanted = list(range(1, len(out.feats) + 1)) if stages is None else list(stages)
            for s in wanted:
                collected.setdefault(s, []).append(dcor.flatten_samples(_select(out, s, "model")).float().cpu())
    return {s: torch.cat(v) for s, v in collected.items()}


def _common_stages(a: dict, b: dict, stages) -> list:
    if stages is not None:
        return list(stages)
    if a.keys() != b.keys():
        raise ValueError(
            f"the two models have different stage counts ({len(a)} and {len(b)}); pass stages=[...] explicitly"
        )
    return list(a)


# ---------------------------------------------------------------------------------------------------
# FSS and RS


def feature_similarity(fa: Tensor, fb: Tensor, estimator: str = "u") -> Tensor:
    """FSS of two feature samples [n, p] and [n, q] with the named estimator (see module docstring)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"FSS estimator must be one of {ESTIMATORS}, got {estimator!r}")
    fa, fb = dcor.flatten_samples(fa), dcor.flatten_samples(fb)
    if estimator == "v_rownorm":
        fa, fb = F.normalize(fa.double(), dim=1), F.normalize(fb.double(), dim=1)
    return dcor.distance_correlation_sqr(fa, fb, unbiased=estimator == "u")


def feature_similarity_score(
    model_a: nn.Module,
    model_b: nn.Module,
    images: Tensor,
    *,
    images_b: Tensor | None = None,
    stages: Sequence[int | str] | None = None,
    estimator: str = "u",
    batch_size: int | None = None,
    stage_fn: StageFn | None = None,
) -> dict[int | str, float]:
    """Feature Similarity Score per stage between two models (e.g. teacher and student).

    Args:
        model_a, model_b: the two models; stage dimensions may differ.
        images: [n, C, H, W] inputs, one pooled sample (n ≥ 4 for ``"u"``).
        images_b: inputs for ``model_b`` if it takes another encoding of the same images.
        stages: 1-based stage numbers / ``"pooled"``; default all (the models must have as many).
        estimator: ``"u"`` (default), ``"v"`` or ``"v_rownorm"``.
        batch_size, stage_fn: see `stage_features`.

    Returns:
        {stage: FSS}.
    """
    fa = stage_features(model_a, images, stages, batch_size=batch_size, stage_fn=stage_fn)
    fb = stage_features(
        model_b, images if images_b is None else images_b, stages, batch_size=batch_size, stage_fn=stage_fn
    )
    return {s: float(feature_similarity(fa[s], fb[s], estimator)) for s in _common_stages(fa, fb, stages)}


def relevance_score(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    given: nn.Module | None = None,
    images_given: Tensor | None = None,
    stages: Sequence[int | str] | None = None,
    partial: str = "semi",
    embedding: str | Tensor = "onehot",
    num_classes: int | None = None,
    min_per_class: int = 2,
    batch_size: int | None = None,
    stage_fn: StageFn | None = None,
) -> dict[int | str, float]:
    """Relevance Score per stage: how well ``model``'s feature geometry matches the labels'.

    Without ``given``: RS = R*(F_model, G). With ``given``: the partial RS pd(model | given, G), the
    relevance of what ``model`` encodes beyond ``given`` (``partial="semi"``: the authors' code,
    ``"full"``: Székely–Rizzo pdCor). Always the bias-corrected U-statistic.

    Args:
        model: the model scored.
        images: [n, C, H, W] inputs, one pooled sample.
        labels: [n] classes; the sample must pass `check_label_batch`.
        given: the model whose features are removed (e.g. the teacher for pd(S | T, G)).
        images_given: inputs for ``given`` if its encoding differs.
        stages, batch_size, stage_fn: see `stage_features`.
        partial: ``"semi"`` or ``"full"`` (only with ``given``).
        embedding, num_classes: see `label_embedding`.

    Returns:
        {stage: RS}.
    """
    if partial not in PARTIALS:
        raise ValueError(f"partial must be one of {PARTIALS}, got {partial!r}")
    labels = labels.reshape(-1).cpu()
    if labels.numel() != images.shape[0]:
        raise ValueError(f"{labels.numel()} labels for {images.shape[0]} images")
    check_label_batch(labels, min_per_class)
    g = dcor.u_centred_distances(label_embedding(labels, embedding, num_classes=num_classes))
    fm = stage_features(model, images, stages, batch_size=batch_size, stage_fn=stage_fn)
    if given is None:
        return {s: float(dcor.rstar(dcor.u_centred_distances(f), g)) for s, f in fm.items()}
    fg = stage_features(
        given, images if images_given is None else images_given, stages, batch_size=batch_size, stage_fn=stage_fn
    )
    scores = {}
    for s in _common_stages(fm, fg, stages):
        c = dcor.u_centred_distances(fg[s])
        r = dcor.project_out(dcor.u_centred_distances(fm[s]), c)
        scores[s] = float(dcor.rstar(r, g if partial == "semi" else dcor.project_out(g, c)))
    return scores


# ---------------------------------------------------------------------------------------------------
# UniCAM


def _minmax(m: Tensor) -> Tensor:
    """Per-image min–max of [n, h, w] to [0, 1] (1e-7 guard, NaN → 0), as pytorch-grad-cam scales CAMs."""
    m = m - m.amin((-1, -2), keepdim=True)
    m = m / (m.amax((-1, -2), keepdim=True) + 1e-7)
    return torch.nan_to_num(m, nan=0.0)


def unicam(
    model_x: nn.Module,
    model_y: nn.Module,
    images: Tensor,
    labels: Tensor | None = None,
    *,
    images_y: Tensor | None = None,
    cut: int | str = POOLED,
    target_stages: int | Sequence[int] | None = None,
    mode: str = "pdcor",
    partial: str = "semi",
    embedding: str | Tensor = "onehot",
    num_classes: int | None = None,
    eps: float = dcor.U_EPS,
    guard: float = dcor.GUARD,
    degenerate_tol: float = 1e-5,
    stage_fn: StageFn | None = None,
) -> Tensor:
    """UniCAM maps of X's features that Y does not explain, for one batch.

    Args:
        model_x: the model explained (e.g. the KD student); its gradients are used.
        model_y: the model removed (e.g. the base model); a fixed projector, no gradient.
        images: [n, C, H, W] inputs of X, n ≥ 4 (the whole batch enters every map).
        labels: [n] classes (needed for ``mode="pdcor"``; ≥ 2 classes, ≥ 2 images per class).
        images_y: inputs of Y if its encoding differs (default ``images``).
        cut: the feature cut for the distance correlations: ``"pooled"`` (default; globally pooled
            last stage, the code's k = 1) or a 1-based stage number (its flattened map).
        target_stages: the stage(s) of X whose activations are weighted; default the last stage
            for ``cut="pooled"``, else the cut stage. Several are averaged and re-normalised.
        mode: ``"pdcor"`` (default) or ``"argmax"`` (see the module docstring).
        partial: ``"semi"`` (default, the code) or ``"full"`` (G̃ projected too); pdcor mode only.
        embedding, num_classes: label embeddings, see `label_embedding`.
        eps, guard: distance and denominator stabilisers (the code's 1e-18, 1e-12).
        degenerate_tol: if ‖R‖ ≤ degenerate_tol·‖Ã‖ (Y explains all of X's distance structure, e.g.
            X ≡ Y), nothing is left to explain and all maps are 0.
        stage_fn: see `stage_features`.

    Returns:
        [n, H, W] maps in [0, 1] at the input resolution.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if partial not in PARTIALS:
        raise ValueError(f"partial must be one of {PARTIALS}, got {partial!r}")
    n = images.shape[0]
    if n < 4:
        raise ValueError(f"UniCAM needs a batch of at least 4 images (U-centred statistics), got {n}")
    stage_fn = stage_fn or _default_stage_fn
    g = None
    if mode == "pdcor":
        if labels is None:
            raise ValueError("mode='pdcor' needs the labels of the batch (or use mode='argmax')")
        labels = labels.reshape(-1).cpu()
        if labels.numel() != n:
            raise ValueError(f"{labels.numel()} labels for {n} images")
        check_label_batch(labels)
        g = dcor.u_centred_distances(label_embedding(labels, embedding, num_classes=num_classes), eps)

    with _in_eval([model_x, model_y]):
        with torch.no_grad():
            out_y = stage_fn(model_y, (images if images_y is None else images_y).to(_device_of(model_y)))
            f_y = dcor.flatten_samples(_select(out_y, cut, "base model (Y)"))
        with torch.enable_grad():
            x = images.to(_device_of(model_x)).detach().requires_grad_(True)  # puts every activation in the graph
            out_x = stage_fn(model_x, x)
            f_x = dcor.flatten_samples(_select(out_x, cut, "explained model (X)"))
            if target_stages is None:
                target_stages = [len(out_x.feats) if cut == POOLED else cut]
            elif isinstance(target_stages, int):
                target_stages = [target_stages]
            acts = [_select(out_x, s, "explained model (X)") for s in target_stages]
            a = dcor.u_centred_distances(f_x, eps)
            b = dcor.u_centred_distances(f_y.to(f_x.device), eps)
            r = dcor.project_out(a, b)
            if float(dcor.u_inner(r, r).detach()) <= degenerate_tol**2 * float(dcor.u_inner(a, a).detach().abs()):
                return torch.zeros(n, *images.shape[-2:], device=x.device)
            if mode == "argmax":
                s = r.amax(1).sum()
            else:
                g = g.to(r.device)
                s = dcor.rstar(r, g if partial == "semi" else dcor.project_out(g, b), guard)
            grads = torch.autograd.grad(s, acts)
    maps = []
    for act, grad in zip(acts, grads, strict=True):
        if act.dim() != 4:
            raise ValueError(f"target stages must be spatial maps [n, K, h, w], got {tuple(act.shape)}")
        weights = grad.mean((-1, -2), keepdim=True)
        cam = _minmax(F.relu((weights * act).sum(1)).detach().float())
        maps.append(F.interpolate(cam[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0])
    return _minmax(torch.stack(maps).mean(0)) if len(maps) > 1 else maps[0]


def distilled_feature_map(
    student: nn.Module, base: nn.Module, images: Tensor, labels: Tensor | None = None, **kwargs
) -> Tensor:
    """UniCAM(X = KD student, Y = base): what KD added. ``kwargs`` as in `unicam` (``images_y`` = base's input)."""
    return unicam(student, base, images, labels, **kwargs)


def residual_feature_map(
    student: nn.Module,
    base: nn.Module,
    images: Tensor,
    labels: Tensor | None = None,
    *,
    images_base: Tensor | None = None,
    **kwargs,
) -> Tensor:
    """UniCAM(X = base, Y = KD student): what the student dropped. ``images_base``: base's input if it differs."""
    if images_base is not None:
        return unicam(base, student, images_base, labels, images_y=images, **kwargs)
    return unicam(base, student, images, labels, **kwargs)


__all__ = [
    "ESTIMATORS",
    "MODES",
    "POOLED",
    "check_label_batch",
    "distilled_feature_map",
    "feature_similarity",
    "feature_similarity_score",
    "label_embedding",
    "relevance_score",
    "residual_feature_map",
    "stage_features",
    "unicam",
]
