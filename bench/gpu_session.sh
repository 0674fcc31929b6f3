#!/usr/bin/env bash
# A GPU machine's whole run in one call, at most BUDGET_S (470 s) wall time, extension build
# included. Each part runs under its own `timeout`, so one slow part cannot eat the others' time,
# and leaves its log under $OUT (copy the logs and JSON lines to bench/results/ afterwards):
#
#   env        versions, GPU, extension build config     env.log
#   build      the extension for sm_90 (if not built)    build.log
#   ceilings   measured copy bandwidth and bf16 matmul   ceilings.log
#   tests      the requires_cuda tests                   tests.log
#   layer      bench/bench_bcos_conv2d.py: cuDNN-epilogue and implicit-GEMM B-cos convs and
#              adjoints against cuDNN, per conv shape; the fastest per shape class
#                                                               layer.log, fastest.json
#   loss       the fused loss at N = 128 and 256: reference eager, CUDA, Triton split and one-pass
#              forwards (`python -m bench ops --ops distill_loss`)        loss.log, loss.jsonl
#   step       compiled step, B-cos R18 <- D169, batch 128, 224², bf16, channels_last:
#              reference, e2kd-live, kd, e2kd-frozen; time, time ÷ floor, first-step (cold
#              compile) time, Inductor kernels                           step.log, step.jsonl
#   profile    torch.profiler top kernels of the compiled e2kd-live step; its first step is the
#              warm-compile time (a second process, Inductor cache populated by `step`)  profile.log
#   graphs     e2kd-live against e2kd-live-graphed (the teacher graph replayed as a CUDA graph),
#              side by side from the warm cache                         graphs.log, graphs.jsonl
#
#   make gpu-wheels          # here, once: the tests' bcos package, which the GPU image lacks, into .whl/
#   OUT=/tmp/e2kd-gpu bash bench/gpu_session.sh      # there, with .whl carried along (ignored by git)
#   OUT=/tmp/e2kd-dry bash bench/gpu_session.sh --dry-run   # CPU, tiny sizes: checks that it all runs
#
# The dry run uses the CPU, the tiny_bcos pair at batch 2 and 32², and skips what needs CUDA with a
# line saying so. STEP_COMPILE=0 runs the step and profile parts eagerly (compiling even the tiny
# pair takes minutes on a 2-core CPU). Per-part limits: LIMIT_<PART> in seconds (the dry run's
# defaults are 4× the GPU's); BUDGET_S caps the whole; $OUT/summary.txt has one line per part.
set -u
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: OUT=DIR bash bench/gpu_session.sh [--dry-run]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/e2kd-gpu}
mkdir -p "$OUT"
: >"$OUT/summary.txt"
PY=${PY:-python3}
# Per-part limits (s) on the GPU; a dry run on a small, shared CPU gets 4× (its budget: 30 min).
SCALE=1
[ $DRY = 1 ] && SCALE=4
BUDGET_S=${BUDGET_S:-$((DRY == 1 ? 1800 : 470))}
COMPILE_FLAG=--compile
[ "${STEP_COMPILE:-1}" = 0 ] && COMPILE_FLAG=
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 # a timed-out part keeps its log
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} E2KD_CUDA_ARCHS=${E2KD_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-16}
# A fresh Inductor cache: the step part's first steps are cold compiles, the profile part's warm.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/e2kd-inductor.XXXXXX")}
started=$(date +%s)

say() { echo "$*" | tee -a "$OUT/summary.txt"; }

# capped LIMIT: LIMIT, or the budget left when that is less (what `part` will allow), so that a
# part's own time budget can be derived from the time it really gets.
capped() {
  local left=$((BUDGET_S - ($(date +%s) - started)))
  echo $(($1 < left ? $1 : left))
}

# part NAME LIMIT_S CMD...: CMD under `timeout` (never past the budget), output in $OUT/NAME.log.
part() {
  local name=$1 limit=$2 left t0 rc status
  shift 2
  left=$((BUDGET_S - ($(date +%s) - started)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    say "$name: skipped: the ${BUDGET_S} s budget is spent"
    return
  fi
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMED OUT at ${limit} s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  say "$name: $status, $(($(date +%s) - t0)) s, log $name.log"
}

if [ $DRY = 1 ]; then
  DEVICE=cpu
  STEP_SIZE=(--pairs tiny_bcos --batch 2 --resolution 32 --dtype float32 --rounds 1)
  PROFILE_SIZE=(--pair tiny_bcos --batch 2 --resolution 32 --dtype float32 --warmup 1 --steps 1 --top 10)
  CEILING_SIZE=(--copy-mib 16 --matmul-n 256)
  LAYER_SIZE=(--models bcos_resnet18 --batch 1 --limit 2 --warmup 1 --repeats 1)
  LOSS_SIZE=(--shapes small --repeats 2)
else
  DEVICE=cuda
  STEP_SIZE=(--pairs 'bcos_r18<-bcos_d169' --batch 128 --resolution 224 --dtype bfloat16 --channels-last --rounds 2)
  PROFILE_SIZE=(--pair 'bcos_r18<-bcos_d169' --batch 128 --resolution 224 --dtype bfloat16 --channels-last)
  CEILING_SIZE=()
  LAYER_SIZE=(--channels-last --repeats 5)
  LOSS_SIZE=(--shapes real --models bcos_resnet18 --repeats 20)
fi
say "gpu_session: $([ $DRY = 1 ] && echo 'dry run, CPU' || echo CUDA), budget ${BUDGET_S} s, commit $(git rev-parse HEAD 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
# Wheels carried to a machine that cannot download (`make gpu-wheels`): the official B-cos package,
# which test modules import at collection (none of their tests needs CUDA, but a module that fails
# to collect fails the tests part). Installed into a folder of its own, after the image's packages.
if [ $DRY = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  WHEEL_SITE=${TMPDIR:-/tmp}/e2kd-wheels
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$WHEEL_SITE" .whl/*.whl; then
    export PYTHONPATH="$PYTHONPATH:$WHEEL_SITE"
    say "wheels: $(cd .whl && echo *.whl) installed for the tests"
  else
    say "wheels: installing .whl/*.whl failed; modules that import them will not collect"
  fi
fi

part env "${LIMIT_ENV:-$((30 * SCALE))}" bash -c '
  nvidia-smi 2>/dev/null || echo "nvidia-smi: not available"
  nproc; free -g 2>/dev/null | head -2
  $0 -c "
import torch, e2kd_fast
from bench import common
from e2kd_fast._ext import build_config
env = common.environment(common.resolve_device(\"auto\"))
print({k: env[k] for k in (\"device\", \"device_kind\", \"torch\", \"triton\", \"cuda\", \"cudnn\", \"driver\", \"git_commit\")})
print(\"extension build config\", build_config())
"' "$PY"

if [ $DRY = 1 ]; then
  say "build: skipped: the dry run uses the extension \`make venv\` built (sm_90 needs nvcc and a GPU run)"
else
  part build "${LIMIT_BUILD:-$((140 * SCALE))}" bash -c '
    $0 -c "import torch, e2kd_fast._C" 2>/dev/null && { echo "extension already built"; exit 0; }
    time E2KD_REQUIRE_EXT=1 $0 -m pip install --no-deps --no-build-isolation -q -e . &&
      $0 -c "from e2kd_fast._ext import build_config, load_extension as l; print(build_config(), l() is not None)"
  ' "$PY"
fi

part ceilings "${LIMIT_CEILINGS:-$((20 * SCALE))}" "$PY" -m bench.floor --measure-ceilings --device "$DEVICE" "${CEILING_SIZE[@]}"

if [ $DRY = 1 ]; then
  say "tests: skipped: the requires_cuda tests need a CUDA device"
else
  part tests "${LIMIT_TESTS:-$((100 * SCALE))}" "$PY" -m pytest -q -p no:cacheprovider -m requires_cuda tests \
    --continue-on-collection-errors
fi

# The kernels before the step: their first calls compile Triton specialisations (both conv designs,
# every conv shape of R18/R50/D169), and a timed-out step must not leave them unmeasured.
LAYER_LIMIT=$(capped "${LIMIT_LAYER:-$((45 * SCALE))}")
part layer "$LAYER_LIMIT" "$PY" -m bench.bench_bcos_conv2d --device "$DEVICE" "${LAYER_SIZE[@]}" \
  --time-budget $((LAYER_LIMIT * 4 / 5)) --fastest-out "$OUT/fastest.json"

part loss "${LIMIT_LOSS:-$((30 * SCALE))}" "$PY" -m bench ops --device "$DEVICE" "${LOSS_SIZE[@]}" --ops distill_loss \
  --providers reference-eager,cpp,triton,triton-one-pass --quiet --out "$OUT/loss.jsonl"

# Variants compile in this order (e2kd-live first); one whose first step would start after the step
# limit minus 45 s (the rounds, the FLOP/byte count) gets a record saying so instead.
STEP_LIMIT=$(capped "${LIMIT_STEP:-$((190 * SCALE))}")
part step "$STEP_LIMIT" "$PY" -m bench step --device "$DEVICE" "${STEP_SIZE[@]}" $COMPILE_FLAG \
  --warmup 1 --memory none --variants "${STEP_VARIANTS:-reference,e2kd-live,kd,e2kd-frozen}" \
  --time-budget $((STEP_LIMIT > 90 ? STEP_LIMIT - 45 : STEP_LIMIT / 2)) --out "$OUT/step.jsonl"

part profile "${LIMIT_PROFILE:-$((60 * SCALE))}" "$PY" -m bench.profile_step --device "$DEVICE" "${PROFILE_SIZE[@]}" $COMPILE_FLAG

# The live step with and without its teacher graph replayed as a CUDA graph, side by side; both
# start from the cache that `step` filled (the second step of the graphed variant records it).
if [ $DRY = 1 ] || [ -z "$COMPILE_FLAG" ]; then
  say "graphs: skipped: replaying a compiled teacher graph needs CUDA and --compile"
else
  part graphs "${LIMIT_GRAPHS:-60}" "$PY" -m bench step --device "$DEVICE" "${STEP_SIZE[@]}" --compile \
    --warmup 3 --rounds 3 --memory none --no-flops --variants e2kd-live,e2kd-live-graphed --out "$OUT/graphs.jsonl"
fi

say "gpu_session: done in $(($(date +%s) - started)) s"
