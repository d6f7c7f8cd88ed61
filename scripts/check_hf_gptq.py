"""Independent check of adaptq's Hugging Face GPTQ export, with numpy only.

Unpacks every layer's qweight/qzeros/scales/g_idx the way GPTQ kernels read the legacy "gptq"
checkpoint format (zeros stored minus one), dequantizes W[out, in] = scale[g_idx[in], out] *
(q - zero) in float32, and requires SHA-256 equality with adaptq's own dequantized weights
(`adaptq tensor-hashes BUNDLE --hf`). With --write-float DIR it also writes the dequantized
model as a plain float32 Hugging Face checkpoint, so a forward pass can confirm the layout.

usage: check_hf_gptq.py EXPORT_DIR ADAPTQ_HF_HASHES.json [--write-float DIR]
"""
import hashlib
import json
import os
import shutil
import struct
import sys

import numpy as np

DT = {"F32": np.float32, "F16": np.float16, "I32": np.int32}


def load(export):
    idx = os.path.join(export, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
    out = {}
    for f in files:
        raw = open(os.path.join(export, f), "rb").read()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        for name, t in header.items():
            if name == "__metadata__":
                continue
            s, e = t["data_offsets"]
            out[name] = np.frombuffer(raw[8 + n + s:8 + n + e], dtype=DT[t["dtype"]]).reshape(t["shape"])
    return out


def unpack(words, bits, axis_len, axis):
    """int32 words holding 32/bits codes each, LSB first, along `axis`."""
    pf = 32 // bits
    w = words.view(np.uint32)
    shifts = (np.arange(pf, dtype=np.uint32) * bits)
    if axis == 0:
        codes = (w[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
        return codes.reshape(-1, w.shape[1])[:axis_len]
    codes = (w[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)
    return codes.reshape(w.shape[0], -1)[:, :axis_len]


def main():
    export, hashes = sys.argv[1], sys.argv[2]
    float_dir = sys.argv[sys.argv.index("--write-float") + 1] if "--write-float" in sys.argv else None
    cfg = json.load(open(os.path.join(export, "config.json")))
    q = cfg["quantization_config"]
    assert q["quant_method"] == "gptq" and q["checkpoint_format"] == "gptq"
    bits = q["bits"]
    want = json.load(open(hashes))
    t = load(export)
    weights = {}
    layers = 0
    for name in sorted(t):
        if name.endswith(".qweight"):
            base = name[: -len(".qweight")]
            qw, qz, sc, gi = t[name], t[base + ".qzeros"], t[base + ".scales"], t[base + ".g_idx"]
            n_in, n_out = qw.shape[0] * 32 // bits, qw.shape[1]
            codes = unpack(qw, bits, n_in, 0).astype(np.float32)          # [in, out]
            zeros = unpack(qz, bits, n_out, 1).astype(np.float32) + 1.0   # [groups, out]
            scale = sc.astype(np.float32)                                  # [groups, out]
            g = gi.astype(np.int64)
            w = (scale[g, :] * (codes - zeros[g, :])).T                    # [out, in]
            weights[base + ".weight"] = np.ascontiguousarray(w, dtype=np.float32)
            layers += 1
        elif not name.endswith((".qzeros", ".scales", ".g_idx")):
            weights[name] = np.ascontiguousarray(t[name].astype(np.float32))
    for name, w in weights.items():
        h = hashlib.sha256(w.astype("<f4").tobytes()).hexdigest()
        assert name in want, f"{name}: not a tensor of the bundle"
        assert h == want[name], f"{name}: numpy unpacking differs from adaptq's dequantized weights"
    assert set(weights) == set(want), f"missing: {set(want) - set(weights)}"
    print(f"{export}: {layers} GPTQ layers ({bits}-bit, group {q['group_size']}) and "
          f"{len(weights) - layers} float tensors unpack with numpy to adaptq's exact values")
    if float_dir:
        os.makedirs(float_dir, exist_ok=True)
        header, off, blobs = {}, 0, []
        for name in sorted(weights):
            b = weights[name].tobytes()
            header[name] = {"dtype": "F32", "shape": list(weights[name].shape), "data_offsets": [off, off + len(b)]}
            off += len(b)
            blobs.append(b)
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        with open(os.path.join(float_dir, "model.safetensors"), "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h)
            for b in blobs:
                f.write(b)
        cfg.pop("quantization_config")
        cfg["torch_dtype"] = "float32"
        json.dump(cfg, open(os.path.join(float_dir, "config.json"), "w"), indent=1)
        for extra in ["tokenizer.json", "tokenizer_config.json"]:
            if os.path.exists(os.path.join(export, extra)):
                shutil.copy(os.path.join(export, extra), float_dir)


if __name__ == "__main__":
    main()
