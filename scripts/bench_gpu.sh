#!/usr/bin/env bash
# Issue #7's benchmarks in one call: the JAX steps (bench_train.py), exact MM-SHAP (bench_mmshap.py)
# and the same-settings PyTorch baselines (bench_torch.py), merged by bench_report.py into one JSON
# with JAX/PyTorch ratios, MFU and the issue's goals, plus a markdown summary on stdout; and the
# train steps fed by the real grain input pipeline next to the steps alone (bench_train_input.py,
# OUTDIR/train_input.json: what fraction of a step the device waits for input).
#
#   scripts/bench_gpu.sh OUTDIR            # full size, bf16 compute, every GPU of the host
#   scripts/bench_gpu.sh --small OUTDIR    # tiny models: a smoke test of the scripts, e.g. on a CPU
#
# Writes OUTDIR/{train,mmshap,torch,train_input,report}.json, one .log per step and, where
# nvidia-smi exists, OUTDIR/nvidia_smi.csv (GPU name, driver, memory). BENCH_PARTS="train input
# mmshap torch" (the default)
# selects steps, so a run can be split over several calls into the same OUTDIR; the report merges
# whatever is there. A failing step is logged and the others still run; the exit status is then 1.
# Set PYTHON to choose the interpreter.
set -uo pipefail

small=()
if [[ "${1:-}" == "--small" ]]; then
  small=(--small)
  shift
fi
if [[ $# -ne 1 ]]; then
  echo "usage: $0 [--small] OUTDIR" >&2
  exit 2
fi
out=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "$0: cannot create $1" >&2; exit 2; }
cd "$(dirname "$0")/.."  # The repository root: the scripts import jmmshap from here.
python=${PYTHON:-python}
parts=${BENCH_PARTS:-train input mmshap torch}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for part in $parts; do
  case $part in
    train | input | mmshap | torch) ;;
    *) echo "$0: unknown BENCH_PARTS entry '$part' (use train, input, mmshap, torch)" >&2; exit 2 ;;
  esac
done

if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    > "$out/nvidia_smi.csv" 2>&1 || true
  # JAX's GPU performance tips: lets XLA overlap the gradient all-reduce of a multi-GPU data-parallel
  # step with compute (no effect on one GPU).
  if [[ "${XLA_FLAGS:-}" != *xla_gpu_enable_latency_hiding_scheduler* ]]; then
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
  fi
elif [[ ${#small[@]} -gt 0 && -z "${XLA_FLAGS:-}" ]]; then
  # The CPU smoke run: two host devices, so the batch is sharded as on a multi-GPU host, and XLA's
  # cheap CPU pipeline (the programs must run, not run fast).
  export XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_llvm_disable_expensive_passes=true"
fi
echo "XLA_FLAGS=${XLA_FLAGS:-}"

status=0
step() {  # step NAME COMMAND...: runs one benchmark, its output to the terminal and NAME.log.
  local name=$1
  shift
  echo "=== $name: $*"
  local start=$SECONDS
  rm -f "$out/$name.json"  # Never merge a stale result of an earlier run.
  "$@" 2>&1 | tee "$out/$name.log"
  local code=${PIPESTATUS[0]}
  echo "=== $name: exit $code after $((SECONDS - start)) s"
  [[ $code -eq 0 ]] || status=1
}

for part in $parts; do
  case $part in
    train) step train "$python" scripts/bench_train.py "${small[@]}" --dtype=bfloat16 \
             --out="$out/train.json" ;;
    input) step train_input "$python" scripts/bench_train_input.py "${small[@]}" \
             --dtype=bfloat16 --out="$out/train_input.json" ;;
    mmshap) step mmshap "$python" scripts/bench_mmshap.py "${small[@]}" --dtype=bfloat16 \
              --output="$out/mmshap.json" ;;
    torch) step torch "$python" scripts/bench_torch.py "${small[@]}" --dtype=bfloat16 \
             --out="$out/torch.json" ;;
  esac
done

"$python" scripts/bench_report.py --train="$out/train.json" --mmshap="$out/mmshap.json" \
  --torch="$out/torch.json" --nvidia_smi="$out/nvidia_smi.csv" --out="$out/report.json" \
  | tee "$out/report.md" || status=1
exit $status
