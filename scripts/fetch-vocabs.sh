#!/usr/bin/env bash
# Fetches llama.cpp's vocabulary-only GGUF files (models/ggml-vocab-*.gguf of the llama.cpp tree
# that the llama-cpp-python sdist on PyPI vendors) into .cache/fixtures/vocab/, for
# crates/model/tests/tokenizers_llamacpp.rs. Then writes the vocabularies upstream ships none
# for: an upstream vocabulary re-labelled with another pre-tokenizer name
# (scripts/reference/relabel_vocab.py), since the pre-tokenizer split is what such a name changes.
# Idempotent: files already there are kept.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache="$root/.cache"
dest="$cache/fixtures/vocab"
version=0.3.36
sdist="$cache/wheels/llama_cpp_python-$version.tar.gz"
mkdir -p "$cache/wheels" "$dest"

if [ ! -f "$dest/.upstream-$version" ]; then
  if [ ! -f "$sdist" ]; then
    # --no-binary for this one package only: with :all: pip would also build the sdist's build
    # tools (CMake) from source just to read its metadata.
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
      "llama-cpp-python==$version" -d "$cache/wheels"
  fi
  python3 - "$sdist" "$dest" <<'EOF'
import os, re, shutil, sys, tarfile
sdist, dest = sys.argv[1], sys.argv[2]
want = re.compile(r"^[^/]+/vendor/llama\.cpp/models/(ggml-vocab-[^/]+\.gguf)$")
with tarfile.open(sdist) as t:
    for m in t.getmembers():
        hit = want.match(m.name)
        if hit and m.isfile():
            with t.extractfile(m) as src, open(os.path.join(dest, hit.group(1)), "wb") as out:
                shutil.copyfileobj(src, out)
EOF
  touch "$dest/.upstream-$version"
fi

# Re-labelled vocabularies, written with the gguf-py that matches the llama.cpp build.
relabels=(
  "llama-bpe tekken"
  "gpt-2 gpt-4o"
  "gpt-2 deepseek-v3"
  "gpt-2 chameleon"
  "gpt-2 poro-chat"
  "gpt-2 viking"
  "gpt-2 jais-2"
  "gpt-2 seed-coder"
  "gpt-2 bailingmoe"
  "gpt-2 exaone-moe"
  "gpt-2 minicpm5"
  "gpt-2 youtu"
  "gpt-2 spark2_5"
  "gpt-2 laguna"
  "gpt-2 grok-2"
  "gpt-2 ufakzeka"
  "gpt-2 granite-embed-multi-97m"
  "gpt-2 dbrx"
  "gpt-2 chatglm-bpe"
)
missing=()
for r in "${relabels[@]}"; do
  set -- $r
  [ -f "$dest/relabel-$2.gguf" ] || missing+=("$r")
done
if [ ${#missing[@]} -gt 0 ]; then
  cd "$root"
  source scripts/python-env.sh
  gguf_py="$(dirname "$(../shared/tools/llamacpp.sh)")/../gguf-py"
  for r in "${missing[@]}"; do
    set -- $r
    PYTHONPATH="$gguf_py" "$venv/bin/python" scripts/reference/relabel_vocab.py \
      "$dest/ggml-vocab-$1.gguf" "$2" "$dest/relabel-$2.gguf"
  done
fi
echo "vocabularies ready in $dest"
