#!/usr/bin/env python3
"""Independent MiniLM (BERT) sentence embeddings in plain numpy, used once to produce the
reference values stored in crates/model/tests/data/minilm_reference.json.

Reads the safetensors file directly (no torch, no transformers), tokenizes with a greedy
longest-match WordPiece over vocab.txt (enough for lower-case ASCII words), adds [CLS]/[SEP],
runs the 6 post-LayerNorm blocks with exact erf GELU, and mean-pools all tokens.

usage: minilm_numpy.py MODEL_DIR > minilm_reference.json
"""
import json, math, struct, sys
import numpy as np

SENTENCES = [
    "it is a truth universally acknowledged",
    "the quick brown fox jumps over the lazy dog",
    "emma woodhouse handsome clever and rich seemed to unite some of the best blessings of existence",
]

def load(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for k, v in header.items():
        if k == "__metadata__" or v["dtype"] != "F32":
            continue
        s, e = v["data_offsets"]
        out[k] = np.frombuffer(data[s:e], dtype="<f4").reshape(v["shape"]).astype(np.float64)
    return out

def wordpiece(words, vocab):
    ids = [vocab["[CLS]"]]
    for w in words:
        start = 0
        while start < len(w):
            end = len(w)
            while end > start:
                piece = w[start:end] if start == 0 else "##" + w[start:end]
                if piece in vocab:
                    ids.append(vocab[piece])
                    break
                end -= 1
            if end == start:
                ids.append(vocab["[UNK]"])
                break
            start = end
    ids.append(vocab["[SEP]"])
    return ids

def layer_norm(x, w, b, eps=1e-12):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * w + b

def gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))

def embed(t, ids, layers=6, heads=12):
    n = len(ids)
    x = t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][:n] \
        + t["embeddings.token_type_embeddings.weight"][0]
    x = layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"])
    d = x.shape[1]
    hd = d // heads
    for i in range(layers):
        p = f"encoder.layer.{i}."
        lin = lambda y, name: y @ t[p + name + ".weight"].T + t[p + name + ".bias"]
        q = lin(x, "attention.self.query").reshape(n, heads, hd).transpose(1, 0, 2)
        k = lin(x, "attention.self.key").reshape(n, heads, hd).transpose(1, 0, 2)
        v = lin(x, "attention.self.value").reshape(n, heads, hd).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(1, 0, 2).reshape(n, d)
        x = layer_norm(lin(a, "attention.output.dense") + x,
                       t[p + "attention.output.LayerNorm.weight"], t[p + "attention.output.LayerNorm.bias"])
        m = lin(gelu(lin(x, "intermediate.dense")), "output.dense")
        x = layer_norm(m + x, t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"])
    return x.mean(0)

def main():
    d = sys.argv[1]
    t = load(f"{d}/model.safetensors")
    vocab = {w.rstrip("\n"): i for i, w in enumerate(open(f"{d}/vocab.txt", encoding="utf-8"))}
    out = []
    for s in SENTENCES:
        ids = wordpiece(s.split(), vocab)
        out.append({"sentence": s, "ids": ids, "embedding": [round(float(v), 7) for v in embed(t, ids)]})
    json.dump(out, sys.stdout)

if __name__ == "__main__":
    main()
