"""The package itself: lean import, optional extension, and lint over the whole tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, check=True
    )
    return result.stdout.strip()


def test_import_is_lean_and_queries_no_device():
    # torchvision itself may import triton; what matters is what importing e2kd_fast adds.
    out = _python(
        "import sys, torch, torchvision\n"
        "before = set(sys.modules)\n"
        "import e2kd_fast\n"
        "heavy = [m for m in ('triton', 'deepspeed', 'nvidia.dali', 'bcos') if m in set(sys.modules) - before]\n"
        "print(heavy, torch.cuda.is_initialized())"
    )
    assert out == "[] False"


def test_extension_is_optional():
    assert _python("import e2kd_fast; print(e2kd_fast.extension_available())", E2KD_DISABLE_EXT="1") == "False"
    config = _python("import e2kd_fast; print(sorted(e2kd_fast.build_config()))")
    assert config == "['cpp', 'cuda', 'reason']"


def test_kernels_folder_ships_inside_the_package():
    assert _python("import e2kd_fast.kernels as k; print(k.__name__)") == "e2kd_fast.kernels"


@pytest.mark.skipif(shutil.which("ruff", path=str(Path(sys.executable).parent)) is None, reason="ruff not installed")
def test_ruff_is_clean_over_the_whole_tree():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    for args in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run([ruff, *args], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, f"ruff {' '.join(args)}:\n{result.stdout}{result.stderr}"
