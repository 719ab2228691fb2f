#!/usr/bin/env python3
"""Cross-checks an `elder import-gguf` output against the reference `gguf` Python package.

Every tensor of the GGUF is dequantized by gguf-py (llama.cpp's own reader), and compared with the
imported safetensors. q_proj/k_proj are first re-permuted the way llama.cpp's converter does, so
this checks both the dequantizers and the un-permutation independently of any forward pass.

usage: tools/compare_gguf_import.py FILE.gguf MODEL_DIR      (pip install gguf safetensors numpy)
"""
import json
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import load_file

NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
         "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
         "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}
TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
       "output.weight": "lm_head.weight"}


def hf_name(name):
    if name in TOP:
        return TOP[name]
    _, layer, part, suffix = name.split(".")
    return f"model.layers.{layer}.{NAMES[part]}.{suffix}"


def permute(w, n_head):
    # llama.cpp convert_hf_to_gguf.py: LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main():
    gguf_path, model_dir = sys.argv[1], sys.argv[2]
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    ours = load_file(os.path.join(model_dir, "model.safetensors"))
    reader = GGUFReader(gguf_path)
    worst = 0.0
    for t in reader.tensors:
        ref = dequantize(t.data, t.tensor_type).astype(np.float32)
        mine = ours[hf_name(t.name)].astype(np.float32)
        if ".attn_q." in t.name:
            mine = permute(mine, cfg["num_attention_heads"])
        elif ".attn_k." in t.name:
            mine = permute(mine, cfg["num_key_value_heads"])
        ref = ref.reshape(mine.shape)
        diff = float(np.max(np.abs(ref - mine)))
        worst = max(worst, diff)
        if diff > 1e-6:
            print(f"MISMATCH {t.name} ({t.tensor_type.name}): max |diff| {diff}")
    print(f"compared {len(reader.tensors)} tensors, worst max |diff| = {worst}")
    sys.exit(0 if worst <= 1e-6 else 1)


if __name__ == "__main__":
    main()
