#!/usr/bin/env bash
# Forward-pass speed: the f32 reference (SmolLM2 GGUF dequantized) and its 4-bit RTN bundle,
# measured in the same run on all cores. Prints a markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-fixtures.sh >/dev/null
cargo build --release -p adaptq
bin=target/release/adaptq
model=.cache/fixtures/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$bin quantize "$model" --out "$tmp/rtn4" --method rtn --bits 4 --group-size 128 --sym >/dev/null
$bin bench "$model" "$tmp/rtn4" --pp "${PP:-512}" --tg "${TG:-64}" --reps "${REPS:-3}"
