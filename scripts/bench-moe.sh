#!/usr/bin/env bash
# Calibrating a mixture of experts block by block: peak RSS (/usr/bin/time -v) and wall time
# of GPTQ on a seeded random-weight Mixtral-layout F32 GGUF (scripts/reference/random_gguf.py
# mixtral: d 1024, 8 experts of width 2816 top-2, 8 heads / 2 KV heads, BLOCKS blocks,
# default 8; SmolLM2's 49152-token vocabulary, untied head), beside
#   - the block limit: 1.5 x (one block's weights in f32, all its experts + attention,
#     + that block's calibration activations, twice: block inputs and MLP inputs, + the
#     Hessians held at once in f64: attention's and one expert's) + embedding and head in
#     f32 + 500 MiB,
#   - the whole model in f32, which a run holding every block at once would need.
# RTN on the same file gives the floor of reading and writing alone.
# Env: BLOCKS, WINDOWS (default 16 windows of 512 tokens from emma.txt), KEEP (folder for the
# model and logs; default .cache/bench-moe), THREADS (default: every core).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-fixtures.sh >/dev/null
cargo build --release -p adaptq 2>/dev/null
bin=$PWD/target/release/adaptq
blocks=${BLOCKS:-8}
windows=${WINDOWS:-16}
keep=${KEEP:-.cache/bench-moe}
mkdir -p "$keep"
keep=$(cd "$keep" && pwd)
emma=../shared/corpora/austen/emma.txt
threads=()
[ -z "${THREADS:-}" ] || threads=(--threads "$THREADS")
d=1024 ff=2816 experts=8 heads=8 kv=2 vocab=49152
model=$keep/mixtral-d$d-$blocks.gguf
if [ ! -f "$model" ]; then
  lc=$(../shared/tools/llamacpp.sh)
  source scripts/python-env.sh
  LLAMACPP_GGUF_PY="$lc/../gguf-py" "$venv/bin/python" scripts/reference/random_gguf.py mixtral "$model" \
    --set n_layer="$blocks" --set n_embd=$d --set n_ff=$ff --set n_expert=$experts \
    --set n_head=$heads --set n_head_kv=$kv --set head_dim=$((d / heads))
fi

# run NAME ARGS...: quantizes into $keep/NAME, prints "wall_s rss_kib".
run() {
  local name=$1; shift
  # --force replaces only a bundle adaptq wrote there (and its checkpoint), nothing else.
  /usr/bin/time -v "$bin" "${threads[@]}" quantize "$model" "$@" --out "$keep/$name" --force \
    >"$keep/$name.out" 2>"$keep/$name.time"
  local wall rss
  wall=$(grep "Elapsed (wall clock)" "$keep/$name.time" | awk -F': ' '{print $2}' | awk -F: '{ if (NF==3) print $1*3600+$2*60+$3; else print $1*60+$2 }')
  rss=$(grep "Maximum resident" "$keep/$name.time" | awk '{print $6}')
  echo "$wall $rss"
}
r=$(run rtn --bits 4 --group-size 128 --sym --min-cosine 0)
g=$(run gptq --method gptq --bits 4 --group-size 128 --sym --min-cosine 0 \
  --calib "$emma" --calib-samples "$windows" --seq-len 512)
python3 - "$r" "$g" "$blocks" "$windows" "$keep/gptq/verification.json" $d $ff $experts $heads $kv $vocab <<'PY'
import json, sys
r, g = sys.argv[1].split(), sys.argv[2].split()
blocks, windows = int(sys.argv[3]), int(sys.argv[4])
ver = json.load(open(sys.argv[5]))
d, ff, e, h, kv, vocab = map(int, sys.argv[6:12])
mib = 1 << 20
hd = d // h
attn = d * h * hd + 2 * d * kv * hd + h * hd * d
block = (attn + e * 3 * d * ff + e * d) * 4 / mib
acts = 2 * windows * 512 * d * 4 / mib
# q/k/v share one input, o another; an expert's gate/up share one, its down another, and
# the experts' are built one expert at a time.
hess = (d * d + (h * hd) ** 2 + d * d + ff * ff) * 8 / mib
ends = 2 * vocab * d * 4 / mib
model = blocks * block + ends
limit = 1.5 * (block + acts + hess) + ends + 500
print(f"Mixtral-layout random model: d {d}, {e} experts of {ff} (top-2), {blocks} blocks, "
      f"vocab {vocab}; GPTQ 4-bit g128 sym on {windows} windows of 512 tokens")
print()
print("| run | wall s | peak RSS MiB |")
print("|---|---|---|")
for name, x in (("RTN 4-bit g128", r), ("GPTQ 4-bit g128", g)):
    print(f"| {name} | {float(x[0]):.1f} | {int(x[1]) / 1024:.0f} |")
print()
rss = int(g[1]) / 1024
print(f"one block in f32 {block:.0f} MiB (experts {e * 3 * d * ff * 4 / mib:.0f}), activations "
      f"{acts:.0f} MiB, Hessians held at once {hess:.0f} MiB, embedding + head {ends:.0f} MiB; "
      f"whole model in f32 {model:.0f} MiB")
ok = "PASS" if rss <= limit else "FAIL"
print(f"GPTQ peak RSS {rss:.0f} MiB vs block limit 1.5 x ({block:.0f} + {acts:.0f} + {hess:.0f}) "
      f"+ {ends:.0f} + 500 = {limit:.0f} MiB: {ok}; {rss / model:.2f} x the f32 model")
fallback = [x for x in ver["experts"] if x["rule"] != "routed"]
tokens = [x["tokens"] for x in ver["experts"]]
print(f"experts: {len(ver['experts'])} calibrated, routed tokens {min(tokens)}..{max(tokens)}, "
      f"{len(fallback)} on the all-token fallback (the unroutable expert of each block among them)")
PY
