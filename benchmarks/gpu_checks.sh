#!/usr/bin/env bash
# The GPU checks of one short lease, in one call (each stage under its own time limit, so one
# that overruns still leaves the others' results):
#   1. the paper's largest case (benchmarks/bench_gpu.py, 40,401 x 220 x 220, full batch) in
#      float32 with TF32 matmuls, then in bfloat16; seconds per epoch, peak memory vs the plan;
#   2. PtychoNN on CUDA (benchmarks/bench_ptychonn.py, quick scale, reusing the PtyINR runs of
#      stores made on a CPU): training time, inference frames per second, preview vs PtyINR.
#
# Usage, in the repository root of a GPU machine with python3 + torch (CUDA):
#   WHEELS=.whl NN_WORKDIR=.gpu/nn OUT=results/ bash benchmarks/gpu_checks.sh
# WHEELS: a folder of wheels for packages the machine lacks (installed with --no-deps into
# /tmp/site; ptyinr's own wheel among them). NN_WORKDIR: a bench_ptychonn --workdir whose
# stores hold complete `ptyinr` runs (the models are trained again here).
# SMOKE=1 runs every stage at toy sizes on the CPU (to check this script anywhere).
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  # hdf5plugin (46 MB) only decodes compressed detector files, which no stage reads
  python3 -c "import hdf5plugin" 2>/dev/null || : > /tmp/site/hdf5plugin.py
fi
if [ "${SMOKE:-0}" = 1 ]; then
  device=cpu; case_args=(--side 7 --frame 32 --step 3 --device cpu --epochs 3)
  nn_args=(--nn-epochs 2)
else
  device=cuda; case_args=()
  nn_args=(--nn-epochs 80)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
python3 - <<'EOF'
import torch, numpy, ptyinr
print("torch", torch.__version__, "numpy", numpy.__version__, "ptyinr", ptyinr.__version__)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory / 2**30, "GiB")
EOF

stage() {  # stage NAME SECONDS COMMAND...: run with a limit, keep its log, say how it ended
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit} s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "=== $name: rc $rc after $((SECONDS - t0)) s"
}

# PAPER_SET: one config override for both (e.g. performance.frame_chunk=8192)
[ -n "${PAPER_SET:-}" ] && case_args+=(--set "$PAPER_SET")
stage paper-tf32 "${LIMIT_TF32:-270}" python3 benchmarks/bench_gpu.py "${case_args[@]}" \
  --tf32 --time-limit "${TRAIN_TF32:-100}" --out "$OUT"
stage paper-bf16 "${LIMIT_BF16:-150}" python3 benchmarks/bench_gpu.py "${case_args[@]}" \
  --precision bf16 --time-limit "${TRAIN_BF16:-40}" --out "$OUT"
if [ -n "${NN_WORKDIR:-}" ]; then
  stage ptychonn "${LIMIT_NN:-130}" python3 benchmarks/bench_ptychonn.py --workdir "$NN_WORKDIR" \
    --reuse --fraction-b 0.25 --timing-check --quiet --device "$device" "${nn_args[@]}" \
    --out "$OUT/ptychonn-quick-$device.json"
fi
