#!/usr/bin/env bash
# GPU check: every benchmark, the gpu_check preset and the test suite on a machine with an NVIDIA GPU, and
# at the end the numbers docs/benchmarks.md records.
#
# Expects python3 with torch, torchvision, scipy, scikit-learn, matplotlib, pandas, pyyaml, pytest and tqdm.
# hydra-core, omegaconf, antlr4-python3-runtime and mlxtend are installed from the wheels in .whl/ when that
# folder exists (made on a machine with a package index; see docs/benchmarks.md). From the repository root:
#
#     OUT=./gpu_out bash bench/gpu_check.sh
#
# Every step runs, each under its own time limit, even if an earlier one failed. Everything printed (the
# `set -x` trace included) is teed into $OUT/gpu_check.log (default OUT=./gpu_out); $OUT/summary.txt lists
# the exit status and seconds of every step (rc=124: the step hit its limit); $OUT/benchmarks.json holds
# every benchmark's results; the preset's report is copied as experiment_report.md: 4 files, within what
# the device tool brings back (8). The limits add up to 560 s; about 5 minutes are expected on an H100/H200.
# With the device tool:
#     run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=590)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
JSON=$(mktemp -d /tmp/modeconn_gpu_json.XXXX)
exec > >(tee "$OUT/gpu_check.log") 2>&1
set -x

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi

: > "$OUT/summary.txt"
# step NAME SECONDS CMD...: run CMD with a time limit and record its exit status and seconds; never stops the script
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
eval_path() {  # eval_path NAME SECONDS ARGS...: bench/eval_path.py on the GPU, results to $JSON/eval_NAME.json
    local name=$1 limit=$2
    shift 2
    step "eval_$name" "$limit" python3 bench/eval_path.py --device cuda --same-process --json "$JSON/eval_$name.json" "$@"
}
CIFAR=(--data synthetic --input-shape 3 32 32 --num-classes 10 --num-train 4096 --num-test 1024 --points 21 --epochs 1 --repeats 2)

step env 30 bash -c 'nvidia-smi; python3 -c "import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no cuda device\")"'

# evaluation: batched vs one at a time vs the load_state_dict loop (the loop indexes a TensorDataset item by
# item, a few CUDA operations per item: the CIFAR-shaped splits are kept at 4096 + 1024)
eval_path mlp 35
eval_path mlp_bn 35 --model mlp_bn
eval_path vgg16_bn 50 --model vgg16_bn --width 1 "${CIFAR[@]}"
eval_path preresnet20 40 --model preresnet20 "${CIFAR[@]}"
eval_path vgg11_bn 40 --model vgg11_bn --width 1 "${CIFAR[@]}"

# AutoNEB: seconds per iteration, every interior pivot vmapped (conv nets too on a GPU) vs one at a time,
# and where the time goes (issue 24's GPU numbers)
step autoneb 20 python3 bench/autoneb.py --device cuda --rounds 2 --iterations 3 --parts

# curve training: a curve epoch against a plain epoch of the same model, data and batch size
step fit_curve 50 python3 bench/fit_curve.py --device cuda --json "$JSON/fit_curve.json"

# the gpu_check preset end to end (VGG-11-BN at 1/4 width, CIFAR-shaped synthetic data): its wall time
if [ -f conf/experiment/gpu_check.yaml ]; then
    run_dir=/tmp/modeconn_gpu_check_run
    rm -rf "$run_dir"
    step experiment 60 python3 -m modeconn.run.cli experiment=gpu_check device=cuda progress=false "hydra.run.dir=$run_dir"
    cp "$run_dir/report.md" "$OUT/experiment_report.md"
    cp "$run_dir/summary.json" "$JSON/experiment_summary.json"
fi

# tests: the tensor tests on the GPU (the fast tier), then the ones that only make sense there
step pytest_cuda_device 120 env MODECONN_TEST_DEVICE=cuda python3 -m pytest -q -x -m "not slow" --durations=15 tests
step pytest_cuda_only 30 python3 -m pytest -q -m cuda -rs tests

# the other benchmarks, as they are
[ -f bench/align.py ] && step align 25 python3 bench/align.py --device cuda --json "$JSON/align.json"
[ -f bench/units.py ] && step units 25 python3 bench/units.py --repeats 1

set +x
python3 - "$JSON" "$OUT" <<'EOF'
"""Merge the benchmarks' JSON into benchmarks.json and print the numbers docs/benchmarks.md records."""
import json
import sys
from pathlib import Path

src, out = Path(sys.argv[1]), Path(sys.argv[2])
results = {p.stem: json.loads(p.read_text()) for p in sorted(src.glob("*.json"))}
steps = dict(line.split(" ", 1) for line in (out / "summary.txt").read_text().splitlines() if " " in line)
results["steps"] = steps
(out / "benchmarks.json").write_text(json.dumps(results, indent=2) + "\n")
print("===== numbers for docs/benchmarks.md")
for name, r in results.items():
    if not name.startswith("eval_"):
        continue
    m = r["methods"]
    print(f"{r['model']:12s} {r['parameters']:>10,d} params, {r['points']} points, {r['train_items']}+{r['test_items']} items: "
          f"loop {m['loop']['median_s']:.3f} s, one at a time {m['one_at_a_time']['median_s']:.3f} s, "
          f"batched {m['batched']['median_s']:.3f} s; batched/loop {m['batched']['speedup_vs_loop']:.1f}x, "
          f"batched/one-at-a-time {m['one_at_a_time']['median_s'] / m['batched']['median_s']:.1f}x, "
          f"equal to the reference (1e-5): {r.get('equal_to_reference')}")
fit = results.get("fit_curve")
if fit and "ratio" in fit:
    print(f"curve epoch / plain epoch: {fit['ratio']:.3f}x ({fit.get('plain_epoch_s', float('nan')):.4f} s plain)")
print("gpu_check preset:", steps.get("experiment", "not run"))
for name in ("pytest_cuda_device", "pytest_cuda_only"):
    print(f"{name}: {steps.get(name, 'not run')}")
EOF
echo "===== summary"
cat "$OUT/summary.txt"
rm -rf "$JSON"
