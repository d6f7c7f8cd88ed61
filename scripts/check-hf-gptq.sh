#!/usr/bin/env bash
# Hugging Face GPTQ export, checked without adaptq: numpy unpacks qweight/qzeros/scales/g_idx
# (scripts/check_hf_gptq.py) and must reproduce adaptq's dequantized weights bit for bit; the
# unpacked weights, written as a plain float checkpoint in Hugging Face layout (rotate-half
# RoPE, un-permuted Q/K, the exported tokenizer.json), must give the bundle's perplexity.
# Then the unpacked Hugging Face checkpoint goes the other way, safetensors → GGUF.
# Run by scripts/test.sh (CI); the numpy virtualenv is shared with check-gguf.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/check-env.sh
text=../shared/corpora/austen/prideprejudice.txt
# same_ppl WHAT A B: models A and B must give the same perplexity (relative 1e-5) on the
# second halves of two 512-token windows; WHAT names them in the messages.
same_ppl() {
  local a b
  a=$("$bin" eval "$2" --text "$text" --ctx 512 --score second-half --chunks 2 --json)
  b=$("$bin" eval "$3" --text "$text" --ctx 512 --score second-half --chunks 2 --json)
  python3 - "$1" "$a" "$b" <<'PY'
import json, sys
what = sys.argv[1]
a, b = (json.loads(x)["ppl"] for x in sys.argv[2:4])
assert abs(a - b) / a < 1e-5, f"{what}: PPL {a} vs {b}"
print(f"{what}: PPL {a:.6f} and {b:.6f}")
PY
}
for cfg in "4 128" "8 32" "2 64"; do
  set -- $cfg
  "$bin" quantize "$m" --out "$tmp/b$1" --bits "$1" --group-size "$2" --sym --min-cosine 0 >/dev/null
  # Small shards here so the index path is exercised too.
  "$bin" export "$tmp/b$1" --to hf-gptq --out "$tmp/hf$1" --max-shard-size 40000000 >/dev/null
  "$bin" tensor-hashes "$tmp/b$1" --hf >"$tmp/h$1.json"
  "$venv/bin/python" scripts/check_hf_gptq.py "$tmp/hf$1" "$tmp/h$1.json"
done
"$bin" export "$tmp/b4" --to hf-gptq --out "$tmp/hf4one" >/dev/null
"$venv/bin/python" scripts/check_hf_gptq.py "$tmp/hf4one" "$tmp/h4.json" --write-float "$tmp/float"
same_ppl "forward pass: bundle, numpy-unpacked HF checkpoint" "$tmp/b4" "$tmp/float"
# A mixture of experts (random Mixtral-layout weights): each expert becomes a GPTQ layer of
# its own under transformers' Mixtral names, the router stays float, and the unpacked
# checkpoint read back as Hugging Face Mixtral gives the bundle's perplexity.
LLAMACPP_GGUF_PY="$(dirname "$(bash ../shared/tools/llamacpp.sh)")/gguf-py" \
  "$venv/bin/python" scripts/reference/random_gguf.py mixtral "$tmp/mx.gguf" --seed 1
"$bin" quantize "$tmp/mx.gguf" --out "$tmp/mxb" --bits 4 --group-size 32 --sym --min-cosine 0 >/dev/null
"$bin" export "$tmp/mxb" --to hf-gptq --out "$tmp/mxhf" >/dev/null
"$bin" tensor-hashes "$tmp/mxb" --hf >"$tmp/mxh.json"
"$venv/bin/python" scripts/check_hf_gptq.py "$tmp/mxhf" "$tmp/mxh.json" --write-float "$tmp/mxfloat"
same_ppl "mixture of experts: bundle, numpy-unpacked HF Mixtral checkpoint" "$tmp/mxb" "$tmp/mxfloat"
# Safetensors (Hugging Face layout) → bundle → GGUF: metadata built from config.json and
# tokenizer.json must match the original GGUF's tokenizer, and Q/K rows permuted back for
# llama.cpp's RoPE must leave the perplexity unchanged.
"$bin" quantize "$tmp/float" --out "$tmp/fb" --bits 8 --group-size 32 --sym >/dev/null
"$bin" export "$tmp/fb" --to gguf --out "$tmp/f.gguf" >/dev/null
"$bin" tensor-hashes "$tmp/f.gguf" >"$tmp/f.json"
"$venv/bin/python" scripts/check_gguf.py "$m" "$tmp/f.gguf" "$tmp/f.json"
same_ppl "safetensors → GGUF: bundle, its GGUF export" "$tmp/fb" "$tmp/f.gguf"
echo "Hugging Face GPTQ export verified"
