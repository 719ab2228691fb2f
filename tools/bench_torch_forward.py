#!/usr/bin/env python3
"""Times transformers' forward pass of one prompt on a checkpoint: the PyTorch number to compare with.

What is timed: `model(input_ids)` of --batch sequences (default 1) of --tokens token ids (no KV
cache, under torch.inference_mode), after --warmup untimed runs, --reps times; the median is the
headline. With --decode-tokens N it also times greedy decoding of N tokens per sequence through the
KV cache after the prompt (ms per decode step, one token of each sequence), the comparison for the
engine's decode step (`cargo bench --bench cpu_forward -- cpu_decode_step`).

Attention: --attn sdpa (default; transformers' default, torch's fused scaled_dot_product_attention)
or --attn eager (the plain matmul-softmax-matmul path the parity fixtures use). Precision: float32
by default. Prompt ids are drawn with a fixed seed, so no tokenizer is needed (works on the
tests/fixtures/parity/ checkpoints too). CPU threads: torch.set_num_threads(--threads).

Usage:
  python tools/bench_torch_forward.py --model models/smollm2-135m --tokens 32 --threads 2
  python tools/bench_torch_forward.py --model DIR --device cuda --dtype bfloat16 --json out.json
Prints a human line, then one JSON line (also written to --json if given).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device: str, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="HF model dir (config.json + safetensors)")
    ap.add_argument("--tokens", type=int, default=32, help="prompt length")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--decode-tokens", type=int, default=0, help="also time N cached decode steps")
    ap.add_argument("--batch", type=int, default=1, help="sequences per call (prompt and decode)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the JSON result here")
    args = ap.parse_args()

    if args.tokens < 1 or args.reps < 1 or args.batch < 1:
        ap.error("--tokens, --reps and --batch must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=DTYPES[args.dtype], attn_implementation=args.attn
        )
    except Exception as e:  # noqa: BLE001
        print(f"error: transformers cannot load {args.model}: {e}", file=sys.stderr)
        return 2
    model = model.to(args.device).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.batch, args.tokens), generator=gen).to(args.device)

    with torch.inference_mode():
        times = time_it(lambda: model(input_ids=ids, use_cache=False), args.device, args.warmup, args.reps)

        decode_ms = None
        if args.decode_tokens > 0:

            def decode():
                out = model(input_ids=ids, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                sync(args.device)
                t0 = time.perf_counter()
                for _ in range(args.decode_tokens):
                    out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                sync(args.device)
                return (time.perf_counter() - t0) * 1e3 / args.decode_tokens

            decode()  # warm-up
            decode_ms = statistics.median(decode() for _ in range(max(1, args.reps // 4)))

    med = statistics.median(times)
    result = {
        "bench": "torch_forward",
        "model": str(args.model),
        "tokens": args.tokens,
        "batch": args.batch,
        "threads": args.threads,
        "attn": args.attn,
        "dtype": args.dtype,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "warmup": args.warmup,
        "reps": args.reps,
        "median_ms": med,
        "min_ms": min(times),
        "mean_ms": statistics.fmean(times),
        "prefill_tokens_per_s": args.batch * args.tokens / (med / 1e3),
        "decode_ms_per_token": decode_ms,
        "decode_tokens_per_s": None if decode_ms is None else args.batch / (decode_ms / 1e3),
        "times_ms": times,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    print(
        f"forward {args.batch} x {args.tokens} tokens ({args.attn}, {args.dtype}, {args.device}, {args.threads} threads): "
        f"median {med:.2f} ms, min {min(times):.2f} ms over {args.reps} reps"
        + (f"; decode {decode_ms:.2f} ms/step" if decode_ms is not None else "")
    )
    line = json.dumps(result)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
