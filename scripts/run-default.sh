#!/usr/bin/env bash
# The main job on the default model: quantize SmolLM2-135M (4-bit, group 128, symmetric RTN),
# verify the bundle, and print its statistics.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-fixtures.sh
cargo build --release -p adaptq
bin=target/release/adaptq
model=.cache/fixtures/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
out=${OUT_DIR:-out/smollm2-rtn4-g128-sym}
$bin quantize "$model" --out "$out" --method rtn --bits 4 --group-size 128 --sym --force
$bin verify "$out"
$bin stats "$out"
