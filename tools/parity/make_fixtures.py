#!/usr/bin/env python3
"""Builds the tiny random parity fixtures in tests/fixtures/parity/ with transformers itself.

For each model it writes <out>/<name>/{config.json, model.safetensors, expected.json}:
the checkpoint exactly as `save_pretrained` writes it, and the float32 eager-attention outputs of that
checkpoint *as reloaded from disk* (so the numbers belong to the bytes the Rust side reads).

Why the weights are re-randomised after transformers' own init: transformers sets every norm weight
to 1 and every bias to 0, and with those a forward that forgets a norm gain or a bias still matches.
Weights also get a larger spread than the default 0.02 so that logits differ clearly between tokens
(near-ties would make argmax and greedy decoding comparisons flaky).

expected.json keys (all numbers from float32; logits rounded to 9 significant digits, which is exact
for float32):
  prompts                 [P][T_p]           token ids, lengths 5, 9, 13
  logits                  [P][T_p][V]        each prompt run alone (batch 1, no padding)
  argmax                  [P][T_p]           argmax of logits
  min_top2_margin         [P]                smallest (top1 - top2) logit gap over the prompt's positions
  batched_max_abs_diff    float              max |batched - single| over valid positions (checked here)
  hidden_states_prompt0   [L+1][T_0][d]      transformers' output_hidden_states for prompt 0:
                                             [0] = embeddings (GPT-2: wte + wpe), [i] = output of block
                                             i-1 for i < L, [L] = final norm applied to the last block's
                                             output (HF convention; checked: [L] @ lm_head^T == logits)
  generate_prompt_index   int                which prompt greedy decoding starts from
  generated               [N]                the N = 8 new token ids (greedy, use_cache=True, no EOS stop)
  generated_min_margin    float              smallest top1 - top2 gap over the decoding steps
  generated_logits        [N][V]             logits that chose each generated token
  config_notes            {..}               facts about the config a reader must not miss
  torch_version, transformers_version, seed

Usage: python tools/parity/make_fixtures.py [--out tests/fixtures/parity]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

PROMPT_LENGTHS = (5, 9, 13)
NEW_TOKENS = 8
# Valid positions of a right-padded batch must match the unbatched run to this tolerance.
BATCH_TOL = 1e-4


def fixture_configs():
    """name -> (config, seed). Shapes are tiny but deliberately uneven so transposes show up."""
    gpt2 = GPT2Config(
        vocab_size=320,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        n_inner=None,  # 4 * n_embd, as in real GPT-2
        layer_norm_epsilon=1e-4,  # non-default (1e-5), catches a hard-coded epsilon
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=319,
        eos_token_id=319,
        initializer_range=0.1,
    )
    llama_tied = LlamaConfig(
        vocab_size=288,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,  # non-default; transformers 5 writes it under rope_parameters
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.1,
    )
    # GQA (2 KV heads for 4 query heads) and an explicit head_dim with heads * head_dim != hidden_size,
    # so q/k/v/o shapes differ from the hidden size; untied lm_head.
    llama_gqa = LlamaConfig(
        vocab_size=352,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.1,
    )
    return {
        "gpt2-tiny": (gpt2, 1001),
        "llama-tiny": (llama_tied, 1002),
        "llama-tiny-gqa": (llama_gqa, 1003),
    }


def is_norm_param(name: str) -> bool:
    return "norm" in name or ".ln_" in name or name.startswith("ln_") or ".ln_f." in name


@torch.no_grad()
def rerandomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Norm gains ~ 1 + 0.1 N(0,1), norm biases and all other biases ~ 0.02 N(0,1)."""
    for name, p in model.named_parameters():
        if is_norm_param(name) and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith("bias"):
            p.copy_(0.02 * torch.randn(p.shape, generator=gen))


def round9(x: float) -> float:
    # 9 significant digits round-trip a float32 exactly while keeping the JSON short.
    return float(f"{x:.9g}")


def to_list(t: torch.Tensor):
    if t.dim() == 0:
        return round9(t.item())
    return [to_list(row) for row in t] if t.dim() > 1 else [round9(v) for v in t.tolist()]


def top2_margin(logits: torch.Tensor) -> float:
    top = logits.topk(2, dim=-1).values
    return float((top[..., 0] - top[..., 1]).min())


def save_checkpoint(model, out_dir: Path) -> None:
    """save_pretrained into a temp dir, keep only config.json + model.safetensors, move into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        except TypeError:  # transformers versions without the argument always write safetensors
            model.save_pretrained(tmp)
        for f in ("config.json", "model.safetensors"):
            if not (Path(tmp) / f).is_file():
                sys.exit(f"save_pretrained did not write {f} (wrote {os.listdir(tmp)})")
        out_dir.mkdir(exist_ok=True)
        for f in ("config.json", "model.safetensors"):
            os.replace(Path(tmp) / f, out_dir / f)


@torch.no_grad()
def greedy_with_cache(model, prompt: torch.Tensor, n: int):
    """Greedy decoding through the KV cache, written out so every step's logits are visible."""
    out = model(input_ids=prompt[None], use_cache=True)
    past = out.past_key_values
    step_logits = out.logits[0, -1]
    tokens, logits_per_step = [], []
    for _ in range(n):
        nxt = int(step_logits.argmax())
        tokens.append(nxt)
        logits_per_step.append(step_logits.clone())
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        step_logits = out.logits[0, -1]
    return tokens, torch.stack(logits_per_step)


@torch.no_grad()
def expected_outputs(model, cfg, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed + 7)
    vocab = cfg.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=gen) for n in PROMPT_LENGTHS]

    single = [model(input_ids=p[None]).logits[0] for p in prompts]

    # One right-padded batch with an attention mask; the valid positions must not move.
    t_max = max(PROMPT_LENGTHS)
    ids = torch.zeros(len(prompts), t_max, dtype=torch.long)
    mask = torch.zeros(len(prompts), t_max, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
        mask[i, : len(p)] = 1
    batched = model(input_ids=ids, attention_mask=mask).logits
    batch_diff = max(
        float((batched[i, : len(p)] - single[i]).abs().max()) for i, p in enumerate(prompts)
    )
    if batch_diff > BATCH_TOL:
        sys.exit(f"right-padded batch differs from single runs by {batch_diff} > {BATCH_TOL}")

    hs = model(input_ids=prompts[0][None], output_hidden_states=True).hidden_states
    if len(hs) != cfg.num_hidden_layers + 1:
        sys.exit(f"expected {cfg.num_hidden_layers + 1} hidden states, got {len(hs)}")
    head = model.get_output_embeddings().weight
    if float((hs[-1][0] @ head.T - single[0]).abs().max()) > 1e-4:
        sys.exit("last hidden state is not the final-norm output (lm_head(hs[-1]) != logits)")

    gen_idx = 1
    tokens, step_logits = greedy_with_cache(model, prompts[gen_idx], NEW_TOKENS)
    # Cross-check the cached decode against recomputing the whole sequence each step.
    seq = prompts[gen_idx].tolist()
    for t in tokens:
        full = model(input_ids=torch.tensor([seq])).logits[0, -1]
        if int(full.argmax()) != t:
            sys.exit("cached greedy decoding disagrees with full recomputation")
        seq.append(t)
    # And against transformers' own generate (EOS disabled so all N tokens come out).
    hf = model.generate(
        prompts[gen_idx][None],
        attention_mask=torch.ones(1, len(prompts[gen_idx]), dtype=torch.long),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        use_cache=True,
        eos_token_id=None,
        pad_token_id=0,
    )[0, len(prompts[gen_idx]) :].tolist()
    if hf != tokens:
        sys.exit(f"model.generate gave {hf}, the explicit cached loop gave {tokens}")

    return {
        "prompts": [p.tolist() for p in prompts],
        "logits": [to_list(l) for l in single],
        "argmax": [l.argmax(-1).tolist() for l in single],
        "min_top2_margin": [round9(top2_margin(l)) for l in single],
        "batched_max_abs_diff": round9(batch_diff),
        "hidden_states_prompt0": [to_list(h[0]) for h in hs],
        "generate_prompt_index": gen_idx,
        "generated": tokens,
        "generated_min_margin": round9(top2_margin(step_logits)),
        "generated_logits": to_list(step_logits),
    }


def config_notes(cfg) -> dict:
    notes = {"model_type": cfg.model_type, "tie_word_embeddings": bool(cfg.tie_word_embeddings)}
    if cfg.model_type == "llama":
        notes["rope_theta"] = float(cfg.rope_parameters["rope_theta"])
        notes["rope_theta_location"] = (
            "config.json has no top-level rope_theta: transformers >= 5 writes "
            "rope_parameters.rope_theta"
        )
        notes["head_dim"] = cfg.head_dim
        notes["num_key_value_heads"] = cfg.num_key_value_heads
    else:
        notes["layer_norm_epsilon"] = cfg.layer_norm_epsilon
    return notes


def build_one(name: str, cfg, seed: int, out_root: Path) -> None:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager", dtype=torch.float32
    )
    rerandomize(model, torch.Generator().manual_seed(seed + 1))
    out_dir = out_root / name
    save_checkpoint(model, out_dir)

    # Expectations come from the checkpoint as read back, not the in-memory model.
    reloaded = AutoModelForCausalLM.from_pretrained(
        out_dir, attn_implementation="eager", dtype=torch.float32
    ).eval()
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        if n1 != n2 or not torch.equal(p1, p2):
            sys.exit(f"{name}: reloaded tensor {n2} differs from saved {n1}")

    expected = expected_outputs(reloaded, reloaded.config, seed)
    expected.update(
        {
            "config_notes": config_notes(reloaded.config),
            "seed": seed,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
        }
    )
    tmp = out_dir / "expected.json.tmp"
    tmp.write_text(json.dumps(expected, separators=(",", ":")) + "\n")
    os.replace(tmp, out_dir / "expected.json")

    sizes = {f.name: f.stat().st_size for f in out_dir.iterdir()}
    total = sum(sizes.values())
    print(
        f"{name}: {total / 1e6:.2f} MB {sizes}; batch diff {expected['batched_max_abs_diff']:.2e}; "
        f"min top2 margins {expected['min_top2_margin']}, generate {expected['generated_min_margin']:.3g}"
    )
    if total > 1.5e6:
        sys.exit(f"{name}: fixture is {total} bytes, over the 1.5 MB budget")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/parity"))
    ap.add_argument("--only", nargs="*", help="fixture names to (re)build; default all")
    args = ap.parse_args()
    torch.set_num_threads(1)  # deterministic reduction order across machines
    for name, (cfg, seed) in fixture_configs().items():
        if args.only and name not in args.only:
            continue
        build_one(name, cfg, seed, args.out)


if __name__ == "__main__":
    main()
