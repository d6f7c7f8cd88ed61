# The shared start of the independent-reader checks (check-gguf.sh, check-hf-gptq.sh),
# sourced from the repository root: the fixtures, the pinned Python virtualenv ($venv), the
# release binary ($bin), the SmolLM2 fixture ($m) and a scratch folder ($tmp) removed on exit.
./scripts/fetch-fixtures.sh >/dev/null
source scripts/python-env.sh
cargo build --release -p adaptq 2>/dev/null
bin=target/release/adaptq
m=.cache/fixtures/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
