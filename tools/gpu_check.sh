#!/usr/bin/env bash
# The loss's GPU check in one command, for a machine with one H100/H200, Python 3.12, torch and
# triton, and no package index: install the wheels carried in .gpu-wheels/ (tools/gpu_wheels.sh
# downloads them elsewhere), run the GPU tests of the loss, the loss benchmark (V = 151,936, 8,192
# positions, bf16, every preset against megatron-core's and torch's cross-entropy) and the
# training benchmark (a ~100M dense model, sequence 2,048, every preset against megatron-core's
# CE), the fused output-layer loss (8,192 positions, h = 1,024, bf16, against the output layer +
# the loss and megatron-core's CE, and the tiny recipe's tokens/s fused vs unfused), and print one
# table, also written to $OUT/gpu_check.md when OUT is set. Each step has its own time limit
# (install 60 s, tests 200 s, loss 100 s, training 150 s, output 90 s); they take less.
#
#   bash tools/gpu_check.sh               # on the GPU machine
#   bash tools/gpu_check.sh --cpu-smoke   # the same steps at tiny sizes on CPU (no install)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SMOKE=0
if [[ "${1:-}" == "--cpu-smoke" ]]; then
    SMOKE=1
fi
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ $SMOKE == 1 && -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi
WORK="${OUT:-$(mktemp -d)}"
mkdir -p "$WORK"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # compiled kernels; the interpreter is for the CPU tests
failed=()

step() {  # step NAME SECONDS CMD...: run with a time limit, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    if [[ $rc != 0 ]]; then
        failed+=("$name (exit $rc)")
    fi
    return $rc
}

"$PY" - <<'PY'
import platform, torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "missing"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"python {platform.python_version()}, torch {torch.__version__}, triton {tv}, {gpu}")
PY

if [[ $SMOKE == 0 ]]; then
    if [[ -d .gpu-wheels ]]; then
        # --no-deps: only what is missing of exactly these, whatever torch's own metadata says
        need="megatron-core numpy packaging pytest pluggy iniconfig pygments setuptools"
        pip_args=(--disable-pip-version-check --quiet --no-index --no-deps --find-links .gpu-wheels)
        step install 60 "$PY" -m pip install "${pip_args[@]}" $need \
            || step install-system 60 "$PY" -m pip install "${pip_args[@]}" \
                --break-system-packages $need
    else
        echo "no .gpu-wheels/ here (tools/gpu_wheels.sh makes it): using what is installed"
    fi
    if ! "$PY" -c "import megatron.core, numpy, pytest, triton" 2>/dev/null; then
        echo "missing packages: megatron-core, numpy, pytest and triton are needed"
        exit 1
    fi
    DEVICE=()
    SIZE=()
    TRAIN=()
else
    DEVICE=(--device cpu)
    SIZE=(--small)
    TRAIN=(--small)
fi

step tests 200 "$PY" -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_loss_triton.py tests/test_loss_functional.py >"$WORK/tests.txt" 2>&1
tail -n 40 "$WORK/tests.txt"
SWEEP=()
if [[ $SMOKE == 0 ]]; then
    SWEEP=(--sweep)
fi
step loss 100 "$PY" tools/bench_gpu.py loss "${DEVICE[@]}" "${SIZE[@]}" "${SWEEP[@]}" \
    --json "$WORK/loss.json"
step train 150 "$PY" tools/bench_gpu.py train "${DEVICE[@]}" "${TRAIN[@]}" \
    --json "$WORK/train.json"
OUTPUT_SIZE=(--repeats 5)
if [[ $SMOKE == 1 ]]; then
    OUTPUT_SIZE=(--tokens 64 --vocab 4096 --hidden 32 --repeats 1 --no-memory --train-steps 2)
fi
step output 90 "$PY" tools/bench_output_loss.py "${DEVICE[@]}" "${OUTPUT_SIZE[@]}" --train \
    --json "$WORK/output.json"

echo
echo "================================ GPU check ================================"
"$PY" tools/bench_gpu.py report "$WORK/tests.txt" "$WORK/loss.json" "$WORK/train.json" \
    "$WORK/output.json" --out "$WORK/gpu_check.md"
if [[ ${#failed[@]} != 0 ]]; then
    echo "failed steps: ${failed[*]}"
    exit 1
fi
echo "table: $WORK/gpu_check.md"
