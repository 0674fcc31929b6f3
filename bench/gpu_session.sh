#!/usr/bin/env bash
# A GPU machine's whole run in one command: build the extension for sm_90, run the CUDA tests and the
# benchmarks, and leave logs and JSON lines under $OUT (copy them to bench/results/ afterwards).
#
#   bash bench/gpu_session.sh build-test   # build + GPU tests + op/layer benchmarks
#   bash bench/gpu_session.sh step         # whole-step benchmark (B-cos R18 <- D169, 224², bf16)
set -u
OUT=${OUT:-/tmp/e2kd-gpu}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} E2KD_CUDA_ARCHS=${E2KD_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-16}
PY=${PY:-python3}
git_commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)

build() {
  if ! $PY -c "import e2kd_fast._C" 2>/dev/null; then
    { time E2KD_REQUIRE_EXT=1 $PY -m pip install --no-deps --no-build-isolation -q -e . ; } >"$OUT/build.log" 2>&1
  fi
  $PY - <<'PY' | tee "$OUT/env.txt"
import torch, triton, e2kd_fast
from e2kd_fast._ext import build_config, load_extension
print("torch", torch.__version__, "triton", triton.__version__, "device", torch.cuda.get_device_name())
print("extension", build_config(), "loaded", load_extension() is not None)
PY
  echo "commit $git_commit" >>"$OUT/env.txt"
}

case "${1:-build-test}" in
  build-test)
    build
    $PY -m pytest -q -p no:cacheprovider -m requires_cuda tests --continue-on-collection-errors \
      >"$OUT/gpu_tests.log" 2>&1
    tail -5 "$OUT/gpu_tests.log"
    $PY -m bench ops --device cuda --ops distill_loss --out "$OUT/ops.jsonl" >"$OUT/ops.log" 2>&1
    tail -25 "$OUT/ops.log"
    $PY -m bench.bench_bcos_conv2d --device cuda --channels-last >"$OUT/bcos_conv2d.log" 2>&1
    tail -25 "$OUT/bcos_conv2d.log"
    ;;
  step)
    build
    $PY -m bench step --device cuda --pairs 'bcos_r18<-bcos_d169' --batch 128 --resolution 224 \
      --dtype bfloat16 --channels-last ${STEP_FLAGS---compile} --rounds 2 --warmup 1 --memory none --no-flops \
      --variants ${STEP_VARIANTS:-reference,kd,e2kd-live,e2kd-frozen} --out "$OUT/step.jsonl" >"$OUT/step.log" 2>&1
    tail -25 "$OUT/step.log"
    ;;
esac
