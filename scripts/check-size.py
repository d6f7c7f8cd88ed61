#!/usr/bin/env python3
"""Size limits of issue 19: crates/cli/src/main.rs under 150 lines, no CLI source file over 300
lines, no Rust function in the workspace over 150 lines (tests and fuzz targets included).
Prints each breach and exits 1 if there is one. Functions are found by their `fn` line and the
matching closing brace (strings, chars and comments skipped), which is exact for rustfmt'd code."""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?((const|async|unsafe|extern(\s+\"[^\"]*\")?)\s+)*fn\s+(\w+)")
MAX_FN, MAX_CLI_FILE, MAX_MAIN = 150, 300, 150


def strip(line, state):
    """The line's code with string/char literals and comments blanked; `state` carries a block
    comment or a string across lines."""
    out, i, n = [], 0, len(line)
    while i < n:
        c = line[i]
        if state["block"]:
            if line.startswith("*/", i):
                state["block"] -= 1
                i += 2
            elif line.startswith("/*", i):
                state["block"] += 1
                i += 2
            else:
                i += 1
            continue
        if state["str"]:
            if c == "\\":
                i += 2
                continue
            if c == '"' and line.startswith("#" * state["hashes"], i + 1):
                state["str"] = False
                i += 1 + state["hashes"]
            else:
                i += 1
            continue
        if line.startswith("//", i):
            break
        if line.startswith("/*", i):
            state["block"] = 1
            i += 2
            continue
        m = re.match(r'r(#*)"', line[i:])
        if m and (i == 0 or not (line[i - 1].isalnum() or line[i - 1] == "_")):
            state["str"], state["hashes"] = True, len(m.group(1))
            i += len(m.group(0))
            continue
        if c == '"':
            state["str"], state["hashes"] = True, 0
            i += 1
            continue
        m = re.match(r"'(\\.|[^\\'])'", line[i:]) or re.match(r"'\\u\{[0-9a-fA-F]+\}'", line[i:])
        if m:
            i += len(m.group(0))
            continue
        out.append(c)
        i += 1
    return "".join(out)


def functions(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    state = {"block": 0, "str": False, "hashes": 0}
    code = [strip(l, state) for l in lines]
    for start, text in enumerate(code):
        m = FN.match(text)
        if not m:
            continue
        depth, opened = 0, False
        for end in range(start, len(code)):
            for ch in code[end]:
                if ch == "{":
                    depth += 1
                    opened = True
                elif ch == "}":
                    depth -= 1
                elif ch == ";" and not opened and depth == 0:
                    break
            else:
                if opened and depth == 0:
                    yield m.group(6), start + 1, end - start + 1
                    break
                continue
            break


def main():
    problems = []
    files = [p for p in ROOT.rglob("*.rs") if "target" not in p.parts]
    for p in sorted(files):
        rel = p.relative_to(ROOT)
        n = len(p.read_text(encoding="utf-8").splitlines())
        if rel.parts[:3] == ("crates", "cli", "src"):
            limit = MAX_MAIN if rel.name == "main.rs" and len(rel.parts) == 4 else MAX_CLI_FILE
            if n > limit:
                problems.append(f"{rel}: {n} lines (limit {limit})")
        for name, line, length in functions(p):
            if length > MAX_FN:
                problems.append(f"{rel}:{line}: fn {name} is {length} lines (limit {MAX_FN})")
    for pr in problems:
        print(pr)
    if problems:
        sys.exit(1)
    print(f"size limits hold ({len(files)} Rust files)")


if __name__ == "__main__":
    main()
