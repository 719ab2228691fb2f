#!/usr/bin/env python3
"""Compares the `elder` binary with transformers (float32, eager attention) on a real model directory.

For each (prompt, target) pair it runs
    BIN score --model DIR --prompt P --target T --json
        -> JSON with prompt_tokens, target_tokens, logprobs (one per target token), argmax (per target
           position: the model's top token when predicting that target token)
    BIN generate --model DIR --prompt P --max-new-tokens N
        -> the continuation (plain text on stdout, or JSON with "tokens"/"generated_tokens"/"text")
and computes the same quantities with transformers. The HF log-probs are computed on the token ids the
binary reports, so a tokenisation difference (reported separately) cannot hide or fake a numeric one.

Prints, per prompt: tokenisation agreement, max |delta logprob|, argmax agreement, greedy agreement;
then a summary line. Exit status: 0 all agree (max |delta| <= --tol, argmax and greedy equal),
1 some disagreement, 2 the binary or the model could not be run.

Usage:
  python tools/parity/compare_hf.py models/smollm2-135m --elder target/release/elder
  python tools/parity/compare_hf.py DIR --hf-only              # only the transformers side
  python tools/parity/compare_hf.py DIR --elder BIN --pairs pairs.jsonl --json report.json
pairs.jsonl: one {"prompt": ..., "target": ...} per line.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

DEFAULT_PAIRS = [
    {"prompt": "The capital of France is", "target": "Paris"},
    {"prompt": "The Eiffel Tower is located in the city of", "target": "Paris, France"},
    {"prompt": "Water boils at a temperature of", "target": "100 degrees Celsius"},
    {"prompt": "The author of the play Hamlet is", "target": "William Shakespeare"},
    {"prompt": "def fibonacci(n):\n    ", "target": "if n < 2:\n        return n"},
]


class ToolError(Exception):
    """The binary or the model could not be run (exit status 2)."""


def load_hf(model_dir: Path):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise ToolError(f"{tok_path} not found: the model directory needs a tokenizer.json")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
    except Exception as e:  # noqa: BLE001 - any loading failure is reported the same way
        raise ToolError(f"transformers cannot load {model_dir}: {e}") from e
    # The tokenizers library is the one the Rust crate binds, so both sides read tokenizer.json alike.
    return model, Tokenizer.from_file(str(tok_path))


def hf_tokenize(tok, prompt: str, target: str):
    """Prompt with the tokenizer's special tokens (e.g. Llama's BOS); target as ' ' + target, plain.

    This mirrors the edit input `prompt + " " + target` of the method; the comparison only reports
    whether the binary tokenised the same way, it does not depend on it.
    """
    p = tok.encode(prompt, add_special_tokens=True).ids
    full = tok.encode(prompt + " " + target, add_special_tokens=True).ids
    if full[: len(p)] == p:
        return p, full[len(p) :]
    # BPE merged across the boundary; fall back to encoding the target on its own.
    return p, tok.encode(" " + target, add_special_tokens=False).ids


@torch.no_grad()
def hf_score(model, prompt_ids: list[int], target_ids: list[int]):
    ids = torch.tensor([prompt_ids + target_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    n_p = len(prompt_ids)
    rows = logp[n_p - 1 : n_p - 1 + len(target_ids)]
    lp = [float(rows[j, t]) for j, t in enumerate(target_ids)]
    return lp, rows.argmax(-1).tolist()


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], n: int, eos: int | None):
    out = model.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        use_cache=True,
        eos_token_id=eos,
        pad_token_id=eos if eos is not None else 0,
    )
    return out[0, len(prompt_ids) :].tolist()


def run_bin(cmd: list[str], timeout: float) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise ToolError(f"cannot execute {cmd[0]}: {e}") from e
    except subprocess.TimeoutExpired as e:
        raise ToolError(f"{' '.join(cmd)} timed out after {timeout}s") from e
    if res.returncode != 0:
        raise ToolError(
            f"{' '.join(cmd)} exited with {res.returncode}\nstderr:\n{res.stderr.strip()[-2000:]}"
        )
    return res.stdout


def elder_score(args, prompt: str, target: str) -> dict:
    cmd = [args.elder, "score", "--model", str(args.model_dir), "--prompt", prompt,
           "--target", " " + target, "--json"]  # fmt: skip
    out = run_bin(cmd, args.timeout)
    try:
        # Tolerate log lines before the JSON object (pretty-printed or one line): parse from the
        # first line that opens an object.
        lines = out.strip().splitlines()
        start = next((i for i, l in enumerate(lines) if l.lstrip().startswith("{")), 0)
        data = json.loads("\n".join(lines[start:]))
    except json.JSONDecodeError as e:
        raise ToolError(f"`elder score --json` printed no JSON object: {out[:500]!r}") from e
    missing = {"prompt_tokens", "target_tokens", "logprobs", "argmax"} - data.keys()
    if missing:
        raise ToolError(f"`elder score --json` output lacks fields {sorted(missing)}: {data}")
    if len(data["logprobs"]) != len(data["target_tokens"]):
        raise ToolError(
            f"`elder score`: {len(data['logprobs'])} logprobs for "
            f"{len(data['target_tokens'])} target tokens"
        )
    return data


def elder_generate(args, prompt: str, tok) -> tuple[list[int] | None, str]:
    """Returns (token ids if the binary reported them, continuation text)."""
    cmd = [args.elder, "generate", "--model", str(args.model_dir), "--prompt", prompt,
           "--max-new-tokens", str(args.max_new_tokens)]  # fmt: skip
    out = run_bin(cmd, args.timeout)
    try:
        data = json.loads(out)
        ids = data.get("tokens") or data.get("generated_tokens")
        text = data.get("text") or data.get("completion")
        if text is None and ids is not None:
            text = tok.decode(ids)
        return ids, text if text is not None else ""
    except (json.JSONDecodeError, AttributeError):
        pass
    text = out.rstrip("\n")
    # A CLI that echoes the prompt before the continuation is accepted too.
    if text.startswith(prompt):
        text = text[len(prompt) :]
    return None, text


def compare_pair(args, model, tok, pair: dict, eos: int | None) -> dict:
    prompt, target = pair["prompt"], pair["target"]
    hf_p, hf_t = hf_tokenize(tok, prompt, target)
    r = {"prompt": prompt, "target": target, "hf_prompt_tokens": hf_p, "hf_target_tokens": hf_t}

    if args.hf_only:
        lp, am = hf_score(model, hf_p, hf_t)
        gen = hf_greedy(model, hf_p, args.max_new_tokens, eos)
        r.update(hf_logprobs=lp, hf_argmax=am, hf_generated=gen, hf_text=tok.decode(gen))
        return r

    es = elder_score(args, prompt, target)
    p_ids, t_ids = [int(x) for x in es["prompt_tokens"]], [int(x) for x in es["target_tokens"]]
    lp, am = hf_score(model, p_ids, t_ids)
    deltas = [abs(a - float(b)) for a, b in zip(lp, es["logprobs"])]
    r.update(
        elder_prompt_tokens=p_ids,
        elder_target_tokens=t_ids,
        tokens_agree=(p_ids == hf_p and t_ids == hf_t),
        hf_logprobs=lp,
        elder_logprobs=es["logprobs"],
        max_abs_dlogprob=max(deltas) if deltas else 0.0,
        hf_argmax=am,
        elder_argmax=es["argmax"],
        argmax_agree=[int(x) for x in es["argmax"]] == am,
    )

    gen = hf_greedy(model, p_ids, args.max_new_tokens, eos)
    hf_text = tok.decode(gen)
    e_ids, e_text = elder_generate(args, prompt, tok)
    if e_ids is not None:
        greedy_agree = [int(x) for x in e_ids] == gen
    else:
        # Text only: compare after trimming, since detokenisation of a leading space may differ.
        greedy_agree = e_text.strip() == hf_text.strip()
    r.update(hf_generated=gen, hf_text=hf_text, elder_generated=e_ids, elder_text=e_text,
             greedy_agree=greedy_agree)  # fmt: skip
    return r


def load_pairs(path: Path | None) -> list[dict]:
    if path is None:
        return DEFAULT_PAIRS
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            pairs.append({"prompt": str(obj["prompt"]), "target": str(obj["target"])})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            sys.exit(f"{path}:{n}: expected {{\"prompt\": ..., \"target\": ...}}: {e}")
    return pairs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--elder", help="path to the elder binary")
    ap.add_argument("--hf-only", action="store_true", help="run only the transformers side")
    ap.add_argument("--pairs", type=Path, help="JSONL of {prompt, target}; default: built-in pairs")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--tol", type=float, default=1e-3, help="max |delta logprob| that counts as agreement")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per binary call")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path, help="also write the full report here")
    args = ap.parse_args()
    if not args.hf_only and not args.elder:
        ap.error("give --elder BIN, or --hf-only")
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    try:
        model, tok = load_hf(args.model_dir)
        eos = model.generation_config.eos_token_id
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        results = []
        for pair in load_pairs(args.pairs):
            r = compare_pair(args, model, tok, pair, eos)
            results.append(r)
            if args.hf_only:
                print(f"{pair['prompt']!r}: logprobs {[round(x, 4) for x in r['hf_logprobs']]} "
                      f"greedy {r['hf_text']!r}")  # fmt: skip
            else:
                print(
                    f"{pair['prompt']!r} -> {pair['target']!r}: tokens "
                    f"{'same' if r['tokens_agree'] else 'DIFFER'}, max|dlogprob| "
                    f"{r['max_abs_dlogprob']:.2e}, argmax {'same' if r['argmax_agree'] else 'DIFFER'}, "
                    f"greedy {'same' if r['greedy_agree'] else 'DIFFER'}"
                )
                if not r["greedy_agree"]:
                    print(f"    hf:    {r['hf_text']!r}\n    elder: {r['elder_text']!r}")
                if not r["tokens_agree"]:
                    print(f"    hf tokens:    {r['hf_prompt_tokens']} | {r['hf_target_tokens']}\n"
                          f"    elder tokens: {r['elder_prompt_tokens']} | {r['elder_target_tokens']}")  # fmt: skip
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    ok = True
    if not args.hf_only:
        worst = max((r["max_abs_dlogprob"] for r in results), default=0.0)
        n_arg = sum(r["argmax_agree"] for r in results)
        n_gen = sum(r["greedy_agree"] for r in results)
        n_tok = sum(r["tokens_agree"] for r in results)
        ok = worst <= args.tol and n_arg == n_gen == len(results) and not math.isnan(worst)
        print(
            f"SUMMARY {'PASS' if ok else 'FAIL'}: max |dlogprob| {worst:.3e} (tol {args.tol:g}); "
            f"argmax agree {n_arg}/{len(results)}; greedy agree {n_gen}/{len(results)}; "
            f"tokenisation agree {n_tok}/{len(results)}"
        )
    if args.json:
        args.json.write_text(json.dumps({"ok": ok, "results": results}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
