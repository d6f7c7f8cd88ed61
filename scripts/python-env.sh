# Sourced by the check scripts: the pinned Python tools (scripts/requirements-check.txt) in a
# git-ignored virtualenv under .cache/, created on first use. Sets $venv.
venv=.cache/py/venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import gguf, numpy" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/requirements-check.txt
fi
