#!/usr/bin/env python3
"""Writes tests/fixtures/gguf/{type}.raw (random k-quant blocks) and {type}.f32 (their values as
dequantized by gguf-py, llama.cpp's reference Python reader), for tests/gguf_dequant.rs.

usage: tools/make_kquant_fixtures.py   (pip install gguf numpy)
"""
import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "gguf")
rng = np.random.default_rng(1234)


def f16(lo, hi, n):
    return rng.uniform(lo, hi, n).astype(np.float16).tobytes()


def block(ty):
    r = lambda n: rng.integers(0, 256, n, dtype=np.uint8).tobytes()  # noqa: E731
    if ty == T.Q4_K:
        return f16(0.001, 0.1, 1) + f16(0.001, 0.1, 1) + r(12) + r(128)
    if ty == T.Q5_K:
        return f16(0.001, 0.1, 1) + f16(0.001, 0.1, 1) + r(12) + r(32) + r(128)
    if ty == T.Q6_K:
        return r(128) + r(64) + r(16) + f16(0.001, 0.1, 1)
    if ty == T.Q8_K:
        return rng.uniform(0.001, 0.1, 1).astype(np.float32).tobytes() + r(256) + r(32)
    raise ValueError(ty)


def main():
    os.makedirs(OUT, exist_ok=True)
    for ty in (T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_K):
        raw = b"".join(block(ty) for _ in range(3))
        try:
            ref = dequantize(np.frombuffer(raw, dtype=np.uint8), ty).astype("<f4")
        except NotImplementedError:
            print(f"gguf-py cannot dequantize {ty.name}; no fixture")
            continue
        name = ty.name.lower()
        open(os.path.join(OUT, f"{name}.raw"), "wb").write(raw)
        open(os.path.join(OUT, f"{name}.f32"), "wb").write(ref.tobytes())
        print(f"{name}: {len(raw)} bytes -> {ref.size} values")


if __name__ == "__main__":
    main()
