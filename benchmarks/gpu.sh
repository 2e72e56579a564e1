#!/usr/bin/env bash
# The GPU checks in one script (issue 24), for a machine with a CUDA GPU and no network: its python3
# has torch (CUDA) and numpy; fedforge runs from this checkout's src/. In under 10 minutes, each
# step under `timeout`, everything into $OUT/gpu.log ($OUT: /tmp when unset):
#   1. nvidia-smi, the versions of Python and torch, the device, and which modules are missing;
#   2. the CUDA tests: tests/engines/test_cuda.py and the tests elsewhere skipped without CUDA
#      (tests/privacy/test_stage.py::test_same_noise_on_every_device, which needs scipy), with pytest
#      when it can be imported (else said, and the tests are not run);
#   3. benchmarks/convnets.py --device cuda (CNN, XDEV, RESNET on the three engines, the matmul rate
#      measured on the GPU; no tutorial loop, no Flower);
#   4. benchmarks/engines.py --only w1 --device cuda.
# Without CUDA it says so and runs steps 3 and 4 on the CPU as a dry run (2 rounds).
#
# The machine has no network: what fedforge needs besides torch and numpy (tqdm, tomli-w), pytest,
# and Fashion-MNIST's files come from .gpu/ (ignored by git), which `--prepare` fills here:
#   bash benchmarks/gpu.sh --prepare    # here: .gpu/data (Fashion-MNIST, 30 MB), .gpu/wheels
#   bash benchmarks/gpu.sh              # there (the device tool: carry [".gpu"]); PYTHON=... to choose
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}

if [ "${1:-}" = "--prepare" ]; then
    set -e
    folder=$("$PY" -c 'from fedforge.data.datasets import DATASETS, locate
print(locate(DATASETS["fashion-mnist"], progress=False))')
    mkdir -p .gpu/data/fashion-mnist .gpu/wheels
    cp "$folder"/*.gz .gpu/data/fashion-mnist/
    # Pure-Python wheels only, so that they install on whatever Python the GPU machine has.
    "$PY" -m pip download -q --only-binary=:all: --no-deps --implementation py --abi none --platform any \
        --python-version 3.10 -d .gpu/wheels \
        pytest pluggy iniconfig packaging pygments exceptiongroup tomli typing-extensions tqdm tomli-w
    du -sh .gpu
    exit
fi

OUT=${OUT:-/tmp}
mkdir -p "$OUT"
START=$SECONDS
LIMIT=580 # seconds for the whole script; a step that would pass it is skipped

step() { # step SECONDS COMMAND...: run it under timeout, unless it would pass LIMIT
    local seconds=$1
    shift
    echo
    echo "== $* (at ${SECONDS}s of ${LIMIT}s; limit ${seconds}s)"
    if ((SECONDS - START + seconds > LIMIT)); then
        echo "== skipped: not enough time left"
        return
    fi
    timeout -k 10 "$seconds" "$@"
    local code=$?
    ((code == 124)) && echo "== timed out after ${seconds}s"
    echo "== exit $code after $((SECONDS - START))s"
}

checks() {
    echo "== $(date -u) on $(uname -n); OUT=$OUT"
    nvidia-smi || echo "(no nvidia-smi)"
    [ -d .gpu/data ] && export FEDFORGE_DATA=$ROOT/.gpu/data
    export FEDFORGE_CACHE=${FEDFORGE_CACHE:-/tmp/fedforge-cache}

    missing=""
    for module in numpy torch tqdm tomli_w pytest scipy; do
        "$PY" -c "import $module" 2>/dev/null || missing="$missing $module"
    done
    echo "modules missing:${missing:- none}"
    wanted=""
    for module in tqdm tomli_w pytest; do
        [[ " $missing " == *" $module "* ]] && wanted="$wanted ${module//_/-}"
    done
    if [ -n "$wanted" ] && [ -d .gpu/wheels ]; then
        echo "installing$wanted from .gpu/wheels into /tmp/gpu-pydeps"
        "$PY" -m pip install -q --no-index --find-links .gpu/wheels --target /tmp/gpu-pydeps $wanted &&
            export PYTHONPATH=$PYTHONPATH:/tmp/gpu-pydeps
    fi
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), torch.get_num_threads(), "threads")'
    "$PY" -c 'import torch; print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")'

    if "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
        DEVICE=cuda ROUNDS=5
    else
        DEVICE=cpu ROUNDS=2
        echo "NO CUDA DEVICE: the CUDA tests skip; the benchmarks run on the CPU as a dry run ($ROUNDS rounds)"
    fi

    if "$PY" -c "import pytest" 2>/dev/null; then
        tests=(tests/engines/test_cuda.py)
        if "$PY" -c "import scipy" 2>/dev/null; then
            tests+=(tests/privacy/test_stage.py::test_same_noise_on_every_device)
        else
            echo "scipy missing: tests/privacy/test_stage.py::test_same_noise_on_every_device not run"
        fi
        step 150 "$PY" -m pytest -q -rs -p no:cacheprovider "${tests[@]}"
    else
        echo "pytest missing (and no .gpu/wheels): the CUDA tests are not run"
    fi

    step 300 nice -n 10 "$PY" benchmarks/convnets.py --device "$DEVICE" --rounds "$ROUNDS"
    step 100 nice -n 10 "$PY" benchmarks/engines.py --only w1 --device "$DEVICE"
    echo
    echo "== done in $((SECONDS - START))s"
}

checks 2>&1 | tee "$OUT/gpu.log"
