#!/usr/bin/env bash
# GPU check: the test suite and the benchmarks on a machine with an NVIDIA GPU.
#
# Expects python3 with torch, torchvision, scipy, scikit-learn, matplotlib and tqdm. hydra-core, omegaconf,
# antlr4-python3-runtime and PyYAML are installed from the wheels in .whl/ when that folder exists (made on a
# machine with network access; see docs/benchmarks.md). Run from anywhere in the repository:
#
#     OUT=./gpu_out bash bench/gpu_check.sh
#
# Every step runs even if an earlier one failed. Everything printed (the `set -x` trace included) is teed
# into $OUT/gpu_check.log (default OUT=./gpu_out); $OUT/summary.txt lists the exit status and seconds of every
# step (rc=124: the step hit its time limit); the benchmarks write eval_mlp.json, eval_vgg11.json and
# fit_curve.json, and the preset's report.md and summary.json are copied as experiment_report.md and
# experiment_summary.json: at most 8 files, which is what the device tool brings back.
# About 4 minutes on an H100 expected, about 7 at most with every step at its limit. With the device tool:
#     run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=480)
set -u
export PYTHONUNBUFFERED=1
export MODECONN_TEST_DEVICE=cuda
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
exec > >(tee "$OUT/gpu_check.log") 2>&1
set -x

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi

: > "$OUT/summary.txt"
# step NAME SECONDS CMD...: run CMD with a time limit and record its exit status; never stops the script
step() {
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    echo "===== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "$name rc=$rc $((SECONDS - started))s" >> "$OUT/summary.txt"
    return 0
}

step env 60 bash -c 'nvidia-smi; python3 -c "import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no cuda device\")"'

step pytest 180 python3 -m pytest -q -x --durations=15 tests

step eval_mlp 45 python3 bench/eval_path.py --device cuda --json "$OUT/eval_mlp.json"

# the loop baseline indexes a TensorDataset item by item (a few CUDA ops per item): keep this split small
step eval_vgg11 75 python3 bench/eval_path.py --device cuda --model vgg11 --data synthetic --input-shape 3 32 32 \
    --num-classes 10 --num-train 4096 --num-test 1024 --width 0.5 --epochs 1 --repeats 2 --json "$OUT/eval_vgg11.json"

if [ -f bench/fit_curve.py ]; then
    step fit_curve 60 python3 bench/fit_curve.py --device cuda --json "$OUT/fit_curve.json"
fi

if [ -f conf/experiment/gpu_check.yaml ]; then
    run_dir=/tmp/modeconn_gpu_check_run
    rm -rf "$run_dir"
    step experiment 60 python3 -m modeconn.cli experiment=gpu_check device=cuda progress=false "hydra.run.dir=$run_dir"
    cp "$run_dir/report.md" "$OUT/experiment_report.md"
    cp "$run_dir/summary.json" "$OUT/experiment_summary.json"
fi

set +x
echo "===== summary"
cat "$OUT/summary.txt"
