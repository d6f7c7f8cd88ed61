#!/usr/bin/env python3
"""Copies a vocabulary-only GGUF with `tokenizer.ggml.pre` set to another pre-tokenizer name.

llama.cpp's source tree ships no vocabulary for some pre-tokenizers (tekken, gpt-4o, …). The
name decides the regex split (and, for some, whether merges are skipped for whole-vocabulary
words and whether a BOS token is added); the tokens and merges only have to be a real byte-level
BPE vocabulary, so an upstream one is re-labelled. Every other key and value is copied as it is,
strings as raw bytes, so the output is byte-for-byte deterministic (no randomness is involved).

usage: PYTHONPATH=<llama.cpp gguf-py> relabel_vocab.py SRC.gguf PRE OUT.gguf
"""
import os
import sys

import gguf
from gguf import GGUFValueType as T


def value(field):
    """The field's value as gguf-py's writer takes it (strings as bytes)."""
    kind = field.types[0]
    if kind == T.ARRAY:
        sub = field.types[-1]
        if sub == T.STRING:
            return [bytes(field.parts[i]) for i in field.data], sub
        return [field.parts[i].tolist()[0] for i in field.data], sub
    if kind == T.STRING:
        return bytes(field.parts[field.data[0]]), None
    return field.parts[field.data[0]].tolist()[0], None


def main(src, pre, out):
    reader = gguf.GGUFReader(src)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    tmp = out + ".tmp"
    writer = gguf.GGUFWriter(tmp, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        val, sub = value(field)
        if key == "tokenizer.ggml.pre":
            val = pre
        writer.add_key_value(key, val, field.types[0], sub)
    if "tokenizer.ggml.pre" not in reader.fields:
        writer.add_key_value("tokenizer.ggml.pre", pre, T.STRING)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
