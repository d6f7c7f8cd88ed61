#!/usr/bin/env bash
# Fuzzes the readers of untrusted input (issue 18) with libFuzzer: each target in fuzz/ runs
# for a set time under AddressSanitizer, with debug assertions and overflow checks on, a
# 10 s limit per input and a 2 GiB limit on memory and on any single allocation. Exits
# non-zero if any target crashed, hung or ran out of memory; the reproducer is the file
# libFuzzer names under fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# SECONDS per target: the first argument, else $FUZZ_SECS, else 600. TARGETs: the rest of the
# arguments, else $FUZZ_TARGETS (space separated), else every target (`cargo fuzz list`).
# Reproduce a crash: cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS="${1:-${FUZZ_SECS:-600}}"
[ $# -gt 0 ] && shift
if [ $# -gt 0 ]; then
  TARGETS=("$@")
else
  read -r -a TARGETS <<<"${FUZZ_TARGETS:-}"
fi
case "$SECS" in '' | *[!0-9]*) echo "usage: $0 [SECONDS] [TARGET...]" >&2; exit 2 ;; esac

# cargo-fuzz passes unstable -Z flags (the sanitizer, coverage instrumentation), which only a
# nightly rustc accepts: use an installed nightly, else install one. Where none can be fetched
# (no access to rustup's dist server), fall back to the stable toolchain with RUSTC_BOOTSTRAP=1,
# which lets that same compiler accept -Z flags; it ships the sanitizer runtimes, and the
# variable is set for this script's builds only.
TC=()
if cargo +nightly --version >/dev/null 2>&1; then
  TC=(+nightly)
elif rustup toolchain install nightly --profile minimal >/dev/null 2>&1 &&
  cargo +nightly --version >/dev/null 2>&1; then
  TC=(+nightly)
else
  echo "fuzz: no nightly toolchain to be had; using stable with RUSTC_BOOTSTRAP=1" >&2
  export RUSTC_BOOTSTRAP=1
fi
echo "fuzz: toolchain $(rustc "${TC[@]}" --version)${RUSTC_BOOTSTRAP:+ (RUSTC_BOOTSTRAP=1)}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz from crates.io"
  nice -n 10 cargo install cargo-fuzz --locked
fi

# Seeds: the valid inputs the mutation tests start from (a real GGUF header, safetensors
# files and indexes, bundle manifests and whole bundles, rANS streams, codebook tensors),
# written straight into the corpora, which libFuzzer then grows run after run.
CORPUS="$PWD/fuzz/corpus"
mkdir -p "$CORPUS"
echo "fuzz: writing seed inputs into fuzz/corpus"
ADAPTQ_FUZZ_SEEDS="$CORPUS" nice -n 10 cargo test --release -q \
  -p adaptq-source -p adaptq-loader --test mutation -- --ignored --exact write_fuzz_seeds >/dev/null

# One build of every target. 16 codegen units build candle-core (which the GGUF reader links)
# much faster on few cores, at a small cost in executions per second.
CGU="${FUZZ_CODEGEN_UNITS:-16}"
echo "fuzz: building the targets (first build compiles candle-core with sanitizer flags: minutes)"
nice -n 10 cargo "${TC[@]}" fuzz build --codegen-units "$CGU"

if [ ${#TARGETS[@]} -eq 0 ]; then
  mapfile -t TARGETS < <(cargo "${TC[@]}" fuzz list)
fi

LOGS="fuzz/logs"
mkdir -p "$LOGS"
failed=()
summary=()
for t in "${TARGETS[@]}"; do
  mkdir -p "$CORPUS/$t"
  dict=()
  case "$t" in manifest | feed | safetensors_header | safetensors_index) dict=(-dict=fuzz/json.dict) ;; esac
  echo "fuzz: $t for ${SECS}s"
  rc=0
  nice -n 10 cargo "${TC[@]}" fuzz run --codegen-units "$CGU" "$t" "$CORPUS/$t" -- \
    -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 \
    -print_final_stats=1 "${dict[@]}" >"$LOGS/$t.log" 2>&1 || rc=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$LOGS/$t.log" | grep -o '[0-9]*$' | tail -1)
  files=$(find "$CORPUS/$t" -type f | wc -l)
  line="$(printf '%-20s execs %-12s corpus %-6s files' "$t" "${execs:-?}" "$files")"
  if [ "$rc" -ne 0 ]; then
    art=$(grep -o 'Test unit written to [^ ]*' "$LOGS/$t.log" | tail -1 | sed 's/.* //' || true)
    why=$(grep -m1 -E 'ERROR: libFuzzer|ERROR: AddressSanitizer|panicked at' "$LOGS/$t.log" || true)
    line="$line  FAILED (exit $rc) ${art:+reproducer $art}"
    failed+=("$t")
    echo "fuzz: $t failed: ${why:-see $LOGS/$t.log}"
    # The report and stack, without libFuzzer's progress lines.
    grep -v -E '^#[0-9]+' "$LOGS/$t.log" | grep -m1 -A40 -E 'ERROR: |panicked at' || tail -n 40 "$LOGS/$t.log"
  fi
  summary+=("$line")
  echo "  $line"
done

echo
echo "fuzz: ${SECS}s per target, logs in $LOGS/"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: no crash, timeout or out-of-memory"
