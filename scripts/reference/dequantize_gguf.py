"""Writes an all-F32 copy of a GGUF file with gguf-py (llama.cpp's own reader, writer and
dequantizers): the reference model the benchmarks quantize from and compare against.

usage: dequantize_gguf.py IN.gguf OUT.gguf

Metadata is copied as it is, except the file type, which becomes ALL_F32 (0). Tensors keep
their names and order; every one is stored as F32. OUT is written beside itself under a
temporary name and renamed, and an existing OUT is refused.
"""
import os
import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter, GGMLQuantizationType, Keys
from gguf.quants import dequantize


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, out = sys.argv[1], sys.argv[2]
    if os.path.exists(out):
        sys.exit(f"{out} exists; not replacing it")
    r = GGUFReader(src)
    arch = r.fields[Keys.General.ARCHITECTURE].contents()
    tmp = out + ".partial"
    w = GGUFWriter(tmp, arch)
    for f in r.fields.values():
        if f.name == Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        value = f.contents()
        if f.name == Keys.General.FILE_TYPE:
            value = 0
        w.add_key_value(f.name, value, vtype, sub_type=sub)
    for t in r.tensors:
        x = dequantize(t.data, t.tensor_type).astype(np.float32)
        # gguf-py's shapes are ggml's ne reversed (outermost first), as numpy holds them.
        w.add_tensor(t.name, x.reshape([int(d) for d in reversed(t.shape)]),
                     raw_dtype=GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
