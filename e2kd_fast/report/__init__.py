"""Run comparison reports (`e2kd-fast report`).

- `build`: `make_report` loads run folders, evaluates them and writes ``report.html`` / ``report.md``.
- `render`: the self-contained HTML page and the markdown version.
- `plots`: explanation pictures, grids and training curves as PNG.
"""

from e2kd_fast.report.build import make_report

__all__ = ["make_report"]
