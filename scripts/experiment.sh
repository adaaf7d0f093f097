#!/usr/bin/env bash
# One recorded experiment on the default LoRA zoo: fit (with dotted overrides) → export → benchmark.
#   scripts/experiment.sh NAME [--model.x value ...]
# Outputs: runs/experiments/NAME/{train,generator,benchmark}; the benchmark is the full honest
# protocol with adapters generated from held-out free-text descriptions. A `--seed_everything N`
# override is also the benchmark's seed, so that the baselines it fits (the hypernetworks) are a
# fresh draw for every generator seed, not one draw compared with three.
set -euo pipefail
name=$1; shift
py=${PYTHON:-.venv/bin/python}
run=runs/experiments/$name
zoo=${ZOO:-checkpoints_zoo/rotdigits-lora}
mkdir -p "$run"
seed=0
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
    --seed_everything) seed=${args[i + 1]:-0} ;;
    --seed_everything=*) seed=${args[i]#*=} ;;
  esac
done
$py -m weightdiff fit --config configs/rotdigits-lora.yaml --data.zoo "$zoo" \
  --trainer.default_root_dir "$run/train" --trainer.logger.init_args.save_dir "$run/train" \
  --trainer.enable_progress_bar false "$@"
ckpt=$(ls -t "$run"/train/*/*/checkpoints/last.ckpt | head -1)
$py -m weightdiff export --ckpt "$ckpt" --out "$run/generator"
$py scripts/benchmark.py --suite adapt-lora --model "$run/generator" --zoo "$zoo" --out "$run/benchmark" \
  --from-description --seed "$seed" ${BENCH_ARGS:-}
