"""Run comparison reports (`e2kd-fast report`) and the scores of the VOC and Waterbirds settings.

- `build`: `make_report` loads run folders, evaluates them and writes ``report.html`` / ``report.md``.
- `render`: the self-contained HTML page and the markdown version.
- `plots`: explanation pictures, grids and training curves as PNG.
- `scores`: VOC mAP, Waterbirds group / worst-group accuracy (used by `e2kd_fast.engine.evaluate`).

This package imports nothing heavy at import time: `e2kd_fast.engine.evaluate` imports `scores` from it.
"""

from __future__ import annotations

from typing import Any


def make_report(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See `e2kd_fast.report.build.make_report`."""
    from e2kd_fast.report.build import make_report as _make_report

    return _make_report(*args, **kwargs)


__all__ = ["make_report"]
