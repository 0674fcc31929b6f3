"""Guarded loader of the optional compiled extension ``e2kd_fast._C``.

The package works without it (every op has a reference implementation). Loading is lazy, never
queries a device, and can be switched off with ``E2KD_DISABLE_EXT=1``.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType


def build_config() -> dict[str, object]:
    """What setup.py built: ``{"cpp": bool, "cuda": bool, "reason": str}``."""
    try:
        from e2kd_fast import _build_config as cfg
    except ImportError:
        return {"cpp": False, "cuda": False, "reason": "not installed with setup.py (no _build_config.py)"}
    return {"cpp": cfg.CPP_BUILT, "cuda": cfg.CUDA_BUILT, "reason": cfg.REASON}


@functools.cache
def load_extension() -> ModuleType | None:
    """The compiled extension module, or None (with one warning if it was built but fails to load)."""
    if os.environ.get("E2KD_DISABLE_EXT") == "1":
        return None
    import torch  # noqa: F401  (loads libc10 and libtorch, which the extension links against)

    try:
        return importlib.import_module("e2kd_fast._C")
    except ImportError as err:
        if build_config()["cpp"]:
            warnings.warn(f"e2kd_fast._C was built but does not load ({err}); using reference ops", stacklevel=2)
        return None


def extension_available() -> bool:
    return load_extension() is not None
