#!/usr/bin/env bash
# The study at the paper's scale on a lent GPU machine: grid paper224 (ResNet-18 from scratch at 224 px, SSOD and
# its CE twin, validation sets), then seed 0 entered as a `select` candidate and the study's fixed rule applied
# (`--grid auto`: test sets are scored only if the rule chooses it), all inside one call's time:
#
#     bash benchmarks/gpu_session.sh OUTDIR [SECONDS]
#
# SECONDS (default 540) is this script's own deadline: every step is stopped at it, and OUTDIR/results.tgz (the
# study's JSON files, each run's log.jsonl with its images per second, every step's log) is packed after each step
# and on any exit, so whatever finished comes back; checkpoints do not (too large), so an unfinished seed is lost.
# Each SSOD run and its CE twin train side by side (`study.py --train ssod|ce`), seed 0 first, then seeds 1 and 2
# together while seed 0 is evaluated. Sixth session (one H100): three seeds in parallel, 4 loader workers each, ran
# at 560-770 img/s per process and a 330 s limit stopped all of them (benchmarks/results/gpu_h100/README.md).
#
# On the device machine the command carries .whl (timm 1.0.31) and .devdata (Fashion-MNIST's t10k files, for the
# validation set of real images); see benchmarks/results/gpu_h100/README.md for the exact call.
set -u
[ $# -ge 1 ] || { echo 'usage: gpu_session.sh OUTDIR [SECONDS]' >&2; exit 2; }
out=$(realpath -m "$1")
limit=${2:-540}
logs=/tmp/gpu_session_logs
mkdir -p "$out" "$logs"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 SSOD_STUDY_CACHE=${SSOD_STUDY_CACHE:-/tmp/ssod_study}
say() { echo "[gpu_session $(date +%T), ${SECONDS}s] $*"; }
left() { echo $(( limit - SECONDS > 1 ? limit - SECONDS : 1 )); }
pack() {
  tar czf "$out/results.tgz" benchmarks/results/study "$logs" \
    "$SSOD_STUDY_CACHE"/runs/*/log.jsonl "$SSOD_STUDY_CACHE"/runs/*/wall.json 2>/dev/null
  say "packed $out/results.tgz (tar exit $?: 2 when some training log does not exist yet)"
}
trap pack EXIT
study() { timeout "$(left)" python3 benchmarks/study.py "$@"; }
train_pair() {  # the SSOD run of seed $1 and its CE twin, side by side, in the background
  for side in ssod ce; do
    study --grid paper224 --seeds "$1" --train "$side" > "$logs/train_s$1_$side.log" 2>&1 &
  done
}
evaluate() {
  say "evaluate seed $1 on the validation sets"
  study --grid paper224 --seeds "$1" 2>&1 | tee "$logs/eval_s$1.log" | grep --line-buffered '^\[study\]'
  pack
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/env.txt"
python3 -c 'import torch, torchvision, timm, ssod_zoo; print("torch", torch.__version__, "torchvision",
torchvision.__version__, "timm", timm.__version__, torch.cuda.get_device_name())' | tee -a "$out/env.txt"

say 'benchmark data'
python3 -c 'import sys; sys.path.insert(0, "benchmarks"); import study; study.benchmarks()'
say 'seed 0: SSOD and its CE twin side by side'
train_pair 0
wait
tail -n 2 "$logs"/train_s0_*.log
say 'seeds 1 and 2 side by side, while seed 0 is evaluated'
train_pair 1
train_pair 2
evaluate 0
wait
tail -n 2 "$logs"/train_s[12]_*.log
evaluate 1
evaluate 2
say 'seed 0 as a select candidate; the fixed rule'
study --grid select --configs r18-224-scratch 2>&1 | tee "$logs/select.log" | grep --line-buffered '^\[study\]'
study --grid auto 2>&1 | tee "$logs/auto.log" | grep --line-buffered '^\[study\]'
say done
