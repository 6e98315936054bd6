#!/usr/bin/env bash
# One lease of a GPU machine (the device tool; see docs/gpu.md): builds
# cbfused for that GPU against the torch installed there, runs every CUDA test, the CUDA
# kernels under compute-sanitizer, and the CUDA benchmark. Logs and CSVs go to $OUT.
#   STAGES="build test sanitize bench" bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
STAGES=${STAGES:-"build test sanitize bench"}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build
t0=$(date +%s)
stamp() { echo "[$(($(date +%s) - t0)) s] $*"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

if [ -d .whl ]; then  # peers / example data that the image lacks (pure-Python wheels)
  $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl &&
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
echo "CXX=${CXX:-unset}: $(${CXX:-c++} --version | head -1); g++: $(g++ --version | head -1); nvcc: $(nvcc --version | tail -1)" | tee -a "$OUT/gpu.txt"

if has build; then
  stamp build
  # The image's CXX (/opt/gcc/bin/g++, a wrapper of GCC 13.3) built a module whose error
  # messages crashed (SIGSEGV formatting an integer in c10::str); the system g++ 13.3 did not.
  export CXX=${CBFUSED_CXX:-g++}
  file -L /opt/gcc/bin/g++ >>"$OUT/gpu.txt" 2>&1; head -c 600 /opt/gcc/bin/g++ 2>/dev/null | strings | head -20 >>"$OUT/gpu.txt"
  # CUDA for the visible GPU only (setup.py's default there), the CPU kernels for this CPU's ISA
  export MAX_JOBS=${MAX_JOBS:-16} CBFUSED_CPU_CAPABILITIES=${CBFUSED_CPU_CAPABILITIES:-native}
  if ! FORCE_CUDA=1 $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    grep -E "error|Error" "$OUT/build.log" | head -40
    stamp "build FAILED"
    exit 1
  fi
  $PY -c "import cbfused; print(cbfused.BUILD_INFO)"
fi
if has diag; then  # a C++ backtrace of DIAG_CODE (python) under cuda-gdb
  stamp diag
  timeout 120 cuda-gdb -q -batch -ex "set pagination off" -ex run -ex bt \
    --args $PY -X faulthandler -c "${DIAG_CODE:-import cbfused}" >"$OUT/diag.log" 2>&1
  grep -E "^#|signal|Error|error" "$OUT/diag.log" | head -40
fi
if has test; then
  stamp "tests on cuda"
  # every test parametrised on the 'cuda' device, test_cuda.py and the build checks
  timeout ${TEST_TIMEOUT:-300} $PY -m pytest -q -p no:cacheprovider -n ${TEST_WORKERS:-8} \
    -k "${TEST_K:-cuda and not emulated}" -rs tests ${PYTEST_ARGS:-} >"$OUT/pytest.log" 2>&1
  echo "pytest rc=$?"
  grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30
fi
if has sanitize; then
  CS=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck}; do
    stamp "compute-sanitizer $tool"
    timeout ${SANITIZE_TIMEOUT:-150} "$CS" --tool "$tool" --error-exitcode 3 $PY benchmarks/gpu_sanitize.py \
      >"$OUT/sanitize-$tool.log" 2>&1
    echo "$tool rc=$?"
    tail -4 "$OUT/sanitize-$tool.log"
  done
fi
if has kernels; then
  stamp "kernel benchmark"
  timeout ${KERNELS_TIMEOUT:-300} $PY benchmarks/gpu_kernels.py --out "$OUT" >"$OUT/kernels.log" 2>&1
  echo "kernels rc=$?"
  tail -45 "$OUT/kernels.log"
fi
if has profile; then
  stamp "kernel profile"
  timeout ${PROFILE_TIMEOUT:-200} $PY benchmarks/gpu_profile.py >"$OUT/profile.log" 2>&1
  echo "profile rc=$?"
  cat "$OUT/profile.log" | tail -30
fi
if has bench; then
  stamp bench
  timeout ${BENCH_TIMEOUT:-400} $PY benchmarks/bench.py --device cuda --out "$OUT" --no-plot ${BENCH_ARGS:-} \
    >"$OUT/bench.log" 2>&1
  echo "bench rc=$?"
  sed -n '/^| kernel/,$p' "$OUT/bench.log" | head -60
fi
stamp done
