"""Configs: frozen dataclasses, strict mappings, YAML files with bases, overrides, and the paper's config files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from e2kd_fast.config import (
    Config,
    DataConfig,
    DistillConfig,
    ModelConfig,
    OptimConfig,
    TeacherConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from e2kd_fast.models import list_models

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# configs/base/ holds fragments that complete configs are built from, not runs of their own.
# Training configs only: base fragments are partial, and configs/xdistill/ has its own schema
# (e2kd_fast.xdistill.config, checked in tests/test_xdistill.py).
CONFIG_FILES = sorted(
    p for p in CONFIGS.rglob("*.yaml") if not {"base", "xdistill"} & set(p.relative_to(CONFIGS).parts[:-1])
)

R18_D169 = {
    "student": {"name": "bcos_resnet18"},
    "teacher": {"name": "bcos_densenet169", "checkpoint": "teachers/densenet_169-7037ee0604.pth"},
}


def _dict(**sections) -> dict:
    """The R18 ← D169 e²KD mapping with some sections replaced or extended."""
    d = {k: dict(v) for k, v in R18_D169.items()}
    for name, values in sections.items():
        d.setdefault(name, {}).update(values)
    return d


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Dataclasses and round trips
# ----------------------------------------------------------------------------------------------------------------------


def test_defaults_match_the_schema():
    cfg = config_from_dict({"student": {"name": "bcos_resnet18"}, "distill": {"method": "none"}})
    assert cfg.teacher == TeacherConfig() and cfg.teacher.mode == "live" and cfg.teacher.name is None
    assert cfg.distill == DistillConfig(method="none")
    assert (cfg.distill.tau, cfg.distill.lam, cfg.distill.explanation, cfg.distill.gt_coef) == (1.0, 1.0, "bcos", 0.0)
    assert cfg.optim == OptimConfig() and cfg.optim.name == "adam" and cfg.optim.lr == 1e-3 and cfg.optim.agc
    assert (cfg.optim.warmup_epochs, cfg.optim.warmup_start_factor, cfg.optim.schedule_unit) == (5.0, 0.01, "epoch")
    assert cfg.data == DataConfig() and (cfg.data.image_size, cfg.data.eval_resize, cfg.data.batch_size) == (
        224,
        256,
        64,
    )
    assert cfg.train == TrainConfig() and (cfg.train.epochs, cfg.train.precision, cfg.train.device) == (
        90,
        "fp32",
        "auto",
    )


def test_configs_are_frozen_hashable_and_own_their_kwargs():
    kwargs = {"norm": "bnu"}
    cfg = Config(student=ModelConfig("bcos_resnet18", kwargs=kwargs), distill=DistillConfig(method="none"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim = OptimConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0
    kwargs["norm"] = "pn"  # the caller's dict is copied on construction
    assert cfg.student.kwargs == {"norm": "bnu"}
    assert hash(cfg) == hash(dataclasses.replace(cfg))
    assert dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=3e-4)).optim.lr == 3e-4


def test_ints_are_accepted_for_floats_and_become_floats():
    cfg = config_from_dict(_dict(optim={"lr": 1, "warmup_epochs": 0}, distill={"tau": 4}))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and isinstance(cfg.distill.tau, float)
    assert isinstance(OptimConfig(grad_clip_norm=1).grad_clip_norm, float)


def test_round_trip_through_yaml(tmp_path):
    cfg = config_from_dict(
        _dict(
            student={"num_classes": 200, "kwargs": {"norm": "gn4", "b": 2.5, "max_out": 2, "extra": [1, None]}},
            teacher={"num_classes": 200, "mode": "frozen", "store": "runs/precompute/x y"},
            distill={"tau": 4, "lam": 1e-10, "guided_step_interval": 16},
            optim={"name": "sgd", "lr": 3e-4, "grad_clip_norm": 1.0, "schedule_unit": "step", "warmup_steps": 7},
            data={"root": "/data/in 1k", "shots": 50, "val_per_class": 50, "train_split": "2012"},
            train={"precision": "bf16", "channels_last": True, "checkpoint_every_steps": 1000, "out_dir": "r/é"},
        )
    )
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert path.read_text().startswith("#") and not list(path.parent.glob(".*.tmp"))
    assert load_config(path) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    default = Config(student=ModelConfig("resnet18"), distill=DistillConfig(method="none"))
    assert load_config(save_config(default, tmp_path / "default.yaml")) == default


def test_config_to_dict_is_a_plain_deep_copy():
    cfg = config_from_dict(_dict(student={"kwargs": {"norm": "bnu"}}))
    d = config_to_dict(cfg)
    assert list(d) == ["student", "teacher", "distill", "optim", "data", "train", "engine"]
    d["student"]["kwargs"]["norm"] = "pn"
    assert cfg.student.kwargs == {"norm": "bnu"}


# ----------------------------------------------------------------------------------------------------------------------
# The paper's config files
# ----------------------------------------------------------------------------------------------------------------------


def test_there_is_a_config_for_every_setting_and_variant():
    names = {p.stem for p in CONFIG_FILES}
    for setting in (
        "imagenet_bcos_r18_from_d169",
        "imagenet50shot_bcos_r18_from_d169",
        "imagenet200shot_bcos_r18_from_d169",
        "imagenet_bcos_r18_from_r34",
        "imagenet_bcos_vit_ti_from_d169",
        "imagenet_std_r18_from_r34_gradcam",
    ):
        for variant in ("kd", "e2kd", "e2kd_frozen"):
            assert f"{setting}_{variant}" in names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_config_file_loads_and_validates(path):
    assert path.read_text().startswith("# "), "each config starts with a one-line comment saying what it is"
    cfg = load_config(path)
    models = list_models()
    assert cfg.student.name in models
    assert cfg.teacher.name in models or (
        cfg.teacher.name is None and cfg.distill.method == "none"
    )  # a teacher's own run
    assert cfg.train.out_dir == f"runs/{path.stem}", "runs of different configs must not share a folder"
    if path.parent.name == "own_data":  # a user's own folder, run end to end in tests/test_own_data.py
        assert cfg.distill.method == {"own_teacher": "none", "own_kd": "kd", "own_e2kd": "e2kd"}[path.stem]
        return
    if path.stem.endswith("_kd"):
        assert (cfg.distill.method, cfg.distill.lam, cfg.teacher.mode) == ("kd", 0.0, "live")
    elif path.parent.name == "baselines":  # feature baselines (tests/test_baselines.py): name ends with the method
        assert path.stem.endswith(f"_{cfg.distill.method}") and cfg.teacher.mode == "live"
    else:
        assert (cfg.distill.method, cfg.distill.lam, cfg.distill.tau) == ("e2kd", 1.0, 1.0)
        assert cfg.teacher.mode == ("frozen" if path.stem.endswith("_frozen") else "live")
    if cfg.teacher.mode == "frozen":
        assert cfg.teacher.store.startswith("runs/precompute/")
    if cfg.data.dataset != "folder":  # VOC / Waterbirds recipes: tests/test_voc_waterbirds.py
        return
    assert cfg.distill.gt_coef == 0.0 and cfg.data.val_per_class == 50 and cfg.data.val_seed == 42
    assert cfg.data.subset_draw == "official"  # held-out and shots: the official images, index for index
    assert not cfg.data.drop_last  # the official train loader keeps the last, partial batch
    assert cfg.distill.guided_step_counter == "epoch"  # the official batch_idx % K
    assert (cfg.data.image_size, cfg.data.eval_resize, cfg.data.crop_scale_min) == (224, 256, 0.08)


# Spot checks of the recipes against the official ones (B-cos-v2 bcos_final, GTE final_live), one row per setting.
RECIPES = {
    "imagenet_bcos_r18_from_d169_e2kd": dict(epochs=200, batch=256, shots=None, teacher="bcos_densenet169"),
    "imagenet50shot_bcos_r18_from_d169_e2kd": dict(epochs=250, batch=32, shots=50, teacher="bcos_densenet169"),
    "imagenet200shot_bcos_r18_from_d169_kd": dict(epochs=125, batch=64, shots=200, teacher="bcos_densenet169"),
    "imagenet_bcos_r18_from_r34_e2kd_frozen": dict(epochs=200, batch=256, shots=None, teacher="bcos_resnet34"),
    "imagenet_bcos_vit_ti_from_d169_e2kd": dict(epochs=150, batch=64, shots=None, teacher="bcos_densenet169"),
    "imagenet_std_r18_from_r34_gradcam_e2kd": dict(epochs=200, batch=256, shots=None, teacher="resnet34"),
}
TEACHER_FILES = {
    "bcos_densenet169": "teachers/densenet_169-7037ee0604.pth",
    "bcos_resnet34": "teachers/resnet_34-a63425a03e.pth",
    "resnet34": "teachers/resnet34-b627a593.pth",
}


@pytest.mark.parametrize(("stem", "expected"), RECIPES.items())
def test_recipes_match_the_spec(stem, expected):
    cfg = load_config(CONFIGS / f"{stem}.yaml")
    assert (cfg.train.epochs, cfg.data.batch_size, cfg.data.shots) == (
        expected["epochs"],
        expected["batch"],
        expected["shots"],
    )
    if cfg.data.shots is not None:
        assert cfg.data.shot_seed == 42
    assert cfg.teacher.name == expected["teacher"] and cfg.teacher.checkpoint == TEACHER_FILES[cfg.teacher.name]
    optim = cfg.optim
    if cfg.student.name.startswith("bcos_"):
        assert (optim.name, optim.lr, optim.weight_decay, optim.agc, optim.grad_clip_norm) == (
            "adam",
            1e-3,
            0,
            True,
            None,
        )
        assert (optim.agc_clip, optim.agc_eps, optim.schedule, optim.warmup_start_factor) == (
            0.01,
            1e-3,
            "cosine",
            0.01,
        )
        assert cfg.distill.explanation == "bcos"
    else:
        assert (optim.name, optim.lr, optim.weight_decay, optim.agc, optim.grad_clip_norm) == (
            "adamw",
            0.01,
            1e-4,
            False,
            1,
        )
        assert cfg.student.name == "resnet18" and cfg.distill.explanation == "gradcam"
    if cfg.student.name == "bcos_vit_ti_patch16_224":
        assert (optim.schedule_unit, optim.warmup_steps) == ("step", 10_000)
    else:
        assert (optim.schedule_unit, optim.warmup_epochs) == ("epoch", 5.0)


# ----------------------------------------------------------------------------------------------------------------------
# Strict mappings: unknown keys, wrong types, allowed values
# ----------------------------------------------------------------------------------------------------------------------


def test_unknown_keys_name_the_dotted_key_and_the_allowed_keys():
    with pytest.raises(ValueError, match=r"'optim\.learning_rate'.*allowed keys of 'optim': name, lr, weight_decay"):
        config_from_dict(_dict(optim={"learning_rate": 1e-3}))
    with pytest.raises(ValueError, match=r"'data\.batchsize'.*batch_size.*did you mean 'batch_size'"):
        config_from_dict(_dict(data={"batchsize": 8}))
    with pytest.raises(ValueError, match=r"'model'.*student, teacher, distill, optim, data, train"):
        config_from_dict({**R18_D169, "model": {}})


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("optim", "lr", "fast", "float"),
        ("optim", "agc", 1, "bool"),
        ("train", "epochs", 1.5, "int"),
        ("train", "epochs", True, "int"),
        ("data", "batch_size", None, "int"),
        ("data", "shots", "50", "int or None"),
        ("data", "root", 3, "str or None"),
        ("optim", "grad_clip_norm", [1.0], "float or None"),
        ("student", "kwargs", ["norm", "bnu"], "mapping"),
    ],
)
def test_wrong_types_name_the_key_the_type_and_the_value(section, key, value, expected):
    with pytest.raises(ValueError) as info:
        config_from_dict(_dict(**{section: {key: value}}))
    message = str(info.value)
    assert f"{section}.{key}" in message and f"expected {expected}" in message and repr(value) in message, message


def test_none_is_accepted_only_where_the_type_allows_it():
    cfg = config_from_dict(
        _dict(data={"shots": None, "eval_batch_size": None}, optim={"grad_clip_norm": None}, train={"out_dir": None})
    )
    assert cfg.data.shots is None and cfg.optim.grad_clip_norm is None
    assert cfg.train.out_dir is None  # a dated folder is chosen when training starts
    for section, key in (("optim", "lr"), ("data", "train_split"), ("distill", "method")):
        with pytest.raises(ValueError, match=rf"{section}\.{key}"):
            config_from_dict(_dict(**{section: {key: None}}))


@pytest.mark.parametrize(
    ("section", "key", "value", "allowed"),
    [
        ("optim", "name", "adm", "'adam', 'adamw', 'sgd'"),
        ("distill", "method", "e2KD", "'kd', 'e2kd', 'none', 'at', 'nst', 'ab', 'catkd', 'reviewkd'"),
        ("distill", "explanation", "lrp", "'bcos', 'gradcam'"),
        ("teacher", "mode", "cached", "'live', 'frozen'"),
        ("optim", "schedule_unit", "iter", "'epoch', 'step'"),
        ("train", "precision", "fp8", "'fp32', 'bf16', 'fp16'"),
        ("train", "device", "gpu", "'auto', 'cpu', 'cuda'"),
        ("data", "dataset", "imagenet", "'folder', 'synthetic', 'voc', 'waterbirds'"),
        ("data", "subset_draw", "bit", "'official', 'per_class'"),
        ("distill", "guided_step_counter", "batch", "'epoch', 'run'"),
    ],
)
def test_choices_name_the_field_and_the_allowed_values(section, key, value, allowed):
    with pytest.raises(ValueError, match=rf"{section}\.{key}: must be one of {allowed}; got '{value}'"):
        config_from_dict(_dict(**{section: {key: value}}))


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: DistillConfig(tau=0), "distill.tau"),
        (lambda: DistillConfig(lam=-1), "distill.lam"),
        (lambda: DistillConfig(guided_step_interval=0), "distill.guided_step_interval"),
        (lambda: OptimConfig(lr=0), "optim.lr"),
        (lambda: OptimConfig(momentum=1.0), "optim.momentum"),
        (lambda: OptimConfig(lr=float("nan")), "optim.lr"),
        (lambda: DataConfig(crop_scale_min=0), "data.crop_scale_min"),
        (lambda: DataConfig(eval_resize=200), "data.eval_resize"),
        (lambda: DataConfig(shots=0), "data.shots"),
        (lambda: TrainConfig(grad_accum=0), "train.grad_accum"),
        (lambda: ModelConfig(""), "student.name"),
        (lambda: ModelConfig("resnet18", kwargs={"f": object()}), "student.kwargs.f"),
    ],
)
def test_out_of_range_values_are_rejected_on_construction(build, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build()


def test_missing_student_and_bad_sections():
    with pytest.raises(ValueError, match=r"missing required key 'student\.name'"):
        config_from_dict({"distill": {"method": "none"}})
    with pytest.raises(ValueError, match=r"missing required key 'student\.name'"):
        config_from_dict({"student": {"num_classes": 10}, "distill": {"method": "none"}})
    with pytest.raises(ValueError, match=r"optim: expected a mapping"):
        config_from_dict({**R18_D169, "optim": [1]})
    with pytest.raises(ValueError, match=r"optim: expected OptimConfig, got dict"):
        Config(student=ModelConfig("resnet18"), optim={"lr": 1.0}, distill=DistillConfig(method="none"))
    # An empty YAML block (None) means "all defaults".
    assert config_from_dict({**R18_D169, "optim": None}).optim == OptimConfig()


# ----------------------------------------------------------------------------------------------------------------------
# Cross-field validation
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("d", "pattern"),
    [
        ({"student": {"name": "bcos_resnet18"}, "distill": {"method": "kd", "lam": 0}}, r"'kd' requires teacher\.name"),
        ({"student": {"name": "bcos_resnet18"}}, r"'e2kd' requires teacher\.name"),
        (_dict(teacher={"mode": "frozen"}), r"'frozen' requires teacher\.store"),
        (
            _dict(teacher={"mode": "frozen", "store": "s"}, data={"mixup_alpha": 0.2}),
            r"mixup/cutmix cannot be applied consistently to stored explanations",
        ),
        (
            _dict(teacher={"mode": "frozen", "store": "s"}, data={"cutmix_alpha": 1.0}),
            r"mixup/cutmix cannot be applied consistently to stored explanations",
        ),
        (
            _dict(distill={"explanation": "gradcam"}),
            r"'gradcam' is meant for standard.*student\.name is 'bcos_resnet18'",
        ),
        (
            _dict(student={"name": "resnet18"}),
            r"'bcos' \(dynamic linear weights\) needs B-cos models.*student\.name is 'resnet18'.*'gradcam'",
        ),
        (_dict(teacher={"name": "resnet34"}), r"needs B-cos models.*teacher\.name is 'resnet34'"),
        (
            {
                "student": {"name": "resnet18"},
                "teacher": {"name": "bcos_resnet34"},
                "distill": {"explanation": "gradcam"},
            },
            r"'gradcam' is meant for standard.*teacher\.name is 'bcos_resnet34'",
        ),
        (
            _dict(student={"num_classes": 10}, teacher={"num_classes": 1000}),
            r"num_classes \(10\) != teacher\.num_classes",
        ),
        (_dict(optim={"warmup_steps": 100}), r"optim\.warmup_steps is 100 but is used only with .*'step'"),
        ({"student": {"name": "x"}, "teacher": {"checkpoint": "t.pth"}}, r"teacher\.checkpoint is set"),
    ],
)
def test_cross_field_errors(d, pattern):
    with pytest.raises(ValueError, match=pattern):
        config_from_dict(d)


def test_valid_combinations_pass():
    # Supervised training needs no teacher; KD of a standard student needs no explanation kind to match.
    assert config_from_dict({"student": {"name": "resnet18"}, "distill": {"method": "none"}}).teacher.name is None
    kd = config_from_dict(_dict(student={"name": "resnet18"}, distill={"method": "kd"}))
    assert kd.distill.explanation == "bcos" and kd.distill.lam == 1.0, "KD ignores lam and the explanation kind"
    frozen = config_from_dict(_dict(teacher={"mode": "frozen", "store": "runs/precompute/d169"}))
    assert frozen.teacher.store == "runs/precompute/d169"
    assert config_from_dict(_dict(optim={"schedule_unit": "step", "warmup_steps": 10_000})).optim.warmup_steps == 10_000


# ----------------------------------------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------------------------------------


def test_overrides_parse_yaml_scalars_into_the_field_types():
    d = apply_overrides(
        R18_D169,
        [
            "optim.lr=3e-4",  # YAML 1.1 would read this as a string
            "distill.tau=4",
            "distill.lam=1E1",
            "train.epochs=12",
            "train.channels_last=true",
            "data.shots=null",
            "data.train_split=2012",  # a string field keeps number-like text as text
            "data.root = /data/imagenet",
            "student.kwargs.norm=bnu",  # free keys inside a mapping field
            "student.kwargs.b=2.5",
            "optim.grad_clip_norm=1",
        ],
    )
    cfg = config_from_dict(d)
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.distill.tau == 4.0 and cfg.distill.lam == 10.0 and cfg.train.epochs == 12
    assert cfg.train.channels_last is True and cfg.data.shots is None
    assert cfg.data.train_split == "2012" and cfg.data.root == "/data/imagenet"
    assert cfg.student.kwargs == {"norm": "bnu", "b": 2.5} and cfg.optim.grad_clip_norm == 1.0
    assert "optim" not in R18_D169, "the input mapping is not modified"


def test_overrides_null_and_whole_mappings():
    d = apply_overrides({"student": {"name": "resnet18"}, "teacher": {"name": "resnet34"}}, ["teacher.name=null"])
    assert d["teacher"]["name"] is None
    assert config_from_dict(apply_overrides(d, ["distill.method=none"])).teacher.name is None
    d = apply_overrides(_dict(student={"kwargs": {"norm": "pn"}}), ["student.kwargs={norm: bnu, max_out: 2}"])
    assert config_from_dict(d).student.kwargs == {"norm": "bnu", "max_out": 2}


def test_override_errors():
    with pytest.raises(ValueError, match=r"unknown key 'optim\.learning_rate'; allowed keys of 'optim': name, lr"):
        apply_overrides(R18_D169, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match=r"unknown key 'optimizer'.*student, teacher, distill"):
        apply_overrides(R18_D169, ["optimizer.lr=1"])
    with pytest.raises(ValueError, match=r"malformed override 'optim\.lr'.*dotted\.key=value"):
        apply_overrides(R18_D169, ["optim.lr"])
    with pytest.raises(ValueError, match=r"malformed override '=1'"):
        apply_overrides(R18_D169, ["=1"])
    with pytest.raises(ValueError, match=r"names a section; name one of its keys: name, lr"):
        apply_overrides(R18_D169, ["optim=1"])
    with pytest.raises(ValueError, match=r"optim\.lr is a float, not a mapping"):
        apply_overrides(R18_D169, ["optim.lr.x=1"])
    with pytest.raises(ValueError, match=r"override 'optim\.lr=\[1'.*invalid YAML"):
        apply_overrides(R18_D169, ["optim.lr=[1"])
    with pytest.raises(TypeError, match="sequence"):
        apply_overrides(R18_D169, "optim.lr=1")
    # Types are checked where the mapping becomes a Config, with the dotted key.
    with pytest.raises(ValueError, match=r"train\.epochs: expected int, got float 100\.0"):
        config_from_dict(apply_overrides(R18_D169, ["train.epochs=1e2"]))
    with pytest.raises(ValueError, match=r"optim\.lr: expected float, got str 'fast'"):
        config_from_dict(apply_overrides(R18_D169, ["optim.lr=fast"]))


# ----------------------------------------------------------------------------------------------------------------------
# Files: bases, cycles, errors
# ----------------------------------------------------------------------------------------------------------------------


def test_load_config_applies_overrides_after_the_file(tmp_path):
    path = _write(
        tmp_path / "run.yaml",
        "# test\nstudent: {name: bcos_resnet18}\ndistill: {method: none}\noptim:\n  lr: 3e-4\n  warmup_epochs: 1\n",
    )
    cfg = load_config(path)
    assert cfg.optim.lr == 3e-4, "YAML files read 3e-4 as a float too"
    cfg = load_config(path, ["optim.lr=0.1", "train.seed=7"])
    assert (cfg.optim.lr, cfg.optim.warmup_epochs, cfg.train.seed) == (0.1, 1.0, 7)


def test_base_files_are_deep_merged_under_the_file(tmp_path):
    _write(
        tmp_path / "base" / "recipe.yaml",
        "optim: {lr: 0.5, weight_decay: 0.1}\nstudent: {name: bcos_resnet18, kwargs: {norm: bnu, b: 2}}\n"
        "data: {batch_size: 8}\n",
    )
    _write(tmp_path / "base" / "more.yaml", "base: recipe.yaml\ndata: {batch_size: 16, shots: 5}\n")  # relative
    _write(tmp_path / "base" / "other.yaml", "data: {batch_size: 32}\ntrain: {epochs: 3}\n")
    path = _write(
        tmp_path / "run.yaml",
        "base: [base/more.yaml, base/other.yaml]\noptim: {lr: 0.25}\nstudent: {kwargs: {b: 3}}\n"
        "distill: {method: none}\n",
    )
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (0.25, 0.1), "the file wins, untouched keys come from the base"
    assert cfg.student.name == "bcos_resnet18" and cfg.student.kwargs == {"norm": "bnu", "b": 3}
    assert (cfg.data.batch_size, cfg.data.shots, cfg.train.epochs) == (32, 5, 3), "later bases win over earlier ones"
    # A shared base reached twice (a diamond) is not a cycle.
    _write(tmp_path / "a.yaml", "base: base/recipe.yaml\n")
    diamond = _write(tmp_path / "d.yaml", "base: [a.yaml, base/recipe.yaml]\ndistill: {method: none}\n")
    assert load_config(diamond).optim.lr == 0.5


def test_base_cycles_are_detected(tmp_path):
    _write(tmp_path / "a.yaml", "base: sub/b.yaml\nstudent: {name: resnet18}\n")
    _write(tmp_path / "sub" / "b.yaml", "base: ../a.yaml\n")
    with pytest.raises(ValueError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")
    _write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "self.yaml")


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    _write(tmp_path / "missing_base.yaml", "base: gone.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"base file 'gone\.yaml' of .*missing_base\.yaml"):
        load_config(tmp_path / "missing_base.yaml")
    _write(tmp_path / "bad.yaml", "student:\n  name: resnet18\noptim: {lr: [1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: invalid YAML at line [34]"):
        load_config(tmp_path / "bad.yaml")
    _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"list\.yaml: the top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    _write(tmp_path / "bad_base.yaml", "base: {a: 1}\n")
    with pytest.raises(ValueError, match=r"'base' must be a file name or a list"):
        load_config(tmp_path / "bad_base.yaml")
    _write(tmp_path / "empty.yaml", "")
    with pytest.raises(ValueError, match=r"empty\.yaml: missing required key 'student\.name'"):
        load_config(tmp_path / "empty.yaml")
    _write(tmp_path / "typo.yaml", "student: {name: resnet18}\ndistill: {method: none}\ntrain: {epoch: 3}\n")
    with pytest.raises(ValueError, match=r"typo\.yaml: unknown key 'train\.epoch'.*did you mean 'epochs'"):
        load_config(tmp_path / "typo.yaml")


def test_renamed_keys_are_read_with_a_warning_and_never_both():
    with pytest.warns(FutureWarning, match="engine.backend is now engine.strategy"):
        cfg = config_from_dict(_dict(engine={"backend": "ddp", "dist_backend": "gloo"}))
    assert (cfg.engine.strategy, cfg.engine.process_group) == ("ddp", "gloo")
    with pytest.warns(FutureWarning, match="engine.backend is now engine.strategy"):
        overridden = apply_overrides(_dict(), ["engine.backend=deepspeed"])
    assert config_from_dict(overridden).engine.strategy == "deepspeed"
    with pytest.raises(ValueError, match="engine.backend is the old name of engine.strategy; set only"):
        config_from_dict(_dict(engine={"backend": "ddp", "strategy": "single"}))
