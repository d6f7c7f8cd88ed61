#!/usr/bin/env bash
# Quantize one model as block-range jobs on a Slurm cluster: one array task per range, then one
# merge job that starts when every task has succeeded.
#
#   sbatch --array=0-3 examples/slurm-array.sh            # the ranges
#   sbatch --dependency=afterok:<array job id> --wrap \
#     "adaptq merge $WORK/part-* --out $WORK/bundle"      # the bundle
#
# With --calib-inputs fp (the default here) every range is calibrated on the float model's
# activations, so the tasks run at the same time (each first runs the float blocks before its
# range). With MODE=quantized (GPTQ's usual order: each block calibrated on the quantized
# outputs before it) range i starts from the activations part i-1 saved, so the ranges must run
# one after another: submit each task after the previous one succeeded, e.g.
#   j=$(sbatch --parsable --array=0 examples/slurm-array.sh)
#   j=$(sbatch --parsable --dependency=afterok:$j --array=1 examples/slurm-array.sh)  # and so on
# (SLURM_ARRAY_TASK_COUNT is 1 then: set TASKS). Splitting still helps there: each job is
# short, and any node can take the next. A task that dies (pre-emption, node failure) is
# requeued and continues from its last saved block: --resume.
#SBATCH --job-name=adaptq-range
#SBATCH --cpus-per-task=16
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --requeue
set -euo pipefail

MODEL=${MODEL:-hf://meta-llama/Meta-Llama-3-8B}
CALIB=${CALIB:-$HOME/corpora/emma.txt}
WORK=${WORK:-$PWD/adaptq-run}
BLOCKS_TOTAL=${BLOCKS_TOTAL:-32}
TASKS=${TASKS:-${SLURM_ARRAY_TASK_COUNT:-4}}
MODE=${MODE:-fp}
i=${SLURM_ARRAY_TASK_ID:?run me with sbatch --array}

per=$(( (BLOCKS_TOTAL + TASKS - 1) / TASKS ))
a=$(( i * per ))
b=$(( a + per < BLOCKS_TOTAL ? a + per : BLOCKS_TOTAL ))
mkdir -p "$WORK"
part() { echo "$WORK/part-$(printf %03d "$1")"; }
mode=(--calib-inputs "$MODE")
if [ "$MODE" = quantized ] && [ "$i" -gt 0 ]; then
  mode+=(--inputs-from "$(part $((i - 1)))")
fi

# Every task must be given the same settings and run the same adaptq build (the same binary on
# every node): a part records both, and merge refuses parts of different runs.
adaptq --threads "${SLURM_CPUS_PER_TASK:-1}" quantize "$MODEL" \
  --method gptq --bits 4 --group-size 128 --sym \
  --calib "$CALIB" --calib-samples 128 --seed 0 \
  "${mode[@]}" --blocks "$a..$b" --resume \
  --out "$(part "$i")"
