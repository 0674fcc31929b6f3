"""Run configuration: checked, frozen dataclass sections read from and written to YAML.

Three modules, each importing only the ones above it::

    sections  the checked-section library: `Section` (frozen dataclasses type checked and validated on
              construction), `require`, `sections_from_dict` (strict, with dotted-key errors and
              "did you mean" suggestions)
    files     YAML files of sections: `read_yaml_file`, `read_yaml_with_bases` (``base:`` inheritance),
              `deep_merge`, `apply_section_overrides` (``"dotted.key=value"``)
    schema    this project's training config: `Config` and its sections, `BASELINE_DEFAULTS`,
              `load_config`, `save_config`, `config_from_dict`, `config_to_dict`, `apply_overrides`

Everything public is importable from here::

    from e2kd_fast.config import load_config, save_config

    cfg = load_config("configs/imagenet_bcos_r18_from_d169_e2kd.yaml", ["optim.lr=3e-4"])
    save_config(cfg, "runs/x/config.yaml")  # the resolved config; load_config reads it back equal
"""

from __future__ import annotations

from e2kd_fast.config.files import apply_section_overrides, deep_merge, read_yaml_file, read_yaml_with_bases
from e2kd_fast.config.schema import (
    BASELINE_DEFAULTS,
    Config,
    DataConfig,
    DatasetKind,
    DeviceName,
    DistillConfig,
    DistillMethod,
    EngineConfig,
    ExplanationKind,
    LoaderName,
    ModelConfig,
    OptimConfig,
    OptimizerName,
    Precision,
    ProcessGroupName,
    ScheduleName,
    ScheduleUnit,
    StrategyName,
    TeacherConfig,
    TeacherMode,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from e2kd_fast.config.sections import Section, field_types, require, sections_from_dict, type_name, unknown_key_error

__all__ = [
    # the training-config schema
    "BASELINE_DEFAULTS",
    "Config",
    "DataConfig",
    "DistillConfig",
    "EngineConfig",
    "ModelConfig",
    "OptimConfig",
    "TeacherConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
    # the value sets of its fields
    "DatasetKind",
    "DeviceName",
    "DistillMethod",
    "ExplanationKind",
    "LoaderName",
    "OptimizerName",
    "ProcessGroupName",
    "Precision",
    "ScheduleName",
    "StrategyName",
    "ScheduleUnit",
    "TeacherMode",
    # the library: checked sections and their YAML files
    "Section",
    "apply_section_overrides",
    "deep_merge",
    "field_types",
    "read_yaml_file",
    "read_yaml_with_bases",
    "require",
    "sections_from_dict",
    "type_name",
    "unknown_key_error",
]
