#!/usr/bin/env bash
# Block-range jobs and the two calibration modes on SmolLM2-135M, GPTQ 4-bit g128 sym on
# WINDOWS (default 16) windows of 512 tokens of emma.txt:
#   - calib_inputs quantized (each block on the quantized outputs before it) and fp (each block
#     on the float model's activations): mean KLD against the f32 model on the first 40 windows
#     of prideprejudice.txt and of press-reportage.txt, and the wall time of one run;
#   - the fp mode as two range jobs (0..15, 15..30) run at the same time plus the merge: wall
#     time against the single run, and whether the merged bundle's digest is the single run's.
# Env: KEEP (folder for bundles and logs; default .cache/bench-jobs), WINDOWS.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-fixtures.sh >/dev/null
cargo build --release -p adaptq 2>/dev/null
bin=$PWD/target/release/adaptq
keep=${KEEP:-.cache/bench-jobs}
windows=${WINDOWS:-16}
mkdir -p "$keep"
smol=.cache/fixtures/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
emma=../shared/corpora/austen/emma.txt
pride=../shared/corpora/austen/prideprejudice.txt
press=../shared/corpora/brown-dev/press-reportage.txt
args=(--method gptq --bits 4 --group-size 128 --sym --calib "$emma" --calib-samples "$windows" --seed 0)

now() { date +%s.%N; }
digest() { grep -o '"global_digest": "[^"]*"' "$1/manifest.json" | cut -d'"' -f4; }
kld() {
  "$bin" eval "$1" --base "$smol" --text "$2" --ctx 512 --chunks 40 --json 2>/dev/null |
    python3 -c 'import json,sys; print("%.4f" % json.load(sys.stdin)["kld_mean"])'
}

rm -rf "${keep:?}"/{q,f,f0,f1,fm}
t0=$(now)
"$bin" quantize "$smol" "${args[@]}" --out "$keep/q" >"$keep/q.log" 2>&1
t1=$(now)
"$bin" quantize "$smol" "${args[@]}" --calib-inputs fp --out "$keep/f" >"$keep/f.log" 2>&1
t2=$(now)
"$bin" quantize "$smol" "${args[@]}" --calib-inputs fp --blocks 0..15 --out "$keep/f0" >"$keep/f0.log" 2>&1 &
p0=$!
"$bin" quantize "$smol" "${args[@]}" --calib-inputs fp --blocks 15..30 --out "$keep/f1" >"$keep/f1.log" 2>&1
wait $p0
"$bin" merge "$keep/f0" "$keep/f1" --out "$keep/fm" >"$keep/fm.log" 2>&1
t3=$(now)

echo "SmolLM2-135M GPTQ 4-bit g128 sym, $windows windows of emma.txt; KLD vs f32, first 40 windows"
echo
echo "| calib_inputs | wall (s) | KLD prideprejudice | KLD press-reportage |"
echo "|---|---|---|---|"
echo "| quantized | $(printf %.0f "$(echo "$t1 - $t0" | bc)") | $(kld "$keep/q" "$pride") | $(kld "$keep/q" "$press") |"
echo "| fp | $(printf %.0f "$(echo "$t2 - $t1" | bc)") | $(kld "$keep/f" "$pride") | $(kld "$keep/f" "$press") |"
echo
same=no
[ "$(digest "$keep/f")" = "$(digest "$keep/fm")" ] && same=yes
single=$(echo "$t2 - $t1" | bc)
split=$(echo "$t3 - $t2" | bc)
printf "fp as ranges 0..15 and 15..30 at once + merge: %.0f s vs %.0f s single (ratio %.2f); same digest: %s\n" \
  "$split" "$single" "$(echo "$split / $single" | bc -l)" "$same"
