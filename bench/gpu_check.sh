#!/usr/bin/env bash
# GPU check: the test suite and the benchmarks on a machine with an NVIDIA GPU.
#
# Expects python3 with torch, torchvision, scipy, scikit-learn, matplotlib and tqdm. hydra-core, omegaconf,
# antlr4-python3-runtime and PyYAML are installed from the wheels in .whl/ when that folder exists (made on a
# machine with network access; see docs/benchmarks.md). Run from the repository root:
#
#     OUT=./gpu_out bash bench/gpu_check.sh
#
# Every step runs even if an earlier one failed; each step's log is teed into $OUT (default ./gpu_out), and
# $OUT/summary.txt lists the exit status of every step. Meant to take well under 6 minutes on an H100.
set -u
set -x
export PYTHONUNBUFFERED=1
export MODECONN_TEST_DEVICE=cuda
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        2>&1 | tee "$OUT/pip.log"
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi

: > "$OUT/summary.txt"
# step NAME SECONDS CMD...: run CMD with a time limit, log to $OUT/NAME.log, record its exit status
step() {
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    set -o pipefail
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=$?
    set +o pipefail
    echo "$name rc=$rc $((SECONDS - started))s" | tee -a "$OUT/summary.txt"
    return 0
}

step env 60 bash -c 'nvidia-smi; python3 -c "import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no cuda device\")"'

step pytest 150 python3 -m pytest -q -x tests

step eval_mlp 60 python3 bench/eval_path.py --device cuda --json "$OUT/eval_mlp.json"

step eval_vgg11 90 python3 bench/eval_path.py --device cuda --model vgg11 --data synthetic --input-shape 3 32 32 \
    --num-classes 10 --width 0.5 --epochs 1 --repeats 2 --json "$OUT/eval_vgg11.json"

if [ -f bench/fit_curve.py ]; then
    step fit_curve 90 python3 bench/fit_curve.py --device cuda --json "$OUT/fit_curve.json"
fi

if [ -f conf/experiment/gpu_check.yaml ]; then
    step experiment 90 python3 -m modeconn.cli experiment=gpu_check device=cuda progress=false \
        "hydra.run.dir=$OUT/experiment_run"
fi

cat "$OUT/summary.txt"
