#!/usr/bin/env python3
"""A plain NumPy forward of GPT-2 and Llama, written from the math, checked against the fixtures.

Two uses: it proves the fixtures' expected logits follow from the checkpoint by the textbook math
(not by some transformers quirk), and it spells out the conventions a second implementation must
match, in the fewest lines:
- GPT-2: Conv1D weights are stored [d_in, d_out] (y = x W + b); c_attn splits into q, k, v in that
  order; gelu_new is the tanh approximation; LayerNorm uses the config's layer_norm_epsilon.
- Llama: nn.Linear weights are stored [d_out, d_in] (y = x W^T); RMSNorm x / sqrt(mean(x^2) + eps) * w;
  RoPE in the "rotate_half" layout (pairs (i, i + head_dim/2), not interleaved (2i, 2i+1)) with
  inv_freq = theta^(-2i/head_dim); query head h reads KV head h // (heads / kv_heads); scores scaled
  by 1/sqrt(head_dim); MLP down(silu(gate(x)) * up(x)); lm_head = embed_tokens when tied.

Usage: python tools/parity/numpy_ref.py [FIXTURE_DIR ...]   (default: all of tests/fixtures/parity/)
Exit status 1 when a fixture's logits differ from this forward by more than 1e-4.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

TOL = 1e-4


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def causal_attention(q, k, v):
    """q [H, T, hd], k/v [H, T, hd] -> [T, H*hd]."""
    t = q.shape[1]
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
    scores = np.where(np.tril(np.ones((t, t), dtype=bool)), scores, -np.inf)
    return (softmax(scores) @ v).transpose(1, 0, 2).reshape(t, -1)


def gpt2_forward(cfg, w, ids):
    d, heads, eps = cfg["n_embd"], cfg["n_head"], cfg["layer_norm_epsilon"]
    p = "transformer." if "transformer.wte.weight" in w else ""

    def ln(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]

    def conv1d(x, name):
        return x @ w[name + ".weight"] + w[name + ".bias"]

    def gelu_new(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    t = len(ids)
    x = w[p + "wte.weight"][ids] + w[p + "wpe.weight"][:t]
    for i in range(cfg["n_layer"]):
        b = f"{p}h.{i}."
        qkv = conv1d(ln(x, b + "ln_1"), b + "attn.c_attn")
        q, k, v = (qkv[:, j * d : (j + 1) * d].reshape(t, heads, -1).transpose(1, 0, 2) for j in range(3))
        x = x + conv1d(causal_attention(q, k, v), b + "attn.c_proj")
        x = x + conv1d(gelu_new(conv1d(ln(x, b + "ln_2"), b + "mlp.c_fc")), b + "mlp.c_proj")
    return ln(x, p + "ln_f") @ w[p + "wte.weight"].T


def llama_forward(cfg, w, ids):
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
    eps = cfg["rms_norm_eps"]
    theta = cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)

    def rms(x, name):
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w[name]

    def lin(x, name):
        return x @ w[name].T

    t = len(ids)
    inv_freq = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(t)[:, None] * inv_freq[None, :]  # [T, hd/2]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # [H, T, hd]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + np.concatenate([-x2, x1], -1) * sin

    x = w["model.embed_tokens.weight"][ids].astype(np.float64)
    for i in range(cfg["num_hidden_layers"]):
        b = f"model.layers.{i}."
        h = rms(x, b + "input_layernorm.weight")
        q = rope(lin(h, b + "self_attn.q_proj.weight").reshape(t, heads, hd).transpose(1, 0, 2))
        k = rope(lin(h, b + "self_attn.k_proj.weight").reshape(t, kv, hd).transpose(1, 0, 2))
        v = lin(h, b + "self_attn.v_proj.weight").reshape(t, kv, hd).transpose(1, 0, 2)
        group = heads // kv
        k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
        x = x + lin(causal_attention(q, k, v), b + "self_attn.o_proj.weight")
        h = rms(x, b + "post_attention_layernorm.weight")
        gate = lin(h, b + "mlp.gate_proj.weight")
        act = gate / (1 + np.exp(-gate)) * lin(h, b + "mlp.up_proj.weight")
        x = x + lin(act, b + "mlp.down_proj.weight")
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return rms(x, "model.norm.weight") @ head.T


def check(fixture: Path) -> float:
    cfg = json.loads((fixture / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(fixture / "model.safetensors").items()}
    exp = json.loads((fixture / "expected.json").read_text())
    forward = gpt2_forward if cfg["model_type"] == "gpt2" else llama_forward
    worst = 0.0
    for ids, logits in zip(exp["prompts"], exp["logits"]):
        worst = max(worst, float(np.abs(forward(cfg, w, np.array(ids)) - np.array(logits)).max()))
    # Greedy continuation by full recomputation must reproduce the stored tokens.
    seq = list(exp["prompts"][exp["generate_prompt_index"]])
    for tok in exp["generated"]:
        nxt = int(forward(cfg, w, np.array(seq))[-1].argmax())
        if nxt != tok:
            print(f"{fixture.name}: greedy token {nxt} != expected {tok}")
            return float("inf")
        seq.append(tok)
    return worst


def main() -> int:
    dirs = [Path(a) for a in sys.argv[1:]] or sorted(
        p for p in Path("tests/fixtures/parity").iterdir() if (p / "expected.json").is_file()
    )
    ok = True
    for d in dirs:
        worst = check(d)
        good = worst <= TOL
        ok &= good
        print(f"{d.name}: max |numpy - expected| logits {worst:.2e} {'ok' if good else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
