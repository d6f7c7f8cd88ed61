#!/usr/bin/env bash
# A refined GGML-grid bundle, judged by llama.cpp: SmolLM2 is quantized to GGML blocks (TYPE,
# default q4_k; 576-wide rows fall back as llama.cpp's rules say) without and with --refine,
# both bundles are exported to GGUF, and llama-perplexity --kl-divergence scores each against
# the F32 model's logits on the first 40 windows of 512 tokens of prideprejudice.txt (its first
# 82,600 characters) and of Brown press reportage (98,500 characters). Calibration and
# refinement read emma.txt only. Prints a markdown table with the refined/plain KLD ratio and
# the re-encoding error the bundle records.
#
# Knobs: TYPE (default q4_k), SAMPLES (default 16), SEQ (default 256), REFINE (default
# "--refine both --refine-epochs 2"), KEEP (folder for the files; default a temporary one).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-fixtures.sh >/dev/null
cargo build --release -q -p adaptq
lc=$(bash ../shared/tools/llamacpp.sh)
export LLAMA_ARG_REPACK=0
# shellcheck source=scripts/python-env.sh
source scripts/python-env.sh
ty=${TYPE:-q4_k}
samples=${SAMPLES:-16}
seq=${SEQ:-256}
refine=${REFINE:---refine both --refine-epochs 2}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
w=${KEEP:-$tmp}
mkdir -p "$w"
cp target/release/adaptq "$tmp/adaptq"
bin=$tmp/adaptq
m=.cache/fixtures/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
emma=../shared/corpora/austen/emma.txt
f32=$w/f32.gguf
[ -f "$f32" ] || PYTHONPATH="$lc/../gguf-py" "$venv/bin/python" scripts/reference/dequantize_gguf.py "$m" "$f32"
texts=(austen:../shared/corpora/austen/prideprejudice.txt:82600
       press:../shared/corpora/brown-dev/press-reportage.txt:98500)
for t in "${texts[@]}"; do
  IFS=: read -r name file cut <<<"$t"
  head -c "$cut" "$file" >"$w/$name.txt"
  [ -f "$w/$name.kld" ] || "$lc/llama-perplexity" -m "$f32" -f "$w/$name.txt" -c 512 -t 2 \
    --kl-divergence-base "$w/$name.kld" >"$w/$name.base.log" 2>&1
done
echo "| file | refine | text | tensor bytes | PPL | mean KLD | KLD refined/plain | same top % | re-encoding error (mean, max) |"
echo "|---|---|---|---|---|---|---|---|---|"
for variant in plain refined; do
  extra=""
  [ "$variant" = refined ] && extra=$refine
  out=$w/$ty-$variant
  # shellcheck disable=SC2086
  "$bin" quantize "$m" --out "$out" --force --ggml-type "$ty" --ggml-embedding-type "$ty" \
    --calib "$emma" --calib-samples "$samples" --seq-len "$seq" $extra >"$w/$variant.log" 2>&1
  "$bin" export "$out" --to gguf --out "$out.gguf" --force >/dev/null
  for t in "${texts[@]}"; do
    IFS=: read -r name _ _ <<<"$t"
    "$lc/llama-perplexity" -m "$out.gguf" -f "$w/$name.txt" -c 512 -t 2 \
      --kl-divergence-base "$w/$name.kld" --kl-divergence >"$out.$name.log" 2>&1
  done
done
PYTHONPATH="$lc/../gguf-py" "$venv/bin/python" - "$w" "$ty" <<'PY'
import json, re, sys
from gguf import GGUFReader
w, ty = sys.argv[1:]
def stats(log):
    t = open(log).read()
    g = lambda pat: float(re.search(pat, t).group(1))
    return g(r"Mean PPL\(Q\)\s*:\s*([\d.]+)"), g(r"Mean\s+KLD:\s*([\d.]+)"), g(r"Same top p:\s*([\d.]+)")
for variant in ("plain", "refined"):
    path = f"{w}/{ty}-{variant}"
    r = GGUFReader(f"{path}.gguf")
    nbytes = sum(int(t.n_bytes) for t in r.tensors)
    rec = json.load(open(f"{path}/verification.json")).get("refine", {}).get("ggml_reencode")
    enc = f"{rec['mean_rel_error']:.2e}, {rec['max_rel_error']:.2e}" if rec else "-"
    for name in ("austen", "press"):
        ppl, kld, top = stats(f"{path}.{name}.log")
        ratio = "-"
        if variant == "refined":
            ratio = f"{kld / stats(f'{w}/{ty}-plain.{name}.log')[1]:.3f}"
        print(f"| {ty} GGUF | {variant} | {name} | {nbytes} | {ppl:.4f} | {kld:.5f} | {ratio} | {top:.2f} | {enc} |")
PY
