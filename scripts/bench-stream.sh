#!/usr/bin/env bash
# Streaming from a hub: quantize SmolLM2 over HTTP from the local test hub (127.0.0.1) with a
# bandwidth limit, twice in one run:
#   streamed   hf://… with range requests; the next tensor downloads while one is quantized
#   download   ADAPTQ_CACHE_DIR set: the whole file is downloaded first, then quantized
# Prints wall time and peak RSS (/usr/bin/time -v) of each, the ratio, and the memory limit
# the streaming path must stay under: 3 x the largest tensor (as the quantizer holds it, f32)
# + 100 MiB. RATE (bytes/s, default 25e6) sets the bandwidth.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-fixtures.sh >/dev/null
cargo build --release -p adaptq -p adaptq-testutil 2>/dev/null
bin=target/release/adaptq
fix=.cache/fixtures/smollm2
rate=${RATE:-25000000}
tmp=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
target/release/adaptq-test-hub --repo test/smollm2="$fix" --rate "$rate" --port "$port" >"$tmp/hub.log" 2>&1 &
hub=$!
trap 'kill $hub 2>/dev/null; rm -rf "$tmp"' EXIT
sleep 0.5
export HF_ENDPOINT=http://127.0.0.1:$port
run() { # name, then env assignments
  local name=$1; shift
  env "$@" /usr/bin/time -v "$bin" quantize hf://test/smollm2 --out "$tmp/$name" --bits 4 --group-size 128 --sym \
    >"$tmp/$name.out" 2>"$tmp/$name.time"
  local wall rss
  wall=$(grep "Elapsed (wall clock)" "$tmp/$name.time" | awk -F': ' '{print $2}' | awk -F: '{ if (NF==3) print $1*3600+$2*60+$3; else print $1*60+$2 }')
  rss=$(grep "Maximum resident" "$tmp/$name.time" | awk '{print $6}')
  echo "$name $wall $rss"
}
s=$(run streamed ADAPTQ_CACHE_DIR=)
d=$(run download ADAPTQ_CACHE_DIR="$tmp/cache")
cmp -s "$tmp/streamed/manifest.json" "$tmp/download/manifest.json" || true
g1=$(grep -o '"global_digest": "[^"]*"' "$tmp/streamed/manifest.json")
g2=$(grep -o '"global_digest": "[^"]*"' "$tmp/download/manifest.json")
[ "$g1" = "$g2" ] || { echo "bundles differ: $g1 vs $g2" >&2; exit 1; }
info=$("$bin" info "$fix/SmolLM2-135M-Instruct.Q4_1.gguf" --tensors)
read -r numel stored < <(echo "$info" | python3 -c '
import json,sys
t=json.load(sys.stdin)["tensors"]
n=lambda x: __import__("math").prod(x["shape"])
big=max(t,key=n)
print(n(big), big["bytes"])')
python3 - "$s" "$d" "$numel" "$stored" "$rate" <<'PY'
import sys
s, d = sys.argv[1].split(), sys.argv[2].split()
numel, stored, rate = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
mib = 1 << 20
limit = 3 * numel * 4 / mib + 100
print(f"SmolLM2-135M Q4_1 GGUF (98.4 MB) over the local test hub at {rate/1e6:.0f} MB/s, RTN 4-bit g128 sym")
print()
print("| pipeline | wall s | peak RSS MiB |")
print("|---|---|---|")
for name, r in (("streamed (range requests, read-ahead)", s), ("download, then quantize", d)):
    print(f"| {name} | {float(r[1]):.2f} | {int(r[2])/1024:.0f} |")
print()
print(f"streamed / download-then-quantize wall time: {float(s[1])/float(d[1]):.2f}")
print(f"largest tensor: {numel} values = {numel*4/mib:.1f} MiB as f32 ({stored/mib:.1f} MiB stored)")
rss = int(s[2]) / 1024
ok = "PASS" if rss <= limit else "FAIL"
print(f"streamed peak RSS {rss:.0f} MiB vs limit 3 x {numel*4/mib:.1f} + 100 = {limit:.0f} MiB: {ok}")
PY
