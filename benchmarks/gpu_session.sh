#!/usr/bin/env bash
# The study at the paper's scale on a lent GPU machine (ResNet-18 from scratch at 224 px, SSOD and its CE twin),
# seeds 0-2, inside one call's time:
#
#     bash benchmarks/gpu_session.sh OUTDIR test [SECONDS]      # the configuration in choice.json, TEST sets
#     bash benchmarks/gpu_session.sh OUTDIR paper224 [SECONDS]  # grid paper224, validation sets (eighth session)
#
# Each SSOD run and its CE twin train side by side (`study.py --train ssod|ce`): seed 0 first, then seeds 1 and 2
# together while seed 0 is evaluated, then seeds 1 and 2 are evaluated side by side. SECONDS (default 545) is the
# script's own deadline: every step is stopped at it, and OUTDIR/results.tgz (the study's JSON files, each run's
# log.jsonl with its images per second, every step's log) is packed after seed 0's evaluation and on any exit, so
# whatever finished comes back. Checkpoints do not (too large). Run it again in a second call while the machine is
# warm and it goes on where it stopped: the cache keeps the checkpoints, and the records, which the fresh copy of
# the repository lacks, are kept beside them and put back.
#
# Eighth session (one H200, paper224): seed 0's pair trained in 124 s side by side (median 1187 and 1202 img/s),
# seeds 1 and 2 in 270-274 s four at a time (median 532-544 img/s), loader-bound on 16 cores; an evaluation on the
# validation sets took 42-44 s alone with 2 loader workers (now up to 8) and 244 s beside the four trainings
# (benchmarks/results/gpu_h200/README.md). The test sets are larger (4000 images against 2500). Sixteenth session
# (one H200, test): all of it in one call of 532 s; seed 0 was scored in 239 s beside the four trainings, seeds 1
# and 2 in 76 s each side by side.
#
# The device call carries .whl (timm 1.0.31) and .devdata (Fashion-MNIST's t10k files, for the validation set of
# real images); the exact call is in benchmarks/results/gpu_h200/README.md.
set -u
[ $# -ge 2 ] || { echo 'usage: gpu_session.sh OUTDIR test|paper224 [SECONDS]' >&2; exit 2; }
out=$(realpath -m "$1")
cd "$(dirname "$0")/.."
case $2 in
  test) grid=(--grid test --config "$(python3 -c 'import json; print(json.load(open(
        "benchmarks/results/study/choice.json"))["config"])')") ;;
  paper224) grid=(--grid paper224) ;;
  *) echo "unknown grid $2: test or paper224" >&2; exit 2 ;;
esac
limit=${3:-545}
logs=/tmp/gpu_session_logs
mkdir -p "$out" "$logs"
export PYTHONUNBUFFERED=1 SSOD_STUDY_CACHE=${SSOD_STUDY_CACHE:-/tmp/ssod_study}
records=benchmarks/results/study/$2
kept=$SSOD_STUDY_CACHE/records/$2
mkdir -p "$records" "$kept"
cp -n "$kept"/*.json "$records"/ 2>/dev/null  # a second call on the same machine: what the first one scored
say() { echo "[gpu_session $(date +%T), ${SECONDS}s] $*"; }
left() { echo $(( limit - SECONDS > 1 ? limit - SECONDS : 1 )); }
pack() {
  tar czf "$out/results.tgz" benchmarks/results/study "$logs" \
    "$SSOD_STUDY_CACHE"/runs/*/log.jsonl "$SSOD_STUDY_CACHE"/runs/*/wall.json 2>/dev/null
  say "packed $out/results.tgz (tar exit $?: 2 when some training log does not exist yet)"
}
trap pack EXIT
study() { timeout "$(left)" python3 benchmarks/study.py "${grid[@]}" "$@"; }
train_pair() {  # the SSOD run of seed $1 and its CE twin, side by side, in the background
  for side in ssod ce; do
    study --seeds "$1" --train "$side" > "$logs/train_s$1_$side.log" 2>&1 &
  done
}
evaluate() {
  say "evaluate seed $1: ${grid[*]}"
  study --seeds "$1" 2>&1 | tee "$logs/eval_s$1.log" | grep --line-buffered '^\[study\]'
  cp "$records"/*.json "$kept"/ 2>/dev/null
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/env.txt"
python3 -c 'import torch, torchvision, timm, ssod_zoo; print("torch", torch.__version__, "torchvision",
torchvision.__version__, "timm", timm.__version__, torch.cuda.get_device_name())' | tee -a "$out/env.txt"
say "${grid[*]}"

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
pack
wait
tail -n 2 "$logs"/train_s[12]_*.log
evaluate 1 &
evaluate 2 &
wait
python3 benchmarks/study.py --summarise  # the two evaluations side by side each wrote it
say done  # the exit packs
