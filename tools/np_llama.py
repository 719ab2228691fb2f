#!/usr/bin/env python3
"""A tiny, obviously-plain numpy Llama forward pass, to check an imported HF directory.

Loads config.json / model.safetensors / tokenizer.json from MODEL_DIR and greedily continues a
prompt. If the GGUF import got dequantization, the q/k row un-permutation or the tokenizer wrong,
the continuation is garbage; if it is right, "The capital of France is" continues with Paris.

usage: tools/np_llama.py MODEL_DIR ["prompt"] [--tokens N]
needs: pip install numpy safetensors tokenizers
"""
import argparse
import json
import os

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotate_half(x):
    # HF convention: pairs are (j, j + head_dim/2).
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def rope(x, pos, theta):
    # x: [heads, T, head_dim]
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.outer(pos, inv)                      # [T, hd/2]
    ang = np.concatenate([ang, ang], axis=-1)     # [T, hd]
    return (x * np.cos(ang) + rotate_half(x) * np.sin(ang)).astype(np.float32)


def silu(x):
    return x / (1.0 + np.exp(-x))


def forward(cfg, w, ids):
    """Logits [T, vocab] for every position of `ids` (no KV cache: simple, slow)."""
    T = len(ids)
    H, KV, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    x = w["model.embed_tokens.weight"][ids]       # [T, d]
    pos = np.arange(T)
    mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, H, hd).transpose(1, 0, 2)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, KV, hd).transpose(1, 0, 2)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, KV, hd).transpose(1, 0, 2)
        q, k = rope(q, pos, theta), rope(k, pos, theta)
        rep = H // KV                              # GQA: query head i uses kv head i // rep
        k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v     # [H, T, hd]
        x = x + a.transpose(1, 0, 2).reshape(T, H * hd) @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        g = silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + g @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("prompt", nargs="?", default="The capital of France is")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--score", metavar="TEXT",
                    help="also print the mean next-token NLL of TEXT (lower is better); this is "
                         "what tells a right q/k un-permutation from a wrong one, since a short "
                         "greedy continuation can survive a wrong rotary pairing")
    args = ap.parse_args()
    cfg = json.load(open(os.path.join(args.model_dir, "config.json")))
    w = load_file(os.path.join(args.model_dir, "model.safetensors"))
    w = {k: v.astype(np.float32) for k, v in w.items()}
    tok = Tokenizer.from_file(os.path.join(args.model_dir, "tokenizer.json"))
    if args.score:
        sids = tok.encode(args.score, add_special_tokens=False).ids
        logits = forward(cfg, w, sids)[:-1].astype(np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        nll = -logp[np.arange(len(sids) - 1), sids[1:]].mean()
        print(f"score: {len(sids)} tokens, mean NLL {nll:.4f} nats, perplexity {np.exp(nll):.2f}")
    ids = tok.encode(args.prompt, add_special_tokens=False).ids
    print("prompt ids:", ids)
    for _ in range(args.tokens):
        nxt = int(np.argmax(forward(cfg, w, ids)[-1]))
        ids.append(nxt)
        if nxt == cfg.get("eos_token_id"):
            break
    print("continuation:", repr(tok.decode(ids, skip_special_tokens=False)))


if __name__ == "__main__":
    main()
