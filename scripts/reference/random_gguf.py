#!/usr/bin/env python3
"""Writes a small, seeded, random-weight F32 GGUF model for one architecture, loadable by
llama.cpp (0.3.36 vendored tree), so that a forward pass can be compared against llama.cpp's.

usage: random_gguf.py ARCH OUT.gguf [--seed N] [--vocab-from SMOLLM.gguf] [--set KEY=VALUE ...]
                      [--hf-twin DIR]

ARCH: llama3 mistral qwen2 qwen3 gemma2 gemma3 phi3 mixtral qwen2moe qwen3moe olmoe
      (see ARCHS below for the exact layouts)

Vocabulary: every tokenizer.ggml.* key is copied from --vocab-from (default: the SmolLM2-135M
fixture, 49152-token byte-level BPE, pre "smollm"); all values copied verbatim (strings as bytes).

Weights: numpy default_rng seeded per tensor from (seed, crc32(tensor name)), so a tensor's
values do not depend on which other tensors a variant writes or drops (same file bytes for the
same arguments).  All tensors are F32.  To keep the model far from uniform, residual channel 1
is a "prior" channel: token t's embedding and output row carry q_t, a fixed unigram-like score
computed from the vocabulary alone (see prior_score); rows 1 of attn_output / ffn_down are zero
so no layer writes into that channel (for tied outputs output_norm.weight[1] is set large to
give the prior its logit range).  Everything else is plain Gaussian / uniform, so
logits = prior (through the final norm) + a context-dependent random part.

Feature switches for A/B checks (--set, repeatable; the defaults are the "feature on" file):
  llama3 : rope_freqs=llama3|ones|none      (per-frequency factor tensor rope_freqs.weight)
  mistral: sliding_window=0|N               (writes llama.attention.sliding_window = N if N>0;
                                             llama.cpp's llama arch never reads it)
  qwen2  : qkv_bias=1|0                     (0: no attn_{q,k,v}.bias tensors)
  qwen3  : qk_norm=random|ones              (attn_{q,k}_norm.weight values)
  gemma2 : attn_softcap=F final_softcap=F window=N
  gemma3 : window=N freq_base_swa=F freq_base=F qk_norm=random|ones
  phi3   : rope_factors=1|0 short_ones=0|1 attn_factor=F sliding_window=N
  mixtral, qwen2moe, qwen3moe, olmoe (mixtures of experts):
           n_expert=N n_expert_used=K dead_expert=0|1 (1: the last expert's router row reads
           the always-positive prior channel with weight -dead_weight, so no token ever picks
           it), qwen2moe: shexp=1|0 (0: shared expert's down projection all zero),
           olmoe/qwen3moe: qk_norm=random|ones
Any other field of the arch's config (n_layer, n_embd, ...) can be overridden the same way.

--hf-twin DIR also writes the same model in Hugging Face (transformers) layout:
DIR/model.safetensors (F32, written by hand) and DIR/config.json, such that a correct transformers
implementation of the architecture computes what llama.cpp computes on the GGUF.  It applies the
inverse of llama.cpp's convert_hf_to_gguf.py: HF tensor names, llama q_proj/k_proj rows
un-permuted (the converter permutes rotate-half rows to interleaved pairs), Gemma "*norm.weight"
values minus 1 (the converter adds 1), and rope_freqs / rope_factors_{short,long} moved into
config.json's rope_scaling (llama3 / longrope).  Qwen2 with qkv_bias=0 gets zero biases (HF's
Qwen2 always has them).  The GGUF bytes do not depend on the option.

Reading gguf: the llama.cpp cache's gguf-py is put first on sys.path if present
($LLAMACPP_GGUF_PY, else ~/.cache/adaptq-peers/llama.cpp-0.3.36/gguf-py), so the writer matches
the reference build; otherwise the installed gguf package is used.
"""
import argparse
import json
import math
import os
import re
import struct
import sys
import zlib

_GGUF_PY = os.environ.get(
    "LLAMACPP_GGUF_PY",
    os.path.expanduser("~/.cache/adaptq-peers/llama.cpp-0.3.36/gguf-py"))
if os.path.isdir(_GGUF_PY):
    sys.path.insert(0, _GGUF_PY)

import numpy as np  # noqa: E402
import gguf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from relabel_vocab import value as field_value  # noqa: E402

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DEFAULT_VOCAB = os.path.join(REPO, ".cache/fixtures/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

# n_embd, n_layer, n_head, n_head_kv, head_dim, n_ff, ctx, eps, rope base, tied output.
# sq/sk: std of q/k entries (sets attention sharpness), so/sd: attn_output/ffn_down gain,
# tau: std of the random logit part (untied), prior_span: ~logit range of the prior (nats),
# prior_c/prior_b: channel-1 input value prior_c*(prior_b+q_t), emb_std: std of other channels.
COMMON = dict(n_layer=2, n_embd=128, n_head=4, n_head_kv=2, head_dim=32, n_ff=384,
              ctx=4096, eps=1e-5, freq_base=10000.0, tied=0,
              sq=1.7, sk=1.7, so=1.0, sd=1.5, tau=0.5, prior_span=15.0, prior_b=3.0,
              prior_c=2.0, emb_std=1.0)
ARCHS = {
    # Llama 3.1: rope_freqs from rope_scaling {rope_type: llama3, factor 8, low 1, high 4,
    # original_max_position_embeddings 64 (8192 in the real model; reduced so that the
    # factors change angles inside a 128-token window)}, GQA 2:1, untied output.
    "llama3": dict(arch="llama", freq_base=500000.0, ctx=8192,
                   rope_freqs="llama3", l3_factor=8.0, l3_low=1.0, l3_high=4.0, l3_orig=64),
    # Mistral 7B layout: GQA 4:1 (8 q heads, 2 kv heads), head_dim = n_embd / n_head, theta 1e6.
    "mistral": dict(arch="llama", n_embd=256, n_head=8, n_head_kv=2, head_dim=32, n_ff=512,
                    freq_base=1000000.0, ctx=32768, sliding_window=0),
    # Qwen2(.5): q/k/v biases, n_head*head_dim == n_embd (llama.cpp requires it), tied output.
    "qwen2": dict(arch="qwen2", eps=1e-6, freq_base=1000000.0, ctx=32768, tied=1, qkv_bias=1,
                  bias_std=1.0, emb_std=0.05),
    # Qwen3: per-head RMSNorm on q and k (before RoPE), head_dim 64 != n_embd/n_head.
    "qwen3": dict(arch="qwen3", head_dim=64, eps=1e-6, freq_base=1000000.0, ctx=40960,
                  qk_norm="random", sq=1.0, sk=1.0),
    # Gemma 2: embeddings * sqrt(n_embd), pre+post norms, GeGLU(tanh), attn + final softcap,
    # SWA on even layers (pattern 2) with a small window, head_dim 64 != n_embd/n_head, tied.
    "gemma2": dict(arch="gemma2", n_layer=4, head_dim=64, n_ff=256, eps=1e-6, ctx=8192, tied=1,
                   attn_softcap=20.0, final_softcap=30.0, window=32, sq=2.5, sk=2.5,
                   prior_b=0.5, emb_std=0.5, prior_span=80.0),
    # Gemma 3: q/k norms, SWA pattern 6 (layers 0-4 local, 5 global), local rope base 10000,
    # global 1e6, small window, tied. No attention softcap in Gemma 3.
    "gemma3": dict(arch="gemma3", n_layer=6, head_dim=64, n_ff=256, eps=1e-6, ctx=32768, tied=1,
                   freq_base=1000000.0, freq_base_swa=10000.0, window=32, sq=1.0, sk=1.0,
                   emb_std=0.5, prior_span=30.0, qk_norm="random"),
    # Phi-3: fused attn_qkv and fused gate|up (gate first) in ffn_up, NEOX rope, LongRoPE
    # factors (short used while n_ctx_seq <= original_context_length), rope attn_factor.
    "phi3": dict(arch="phi3", n_ff=256, ctx=2048, rope_factors=1, short_ones=0, orig_ctx=512,
                 attn_factor=-1.0, sliding_window=2047),
    # Mixtral: arch llama with experts (softmax router, top-k weights renormalised), 4 layers,
    # 8 experts, top-2; expert width is feed_forward_length.
    "mixtral": dict(arch="llama", n_layer=4, n_ff=192, freq_base=1000000.0, ctx=32768,
                    n_expert=8, n_expert_used=2, dead_expert=1, router_std=2.0,
                    dead_weight=20.0),
    # Qwen2-MoE (Qwen1.5-MoE layout): q/k/v biases, experts of expert_feed_forward_length,
    # top-k weights not renormalised, a shared expert gated by sigmoid(ffn_gate_inp_shexp . x).
    "qwen2moe": dict(arch="qwen2moe", n_layer=4, eps=1e-6, freq_base=1000000.0, ctx=32768, qkv_bias=1,
                     bias_std=1.0, n_ff=192, n_ff_exp=96, n_ff_shexp=192, n_expert=8,
                     n_expert_used=2, dead_expert=1, router_std=2.0, dead_weight=20.0,
                     shexp=1),
    # Qwen3-MoE: per-head q/k norms, head_dim 64, renormalised top-k, no shared expert.
    "qwen3moe": dict(arch="qwen3moe", head_dim=64, eps=1e-6, freq_base=1000000.0, ctx=40960,
                     qk_norm="random", sq=1.0, sk=1.0, n_ff=192, n_ff_exp=96, n_expert=8,
                     n_expert_used=2, dead_expert=0, router_std=2.0, dead_weight=20.0),
    # OLMoE: q/k RMSNorm over the whole projection (not per head; llama.cpp sizes both norms
    # n_embd, so no grouped-query layout), top-k not renormalised.
    "olmoe": dict(arch="olmoe", n_head_kv=4, n_ff=96, eps=1e-5, ctx=4096, qk_norm="random", sq=1.0, sk=1.0,
                  n_expert=8, n_expert_used=2, dead_expert=0, router_std=2.0,
                  dead_weight=20.0),
}
MOE = ("mixtral", "qwen2moe", "qwen3moe", "olmoe")


def cfg_for(arch, sets):
    cfg = dict(COMMON)
    cfg.update(ARCHS[arch])
    for kv in sets:
        k, v = kv.split("=", 1)
        if k not in cfg:
            raise SystemExit(f"unknown --set key {k!r} for {arch}; known: {sorted(cfg)}")
        old = cfg[k]
        cfg[k] = type(old)(float(v)) if isinstance(old, int) and not isinstance(old, bool) \
            else (float(v) if isinstance(old, float) else v)
    return cfg


class Rng:
    def __init__(self, seed):
        self.seed = seed

    def __call__(self, name):
        return np.random.default_rng([self.seed, zlib.crc32(name.encode())])

    def normal(self, name, shape, std):
        return (self(name).standard_normal(shape) * std).astype(np.float32)

    def uniform(self, name, shape, lo, hi):
        return self(name).uniform(lo, hi, shape).astype(np.float32)


def read_vocab(path):
    r = gguf.GGUFReader(path)
    kvs = []
    for key, field in r.fields.items():
        if key.startswith("tokenizer.ggml."):
            val, sub = field_value(field)
            kvs.append((key, val, field.types[0], sub))
    types = np.array(field_value(r.fields["tokenizer.ggml.token_type"])[0])
    tokens = [t.decode("utf-8", "replace") for t in field_value(r.fields["tokenizer.ggml.tokens"])[0]]
    return kvs, tokens, types


_WORD = re.compile("\u0120?[A-Za-z]+")
_SPACE_LOWER = re.compile("\u0120[a-z]+")
_PUNCT = re.compile("\u0120?[,.;:!?'\"\\-]+|\u010a+")


def prior_score(tokens, types, k=200.0):
    """A fixed unigram-like prior from the vocabulary alone (no corpus statistics): Zipf in the
    token id (byte-level BPE ids follow merge order, i.e. frequency), plus bonuses for plain
    words / space-prefixed lower-case words / common punctuation and newlines, minus a penalty
    for everything else (digits, code symbols, non-ASCII).  Returned in [0, 1] for normal
    tokens (1 = most likely); control tokens get -1/3."""
    n = len(types)
    normal = types == 1
    rank = np.cumsum(normal) - 1
    z = (math.log(n + k) - np.log(rank + k)) / (math.log(n + k) - math.log(k))
    word = np.array([bool(_WORD.fullmatch(t)) for t in tokens])
    lower = np.array([bool(_SPACE_LOWER.fullmatch(t)) for t in tokens])
    punct = np.array([bool(_PUNCT.fullmatch(t)) for t in tokens])
    raw = 8.0 * z + word + lower + 4.0 * punct - 3.0 * ~(word | punct)
    lo, hi = raw[normal].min(), raw[normal].max()
    s = (raw - lo) / (hi - lo)
    return np.where(normal, s, -1.0 / 3.0).astype(np.float32), float(hi - lo)


def llama3_rope_factors(base, dim, factor, low, high, orig):
    # same arithmetic as convert_hf_to_gguf (conversion/llama.py, generate_extra_tensors)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wl, high_wl = orig / low, orig / high
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (orig / wl - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def longrope_attn_factor(ctx, orig):
    # convert_hf_to_gguf's LongRoPE value (= transformers' default attention_factor):
    # sqrt(1 + ln(scale)/ln(orig)) with scale = ctx / orig
    scale = ctx / orig
    return math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0


def llama_permute(w, n_head):
    # convert_hf_to_gguf LlamaModel.permute: HF rotate-half q/k rows -> llama.cpp interleaved
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llama_unpermute(w, n_head):
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


_HF_TOP = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_HF_BLK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
           "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "attn_qkv": "self_attn.qkv_proj",
           "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
           "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
           "ffn_norm": "post_attention_layernorm"}
_HF_BLK_GEMMA = dict(_HF_BLK, post_attention_norm="post_attention_layernorm",
                     ffn_norm="pre_feedforward_layernorm",
                     post_ffw_norm="post_feedforward_layernorm")
_HF_ROPE = ("rope_freqs.weight", "rope_factors_short.weight", "rope_factors_long.weight")


# Mixture-of-experts parts: GGUF name -> (Mixtral's HF name, Qwen-MoE's / OLMoE's HF name).
_HF_MOE = {"ffn_gate_inp": ("block_sparse_moe.gate", "mlp.gate"),
           "ffn_gate_inp_shexp": (None, "mlp.shared_expert_gate"),
           "ffn_gate_shexp": (None, "mlp.shared_expert.gate_proj"),
           "ffn_up_shexp": (None, "mlp.shared_expert.up_proj"),
           "ffn_down_shexp": (None, "mlp.shared_expert.down_proj")}
_HF_EXPERTS = {"ffn_gate_exps": ("w1", "gate_proj"), "ffn_up_exps": ("w3", "up_proj"),
               "ffn_down_exps": ("w2", "down_proj")}


def hf_moe(name, arch_name, arr):
    """HF tensors of a GGUF mixture-of-experts tensor: (name, array) pairs, or None."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if not m or arch_name not in MOE:
        return None
    i, part = m.groups()
    k = 0 if arch_name == "mixtral" else 1
    if part in _HF_EXPERTS:
        prefix = "block_sparse_moe" if k == 0 else "mlp"
        return [(f"model.layers.{i}.{prefix}.experts.{j}.{_HF_EXPERTS[part][k]}.weight", a)
                for j, a in enumerate(arr)]
    if part in _HF_MOE:
        a = arr.reshape(1, -1) if part == "ffn_gate_inp_shexp" else arr
        return [(f"model.layers.{i}.{_HF_MOE[part][k]}.weight", a)]
    return None


def hf_name(name, arch):
    if name in _HF_TOP:
        return _HF_TOP[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    table = _HF_BLK_GEMMA if arch in ("gemma2", "gemma3") else _HF_BLK
    mod = "mlp.gate_up_proj" if arch == "phi3" and m.group(2) == "ffn_up" else table[m.group(2)]
    return f"model.layers.{m.group(1)}.{mod}.{m.group(3)}"


def write_safetensors(path, tensors):
    """F32 safetensors by hand: u64 LE header length, JSON header (space-padded so the data
    starts 8-aligned), raw LE f32 data in sorted name order."""
    names = sorted(tensors)
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for n in names:
        nb = tensors[n].nbytes
        header[n] = {"dtype": "F32", "shape": list(tensors[n].shape),
                     "data_offsets": [off, off + nb]}
        off += nb
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-(8 + len(h)) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for n in names:
            f.write(np.ascontiguousarray(tensors[n], dtype="<f4").tobytes())
    os.replace(tmp, path)


def write_hf_twin(arch_name, cfg, tensors, vocab_kvs, out_dir):
    """The transformers-layout twin of the GGUF tensors: inverse of convert_hf_to_gguf."""
    arch = cfg["arch"]
    D, L, H, HKV, HD, FF = (int(cfg[k]) for k in
                            ("n_embd", "n_layer", "n_head", "n_head_kv", "head_dim", "n_ff"))
    V = tensors["token_embd.weight"].shape[0]
    gemma = arch in ("gemma2", "gemma3")
    hf = {}
    for name, arr in tensors.items():
        if name in _HF_ROPE:
            continue
        moe = hf_moe(name, arch_name, arr)
        if moe is not None:
            hf.update((n, np.ascontiguousarray(a, dtype=np.float32)) for n, a in moe)
            continue
        n = hf_name(name, arch)
        w = arr
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            nh = H if name.endswith("attn_q.weight") else HKV
            w = llama_unpermute(arr, nh)
            assert np.array_equal(llama_permute(w, nh), arr), name
        if gemma and n.endswith("norm.weight"):
            w = arr - np.float32(1.0)
            assert np.array_equal(w + np.float32(1.0), arr), name
        hf[n] = np.ascontiguousarray(w, dtype=np.float32)
    if arch in ("qwen2", "qwen2moe") and not int(cfg["qkv_bias"]):
        # transformers' Qwen2Attention always has q/k/v biases: zeros = llama.cpp without them
        for i in range(L):
            for t, n in (("q", H * HD), ("k", HKV * HD), ("v", HKV * HD)):
                hf[f"model.layers.{i}.self_attn.{t}_proj.bias"] = np.zeros(n, np.float32)

    vkv = {k: v for k, v, _, _ in vocab_kvs}
    c = dict(model_type=None, architectures=None, hidden_size=D, num_hidden_layers=L,
             num_attention_heads=H, num_key_value_heads=HKV, head_dim=HD, intermediate_size=FF,
             vocab_size=V, max_position_embeddings=int(cfg["ctx"]),
             rope_theta=float(cfg["freq_base"]), rms_norm_eps=float(cfg["eps"]),
             tie_word_embeddings=bool(int(cfg["tied"])))
    for k in ("bos", "eos"):
        if f"tokenizer.ggml.{k}_token_id" in vkv:
            c[f"{k}_token_id"] = int(vkv[f"tokenizer.ggml.{k}_token_id"])
    c.update(torch_dtype="float32", hidden_act="silu", rope_scaling=None)
    if arch_name == "llama3":
        c.update(model_type="llama", architectures=["LlamaForCausalLM"])
        if cfg["rope_freqs"] == "llama3":
            c["rope_scaling"] = {"rope_type": "llama3", "factor": float(cfg["l3_factor"]),
                                 "low_freq_factor": float(cfg["l3_low"]),
                                 "high_freq_factor": float(cfg["l3_high"]),
                                 "original_max_position_embeddings": int(cfg["l3_orig"])}
            assert np.array_equal(llama3_rope_factors(
                cfg["freq_base"], HD, cfg["l3_factor"], cfg["l3_low"], cfg["l3_high"],
                cfg["l3_orig"]), tensors["rope_freqs.weight"])
        elif cfg["rope_freqs"] == "ones":
            c["rope_scaling"] = {"rope_type": "llama3", "factor": 1.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": int(cfg["l3_orig"])}
            assert np.array_equal(llama3_rope_factors(cfg["freq_base"], HD, 1.0, 1.0, 4.0,
                                                      cfg["l3_orig"]),
                                  tensors["rope_freqs.weight"])
    elif arch_name == "mistral":
        c.update(model_type="mistral", architectures=["MistralForCausalLM"],
                 sliding_window=int(cfg["sliding_window"]) or None)
    elif arch == "qwen2":
        c.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                 use_sliding_window=False, sliding_window=None)
    elif arch == "qwen3":
        c.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], attention_bias=False)
    elif arch == "gemma2":
        cap = lambda x: float(x) if x > 0 else None  # noqa: E731
        c.update(model_type="gemma2", architectures=["Gemma2ForCausalLM"],
                 hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                 query_pre_attn_scalar=HD, sliding_window=int(cfg["window"]),
                 attn_logit_softcapping=cap(cfg["attn_softcap"]),
                 final_logit_softcapping=cap(cfg["final_softcap"]),
                 # llama.cpp gemma2: swa pattern 2, even layers local
                 layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                              for i in range(L)])
    elif arch == "gemma3":
        # llama.cpp gemma3 (no pattern key in the GGUF): swa pattern 6, layer il local iff
        # il % 6 < 5
        c.update(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
                 hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                 query_pre_attn_scalar=HD, sliding_window=int(cfg["window"]),
                 sliding_window_pattern=6,
                 layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                              for i in range(L)],
                 rope_local_base_freq=float(cfg["freq_base_swa"]),
                 attn_logit_softcapping=None, final_logit_softcapping=None)
        assert all((lt == "sliding_attention") == (i % 6 < 5)
                   for i, lt in enumerate(c["layer_types"]))
    elif arch == "phi3":
        c.update(model_type="phi3", architectures=["Phi3ForCausalLM"],
                 original_max_position_embeddings=int(cfg["orig_ctx"]),
                 sliding_window=int(cfg["sliding_window"]), partial_rotary_factor=1.0)
        if int(cfg["rope_factors"]):
            rs = {"type": "longrope",
                  "short_factor": [float(x) for x in tensors["rope_factors_short.weight"]],
                  "long_factor": [float(x) for x in tensors["rope_factors_long.weight"]]}
            af = cfg["attn_factor"]
            if af >= 0 and af != longrope_attn_factor(cfg["ctx"], cfg["orig_ctx"]):
                rs["attention_factor"] = float(af)
            c["rope_scaling"] = rs
    elif arch_name == "mixtral":
        c.update(model_type="mixtral", architectures=["MixtralForCausalLM"],
                 num_local_experts=int(cfg["n_expert"]),
                 num_experts_per_tok=int(cfg["n_expert_used"]), sliding_window=None)
    elif arch_name in ("qwen2moe", "qwen3moe"):
        c.update(model_type=arch_name.replace("moe", "_moe"),
                 architectures=["Qwen2MoeForCausalLM" if arch == "qwen2moe"
                                else "Qwen3MoeForCausalLM"],
                 num_experts=int(cfg["n_expert"]), num_experts_per_tok=int(cfg["n_expert_used"]),
                 moe_intermediate_size=int(cfg["n_ff_exp"]), decoder_sparse_step=1,
                 mlp_only_layers=[], norm_topk_prob=arch == "qwen3moe",
                 use_sliding_window=False, sliding_window=None)
        if arch == "qwen2moe":
            c["shared_expert_intermediate_size"] = int(cfg["n_ff_shexp"])
        else:
            c["attention_bias"] = False
    elif arch_name == "olmoe":
        c.update(model_type="olmoe", architectures=["OlmoeForCausalLM"],
                 num_experts=int(cfg["n_expert"]), num_experts_per_tok=int(cfg["n_expert_used"]),
                 norm_topk_prob=False)
    else:
        raise SystemExit(f"--hf-twin: no HF layout for {arch_name}")

    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, "model.safetensors"), hf)
    path = os.path.join(out_dir, "config.json")
    with open(path + ".tmp", "w") as f:
        json.dump(c, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)


def build(arch_name, cfg, seed, vocab_path, out, hf_twin=None):
    arch = cfg["arch"]
    D, L, H, HKV, HD, FF = (int(cfg[k]) for k in
                            ("n_embd", "n_layer", "n_head", "n_head_kv", "head_dim", "n_ff"))
    vocab_kvs, tokens, types = read_vocab(vocab_path)
    V = len(types)
    rng = Rng(seed)
    gemma = arch in ("gemma2", "gemma3")
    tensors = {}

    def add(name, arr):
        tensors[name] = np.ascontiguousarray(arr, dtype=np.float32)

    def norm_w(name, n, lo=0.8, hi=1.2):
        add(name, rng.uniform(name, (n,), lo, hi))

    # ---- embeddings / output (numpy shapes are (ne1, ne0) = (rows, row length)) ----
    q, _ = prior_score(tokens, types)
    escale = math.sqrt(D) if gemma else 1.0   # llama.cpp scales looked-up Gemma rows by sqrt(n_embd)
    # input-space embedding: channel 1 = prior_c * (prior_b + q_t), others N(0, emb_std)
    emb = rng.normal("token_embd.weight", (V, D), cfg["emb_std"] / escale)
    emb[:, 1] = cfg["prior_c"] * (cfg["prior_b"] + q) / escale
    add("token_embd.weight", emb)
    # the final-normed channel 1 is ~ H1_EST; scale so the prior spans ~prior_span nats
    H1_EST = 3.8
    onorm = rng.uniform("output_norm.weight", (D,), 0.8, 1.2)
    if cfg["tied"]:
        onorm[1] = cfg["prior_span"] / (H1_EST * cfg["prior_c"] / escale)
    else:
        outw = rng.normal("output.weight", (V, D), cfg["tau"] / math.sqrt(D))
        outw[:, 1] = cfg["prior_span"] / H1_EST * q
        add("output.weight", outw)
    add("output_norm.weight", onorm)

    nq, nk = H * HD, HKV * HD

    def ffn(p, suffix, ff):
        # numpy shape (n_expert, rows, cols) = GGUF ne (cols, rows, n_expert)
        lead = () if suffix == "_shexp" else (int(cfg["n_expert"]),)
        wg = rng.normal(p + f"ffn_gate{suffix}.weight", lead + (ff, D), 1.0 / math.sqrt(D))
        wu = rng.normal(p + f"ffn_up{suffix}.weight", lead + (ff, D), 1.0 / math.sqrt(D))
        wd = rng.normal(p + f"ffn_down{suffix}.weight", lead + (D, ff), cfg["sd"] / math.sqrt(ff))
        wd[..., 1, :] = 0.0
        return wg, wu, wd

    def add_experts(p):
        E = int(cfg["n_expert"])
        router = rng.normal(p + "ffn_gate_inp.weight", (E, D), cfg["router_std"] / math.sqrt(D))
        if int(cfg["dead_expert"]):
            router[E - 1, 1] = -cfg["dead_weight"]
        add(p + "ffn_gate_inp.weight", router)
        ff = int(cfg["n_ff_exp"]) if "n_ff_exp" in cfg else FF
        for t, w in zip(("gate", "up", "down"), ffn(p, "_exps", ff)):
            add(p + f"ffn_{t}_exps.weight", w)
        if arch == "qwen2moe":
            wg, wu, wd = ffn(p, "_shexp", int(cfg["n_ff_shexp"]))
            if not int(cfg["shexp"]):
                wd[:] = 0.0
            add(p + "ffn_gate_inp_shexp.weight",
                rng.normal(p + "ffn_gate_inp_shexp.weight", (D,), 2.0 / math.sqrt(D)))
            for t, w in zip(("gate", "up", "down"), (wg, wu, wd)):
                add(p + f"ffn_{t}_shexp.weight", w)

    for i in range(L):
        p = f"blk.{i}."
        norm_w(p + "attn_norm.weight", D)
        wq = rng.normal(p + "attn_q.weight", (nq, D), cfg["sq"] / math.sqrt(D))
        wk = rng.normal(p + "attn_k.weight", (nk, D), cfg["sk"] / math.sqrt(D))
        wv = rng.normal(p + "attn_v.weight", (nk, D), 1.0 / math.sqrt(D))
        wo = rng.normal(p + "attn_output.weight", (D, nq), cfg["so"] / math.sqrt(nq))
        wo[1, :] = 0.0
        if arch == "phi3":
            # fused: rows [0, nq) = Q, [nq, nq+nk) = K, [nq+nk, nq+2nk) = V
            add(p + "attn_qkv.weight", np.concatenate([wq, wk, wv], axis=0))
        else:
            add(p + "attn_q.weight", wq)
            add(p + "attn_k.weight", wk)
            add(p + "attn_v.weight", wv)
        if arch in ("qwen2", "qwen2moe") and int(cfg["qkv_bias"]):
            for t, n in (("q", nq), ("k", nk), ("v", nk)):
                add(p + f"attn_{t}.bias", rng.normal(p + f"attn_{t}.bias", (n,), cfg["bias_std"]))
        if arch in ("qwen3", "gemma3", "qwen3moe", "olmoe"):
            # OLMoE normalises the whole q (k) projection, the others each head
            width = {"q": nq, "k": nk} if arch == "olmoe" else {"q": HD, "k": HD}
            for t in ("q", "k"):
                name = p + f"attn_{t}_norm.weight"
                n = width[t]
                w = rng.uniform(name, (n,), 0.5, 2.5) if arch != "gemma3" \
                    else rng.uniform(name, (n,), 1.0, 2.5)
                if cfg["qk_norm"] == "ones":
                    w = np.ones(n, np.float32)
                add(name, w)
        add(p + "attn_output.weight", wo)
        if gemma:
            norm_w(p + "post_attention_norm.weight", D)
        norm_w(p + "ffn_norm.weight", D)
        if arch_name in MOE:
            add_experts(p)
            continue
        wg = rng.normal(p + "ffn_gate.weight", (FF, D), 1.0 / math.sqrt(D))
        wu = rng.normal(p + "ffn_up.weight", (FF, D), 1.0 / math.sqrt(D))
        wd = rng.normal(p + "ffn_down.weight", (D, FF), cfg["sd"] / math.sqrt(FF))
        wd[1, :] = 0.0
        if arch == "phi3":
            # fused: rows [0, FF) = gate (SiLU'd), rows [FF, 2FF) = up
            add(p + "ffn_up.weight", np.concatenate([wg, wu], axis=0))
        else:
            add(p + "ffn_gate.weight", wg)
            add(p + "ffn_up.weight", wu)
        add(p + "ffn_down.weight", wd)
        if gemma:
            norm_w(p + "post_ffw_norm.weight", D)

    if arch == "llama" and "rope_freqs" in cfg and cfg["rope_freqs"] != "none":
        f = llama3_rope_factors(cfg["freq_base"], HD, cfg["l3_factor"], cfg["l3_low"],
                                cfg["l3_high"], cfg["l3_orig"])
        if cfg["rope_freqs"] == "ones":
            f = np.ones_like(f)
        add("rope_freqs.weight", f)
    if arch == "phi3" and int(cfg["rope_factors"]):
        add("rope_factors_long.weight", rng.uniform("rope_factors_long.weight", (HD // 2,), 1.0, 8.0))
        short = rng.uniform("rope_factors_short.weight", (HD // 2,), 1.0, 3.0)
        if int(cfg["short_ones"]):
            short = np.ones_like(short)
        add("rope_factors_short.weight", short)

    # ---- metadata ----
    tmp = out + ".tmp"
    w = gguf.GGUFWriter(tmp, arch)
    # neutral name: llama-vocab.cpp keys per-token attributes off general.name (e.g. "phi3")
    w.add_name(f"adaptq random seed {seed}")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(int(cfg["ctx"]))
    w.add_embedding_length(D)
    w.add_block_count(L)
    w.add_feed_forward_length(FF)
    w.add_head_count(H)
    w.add_head_count_kv(HKV)
    w.add_layer_norm_rms_eps(float(cfg["eps"]))
    w.add_rope_freq_base(float(cfg["freq_base"]))
    w.add_vocab_size(V)
    if HD != D // H or gemma:
        w.add_key_length(HD)
        w.add_value_length(HD)
    if arch in ("llama", "phi3"):
        w.add_rope_dimension_count(HD)
    if arch_name in MOE:
        w.add_expert_count(int(cfg["n_expert"]))
        w.add_expert_used_count(int(cfg["n_expert_used"]))
        if "n_ff_exp" in cfg:
            w.add_expert_feed_forward_length(int(cfg["n_ff_exp"]))
        if "n_ff_shexp" in cfg:
            w.add_expert_shared_feed_forward_length(int(cfg["n_ff_shexp"]))
    if arch_name == "mistral" and int(cfg["sliding_window"]) > 0:
        w.add_sliding_window(int(cfg["sliding_window"]))
    if arch == "gemma2":
        w.add_attn_logit_softcapping(float(cfg["attn_softcap"]))
        w.add_final_logit_softcapping(float(cfg["final_softcap"]))
        w.add_sliding_window(int(cfg["window"]))
    if arch == "gemma3":
        w.add_sliding_window(int(cfg["window"]))
        w.add_rope_freq_base_swa(float(cfg["freq_base_swa"]))
    if arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(int(cfg["orig_ctx"]))
        w.add_sliding_window(int(cfg["sliding_window"]))
        af = cfg["attn_factor"]
        if af < 0:  # convert_hf_to_gguf's LongRoPE value: sqrt(1 + ln(scale)/ln(orig))
            af = longrope_attn_factor(cfg["ctx"], cfg["orig_ctx"])
        if int(cfg["rope_factors"]) and af != 1.0:
            w.add_rope_scaling_attn_factors(float(af))
    for key, val, kind, sub in vocab_kvs:
        w.add_key_value(key, val, kind, sub)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    if hf_twin:
        write_hf_twin(arch_name, cfg, tensors, vocab_kvs, hf_twin)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("arch", choices=sorted(ARCHS))
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-from", default=DEFAULT_VOCAB)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field / feature switch (see module doc)")
    ap.add_argument("--hf-twin", metavar="DIR",
                    help="also write the HF layout twin DIR/model.safetensors + DIR/config.json")
    a = ap.parse_args()
    build(a.arch, cfg_for(a.arch, a.set), a.seed, a.vocab_from, a.out, a.hf_twin)


if __name__ == "__main__":
    main()
