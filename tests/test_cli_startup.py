"""The command line answers ``--help`` and ``--version`` without importing torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

import e2kd_fast

# Runs the command line in-process, then reports whether torch was imported on the way.
_PROBE = (
    "import sys\n"
    "from e2kd_fast.cli import main\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "except SystemExit:\n"
    "    pass\n"
    "print('TORCH-IMPORTED' if 'torch' in sys.modules else 'TORCH-NOT-IMPORTED')\n"
)


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["train", "--help"], ["explain", "--help"]])
def test_help_and_version_import_no_torch(args):
    result = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("TORCH-NOT-IMPORTED"), result.stdout
    if args == ["--version"]:
        assert f"e2kd-fast {e2kd_fast.__version__}" in result.stdout


def test_python_dash_m_help_imports_no_torch():
    """``python -m e2kd_fast --help`` as a user runs it: ``-X importtime`` lists every module imported."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "e2kd_fast", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "usage: e2kd-fast" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "e2kd_fast.cli" in imported
    assert "torch" not in imported


def test_package_names_load_on_first_use():
    code = (
        "import sys, e2kd_fast\n"
        "before = 'torch' in sys.modules\n"
        "model = e2kd_fast.create_model('bcos_resnet20_cifar', num_classes=3)\n"
        "print(before, type(model).__name__, 'create_model' in dir(e2kd_fast))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "BcosResNet", "True"]
