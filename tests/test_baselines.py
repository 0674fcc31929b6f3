"""Feature-based KD baselines (AT, NST, AB, CAT-KD, ReviewKD): losses against independent computations,
stage extraction, connectors' gradients, one graph under torch.compile, configs, training and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from e2kd_fast.config import config_from_dict, load_config
from e2kd_fast.data.build import build_datasets
from e2kd_fast.distill.baselines import (
    ab_loss,
    ab_margin,
    at_loss,
    build_baseline,
    cat_loss,
    hcl_loss,
    nst_loss,
)
from e2kd_fast.distill.features import forward_stages, stage_shapes
from e2kd_fast.engine import Trainer, read_metrics
from e2kd_fast.engine.step import TrainStep
from e2kd_fast.models import create_model, read_checkpoint
from tests.helpers import write_image_folder
from tests.test_trainer import ShapesSet

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "baselines").glob("*.yaml"))
# One optimiser step from: every B-cos config (all methods) and the standard AT config; all load.
STARTED = [p for p in CONFIGS if "_bcos_" in p.name or p.stem.endswith("std_r18_from_r34_at")]
METHODS = ("at", "nst", "ab", "catkd", "reviewkd")


def _pair(student: str = "bcos_resnet20_cifar", teacher: str = "bcos_resnet32_cifar", classes: int = 4):
    torch.manual_seed(0)
    s = create_model(student, num_classes=classes).train()
    t = create_model(teacher, num_classes=classes).eval().requires_grad_(False)
    return s, t


# ------------------------------------------------------------------------------------------------ stage features

ARCHS = [
    "bcos_resnet20_cifar",
    "bcos_resnet18",
    "bcos_densenet121",
    "resnet18",
    "densenet121",
    "bcos_vit_ti_patch16_224",
]


@pytest.mark.parametrize("name", ARCHS)
def test_forward_stages_matches_the_model_and_its_cams(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5).eval()
    x = torch.rand(2, 6 if name.startswith("bcos") else 3, 32, 32)
    with torch.no_grad():
        out = forward_stages(model, x, cam="vit" not in name)
        expected = model(x)
    torch.testing.assert_close(out.logits, expected)
    assert len(out.feats) == len(out.preact) == (3 if "cifar" in name else 4)
    assert out.pooled.shape == (2, out.feats[-1].shape[1])
    if "vit" in name:
        assert out.cam is None
        return
    # The CAMs average to the logits (less the constant B-cos logit bias).
    bias = getattr(getattr(model, "logit_layer", None), "logit_bias", None) or 0.0
    assert out.cam.shape == (2, 5, *out.feats[-1].shape[-2:])
    torch.testing.assert_close(out.cam.mean((2, 3)) + bias, expected, rtol=1e-5, atol=1e-5)


def test_torchvision_preactivations_are_the_residual_sums_before_the_relu():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=5).eval()
    with torch.no_grad():
        out = forward_stages(model, torch.randn(2, 3, 32, 32))
        assert all(torch.equal(F.relu(p), f) for p, f in zip(out.preact, out.feats, strict=True))
        assert all((p < 0).any() for p in out.preact)


def test_stage_shapes_restore_train_mode_and_running_stats():
    model = create_model("resnet18", num_classes=5).train()
    before = model.bn1.running_mean.clone()
    shapes = stage_shapes(model, 3)
    assert [c for c, _, _ in shapes] == [64, 128, 256, 512]
    assert model.training and model.layer1[0].bn1.training and torch.equal(model.bn1.running_mean, before)


def test_cam_of_a_standard_resnet_is_the_classifier_at_every_position():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = forward_stages(model, x, cam=True)
        a = F.relu(
            model.layer4(model.layer3(model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))))
        )
        expected = torch.einsum("kc,nchw->nkhw", model.fc.weight, a) + model.fc.bias[None, :, None, None]
    torch.testing.assert_close(out.cam, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ losses


def test_at_loss_equals_the_hand_formula():
    torch.manual_seed(0)
    fs = [torch.randn(3, 4, 6, 6), torch.randn(3, 5, 3, 3)]
    ft = [torch.randn(3, 7, 6, 6), torch.randn(3, 2, 6, 6)]  # the second teacher map is larger: pooled 2×2
    expected = 0.0
    for s, t in zip(fs, ft, strict=True):
        if t.shape[-1] != s.shape[-1]:
            t = t.view(3, 2, 3, 2, 3, 2).mean((3, 5))  # 2×2 average pooling by hand
        per_sample = []
        for n in range(3):
            qs = (s[n] ** 2).sum(0).flatten()  # channel *sum*: the normalisation removes the mean's 1/C
            qt = (t[n] ** 2).sum(0).flatten()
            per_sample.append(((qs / qs.norm() - qt / qt.norm()) ** 2).mean())
        expected += torch.stack(per_sample).mean()
    torch.testing.assert_close(at_loss(fs, ft), expected, rtol=1e-5, atol=1e-7)


def test_nst_loss_equals_the_explicit_double_loop():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)

    def k(a, b):
        return float(a @ b) ** 2

    expected = 0.0
    for n in range(2):
        fs = [v / v.norm() for v in s[n].flatten(1)]
        ft = [v / v.norm() for v in t[n].flatten(1)]
        tt = sum(k(a, b) for a in ft for b in ft) / len(ft) ** 2
        ss = sum(k(a, b) for a in fs for b in fs) / len(fs) ** 2
        st = sum(k(a, b) for a in fs for b in ft) / (len(fs) * len(ft))
        expected += (tt + ss - 2 * st) / 2  # batch mean
    torch.testing.assert_close(nst_loss([s], [t]), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert nst_loss([t], [t]).abs() < 1e-6  # MMD of a distribution with itself


def test_ab_margin_on_hand_cases():
    # (student response r, teacher response t) → penalty with margin 1
    cases = [
        (2.0, 1.0, 0.0),  # teacher active, student beyond the margin: no penalty
        (0.5, 1.0, 0.25),  # active, r ≤ m: (r − m)²
        (-1.0, 3.0, 4.0),
        (-2.0, -1.0, 0.0),  # inactive, r ≤ −m: no penalty
        (0.0, 0.0, 1.0),  # inactive (t ≤ 0), r > −m: (r + m)²
        (1.5, -0.1, 6.25),
    ]
    for r, t, expected in cases:
        assert ab_margin(torch.tensor([r]), torch.tensor([t])).item() == pytest.approx(expected)
    r = torch.tensor([[r for r, _, _ in cases]])
    t = torch.tensor([[t for _, t, _ in cases]])
    assert ab_margin(r, t).item() == pytest.approx(sum(e for _, _, e in cases))
    # Stage weights 2^{i−L+1}, divided by the batch and scaled by 3/1000.
    a, b = torch.full((2, 1, 1, 1), 0.5), torch.ones(2, 1, 1, 1)
    expected = (0.5 * 2 * 0.25 + 1.0 * 2 * 0.25) / 2 * 3 / 1000
    assert ab_loss([a, a], [b, b]).item() == pytest.approx(expected)


def test_cat_loss_equals_pooled_mse_by_hand():
    torch.manual_seed(0)
    cs, ct = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    ps, pt = cs.view(2, 3, 2, 4, 2, 4).mean((3, 5)), ct.view(2, 3, 2, 4, 2, 4).mean((3, 5))
    torch.testing.assert_close(cat_loss(cs, ct, 2), ((ps - pt) ** 2).mean())
    ns = ps / ps.pow(2).sum((2, 3), keepdim=True).sqrt()
    nt = pt / pt.pow(2).sum((2, 3), keepdim=True).sqrt()
    torch.testing.assert_close(cat_loss(cs, ct, 2, normalize=True), ((ns - nt) ** 2).mean())


def test_hcl_equals_the_explicit_pyramid():
    torch.manual_seed(0)
    s8, t8 = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    s2, t2 = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)

    def mse(a, b):
        return ((a - b) ** 2).mean()

    def pool(a, r):
        return a.view(2, 3, r, a.shape[-1] // r, r, a.shape[-1] // r).mean((3, 5))

    # 8×8: levels 4, 2, 1 with weights 1/2, 1/4, 1/8; 2×2: only level 1, weight 1/2.
    big = (mse(s8, t8) + mse(pool(s8, 4), pool(t8, 4)) / 2 + mse(pool(s8, 2), pool(t8, 2)) / 4) / 1.75
    big = (big * 1.75 + mse(pool(s8, 1), pool(t8, 1)) / 8) / 1.875
    small = (mse(s2, t2) + mse(pool(s2, 1), pool(t2, 1)) / 2) / 1.5
    torch.testing.assert_close(hcl_loss([s8, s2], [t8, t2]), big + small)


# ------------------------------------------------------------------------------------------------ objectives


@pytest.mark.parametrize("method", METHODS)
def test_objective_runs_and_gradients_reach_student_and_connectors(method):
    s, t = _pair()
    objective = build_baseline(method, s, t)
    x, y = torch.rand(4, 6, 16, 16), torch.tensor([0, 1, 2, 3])
    phase, ramp = objective.schedule(0)
    out = objective(s, t, x, y, torch.tensor(ramp), phase)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert s.layer1[0].conv1.linear.weight.grad.abs().sum() > 0
    params = list(objective.parameters())
    assert bool(params) == (method == "reviewkd")  # AB's connectors are identities: equal channel counts
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params if p.requires_grad and p.ndim > 1)
    assert all(p.grad is None for p in t.parameters())
    expected_weight = {"at": 1000.0, "nst": 50.0, "ab": 1.0, "catkd": 0.5, "reviewkd": 1.0}[method]
    assert objective.weight == expected_weight


def test_total_loss_composition():
    s, t = _pair()
    x, y = torch.rand(4, 6, 16, 16), torch.tensor([0, 1, 2, 3])
    at = build_baseline("at", s, t, weight=3.0, kd_coef=0.5, tau=2.0)
    out = at(s, t, x, y, torch.tensor(1.0))
    torch.testing.assert_close(out["loss"].detach(), out["gt"] + 0.5 * out["kd"] + 3.0 * out["feat"])
    review = build_baseline("reviewkd", s, t)  # warm-up 20 epochs: ramp (epoch + 1) / 20
    assert review.schedule(0) == ("main", 0.05) and review.schedule(19) == ("main", 1.0)
    out = review(s, t, x, y, torch.tensor(0.05))
    torch.testing.assert_close(out["loss"].detach(), out["gt"] + 0.05 * out["feat"])
    ab = build_baseline("ab", s, t, options={"init_epochs": 2})
    assert ab.schedule(1)[0] == "init" and ab.schedule(2)[0] == "main"
    init = ab(s, t, x, y, None, "init")
    torch.testing.assert_close(init["loss"].detach(), init["feat"])
    main = ab(s, t, x, y, None, "main")
    torch.testing.assert_close(main["loss"].detach(), main["gt"])


def test_standard_student_from_a_bcos_free_pair_and_cross_architecture():
    s, t = _pair("resnet18", "densenet121")
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    for method in ("ab", "reviewkd", "catkd"):
        objective = build_baseline(method, s, t)
        phase, ramp = objective.schedule(0)
        out = objective(s, t, x, y, torch.tensor(ramp), phase)
        assert torch.isfinite(out["loss"]), method
        out["loss"].backward()
        if method == "ab":  # 64/128/256/512 → 256/512/1024/1024 channels: 1×1 conv + BN connectors
            assert len(list(objective.parameters())) == 12
        assert all(p.grad is not None for p in objective.parameters()), method


def test_unsupported_models_and_options_are_clear_errors():
    s, t = _pair()
    vit = create_model("bcos_vit_ti_patch16_224", num_classes=4)
    with pytest.raises(TypeError, match="ViT"):
        build_baseline("catkd", vit, t)
    with pytest.raises(TypeError, match="not supported"):
        build_baseline("at", torch.nn.Sequential(torch.nn.Conv2d(6, 4, 1)), t)
    with pytest.raises(ValueError, match="unknown options"):
        build_baseline("at", s, t, options={"q": 2})
    base = {"student": {"name": "bcos_resnet18"}, "teacher": {"name": "bcos_resnet34"}}
    bad = [
        ({"distill": {"method": "catkd"}, "student": {"name": "bcos_vit_ti_patch16_224"}}, "CAT-KD"),
        ({"distill": {"method": "at"}, "teacher": {"name": "bcos_resnet34", "mode": "frozen", "store": "x"}}, "live"),
        ({"distill": {"method": "at", "feature_options": {"pool_size": 2}}}, "unknown key"),
        ({"distill": {"method": "catkd", "feature_options": {"pool_size": 0}}}, "must be > 0"),
        ({"distill": {"method": "kd", "feature_weight": 1.0}}, "used only by the feature baselines"),
        ({"distill": {"method": "at", "feature_weight": -1.0}}, "feature_weight"),
        ({"distill": {"method": "at", "logit_coef": 0.5}}, "weighs its KD term by distill.kd_coef"),
        ({"distill": {"method": "kd", "logit_coef": 0.0}}, "distill.logit_coef"),
        ({"distill": {"method": "nst"}, "teacher": {"name": None}}, "requires teacher.name"),
    ]
    for sections, message in bad:
        with pytest.raises(ValueError, match=message):
            config_from_dict({**base, **sections})


def test_forward_to_loss_is_one_graph_without_breaks():
    """ReviewKD (the most involved: ABF fusion, interpolation, HCL pyramid); the others share its path."""
    torch._dynamo.reset()
    s, t = _pair(teacher="bcos_resnet20_cifar")
    method = "reviewkd"
    step = TrainStep(s, t, objective=build_baseline(method, s, t))
    x, y = torch.rand(2, 6, 16, 16), torch.tensor([0, 1])
    objective = step.objective

    def fn(images, labels, ramp):
        return objective(s, t, images, labels, ramp, "main")

    report = torch._dynamo.explain(fn)(x, y, torch.tensor(0.5))
    assert (report.graph_count, report.graph_break_count) == (1, 0), report.break_reasons


# ------------------------------------------------------------------------------------------------ engine


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data"), classes=4, per_split={"train": 3, "val": 1})


def test_every_baseline_config_loads():
    assert len(CONFIGS) == 10
    for path in CONFIGS:
        cfg = load_config(path)
        assert cfg.distill.method in METHODS and path.stem.endswith(cfg.distill.method)


@pytest.mark.parametrize("path", STARTED, ids=[p.stem for p in STARTED])
def test_baseline_config_starts(path, tiny_folder, tmp_path):
    overrides = [
        f"data.root={tiny_folder}",
        "data.image_size=32",
        "data.eval_resize=32",
        "data.batch_size=8",
        "train.bn_group_size=2",  # the recipe's groups of 64, scaled to the batch of 8
        "data.num_workers=0",
        "data.val_per_class=1",
        "train.epochs=1",
        f"train.out_dir={tmp_path / 'run'}",
        "train.device=cpu",
        "train.compile=false",
        "teacher.checkpoint=null",
        "student.num_classes=4",
        "teacher.num_classes=4",
    ]
    cfg = load_config(path, overrides)
    data = build_datasets(cfg)
    trainer = Trainer(cfg, data.train, None, train_indices=data.train_indices, show_progress=False)
    assert trainer.fit()["steps"] == 1
    assert (trainer.step_fn.objective is not None) and trainer.step_fn.objective.method == cfg.distill.method
    record = read_metrics(tmp_path / "run", "train")[-1]
    assert "feat" in record and record["feat"] >= 0


def _run_config(tmp_path, method: str, options: dict, **train) -> dict:
    return {
        "student": {"name": "bcos_resnet20_cifar", "num_classes": 4},
        "teacher": {"name": "bcos_resnet20_cifar", "num_classes": 4},
        "distill": {"method": method, "feature_options": options},
        "optim": {"lr": 1e-3, "warmup_epochs": 1},
        "data": {"batch_size": 8, "num_workers": 0},
        "train": {
            "epochs": 2,
            "out_dir": str(tmp_path / "run"),
            "log_every_steps": 1,
            "device": "cpu",
            "compile": False,
            **train,
        },
    }


def _trainer(tmp_path, method, options, **train) -> Trainer:
    torch.manual_seed(0)  # same student, teacher and connector weights for every run
    cfg = config_from_dict(_run_config(tmp_path, method, options, **train))
    return Trainer(cfg, ShapesSet(24, seed=0), None, show_progress=False)


def test_connectors_train_checkpoint_and_resume_exactly(tmp_path):
    """ReviewKD (warm-up over 2 epochs): connectors are optimised, saved, and a resumed run equals the full one."""
    options = {"warmup_epochs": 2}
    full = _trainer(tmp_path / "a", "reviewkd", options)
    start = [p.detach().clone() for p in full.step_fn.objective.parameters()]
    full.fit()
    assert any(not torch.equal(a, b) for a, b in zip(start, full.step_fn.objective.parameters(), strict=True))
    reference = [r["loss"] for r in read_metrics(tmp_path / "a" / "run", "train")]
    assert len(reference) == 6

    interrupted = _trainer(tmp_path / "b", "reviewkd", options, checkpoint_every_steps=4)
    original = interrupted._optimizer_step

    def failing_step():
        if interrupted.state.step == 5:
            raise KeyboardInterrupt
        original()

    interrupted._optimizer_step = failing_step
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    assert "distill_objective" in read_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last.pt")
    resumed = _trainer(tmp_path / "b", "reviewkd", options, checkpoint_every_steps=4)
    resumed.fit(resume="auto")
    records = read_metrics(tmp_path / "b" / "run", "train")
    assert {r["step"]: r["loss"] for r in records[-2:]} == {5: reference[4], 6: reference[5]}
    resumed_state, full_state = resumed.step_fn.objective.state_dict(), full.step_fn.objective.state_dict()
    for a, b in zip(resumed_state.values(), full_state.values(), strict=True):
        assert torch.equal(a, b)


def test_ab_switches_from_initialisation_to_label_training(tmp_path):
    trainer = _trainer(tmp_path, "ab", {"init_epochs": 1})
    trainer.fit()
    records = read_metrics(tmp_path / "run", "train")
    first, second = records[: trainer.steps_per_epoch], records[trainer.steps_per_epoch :]
    assert all(r["gt"] == 0 and r["feat"] > 0 for r in first)  # AB loss alone
    assert all(r["gt"] > 0 and r["feat"] == 0 for r in second)  # label loss alone


@pytest.mark.requires_cuda  # Inductor on CPU takes minutes here
def test_compiled_baseline_step_equals_eager():
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # TF32 convs would differ by ~1e-3
        _compiled_baseline_step_equals_eager()


def _compiled_baseline_step_equals_eager():
    torch._dynamo.reset()
    s, t = _pair()
    s, t = s.cuda(), t.cuda()
    x, y = torch.rand(4, 6, 16, 16, device="cuda"), torch.tensor([0, 1, 2, 3], device="cuda")
    objective = build_baseline("reviewkd", s, t)
    lines: list[str] = []
    eager = TrainStep(s, t, objective=objective, steps_per_epoch=2)
    compiled = TrainStep(s, t, objective=objective, steps_per_epoch=2, compile=True, log=lines.append)
    grads = []
    for step in (eager, compiled):
        out = step(x, y, 3)  # epoch 1: ramp 2/20
        out["loss"].backward()
        grads.append([p.grad.clone() for p in [*s.parameters(), *objective.parameters()]])
        s.zero_grad()
        objective.zero_grad()
    torch.testing.assert_close(compiled(x, y, 3)["loss"], eager(x, y, 3)["loss"], rtol=1e-5, atol=1e-6)
    for a, e in zip(*grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x, y, 5)  # another epoch, another ramp value: the same graph
    assert len(lines) == 1 and "reviewkd step (main)" in lines[0]
