"""The e²KD gradient equals central finite differences for zoo students of every B-cos family.

Students: ResNet-18, ResNeXt-50 32×4d, DenseNet-121, ViT-Ti/16 (2 × 2 tokens at 32 px) and the
CIFAR ResNet-20, freshly initialised in float64, in train mode (batch statistics, 4 images) and
eval mode (running statistics, 2 images), distilled with τ = 2 and λ = 5 at 32 px from one
trained-like B-cos ResNet-18 teacher (‖W_T‖ of a few units). Each student's explanations are
scaled to 1e-8 < ‖W_S‖ ≤ 1e-6 per sample: ‖W_S‖² is below 1e-8, but ‖W_S‖ is above the cosine's
per-norm clamp ε = 1e-8, where the cosine's autograd gradient is the derivative of its forward.
The explanations come from the explicit sweep (what training uses), and from autograd in one case.
Checked: entries of the stem's weight (every path of the backward ends there) and of the
classifier's.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor, nn

from e2kd_fast import AddInverse, create_model
from e2kd_fast.distill import TeacherOutputs, e2kd_objective
from e2kd_fast.explain import dynamic_weights
from e2kd_fast.nn import BatchNormUncentered2d, BcosConv2d, BcosLinear
from tests.helpers import randomize_norms

pytestmark = pytest.mark.slow

TAU, LAM = 2.0, 5.0
NUM_CLASSES = 10
STUDENTS = {
    "resnet": "bcos_resnet18",
    "resnext": "bcos_resnext50_32x4d",  # the only (so the smallest) B-cos ResNeXt in the zoo
    "densenet": "bcos_densenet121",
    "vit": "bcos_vit_ti_patch16_224",  # takes any size divisible by 16: 32 px gives 2 × 2 tokens
    "cifar": "bcos_resnet20_cifar",
}
CASES = [
    ("resnet", "train"),
    ("resnet", "eval"),
    ("resnext", "train"),
    ("resnext", "eval"),
    ("densenet", "train"),
    ("densenet", "eval"),  # a D121 student of 10 classes at 32 px in eval mode under a R18 teacher
    ("vit", "eval"),  # layer norms and no dropout: the ViT's train mode is the same function
    ("cifar", "train"),
    ("cifar", "eval"),
]
STUDENT_NORM = 1e-7  # the ‖W_S‖ aimed at (geometric mean over the batch)
TEACHER_NORM = 4.0
# Steps relative to the weight's unit norm. The loss is only piecewise smooth: with B = 2 each
# unit's scale |cos| has a kink at cos = 0, and a stem weight moves every cosine downstream, so a
# step can cross a kink (1e-6 does for both stem entries of the train-mode CIFAR ResNet and ResNeXt
# here). The difference is then off by that unit's share, which shrinks with the step: a mismatch is
# retried with smaller steps, down to where the loss's round-off (~1e-15) over 2h starts to show.
STEPS = (1e-6, 1e-7, 1e-8)


def _inputs() -> Tensor:
    """4 images in the 6-channel encoding, float64: train-mode cases see all, eval-mode cases 2.

    A colour per image plus noise: at 32 px the ImageNet models' last stage is 1 × 1, where batch
    statistics over near-identical images (pure noise) or over 2 images are so ill-conditioned that
    a DenseNet's train-mode loss is numerically rough at every step size.
    """
    generator = torch.Generator().manual_seed(0)
    colour = torch.rand(4, 3, 1, 1, generator=generator, dtype=torch.float64)
    noise = torch.rand(4, 3, 32, 32, generator=generator, dtype=torch.float64)
    return AddInverse()(0.5 * colour + 0.5 * noise)


def _explanation_norms(model: nn.Module, x6: Tensor, target: Tensor | None = None) -> Tensor:
    """Per-sample ‖W‖ [N] of the explanation the objective compares."""
    with torch.no_grad():
        weights = dynamic_weights(model, x6, target, algorithm="sweep", create_graph=False)
    return torch.linalg.vector_norm(weights.flatten(1), dim=1)


def _scale_explanations(model: nn.Module, x6: Tensor, norm: float, target: Tensor | None = None) -> None:
    """Sets the logit layer's temperature so that the geometric mean of ‖W_i‖ is ``norm``.

    B-cos weights are normalised per output unit, so scaling the classifier's (or any B-cos layer's)
    weights leaves W unchanged. A norm's γ scales W exactly only where a single norm feeds the
    classifier (DenseNet's norm5, the ViT head's norm), not a ResNet's residual sum. The temperature
    divides W and the logits' linear part alike, in every family and mode.
    """
    model.logit_layer.logit_temperature = None
    current = _explanation_norms(model, x6, target).log().mean().exp().item()
    model.logit_layer.logit_temperature = current / norm


@functools.cache
def _teacher_outputs() -> TeacherOutputs:
    """The outputs on `_inputs` of a trained-like B-cos ResNet-18 teacher (eval mode, frozen).

    Its norms get random γ and the running variances of a batch, as after training (a fresh
    model's running variances of 1 shrink ‖W_T‖ to ~1e-6 at 32 px); its explanations are then
    scaled to a few units (a confident teacher).
    """
    with torch.random.fork_rng():  # the same teacher whichever test builds it first
        torch.manual_seed(1)
        teacher = create_model("bcos_resnet18", num_classes=NUM_CLASSES).double()
    generator = torch.Generator().manual_seed(1)
    for module in teacher.modules():
        # Per norm: on the whole model the helper would also redraw the B-cos weights (NormedConv2d).
        if isinstance(module, BatchNormUncentered2d):
            randomize_norms(module, generator)
            module.reset_running_stats()
            module.momentum = None  # one batch sets running_var to its variance
    calibration = AddInverse()(torch.rand(8, 3, 32, 32, generator=generator, dtype=torch.float64))
    with torch.no_grad():
        teacher.train()(calibration)
    teacher.eval().requires_grad_(False)
    x6 = _inputs()
    _scale_explanations(teacher, x6, TEACHER_NORM)
    weights, logits = dynamic_weights(teacher, x6, None, algorithm="sweep", return_logits=True)
    return TeacherOutputs(logits, weights)


def _stem_and_classifier(model: nn.Module) -> dict[str, nn.Parameter]:
    """The first and the last B-cos layer's weight, by name."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BcosConv2d | BcosLinear)]
    return {f"{name}.linear.weight": m.linear.weight for name, m in (layers[0], layers[-1])}


def _gradient_mismatches(student: nn.Module, algorithm: str) -> list[str]:
    """Compares param.grad with central differences at 2 entries each of the stem's and the
    classifier's weight; returns the mismatches as lines (none when every entry agrees)."""
    batch = 4 if student.training else 2
    x6 = _inputs()[:batch]
    # The teacher is frozen and in eval mode (each image on its own): its outputs on the batch are
    # computed once, not in each of the 2 evaluations per entry (the objective with a live teacher
    # equals them: test_objective.py).
    everything = _teacher_outputs()
    frozen = TeacherOutputs(everything.logits[:batch], everything.explanation[:batch])
    teacher_norms = torch.linalg.vector_norm(frozen.explanation.flatten(1), dim=1)
    print(f"‖W_T‖ = {teacher_norms.tolist()}")
    assert (teacher_norms >= 1).all()

    target = frozen.logits.argmax(1)  # the class both explanations are taken for
    _scale_explanations(student, x6, STUDENT_NORM, target)
    student_norms = _explanation_norms(student, x6, target)
    print(f"‖W_S‖ = {student_norms.tolist()}")
    assert (student_norms > 1e-8).all() and (student_norms <= 1e-6).all()

    # Only the checked weights require grad: the backward skips every other weight's gradient.
    params = _stem_and_classifier(student)
    student.requires_grad_(False)
    for param in params.values():
        param.requires_grad_(True)
    kw = {"tau": TAU, "lam": LAM, "algorithm": algorithm}
    e2kd_objective(student, None, x6, frozen=frozen, **kw)["loss"].backward()
    student.requires_grad_(False)  # the differences need the loss only: no graph

    def central_difference(param: Tensor, index: tuple[int, ...], h: float) -> float:
        values = []
        for step in (h, -2 * h):
            with torch.no_grad():
                param[index] += step
            values.append(e2kd_objective(student, None, x6, frozen=frozen, **kw)["loss"].item())
        with torch.no_grad():
            param[index] += h
        return (values[0] - values[1]) / (2 * h)

    mismatches = []
    generator = torch.Generator().manual_seed(2)
    for name, param in params.items():
        grad = param.grad
        # The largest entry and a random one of the same unit (most entries of the classifier's
        # other units get only the KD term's gradient, scaled down with W_S).
        top = tuple(i.item() for i in torch.unravel_index(grad.abs().argmax(), grad.shape))
        unit = top[0]
        other = torch.randint(grad[unit].numel(), (), generator=generator)
        indices = [top, (unit, *(i.item() for i in torch.unravel_index(other, grad[unit].shape)))]
        unit_norm = torch.linalg.vector_norm(param[unit]).item()  # B-cos uses the unit's direction only
        tolerance = {"rel": 1e-6, "abs": 1e-7 * grad.abs().max().item()}
        for index in indices:
            analytic = grad[index].item()
            differences = []
            for step in STEPS:
                differences.append(central_difference(param, index, step * unit_norm))
                if analytic == pytest.approx(differences[-1], **tolerance):
                    break
            line = f"{name}{list(index)}: analytic {analytic:.9e}, differences " + ", ".join(
                f"{d:.9e} (h = {s:.0e}·‖unit‖)" for d, s in zip(differences, STEPS, strict=False)
            )
            print(line)
            if analytic != pytest.approx(differences[-1], **tolerance):
                mismatches.append(line)
    return mismatches


@pytest.mark.parametrize(("family", "mode"), CASES, ids=[f"{family}-{mode}" for family, mode in CASES])
def test_gradient_equals_finite_differences(family: str, mode: str) -> None:
    torch.set_default_dtype(torch.float64)
    student = create_model(STUDENTS[family], num_classes=NUM_CLASSES).train(mode == "train")
    mismatches = _gradient_mismatches(student, "sweep")
    assert not mismatches, "\n".join(mismatches)


def test_gradient_equals_finite_differences_with_autograd_explanations() -> None:
    """The autograd back end (a double backward through the model), CIFAR ResNet in train mode."""
    torch.set_default_dtype(torch.float64)
    student = create_model(STUDENTS["cifar"], num_classes=NUM_CLASSES).train()
    mismatches = _gradient_mismatches(student, "autograd")
    assert not mismatches, "\n".join(mismatches)
