"""Independent check of adaptq's GGUF files with the `gguf` package from PyPI (llama.cpp's own
Python reader): every tensor must dequantize to exactly the values adaptq reads (compared as
SHA-256 of little-endian f32), and the tokenizer/architecture metadata must equal the source's.

usage: check_gguf.py SOURCE.gguf EXPORTED.gguf ADAPTQ_HASHES.json
"""
import hashlib
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    return [bytes(f.parts[i]).hex() for i in f.data]


def main():
    src_path, out_path, hashes_path = sys.argv[1:4]
    src, out = GGUFReader(src_path), GGUFReader(out_path)
    want = json.load(open(hashes_path))
    types = {}
    for t in out.tensors:
        values = dequantize(t.data, t.tensor_type).astype("<f4", copy=False)
        n = int(np.prod(t.shape))
        assert values.size == n, f"{t.name}: {values.size} values, expected {n}"
        h = hashlib.sha256(np.ascontiguousarray(values).reshape(-1).tobytes()).hexdigest()
        assert h == want[t.name], f"{t.name} ({t.tensor_type.name}): gguf-py decodes different values"
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    assert len(out.tensors) == len(want), "tensor count differs"
    for key in ["general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.tokens",
                "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "llama.block_count",
                "llama.embedding_length", "llama.rope.freq_base"]:
        assert field(src, key) == field(out, key), f"metadata {key} differs"
    print(f"{out_path}: {len(out.tensors)} tensors identical under gguf-py "
          f"({', '.join(f'{k} x{v}' for k, v in sorted(types.items()))}); tokenizer metadata intact")


if __name__ == "__main__":
    main()
