#!/usr/bin/env bash
# Forward-pass speed: adaptq's packed runtime (`adaptq bench`) against llama.cpp's llama-bench
# on the same files, same thread count, in one run. Prints a markdown table of prompt processing
# (pp512) and generation (tg128) tokens/s with the ratio adaptq / llama.cpp, and the peak RSS
# of `adaptq generate` on the int4 bundle beside its target (1.3x stored size + 200 MiB), and
# the KL divergence between the packed and the exact path on the Q4_0 file.
#
# Files: the SmolLM2 fixture dequantized to F32 (scripts/reference/dequantize_gguf.py,
# gguf-py); llama-quantize's Q8_0, Q4_0 and Q4_K_M of it (on SmolLM2's 576-wide rows
# Q4_K_M holds Q4_K, Q5_0, Q6_K and Q8_0); two adaptq bundles llama.cpp cannot run: int4 g128
# symmetric RTN (re-laid onto Q4_0 blocks at load) and NOVAQ at 2.5 bits (calibrated on
# emma.txt; on the codebook lookup kernel). Bundles are compared
# with adaptq's own F32 run. llama.cpp runs with --repack 0 (its AMX repacking crashes on
# these virtual machines; see crates/testutil/src/llamacpp.rs).
#
# tg runs from an empty cache, as llama-bench's tg test does; pp computes the last position's
# logits only, as llama-bench's pp test does. Both tools report their best repetition.
#
# Knobs: THREADS (default 2), REPS (default 3), PP (512), TG (128), CHUNKS (KLD windows, 40),
# KEEP (a folder for the files, reused by a later run; default a temporary one). The NOVAQ
# bundle takes a few minutes to make the first time.
set -euo pipefail
keep=${KEEP:+$(realpath -m "$KEEP")}
cd "$(dirname "$0")/.."
./scripts/fetch-fixtures.sh >/dev/null
cargo build --release -q -p adaptq
lc=$(bash ../shared/tools/llamacpp.sh)
# shellcheck source=scripts/python-env.sh
source scripts/python-env.sh
threads=${THREADS:-2}
reps=${REPS:-3}
pp=${PP:-512}
tg=${TG:-128}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
w=${keep:-$tmp}
mkdir -p "$w"
cp target/release/adaptq "$tmp/adaptq"
A=$tmp/adaptq
emma=../shared/corpora/austen/emma.txt
# make OUT CMD...: runs CMD (writing OUT.partial) unless OUT exists, then renames it into place.
make() {
  local out=$1; shift
  [ -e "$out" ] && return 0
  rm -rf "$out.partial"
  "$@" >"$w/$(basename "$out").log" 2>&1 || { tail -n 20 "$w/$(basename "$out").log" >&2; exit 1; }
  mv "$out.partial" "$out"
}
make "$w/f32.gguf" env PYTHONPATH="$lc/../gguf-py" "$venv/bin/python" \
  scripts/reference/dequantize_gguf.py .cache/fixtures/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
  "$w/f32.gguf.partial"
for t in Q8_0 Q4_0 Q4_K_M; do
  make "$w/$t.gguf" "$lc/llama-quantize" "$w/f32.gguf" "$w/$t.gguf.partial" "$t" 2
done
make "$w/int4-g128" "$A" quantize "$w/f32.gguf" --out "$w/int4-g128.partial" --method rtn \
  --bits 4 --group-size 128 --sym
make "$w/novaq-2.5" "$A" quantize "$w/f32.gguf" --out "$w/novaq-2.5.partial" --method novaq \
  --preset high-quality --calib "$emma" --calib-samples 16

ggufs=(f32 Q8_0 Q4_0 Q4_K_M)
bundles=(int4-g128 novaq-2.5)
# Each file by both tools back to back, so a change in the machine's load between runs shifts
# both sides of a ratio alike.
for m in "${ggufs[@]}" "${bundles[@]}"; do
  case " ${ggufs[*]} " in
    *" $m "*)
      "$lc/llama-bench" -m "$w/$m.gguf" -t "$threads" -p "$pp" -n "$tg" -r "$reps" --repack 0 \
        -o json >"$tmp/llama-$m.json" 2>"$tmp/llama-$m.err" \
        || { cat "$tmp/llama-$m.err" >&2; exit 1; }
      path=$w/$m.gguf ;;
    *) path=$w/$m ;;
  esac
  "$A" bench "$path" --threads "$threads" --pp "$pp" --tg "$tg" --reps "$reps" --json \
    >"$tmp/adaptq-$m.json"
done
size=$(du -sb "$w/int4-g128" | cut -f1)
/usr/bin/time -v "$A" generate "$w/int4-g128" --prompt "The capital of France is" \
  --max-tokens 64 --threads "$threads" >/dev/null 2>"$tmp/time.txt"
rss_kb=$(awk -F': ' '/Maximum resident/ {print $2}' "$tmp/time.txt")
# The packed path's activation rounding, measured: KLD of the packed run against the exact one
# on the same Q4_0 file (the --base model always runs exact).
"$A" eval "$w/Q4_0.gguf" --packed --base "$w/Q4_0.gguf" --text \
  ../shared/corpora/austen/prideprejudice.txt --ctx 512 --score second-half \
  --chunks "${CHUNKS:-40}" --json --threads "$threads" >"$tmp/kld.json"

python3 - "$tmp" "$pp" "$tg" "$threads" "$size" "$rss_kb" "${ggufs[*]}" "${bundles[*]}" "${CHUNKS:-40}" "$reps" <<'PY'
import json, sys
tmp, pp, tg, threads, size, rss_kb, ggufs, bundles, chunks, reps = sys.argv[1:]
ggufs, bundles = ggufs.split(), bundles.split()
ours = {g: json.load(open(f"{tmp}/adaptq-{g}.json"))["models"][0]["speed"] for g in ggufs + bundles}
def theirs(g):
    # The best repetition, as adaptq bench reports (llama-bench's avg_ts is their mean).
    runs = json.load(open(f"{tmp}/llama-{g}.json"))
    pp_ = next(max(r["samples_ts"]) for r in runs if r["n_prompt"] > 0 and r["n_gen"] == 0)
    tg_ = next(max(r["samples_ts"]) for r in runs if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return pp_, tg_
print(f"threads: {threads}; both tools: the best of {reps} repetitions, each file run by"
      " llama-bench and adaptq back to back\n")
print(f"| file | llama.cpp pp{pp} | adaptq pp{pp} | ratio | llama.cpp tg{tg} | adaptq tg{tg} | ratio |")
print("|---|---|---|---|---|---|---|")
for g in ggufs:
    lp, lt = theirs(g)
    a = ours[g]
    ap, at = a["pp_tokens_per_s"], a["tg_tokens_per_s"]
    print(f"| {g} | {lp:.1f} | {ap:.1f} | {ap/lp:.2f}x | {lt:.1f} | {at:.1f} | {at/lt:.2f}x |")
f = ours["f32"]
for b in bundles:
    a = ours[b]
    ap, at = a["pp_tokens_per_s"], a["tg_tokens_per_s"]
    print(f"| {b} (adaptq bundle; ratio vs adaptq f32) | - | {ap:.1f} | {ap/f['pp_tokens_per_s']:.2f}x "
          f"| - | {at:.1f} | {at/f['tg_tokens_per_s']:.2f}x |")
size, rss = int(size), int(rss_kb) * 1024
limit = 1.3 * size + 200 * 2**20
mib = lambda b: b / 2**20
print(f"\ngenerate on int4-g128: peak RSS {mib(rss):.0f} MiB, stored {mib(size):.0f} MiB, "
      f"target 1.3x stored + 200 MiB = {mib(limit):.0f} MiB: {'PASS' if rss <= limit else 'FAIL'}")
k = json.load(open(f"{tmp}/kld.json"))
print(f"Q4_0, packed vs exact on the first {chunks} windows of prideprejudice.txt: mean KLD "
      f"{k['kld_mean']:.6f}, PPL {k['ppl']:.4f} packed vs {k['base_ppl']:.4f} exact, "
      f"top-1 agreement {100 * k['top1_agreement']:.2f} %")
PY
