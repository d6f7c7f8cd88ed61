#!/usr/bin/env bash
# The project's test command (README, and .ci/run calls exactly this): fetch the fixture models
# into the git-ignored cache if missing, then run every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-fixtures.sh
# Size limits of the code (main.rs, CLI files, functions).
python3 scripts/check-size.py
cargo test --workspace --release
# GGUF exports checked by an independent reader (llama.cpp's gguf-py from PyPI).
./scripts/check-gguf.sh
./scripts/check-hf-gptq.sh
# The no_std bundle loader must build for WebAssembly canisters.
if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  rustup target add wasm32-unknown-unknown || {
    echo "cannot install the wasm32-unknown-unknown target (rustup fetches it once from the network)" >&2
    exit 1
  }
fi
cargo build -p adaptq-loader --target wasm32-unknown-unknown --release
