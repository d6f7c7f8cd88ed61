#!/usr/bin/env bash
# adaptq's GGUF files against llama-quantize's, judged in llama.cpp's own evaluator, in one run.
#
# The reference is the SmolLM2 fixture dequantized to F32 (scripts/reference/dequantize_gguf.py,
# gguf-py). For each llama.cpp type name, llama-quantize writes its file with an emma.txt
# importance matrix, and adaptq writes a GGUF type mix aimed at the same size (`--like NAME`,
# GPTQ calibrated on emma.txt). Every file is scored by `llama-perplexity --kl-divergence`
# against the F32 model's logits on the first 40 windows of 512 tokens of prideprejudice.txt
# (its first 82,600 characters) and of Brown press reportage (98,500 characters). adaptq also
# writes files at sizes llama-quantize cannot reach on this model (BELOW, bits per weight).
# Prints a markdown table and writes gguf-kld.svg (mean KLD against bpw, both tools, both texts).
#
# The fixture's linear weights lie on Q4_1's grid (group 32, f16 scale and min), so Q4_1 rebuilds
# them almost exactly and Q5_1 nearly so: adaptq's mixes leave both out (MIX_TYPES). llama.cpp
# picks its types by fixed rules; where those are Q4_1/Q5_1 (its Q4_0 and Q5_K_M files) its
# figures profit from the reference's grid, and the table says which types each file holds.
#
# Knobs: PRESETS (type names, default all eleven), BELOW (default "4.6 4.8"), SAMPLES
# (calibration windows, default 64), MIX_TYPES (default every type but Q4_1 and Q5_1), AQ_FLAGS
# (extra adaptq quantize flags), KEEP (a folder for the files and the SVG, reused by a later run:
# finished files are kept; default a temporary one, the SVG then lands in the current folder).
# All eleven names with both texts take about 2.5 hours on 2 cores.
set -euo pipefail
keep=${KEEP:+$(realpath -m "$KEEP")}
svg=$(realpath -m "${keep:-.}/gguf-kld.svg")
cd "$(dirname "$0")/.."
./scripts/fetch-fixtures.sh >/dev/null
cargo build --release -q -p adaptq
lc=$(bash ../shared/tools/llamacpp.sh)
# llama.cpp's AMX kernels (native builds on Sapphire Rapids) crash on these virtual machines;
# without repacking its plain CPU kernels run.
export LLAMA_ARG_REPACK=0
# shellcheck source=scripts/python-env.sh
source scripts/python-env.sh
presets=${PRESETS:-Q2_K Q3_K_S Q3_K_M Q4_0 Q4_K_S Q4_K_M Q5_K_M Q6_K IQ4_XS IQ3_XXS IQ2_XS}
below=${BELOW:-4.6 4.8}
samples=${SAMPLES:-64}
mix_types=${MIX_TYPES:-Q2_K,Q3_K,IQ4_XS,IQ4_NL,Q4_0,Q4_K,Q5_0,Q5_K,Q6_K,Q8_0}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
w=${keep:-$tmp}
mkdir -p "$w"
cp target/release/adaptq "$tmp/adaptq"
bin=$tmp/adaptq
emma=../shared/corpora/austen/emma.txt
# partial OUT: where OUT is written before it is finished (its extension kept: some tools choose
# a format by it).
partial() { echo "${1%.*}.partial.${1##*.}"; }
# produce OUT LOG CMD...: runs CMD (which writes "$(partial OUT)") unless OUT exists, renames
# the result into place only when CMD succeeds, and shows the log's end when it fails.
produce() {
  local out=$1 log=$2; shift 2
  [ -f "$out" ] && return 0
  rm -f "$(partial "$out")"
  if ! "$@" >"$log" 2>&1; then
    echo "bench-gguf: failed making $out; the end of $log:" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi
  mv "$(partial "$out")" "$out"
}
f32=$w/f32.gguf
produce "$f32" "$w/f32.log" env PYTHONPATH="$lc/../gguf-py" "$venv/bin/python" \
  scripts/reference/dequantize_gguf.py .cache/fixtures/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
  "$(partial "$f32")"
produce "$w/imatrix.dat" "$w/imatrix.log" "$lc/llama-imatrix" -m "$f32" -f "$emma" \
  -o "$(partial "$w/imatrix.dat")" -c 512 --chunks 100 -t 2
texts=(austen:../shared/corpora/austen/prideprejudice.txt:82600
       press:../shared/corpora/brown-dev/press-reportage.txt:98500)
for t in "${texts[@]}"; do
  IFS=: read -r name file cut <<<"$t"
  head -c "$cut" "$file" >"$w/$name.txt.new"
  # A cached base is valid only for the same text.
  if ! cmp -s "$w/$name.txt.new" "$w/$name.txt" 2>/dev/null; then
    rm -f "$w/$name.kld"
  fi
  mv "$w/$name.txt.new" "$w/$name.txt"
  produce "$w/$name.kld" "$w/$name.base.log" "$lc/llama-perplexity" -m "$f32" -f "$w/$name.txt" \
    -c 512 -t 2 --kl-divergence-base "$(partial "$w/$name.kld")"
done
# score TOOL LABEL PATH: llama-perplexity --kl-divergence on both texts, right after the file is
# made (so an interrupted run keeps what it measured); a log newer than the file and the base
# logits is reused.
: >"$w/rows.tsv"
score() {
  local tool=$1 label=$2 path=$3 name log
  for t in "${texts[@]}"; do
    IFS=: read -r name _ _ <<<"$t"
    log=$path.$name.log
    if [ "$log" -nt "$path" ] && [ "$log" -nt "$w/$name.kld" ] && grep -q "Mean PPL(Q)" "$log"; then
      continue
    fi
    if ! "$lc/llama-perplexity" -m "$path" -f "$w/$name.txt" -c 512 -t 2 \
      --kl-divergence-base "$w/$name.kld" --kl-divergence >"$log" 2>&1; then
      echo "bench-gguf: llama-perplexity failed on $path; the end of $log:" >&2
      tail -n 20 "$log" >&2
      exit 1
    fi
  done
  printf '%s\t%s\t%s\n' "$tool" "$label" "$path" >>"$w/rows.tsv"
}
for p in $presets; do
  produce "$w/llama-$p.gguf" "$w/llama-$p.log" "$lc/llama-quantize" --imatrix "$w/imatrix.dat" \
    "$f32" "$(partial "$w/llama-$p.gguf")" "$p" 2
  score llama.cpp "$p" "$w/llama-$p.gguf"
done
aq() { # label, output, budget flags...
  local label=$1 out=$2; shift 2
  # shellcheck disable=SC2086
  produce "$out" "$out.log" "$bin" quantize "$f32" --format gguf --method gptq --calib "$emma" \
    --calib-samples "$samples" --act-order --min-cosine 0 --mix-types "$mix_types" \
    ${AQ_FLAGS:-} "$@" --out "$(partial "$out")"
  score adaptq "$label" "$out"
}
for p in $presets; do aq "$p" "$w/adaptq-$p.gguf" --like "$p"; done
for b in $below; do aq "$b bpw" "$w/adaptq-$b.gguf" --target-bpw "$b"; done
PYTHONPATH="$lc/../gguf-py" "$venv/bin/python" - "$w/rows.tsv" "$svg" <<'PY'
import re, sys
from gguf import GGUFReader

def stats(log):
    t = open(log).read()
    g = lambda pat: float(re.search(pat, t).group(1))
    return (g(r"Mean PPL\(Q\)\s*:\s*([\d.]+)"), g(r"Mean\s+KLD:\s*([\d.]+)"),
            g(r"99\.0%\s+KLD:\s*([\d.]+)"), g(r"Same top p:\s*([\d.]+)"))

rows = []
for line in open(sys.argv[1]):
    tool, label, path = line.rstrip("\n").split("\t")
    r = GGUFReader(path)
    nbytes = sum(int(t.n_bytes) for t in r.tensors)
    params = sum(int(t.n_elements) for t in r.tensors)
    kinds = {}
    for t in r.tensors:
        if len(t.shape) >= 2:
            kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    held = ", ".join(f"{k} ×{n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
    rows.append((tool, label, nbytes, 8 * nbytes / params,
                 stats(f"{path}.austen.log"), stats(f"{path}.press.log"), held))
print("| file | type / budget | tensor bytes | bpw | PPL Austen | KLD Austen | p99 | top-1 % "
      "| PPL press | KLD press | p99 | top-1 % |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for tool, label, nbytes, bpw, a, p, _ in rows:
    print(f"| {tool} | {label} | {nbytes:,} | {bpw:.3f} | {a[0]:.4f} | {a[1]:.5f} | {a[2]:.4f} | "
          f"{a[3]:.2f} | {p[0]:.4f} | {p[1]:.5f} | {p[2]:.4f} | {p[3]:.2f} |")
print()
print("| file | type / budget | 2-D tensors by type |")
print("|---|---|---|")
for tool, label, *_, held in rows:
    print(f"| {tool} | {label} | {held} |")
# The plot: mean KLD (log scale) against bpw, one line per tool and text.
import math
W, H, L, B = 640, 400, 60, 40
xs = [r[3] for r in rows]
ks = [r[i][1] for r in rows for i in (4, 5) if r[i][1] > 0]
x0, x1 = math.floor(min(xs) * 2) / 2, math.ceil(max(xs) * 2) / 2
y0, y1 = math.floor(math.log10(min(ks))), math.ceil(math.log10(max(ks)))
X = lambda v: L + (v - x0) / (x1 - x0) * (W - L - 20)
Y = lambda k: H - B - (math.log10(k) - y0) / (y1 - y0) * (H - B - 20)
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<line x1="{L}" y1="{H-B}" x2="{W-20}" y2="{H-B}" stroke="black"/>',
       f'<line x1="{L}" y1="20" x2="{L}" y2="{H-B}" stroke="black"/>',
       f'<text x="{W/2}" y="{H-8}" text-anchor="middle">bits per weight (every tensor)</text>',
       f'<text x="14" y="{H/2}" transform="rotate(-90 14 {H/2})" text-anchor="middle">mean KLD vs F32 (llama-perplexity)</text>']
v = x0
while v <= x1 + 1e-9:
    out.append(f'<text x="{X(v)}" y="{H-B+16}" text-anchor="middle">{v:g}</text>')
    v += 0.5
for e in range(y0, y1 + 1):
    out.append(f'<text x="{L-6}" y="{Y(10**e)+4}" text-anchor="end">1e{e}</text>')
styles = {("llama.cpp", 4): ("#d62728", ""), ("llama.cpp", 5): ("#d62728", "5,4"),
          ("adaptq", 4): ("#1f77b4", ""), ("adaptq", 5): ("#1f77b4", "5,4")}
for (tool, i), (color, dash) in styles.items():
    pts = sorted((r[3], r[i][1]) for r in rows if r[0] == tool and r[i][1] > 0)
    if not pts:
        continue
    path = " ".join(f"{X(a):.1f},{Y(k):.1f}" for a, k in pts)
    out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-dasharray="{dash}"/>')
    out += [f'<circle cx="{X(a):.1f}" cy="{Y(k):.1f}" r="3" fill="{color}"/>' for a, k in pts]
for n, (label, color, dash) in enumerate([("llama.cpp, Austen", "#d62728", ""),
                                          ("llama.cpp, press", "#d62728", "5,4"),
                                          ("adaptq, Austen", "#1f77b4", ""),
                                          ("adaptq, press", "#1f77b4", "5,4")]):
    y = 30 + 16 * n
    out.append(f'<line x1="{W-170}" y1="{y}" x2="{W-140}" y2="{y}" stroke="{color}" stroke-dasharray="{dash}"/>')
    out.append(f'<text x="{W-135}" y="{y+4}">{label}</text>')
out.append("</svg>")
open(sys.argv[2], "w").write("\n".join(out) + "\n")
PY
echo "plot: $svg"
