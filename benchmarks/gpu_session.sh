#!/usr/bin/env bash
# The study at the paper's scale on a lent GPU machine: grid paper224 (ResNet-18 from scratch at 224 px, SSOD and
# its CE twin, validation sets) for the seeds given, one after another; with seed 0, then seed 0 entered as a
# `select` candidate and the study's fixed rule applied (`--grid auto`: test sets are scored only if the rule
# chooses it).
#
#     SSOD_STUDY_CACHE=/tmp/study bash benchmarks/gpu_session.sh OUTDIR SEED [SEED ...]
#
# One seed per call where a call is limited to 10 minutes: a seed's pair took about 8 minutes in the sixth session,
# and the results come back without checkpoints, so a seed that does not finish is lost with the machine.
# OUTDIR/results.tgz holds the study's JSON files and training logs, written on any exit, so whatever finished
# comes back. Sixth session (one H100): three seeds in parallel with 4 loader workers each ran at 560-770 img/s
# per process, about 8 minutes per seed's pair, and the 330 s limit stopped all three
# (benchmarks/results/gpu_h100/README.md). The candidate now asks for 12 workers and the seeds run one at a time;
# that speed is not measured yet.
set -u
[ $# -ge 2 ] || { echo 'usage: gpu_session.sh OUTDIR SEED [SEED ...]' >&2; exit 2; }
out=$(realpath -m "$1")
shift
seeds=("$@")
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 SSOD_STUDY_CACHE=${SSOD_STUDY_CACHE:-/tmp/ssod_study}
say() { echo "[gpu_session $(date +%T)] $*"; }
pack() {
  tar czf "$out/results.tgz" benchmarks/results/study \
    "$SSOD_STUDY_CACHE"/runs/*/log.jsonl "$SSOD_STUDY_CACHE"/runs/*/wall.json 2>/dev/null
  say "packed $out/results.tgz (tar exit $?: 2 when some training log does not exist yet)"
}
trap pack EXIT

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/env.txt"
python3 -c 'import torch, torchvision, timm, ssod_zoo; print("torch", torch.__version__, "torchvision",
torchvision.__version__, "timm", timm.__version__, torch.cuda.get_device_name())' | tee -a "$out/env.txt"

say 'benchmark data'
python3 -c 'import sys; sys.path.insert(0, "benchmarks"); import study; study.benchmarks()'
for s in "${seeds[@]}"; do
  say "grid paper224, seed $s"
  python3 benchmarks/study.py --grid paper224 --seeds "$s" 2>&1 | grep --line-buffered -v '^epoch' | tee "$out/study_s$s.log"
done
if [[ " ${seeds[*]} " == *" 0 "* ]]; then
  say 'seed 0 as a select candidate; the fixed rule'
  python3 benchmarks/study.py --grid select --configs r18-224-scratch 2>&1 | tail -n 3
  python3 benchmarks/study.py --grid auto 2>&1 | tail -n 5
fi
