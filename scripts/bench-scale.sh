#!/usr/bin/env bash
# Calibrating models larger than memory: peak RSS (/usr/bin/time -v) and wall time of streamed
# calibration, printed as tables beside the limits issue 15 sets.
#
# 1. A seeded random-weight F16 GGUF shaped like Llama 3 8B (d 4096, FFN 14336, 32/8 heads,
#    vocab 128256), BLOCKS blocks (default 4), written by scripts/reference/big_gguf.py.
#    RTN 4-bit g128 sym and GPTQ 4-bit g128 sym on WINDOWS calibration windows (default 32) of
#    emma.txt. Limit: 1.5 x (largest block in f32 + that block's calibration activations)
#    + the embedding in f32 + 500 MiB. Time per block: (GPTQ wall - RTN wall) / BLOCKS; the
#    32-block projection adds RTN's wall scaled by parameter count.
# 2. SmolLM2-135M GPTQ 4-bit g128 sym: 16 windows (limit 600 MiB), and 64 windows with
#    --act-order, each run by this tree's adaptq and by BASE (default 4ee598c, the last commit
#    that loaded the whole model in f32; built once into .cache/baseline) in the same run:
#    peak RSS, wall, the wall ratio, whether the bundles' digests agree, and the 64-window
#    bundle's mean KLD on the first 40 windows of prideprejudice.txt.
#
# Env: BLOCKS, WINDOWS, KEEP (folder for the big GGUF and logs; default .cache/bench-scale),
# ONLY=big|smol (one part), BASE, THREADS (default: every core).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-fixtures.sh >/dev/null
cargo build --release -p adaptq 2>/dev/null
bin=$PWD/target/release/adaptq
blocks=${BLOCKS:-4}
windows=${WINDOWS:-32}
keep=${KEEP:-.cache/bench-scale}
mkdir -p "$keep"
keep=$(cd "$keep" && pwd)
emma=../shared/corpora/austen/emma.txt
pride=../shared/corpora/austen/prideprejudice.txt
smol=.cache/fixtures/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
threads=()
[ -z "${THREADS:-}" ] || threads=(--threads "$THREADS")

# run NAME BIN ARGS...: quantizes into $keep/NAME, prints "wall_s rss_kib digest".
run() {
  local name=$1 b=$2; shift 2
  rm -rf "${keep:?}/$name"
  /usr/bin/time -v "$b" "${threads[@]}" quantize "$@" --out "$keep/$name" >"$keep/$name.out" 2>"$keep/$name.time"
  local wall rss
  wall=$(grep "Elapsed (wall clock)" "$keep/$name.time" | awk -F': ' '{print $2}' | awk -F: '{ if (NF==3) print $1*3600+$2*60+$3; else print $1*60+$2 }')
  rss=$(grep "Maximum resident" "$keep/$name.time" | awk '{print $6}')
  echo "$wall $rss $(grep -o '"global_digest": "[^"]*"' "$keep/$name/manifest.json" | cut -d'"' -f4)"
}

if [ "${ONLY:-big}" = big ]; then
  big=$keep/llama3-8b-shape-$blocks.gguf
  if [ ! -f "$big" ]; then
    lc=$(../shared/tools/llamacpp.sh)
    source scripts/python-env.sh
    PYTHONPATH="$lc/../gguf-py" "$venv/bin/python" scripts/reference/big_gguf.py "$big" --blocks "$blocks"
  fi
  r=$(run big-rtn "$bin" "$big" --bits 4 --group-size 128 --sym)
  g=$(run big-gptq "$bin" "$big" --method gptq --bits 4 --group-size 128 --sym \
    --calib "$emma" --calib-samples "$windows")
  python3 - "$r" "$g" "$blocks" "$windows" <<'PY'
import sys
r, g = sys.argv[1].split(), sys.argv[2].split()
blocks, windows = int(sys.argv[3]), int(sys.argv[4])
mib = 1 << 20
d, ff, q, kv, vocab, seq = 4096, 14336, 4096, 1024, 128256, 512
block = d * q * 2 + d * kv * 2 + 3 * d * ff          # q, o, k, v, gate, up, down
acts = windows * seq * d * 4
emb = vocab * d * 4
limit = 1.5 * (block * 4 + acts) / mib + emb / mib + 500
params = lambda n: 2 * vocab * d + n * (block + 2 * d) + d
print(f"Llama-3-8B-shaped random F16 GGUF, {blocks} blocks, GPTQ 4-bit g128 sym on {windows} windows of 512 tokens")
print()
print("| run | wall s | peak RSS MiB |")
print("|---|---|---|")
print(f"| RTN 4-bit g128 sym | {float(r[0]):.0f} | {int(r[1])/1024:.0f} |")
print(f"| GPTQ 4-bit g128 sym, {windows} windows | {float(g[0]):.0f} | {int(g[1])/1024:.0f} |")
print()
rss = int(g[1]) / 1024
print(f"limit: 1.5 x ({block*4/mib:.0f} MiB block in f32 + {acts/mib:.0f} MiB activations) + {emb/mib:.0f} MiB embedding + 500 = {limit:.0f} MiB;"
      f" GPTQ peak {rss:.0f} MiB: {'PASS' if rss <= limit else 'FAIL'}")
per_block = (float(g[0]) - float(r[0])) / blocks
rtn32 = float(r[0]) * params(32) / params(blocks)
print(f"calibration time per block: {per_block:.0f} s; projected for 32 blocks: {(per_block * 32 + rtn32) / 3600:.2f} h"
      f" ({per_block:.0f} s x 32 + RTN's {float(r[0]):.0f} s scaled to 32 blocks)")
PY
fi

if [ "${ONLY:-smol}" = smol ]; then
  base=${BASE:-4ee598c}
  bdir=.cache/baseline/$base
  if [ ! -x "$bdir/target/release/adaptq" ]; then
    rm -rf "$bdir/src"
    mkdir -p "$bdir"
    git worktree add --detach "$bdir/src" "$base" >/dev/null
    (cd "$bdir/src" && CARGO_TARGET_DIR="$PWD/../target" cargo build --release -p adaptq 2>/dev/null)
    git worktree remove --force "$bdir/src"
  fi
  old=$PWD/$bdir/target/release/adaptq
  gptq=(--method gptq --bits 4 --group-size 128 --sym --calib "$emma")
  a=$(run smol16 "$bin" "$smol" "${gptq[@]}" --calib-samples 16)
  b=$(run smol16-base "$old" "$smol" "${gptq[@]}" --calib-samples 16)
  c=$(run smol64 "$bin" "$smol" "${gptq[@]}" --calib-samples 64 --act-order)
  d=$(run smol64-base "$old" "$smol" "${gptq[@]}" --calib-samples 64 --act-order)
  "$bin" eval "$keep/smol64" --text "$pride" --ctx 512 --score second-half --chunks 40 --base "$smol" --json >"$keep/smol64-eval.json"
  python3 - "$a" "$b" "$c" "$d" "$keep/smol64-eval.json" "$base" <<'PY'
import json, sys
a, b, c, d = (s.split() for s in sys.argv[1:5])
kld = json.load(open(sys.argv[5]))["kld_mean"]
base = sys.argv[6]
print(f"SmolLM2-135M GPTQ 4-bit g128 sym; this tree against {base} (whole model in f32), same run")
print()
print("| run | wall s | peak RSS MiB | base wall s | base peak RSS MiB | wall ratio | same digest |")
print("|---|---|---|---|---|---|---|")
for name, x, y in (("16 windows", a, b), ("64 windows, --act-order", c, d)):
    print(f"| {name} | {float(x[0]):.0f} | {int(x[1])/1024:.0f} | {float(y[0]):.0f} | {int(y[1])/1024:.0f} | {float(x[0])/float(y[0]):.2f} | {'yes' if x[2] == y[2] else 'NO'} |")
print()
rss = int(a[1]) / 1024
print(f"16 windows: peak {rss:.0f} MiB vs limit 600 MiB: {'PASS' if rss < 600 else 'FAIL'}")
print(f"64 windows, --act-order: mean KLD {kld:.4f} (first 40 windows of prideprejudice.txt; limit 0.1501)")
PY
fi
