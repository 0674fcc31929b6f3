"""Every Triton kernel, in every specialisation its ops launch, assembles for sm_90a without spills.

No GPU: the launchers run on meta tensors with their kernels recorded (`bench.ptxas_report`), each
specialisation is compiled by Triton for ``GPUTarget("cuda", 90, 32)`` and assembled by
``ptxas -arch=sm_90a -v``. The ``core`` workload reaches every block size and constant of the
R18/R50/D169 convs at 224² and of the loss at batch 64–256 (``python -m bench ptxas`` checks that
on the traced models). Skipped where Triton's CUDA back end or ptxas is missing. Results are
cached in ``.cache/ptxas`` per kernel source and tools: an uncached run assembles about 210
specialisations (about two minutes on 2 cores when nothing is cached). The implicit-GEMM conv is
compiled in bf16 and fp32; fp16 takes bf16's tiles and instructions.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import ptxas_report

ROOT = Path(__file__).resolve().parent.parent

SAMPLE_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_k' for 'sm_90a'
ptxas info    : Function properties for _k
    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]
"""


def test_parse_ptxas_reads_registers_spills_and_shared_memory():
    assert ptxas_report.parse_ptxas(SAMPLE_LOG) == {
        "registers": 255,
        "spill_stores": 8,
        "spill_loads": 12,
        "stack_bytes": 24,
        "static_smem_bytes": 4096,
    }
    with pytest.raises(ValueError, match="no resource lines"):
        ptxas_report.parse_ptxas("ptxas fatal: nothing")


# The report runs in a fresh interpreter without TRITON_INTERPRET: Triton's interpreter leaves parts
# of ``triton.language`` patched after the kernels earlier tests ran through it (a helper's call
# patches them without undoing it), and the compiler then fails on that patched language.
_REPORT = """
import json
from bench import ptxas_report
launches = ptxas_report.record_launches("core")
records = ptxas_report.report(launches, cache_dir=ptxas_report.CACHE_DIR, log=lambda _: None)
print(json.dumps([{key: value for key, value in r.items() if key != "_key"} for r in records]))
"""


@pytest.fixture(scope="module")
def records() -> list[dict]:
    reason = ptxas_report.unavailable_reason()
    if reason:
        pytest.skip(reason)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _REPORT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _launched_kernels() -> set[str]:
    """Every ``@triton.jit`` function in kernels/ that its module launches (``name[grid](...)``);
    the others are helpers the kernels call."""
    pytest.importorskip("triton")
    names = set()
    for module_name in ptxas_report.KERNEL_MODULES:
        module = importlib.import_module(f"e2kd_fast.kernels.{module_name}")
        source = inspect.getsource(module)
        for fn in map(ptxas_report._jit_function, vars(module).values()):
            if fn is not None and re.search(rf"\b{fn.__name__}\[", source):
                names.add(fn.__name__)
    return names


def test_every_kernel_specialisation_assembles_without_spills(records):
    compiled = {r["kernel"] for r in records}
    missing = _launched_kernels() - compiled
    assert not missing, f"kernels the core workload of bench/ptxas_report.py never launches: {sorted(missing)}"
    spilled = [
        f"{r['kernel']} {r['specialisation']}: {r['spill_stores']} B stored, {r['spill_loads']} B loaded, "
        f"{r['registers']} registers (e.g. {r['example']})"
        for r in records
        if r["spill_stores"] or r["spill_loads"]
    ]
    assert not spilled, "register spills on sm_90a:\n" + "\n".join(spilled)
    assert all(0 < r["registers"] <= 255 for r in records)
