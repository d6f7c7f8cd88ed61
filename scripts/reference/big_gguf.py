#!/usr/bin/env python3
"""Writes a seeded random-weight F16 GGUF shaped like Llama 3 8B (d 4096, FFN 14336, 32 heads /
8 KV heads, vocab 128256, untied head) with any number of blocks, streaming one tensor at a
time, so the 32-block file (16 GB) is written in little memory. For memory and time benchmarks
only: the weights are Gaussians (std 0.02, norms 1), not a language model.

usage: big_gguf.py OUT.gguf [--blocks N] [--seed S] [--vocab-from SMOLLM.gguf]

The vocabulary is SmolLM2's byte-level BPE (tokenizer.ggml.* copied from --vocab-from), padded
with control tokens to 128256 entries, so any English text tokenizes and every id is < 49152.
"""
import argparse
import os
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# random_gguf puts the llama.cpp build's gguf-py first on sys.path.
from random_gguf import DEFAULT_VOCAB, read_vocab  # noqa: E402
import gguf  # noqa: E402
import numpy as np  # noqa: E402

D, FF, H, HKV, V = 4096, 14336, 32, 8, 128256
HD = D // H


def shapes(blocks):
    yield "token_embd.weight", (V, D)
    for i in range(blocks):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", (D,)
        yield p + "attn_q.weight", (H * HD, D)
        yield p + "attn_k.weight", (HKV * HD, D)
        yield p + "attn_v.weight", (HKV * HD, D)
        yield p + "attn_output.weight", (D, H * HD)
        yield p + "ffn_norm.weight", (D,)
        yield p + "ffn_gate.weight", (FF, D)
        yield p + "ffn_up.weight", (FF, D)
        yield p + "ffn_down.weight", (D, FF)
    yield "output_norm.weight", (D,)
    yield "output.weight", (V, D)


def values(name, shape, seed):
    if len(shape) == 1:
        return np.ones(shape, dtype=np.float32)  # norms: F32, as llama.cpp's converter keeps them
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    out = np.empty(shape, dtype=np.float16)
    for r in range(0, shape[0], 1024):  # a few hundred MB of f64 at a time
        n = min(1024, shape[0] - r)
        out[r:r + n] = rng.standard_normal((n, shape[1])) * 0.02
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-from", default=DEFAULT_VOCAB)
    a = ap.parse_args()
    kvs, tokens, _ = read_vocab(a.vocab_from)
    pad = V - len(tokens)
    tmp = a.out + ".tmp"
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(f"adaptq random llama3-8b-shaped seed {a.seed}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(8192)
    w.add_embedding_length(D)
    w.add_block_count(a.blocks)
    w.add_feed_forward_length(FF)
    w.add_head_count(H)
    w.add_head_count_kv(HKV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_rope_dimension_count(HD)
    w.add_vocab_size(V)
    for key, val, kind, sub in kvs:
        if key == "tokenizer.ggml.tokens":
            val = val + [f"<pad_{i}>".encode() for i in range(pad)]
        elif key == "tokenizer.ggml.token_type":
            val = val + [3] * pad
        elif key == "tokenizer.ggml.scores":
            val = val + [0.0] * pad
        w.add_key_value(key, val, kind, sub)
    for name, shape in shapes(a.blocks):
        f16 = len(shape) == 2
        n = int(np.prod(shape))
        w.add_tensor_info(name, shape, np.dtype(np.float16 if f16 else np.float32),
                          n * (2 if f16 else 4),
                          gguf.GGMLQuantizationType.F16 if f16 else gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape in shapes(a.blocks):
        w.write_tensor_data(values(name, shape, a.seed))
    w.close()
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
