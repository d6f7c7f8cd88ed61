#!/usr/bin/env bash
# The quantization comparison table, end to end on the real model in one run: each method and
# config is quantized (calibrated on emma.txt), verified, and evaluated on the first CHUNKS
# windows of prideprejudice.txt (ctx 512, second half scored) against the f32 model. Wall time
# and peak RSS of each quantize come from /usr/bin/time -v. Prints a markdown table; the
# llama.cpp anchors for the same model and text are in ../shared/anchors/.
#
# Knobs: CHUNKS (default 40), SAMPLES calibration windows (default 64), ONLY (a regex over the
# row names, e.g. ONLY='rtn|gptq4'), MODEL (default the SmolLM2 fixture), TEXTS (evaluation
# texts, space-separated; default prideprejudice.txt; each row is evaluated on each), KEEP (a
# folder to keep the bundles and GGUF files in). A full run takes about 6 hours on 2 cores. Rows
# with --ggml-type are exported to GGUF and the GGUF file itself is evaluated.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-fixtures.sh >/dev/null
cargo build --release -p adaptq 2>/dev/null
m=${MODEL:-.cache/fixtures/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
calib=../shared/corpora/austen/emma.txt
read -r -a texts <<<"${TEXTS:-../shared/corpora/austen/prideprejudice.txt}"
for t in "${texts[@]}"; do
  [ "$(basename "$t")" != emma.txt ] || { echo "emma.txt is the calibration text: evaluate on another" >&2; exit 2; }
done
chunks=${CHUNKS:-40}
samples=${SAMPLES:-64}
only=${ONLY:-.}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
keep=${KEEP:-$tmp}
mkdir -p "$keep"
# A private copy, so rebuilding the workspace during a long run cannot change the binary mid-table.
cp target/release/adaptq "$tmp/adaptq"
bin=$tmp/adaptq
C="--calib $calib --calib-samples $samples --act-order"
N="--method novaq --calib $calib --calib-samples $samples --lossless rans"
# Rotated RTN needs calibration text only to run the layers in the rotated space.
R="--rotate --calib $calib --calib-samples 8"
rows=(
  "rtn4-sym|--bits 4 --group-size 128 --sym"
  "rtn4-sym-allquant|--bits 4 --group-size 128 --sym --embeddings quant"
  "gptq4-sym|--method gptq --bits 4 --group-size 128 --sym $C"
  "awq4-sym|--method awq --bits 4 --group-size 128 --sym $C"
  "rtn3-asym|--bits 3 --group-size 128"
  "gptq3-asym|--method gptq --bits 3 --group-size 128 $C"
  "awq3-asym|--method awq --bits 3 --group-size 128 $C"
  "apq-3.5|--method apq --bits 2-8 --target-bpw 3.5 --max-bpw 3.5 --sym --awq --refit $C"
  "rtn2-asym-g64|--bits 2 --group-size 64"
  "gptq2-asym-g64|--method gptq --bits 2 --group-size 64 $C"
  "awq2-asym-g64|--method awq --bits 2 --group-size 64 $C"
  "ternary-g64|--method ternary --group-size 64"
  "apq-2.5|--method apq --bits 2-8 --target-bpw 2.5 --max-bpw 2.5 --sym --awq --refit $C"
  # NOVAQ: residual vector codebooks; the budget counts codebooks, scales and means.
  "novaq-2.5|--preset high-quality $N"
  "novaq-2.5-norefine|--preset high-quality --refine-iterations 0 $N"
  "novaq-2.0|--target-bits 2.0 $N"
  "novaq-1.5|--preset balanced $N"
  "ternary-g64-rans|--method ternary --group-size 64 --lossless rans"
  # Residual-stream Hadamard rotation (norms folded, online rotation at the embedding ends).
  "f32-rotated|EVAL --rotate 1"
  "rtn3-asym-rot|--bits 3 --group-size 128 $R"
  "rtn4-sym-rot|--bits 4 --group-size 128 --sym $R"
  "gptq3-asym-rot|--method gptq --bits 3 --group-size 128 --rotate $C"
  "gptq4-sym-rot|--method gptq --bits 4 --group-size 128 --sym --rotate $C"
  "novaq-2.5-rot|--preset high-quality --rotate $N"
  # Range search (Hessian-weighted clipping of each group's range) against the min/max fit.
  "rtn2-asym-g64-rs|--bits 2 --group-size 64 --range-search"
  "gptq2-asym-g64-rs|--method gptq --bits 2 --group-size 64 --range-search $C"
  "rtn3-asym-rs|--bits 3 --group-size 128 --range-search"
  "gptq3-asym-rs|--method gptq --bits 3 --group-size 128 --range-search $C"
  "rtn4-sym-rs|--bits 4 --group-size 128 --sym --range-search"
  "gptq4-sym-rs|--method gptq --bits 4 --group-size 128 --sym --range-search $C"
  "gguf-q4_k-gptq-rs|--method gptq --ggml-type q4_k --range-search $C"
  # llama.cpp block types (embedding Q8_0 as llama-quantize does), evaluated on the exported GGUF.
  "gguf-q4_0-rtn|--ggml-type q4_0"
  "gguf-q4_0-gptq|--method gptq --ggml-type q4_0 $C"
  "gguf-q4_k-rtn|--ggml-type q4_k"
  "gguf-q4_k-gptq|--method gptq --ggml-type q4_k $C"
)
echo "| config | text | total bytes | bpw | PPL | ΔPPL % | mean KLD | top-1 % | quantize s | peak RSS MiB | lossless × | gates |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
for row in "${rows[@]}"; do
  name=${row%%|*}; args=${row#*|}
  [[ $name =~ $only ]] || continue
  out="$keep/$name"
  if [[ $args == EVAL* ]]; then
    # The unquantized model itself, transformed as the flags say (e.g. rotated).
    for text in "${texts[@]}"; do
      # shellcheck disable=SC2086
      "$bin" eval "$m" --text "$text" --ctx 512 --score second-half --chunks "$chunks" --base "$m" --json ${args#EVAL} >"$tmp/$name.json"
      python3 - "$name" "$tmp/$name.json" "$(basename "$text")" <<'PY'
import json, sys
name, ev, text = sys.argv[1:]
e = json.load(open(ev))
print(f"| {name} | {text} | - | 32.000 | {e['ppl']:.4f} | {e['delta_ppl_pct']:+.3f} | {e['kld_mean']:.6f} | {100*e['top1_agreement']:.2f} | - | - | - | - |")
PY
    done
    continue
  fi
  # shellcheck disable=SC2086
  /usr/bin/time -v "$bin" quantize "$m" --out "$out" $args >"$tmp/$name.log" 2>"$tmp/$name.time" || true
  "$bin" verify "$out" >/dev/null
  model=$out
  if [[ $args == *--ggml-type* ]]; then
    "$bin" export "$out" --to gguf --out "$out.gguf" >/dev/null
    model=$out.gguf
  fi
  for text in "${texts[@]}"; do
    "$bin" eval "$model" --text "$text" --ctx 512 --score second-half --chunks "$chunks" --base "$m" --json >"$tmp/$name.json"
    python3 - "$name" "$out" "$tmp/$name.json" "$tmp/$name.time" "$(basename "$text")" <<'PY'
import json, sys, re
name, out, ev, tm, text = sys.argv[1:]
v = json.load(open(f"{out}/verification.json")); e = json.load(open(ev)); t = open(tm).read()
wall = re.search(r"Elapsed \(wall clock\) time.*: (.*)", t).group(1).split(":")
secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall)))
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 1024
tot = v["totals"]
failed = [g["name"] for g in v["gates"] if g["status"] != "PASS"]
lossless = f"{tot['lossless_ratio']:.3f}" if tot.get("lossless_ratio") else "-"
print(f"| {name} | {text} | {tot['payload_bytes']} | {tot['bits_per_weight']:.3f} | {e['ppl']:.4f} | {e['delta_ppl_pct']:+.1f} | "
      f"{e['kld_mean']:.4f} | {100*e['top1_agreement']:.2f} | {secs:.1f} | {rss:.0f} | {lossless} | {v['OVERALL_STATUS']}{' (' + ', '.join(failed) + ')' if failed else ''} |")
PY
  done
done
