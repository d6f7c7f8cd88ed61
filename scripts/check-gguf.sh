#!/usr/bin/env bash
# GGUF files written by adaptq, read by an independent reader: the `gguf` package from PyPI
# (llama.cpp's gguf-py, pinned in scripts/requirements-check.txt, installed into a git-ignored
# virtualenv under .cache/). For each GGML type, the SmolLM2 fixture is quantized and exported,
# and gguf-py must dequantize every tensor to exactly what adaptq decodes, with the tokenizer
# metadata unchanged. Run by scripts/test.sh (CI).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/check-env.sh
check() {
  local name=$1; shift
  "$bin" quantize "$m" --out "$tmp/$name.gguf" --format gguf "$@" >/dev/null
  "$bin" tensor-hashes "$tmp/$name.gguf" >"$tmp/$name.json"
  "$venv/bin/python" scripts/check_gguf.py "$m" "$tmp/$name.gguf" "$tmp/$name.json"
  rm -f "$tmp/$name.gguf"
}
# k-quants and IQ4_XS land on the 1536-wide down projections; 576-wide rows take the fallbacks
# (IQ4_NL, Q5_0, Q5_1, Q8_0), so these runs and the Q4_0 relay below cover all twelve types.
for t in q2_k q3_k q4_k q5_k q6_k q4_1 iq4_xs; do
  check "$t" --ggml-type "$t"
done
# The same through `export` from an adaptq integer grid that is a GGML grid (lossless relay).
"$bin" quantize "$m" --out "$tmp/int4" --bits 4 --group-size 32 --sym >/dev/null
"$bin" export "$tmp/int4" --to gguf --out "$tmp/int4.gguf" >/dev/null
"$bin" tensor-hashes "$tmp/int4" >"$tmp/int4-bundle.json"
"$bin" tensor-hashes "$tmp/int4.gguf" >"$tmp/int4.json"
cmp <(python3 -m json.tool --sort-keys "$tmp/int4-bundle.json") <(python3 -m json.tool --sort-keys "$tmp/int4.json")
"$venv/bin/python" scripts/check_gguf.py "$m" "$tmp/int4.gguf" "$tmp/int4.json"
echo "gguf-py agrees with adaptq on every exported tensor"
