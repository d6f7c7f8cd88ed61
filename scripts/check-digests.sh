#!/usr/bin/env bash
# Quantizes every case of crates/cli/tests/data/digest-cases.txt (calibrated ones included:
# 2634 s measured on two cores while other builds shared them) and compares the bundles'
# digests with the recorded ones.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-fixtures.sh
ADAPTQ_DIGESTS=all cargo test --release -p adaptq --test digests -- --nocapture
