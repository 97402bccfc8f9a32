#!/usr/bin/env bash
# One command for a lent H100/H200 (under 9 minutes in all): GPU tests, the CUDA extension, a launch-config sweep,
# the GPU benchmarks.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; results under $OUT (default /tmp/gpu_check_out)
#
# With the device tool: carry ".whl" (made here by `bash benchmarks/fetch_wheels.sh`) so that TRL, Liger-Kernel and
# Cut Cross-Entropy are installed there; without it those peers are reported as missing, never skipped silently.
# Stages, each with its own time cap so one slow stage cannot eat the budget:
#   1. install carried wheels into /tmp/site (no index, no deps), then fastalign itself (editable, no deps)
#   2. `python -m fastalign.ext build` (the C++/CUDA extension; tolerated when absent or failing), first, so that
#      the GPU tests of the CUDA kernels run instead of skipping
#   3. GPU tests: `pytest -m gpu tests/`, then the op/kernel tests compiled for the card (tests/ops)
#   4. `python -m benchmarks.config_sweep --out-dir $OUT/configs`: a handful of tile / warp / stage configs per kernel
#      (from benchmarks/compile_table.py), timed at sweep shapes; the winners go to $OUT/configs/<card>.json, which
#      the benchmarks below then use (FASTALIGN_KERNEL_CONFIGS)
#   5. `python -m benchmarks --preset gpu --out $OUT/bench` with a run deadline and a per-implementation timeout
# Afterwards, here: copy $OUT/bench/results.json to benchmarks/results/gpu-<card>.json and $OUT/configs/<card>.json
# to kernels/configs/ (the launchers read it there), and regenerate with
#   python -m benchmarks report benchmarks/results/*.json benchmarks/results/generation/cpu.json --out BENCHMARKS.md \
#       --readme README.md
# Device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=560).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T_TESTS=${GPU_CHECK_TEST_SECONDS:-100}
T_EXT=${GPU_CHECK_EXT_SECONDS:-80}
T_SWEEP=${GPU_CHECK_SWEEP_SECONDS:-80}
T_BENCH=${GPU_CHECK_BENCH_SECONDS:-210}
start=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - start )) s] $*"; }
status=0

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | head -2
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, '|', torch.cuda.get_device_name(0))"

stage "install carried wheels (.whl/) and fastalign"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
    || echo "WARNING: installing the carried wheels failed; peers will be reported as missing"
  ls .whl
else
  echo "no .whl/ carried: TRL, Liger-Kernel and CCE will be reported as missing (run benchmarks/fetch_wheels.sh)"
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3 \
  || python3 -m pip install -q --no-deps --no-build-isolation . 2>&1 | tail -3
python3 -c "import fastalign, fastalign.kernels, fastalign.benchmarks; print('fastalign', fastalign.__version__, 'from', fastalign.__file__)" \
  || { echo "FATAL: fastalign does not import"; exit 1; }

stage "CUDA extension (python -m fastalign.ext build; cap ${T_EXT} s)"
if python3 -c "import fastalign.ext" 2>/dev/null; then
  timeout -k 5 "$T_EXT" python3 -m fastalign.ext build 2>&1 | tail -5 || echo "extension build failed or timed out (the benchmarks report it)"
else
  echo "fastalign.ext is not in this checkout: skipping the build (the benchmarks report the extension as missing)"
fi

stage "GPU tests (pytest -m gpu tests/, then tests/ops compiled for this card; cap ${T_TESTS} s)"
timeout -k 5 $(( T_TESTS / 2 )) python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
rc=${PIPESTATUS[0]}; [[ $rc -ne 0 && $rc -ne 5 ]] && { echo "GPU-marked tests: exit $rc"; status=1; }
timeout -k 5 $(( T_TESTS / 2 )) python3 -m pytest -q -x -m "not gpu and not slow and not compile" -p no:cacheprovider tests/ops 2>&1 \
  | tee -a "$OUT/pytest_gpu.log" | tail -15
rc=${PIPESTATUS[0]}; [[ $rc -ne 0 && $rc -ne 5 ]] && { echo "op/kernel tests on the GPU: exit $rc"; status=1; }

stage "launch-config sweep (benchmarks.config_sweep; deadline $(( T_SWEEP - 25 )) s, hard cap ${T_SWEEP} s)"
timeout -k 5 "$T_SWEEP" python3 -m benchmarks.config_sweep --out-dir "$OUT/configs" --deadline $(( T_SWEEP - 25 )) 2>&1 \
  | tee "$OUT/config_sweep.log" | tail -30
rc=${PIPESTATUS[0]}; [[ $rc -ne 0 ]] && { echo "config sweep: exit $rc (124 = hard time cap); defaults stay"; status=1; }
table=$(ls "$OUT"/configs/*.json 2>/dev/null | head -1)
if [[ -n "$table" ]]; then export FASTALIGN_KERNEL_CONFIGS="$table"; echo "benchmarks use $table"; fi

stage "benchmarks --preset gpu (deadline $(( T_BENCH - 30 )) s, hard cap ${T_BENCH} s)"
timeout -k 10 "$T_BENCH" python3 -m benchmarks --preset gpu --out "$OUT/bench" --no-build-ext \
  --deadline $(( T_BENCH - 30 )) --impl-timeout 60 2>&1 | tee "$OUT/bench.log" | grep -v "^  " | tail -40
rc=${PIPESTATUS[0]}
if [[ $rc -ne 0 ]]; then echo "benchmark run: exit $rc (124 = hard time cap)"; status=1; fi
if [[ -f "$OUT/bench/results.json" ]]; then
  python3 -m benchmarks report "$OUT/bench/results.json" --out "$OUT/bench/BENCHMARKS.gpu.md" \
    --plots-dir "$OUT/bench" | tail -25
fi

stage "done in $(( $(date +%s) - start )) s (exit $status); files under $OUT"
ls -la "$OUT" "$OUT/bench" 2>/dev/null | grep -v "^total"
exit $status
