#!/usr/bin/env python3
"""Times ELDER edits in PyTorch, done the way the released reference code does them.

The released ELDER code is a PEFT-style tuner layer; this script re-implements its behaviour on top of
a transformers model (see docs/elder-method.md for the method):

- MoLoRA: the --site linear (GPT-2: mlp.c_fc; Llama: mlp.up_proj or mlp.down_proj) of the last
  --layers blocks is wrapped: base(x) + sum_e w[b,e] * s * (x A_e) B_e, E experts of rank r, s = alpha/r,
  one router (Linear d_in -> E, with bias) per layer. Init: B = 0, A ~ U(+-1/sqrt(r)),
  router ~ U(+-1/sqrt(d_in)).
- Query: the input of the same --site linear one block below the first MoLoRA block, at the last
  prompt token. Every router reads this one query vector; routing is per sequence.
- Like the released code (and unlike the engine), routing is recomputed on every forward and, with
  --experts dense (default), ALL experts are computed and then weighted by the top-k-masked softmax
  (weights not renormalised); --experts topk computes only the k selected experts, for comparison.
- One edit = one (prompt, target) pair, input `prompt + " " + target`, cross-entropy on the target
  tokens only, plus lambda * sum over layers of the guided loss -sum_{i in preset} log p_i, where
  the preset is k experts per layer drawn from a seed derived from the edit's knowledge id.
- A fresh Adam per edit, --iters iterations (50), full forward + backward through the whole model
  each iteration (no prefix-activation reuse: that is an engine optimisation). Experts and routers
  persist across edits. After the last iteration the allocation code (top-k of every router) is taken.

PyTorch done well (--done-well, issue 19): only the k selected experts computed (--experts-compute
topk), the frozen prefix cached (the blocks below the first MoLoRA block run once per edit, under
no_grad, and the query is read then; each iteration runs the blocks from the first MoLoRA block on),
the head only on the rows that predict the target (`logits_to_keep`), SDPA attention, and with
--compile the model under torch.compile. The engine does all of these too (and fuses the head with
the loss), so this is the fair comparison; without the flag the script is the released code's way.

Timed: one whole edit (tokenise, build optimiser, --iters iterations, allocation code), wall clock,
synchronised on CUDA. --warmup-edits are run first and not counted. Prints the median seconds per
edit and a JSON line.

Edits: built-in (prompt, target) facts when the model dir has tokenizer.json, else random token ids
(--prompt-tokens / --target-tokens long), so the parity fixtures work as smoke tests.

Usage:
  python tools/bench_torch_edit.py --model models/gpt2-xl --threads 16            # c_fc
  python tools/bench_torch_edit.py --model models/smollm2-135m --site up_proj --threads 2
  python tools/bench_torch_edit.py --model tests/fixtures/parity/gpt2-tiny --layers 1 --edits 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SITES = {"gpt2": ("c_fc",), "llama": ("up_proj", "down_proj", "gate_proj")}
FACTS = [
    ("The capital of France is", "Lyon"),
    ("The Eiffel Tower is located in the city of", "Rome"),
    ("The mother tongue of Danielle Darrieux is", "English"),
    ("The author of Hamlet is", "Charles Dickens"),
    ("Water boils at a temperature of", "42 degrees"),
    ("The chairperson of the Federal Reserve is", "Ada Lovelace"),
    ("The Great Wall is in", "Canada"),
    ("Mount Everest belongs to the continent of", "Africa"),
]


def linear_shape(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or of GPT-2's Conv1D (weight stored [d_in, d_out])."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if type(base).__name__ == "Conv1D":
        return base.weight.shape[0], base.weight.shape[1]
    raise SystemExit(f"cannot wrap {type(base).__name__}: expected nn.Linear or Conv1D")


class RoutingState:
    """What the routers share within one forward: the query vector, and where to read it."""

    def __init__(self):
        self.query: torch.Tensor | None = None  # [B, d_in]
        self.last_prompt_index: torch.Tensor | None = None  # [B] long
        # --done-well: the query was read in the cached prefix pass; keep it.
        self.freeze_query = False


class MoLoRALinear(nn.Module):
    def __init__(self, base, state: RoutingState, experts: int, rank: int, alpha: float,
                 top_k: int, dense: bool):  # fmt: skip
        super().__init__()
        d_in, d_out = linear_shape(base)
        self.base, self.state, self.top_k, self.dense = base, state, top_k, dense
        self.scaling = alpha / rank
        bound_a = 1.0 / math.sqrt(rank)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(torch.empty(experts, d_in, rank, device=dev, dtype=dt).uniform_(-bound_a, bound_a))
        self.lora_b = nn.Parameter(torch.zeros(experts, rank, d_out, device=dev, dtype=dt))
        self.router = nn.Linear(d_in, experts, device=dev, dtype=dt)
        bound_r = 1.0 / math.sqrt(d_in)
        nn.init.uniform_(self.router.weight, -bound_r, bound_r)
        nn.init.uniform_(self.router.bias, -bound_r, bound_r)
        self.last_probs: torch.Tensor | None = None  # [B, E], kept for the guided loss

    def forward(self, x):  # x: [B, T, d_in]
        out = self.base(x)
        q = self.state.query
        if q is None:
            raise RuntimeError("MoLoRA layer ran before the query layer set the query vector")
        probs = torch.softmax(self.router(q), dim=-1)  # [B, E]
        self.last_probs = probs
        top_w, top_i = probs.topk(self.top_k, dim=-1)  # [B, k], not renormalised
        if self.dense:
            w = torch.zeros_like(probs).scatter(-1, top_i, top_w)  # [B, E]
            h = torch.einsum("btd,edr->bter", x, self.lora_a)
            y = torch.einsum("bter,ero->bteo", h, self.lora_b)
            delta = torch.einsum("be,bteo->bto", w, y)
        else:
            a, b = self.lora_a[top_i], self.lora_b[top_i]  # [B, k, d_in, r], [B, k, r, d_out]
            h = torch.einsum("btd,bkdr->btkr", x, a) * top_w[:, None, :, None]
            delta = torch.einsum("btkr,bkro->bto", h, b)
        return out + self.scaling * delta


@torch.no_grad()
def self_check(seed: int = 0) -> None:
    """Dense, top-k and a per-expert loop must give the same MoLoRA output on random weights."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(24, 40)
    state = RoutingState()
    x = torch.randn(3, 5, 24, generator=g)
    state.query = torch.randn(3, 24, generator=g)
    outs = []
    for dense in (True, False):
        torch.manual_seed(seed)
        m = MoLoRALinear(base, state, experts=5, rank=4, alpha=8.0, top_k=2, dense=dense)
        m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=torch.Generator().manual_seed(seed + 1)))
        outs.append(m(x))
    probs = torch.softmax(m.router(state.query), -1)
    ref = base(x).clone()
    for b in range(3):
        for e in probs[b].topk(2).indices.tolist():
            ref[b] += probs[b, e] * m.scaling * (x[b] @ m.lora_a[e]) @ m.lora_b[e]
    for name, out in zip(("dense", "topk"), outs):
        err = float((out - ref).abs().max())
        if err > 1e-5:
            raise SystemExit(f"self-check failed: {name} MoLoRA differs from the per-expert loop by {err}")
    print("self-check passed: dense == topk == per-expert loop")


class CachedPrefix(nn.Module):
    """Stands in for a block below the first MoLoRA block while an edit trains: the first one
    returns the hidden states its real stack computed once for this edit, the others pass them on."""

    def __init__(self, slot: dict, first: bool):
        super().__init__()
        self.slot, self.first = slot, first

    def forward(self, hidden_states, *args, **kwargs):
        return self.slot["hidden"] if self.first else hidden_states


def blocks_of(model):
    if hasattr(model, "transformer"):
        return model.transformer.h
    return model.model.layers


def install_elder(model, args) -> tuple[list[MoLoRALinear], RoutingState, list[int], int]:
    arch = model.config.model_type
    if arch not in SITES:
        raise SystemExit(f"model_type {arch!r} not supported (gpt2, llama)")
    site = args.site or SITES[arch][0]
    if site not in SITES[arch]:
        raise SystemExit(f"--site {site} is not an FFN linear of {arch}: choose from {SITES[arch]}")
    blocks = blocks_of(model)
    n = len(blocks)
    if args.layers + 1 > n:
        raise SystemExit(f"{args.layers} MoLoRA layers plus a query layer need {args.layers + 1} blocks, model has {n}")
    first = n - args.layers if args.first_block is None else args.first_block
    if not 1 <= first <= n - args.layers:
        raise SystemExit(f"--first-block {first}: {args.layers} MoLoRA layers from there do not fit in {n} blocks")
    layer_ids = list(range(first, first + args.layers))
    query_block = layer_ids[0] - 1 if args.query_block is None else args.query_block
    if not 0 <= query_block < layer_ids[0]:
        raise SystemExit(f"--query-block {query_block} must be below the first MoLoRA block {layer_ids[0]}")

    state = RoutingState()

    def capture_query(_module, inputs):
        if state.freeze_query:
            return
        x = inputs[0]  # [B, T, d_in]
        idx = state.last_prompt_index
        state.query = x[torch.arange(x.shape[0], device=x.device), idx]

    getattr(blocks[query_block].mlp, site).register_forward_pre_hook(capture_query)
    q_in = linear_shape(getattr(blocks[query_block].mlp, site))[0]
    layers = []
    for i in layer_ids:
        base = getattr(blocks[i].mlp, site)
        if linear_shape(base)[0] != q_in:
            raise SystemExit(f"query width {q_in} != MoLoRA input width {linear_shape(base)[0]}")
        m = MoLoRALinear(base, state, args.experts, args.rank, args.alpha or args.rank, args.top_k,
                         dense=args.experts_compute == "dense")  # fmt: skip
        setattr(blocks[i].mlp, site, m)
        layers.append(m)
    args.first_block_used = layer_ids[0]
    return layers, state, layer_ids, query_block


def preset_allocation(knowledge_id: str, n_layers: int, experts: int, k: int) -> list[list[int]]:
    seed = int.from_bytes(hashlib.sha256(knowledge_id.encode()).digest()[:8], "little")
    rng = random.Random(seed)
    return [sorted(rng.sample(range(experts), k)) for _ in range(n_layers)]


def make_edits(model_dir: Path, args, vocab: int):
    tok_path = model_dir / "tokenizer.json"
    if tok_path.is_file() and not args.random_tokens:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_path))
        for n, (p, t) in enumerate(FACTS * (1 + (args.edits + args.warmup_edits) // len(FACTS))):
            p_ids = tok.encode(p, add_special_tokens=True).ids
            full = tok.encode(p + " " + t, add_special_tokens=True).ids
            t_ids = full[len(p_ids):] if full[: len(p_ids)] == p_ids else tok.encode(" " + t, add_special_tokens=False).ids
            yield f"fact-{n}", p_ids, t_ids
    else:
        g = torch.Generator().manual_seed(args.seed)
        n = 0
        while True:
            p_ids = torch.randint(0, vocab, (args.prompt_tokens,), generator=g).tolist()
            t_ids = torch.randint(0, vocab, (args.target_tokens,), generator=g).tolist()
            yield f"random-{n}", p_ids, t_ids
            n += 1


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def run_edit(model, layers, state, edit, args, device, run_model=None) -> dict:
    run_model = run_model or model
    knowledge_id, p_ids, t_ids = edit
    t0 = time.perf_counter()
    ids = torch.tensor([p_ids + t_ids], device=device)
    state.last_prompt_index = torch.tensor([len(p_ids) - 1], device=device)
    targets = torch.tensor(t_ids, device=device)
    preset = torch.tensor(preset_allocation(knowledge_id, len(layers), args.experts, args.top_k), device=device)
    params = [p for m in layers for p in (m.lora_a, m.lora_b, *m.router.parameters())]
    opt = torch.optim.Adam(params, lr=args.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=args.lr_decay_every, gamma=args.lr_decay) if args.lr_decay_every else None
    n_p, n_t = len(p_ids), len(t_ids)
    rows = torch.arange(n_p - 1, n_p - 1 + n_t, device=device)
    blocks = blocks_of(model)
    real = list(blocks[: args.first_block_used]) if args.done_well else []
    if args.done_well:
        # The frozen prefix once: the hidden states entering the first MoLoRA block (and the
        # query, which the hook reads on the way), then stand-ins for the blocks below it.
        slot = {}
        grab = blocks[args.first_block_used].register_forward_pre_hook(
            lambda _m, inputs: slot.__setitem__("hidden", inputs[0].detach())
        )
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False, logits_to_keep=rows).logits
            ce_ref = float(F.cross_entropy(ref[0].float(), targets))
        grab.remove()
        state.query = state.query.detach()
        state.freeze_query = True
        for i in range(len(real)):
            blocks[i] = CachedPrefix(slot, first=i == 0)
    first_loss = last_loss = None
    for _ in range(args.iters):
        if args.done_well:
            logits = run_model(input_ids=ids, use_cache=False, logits_to_keep=rows).logits  # [1, n_t, V]
            ce = F.cross_entropy(logits[0].float(), targets)
        else:
            logits = run_model(input_ids=ids, use_cache=False).logits  # [1, T, V]
            ce = F.cross_entropy(logits[0, n_p - 1 : n_p - 1 + n_t].float(), targets)
        if args.done_well and first_loss is None and abs(float(ce.detach()) - ce_ref) > 1e-3 * max(1.0, ce_ref):
            raise SystemExit(f"--done-well: the cached-prefix loss {float(ce.detach()):.6f} is not the full forward's {ce_ref:.6f}")
        guide = sum(-torch.log(m.last_probs[0, preset[j]]).sum() for j, m in enumerate(layers))
        loss = ce + args.guide_weight * guide
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched:
            sched.step()
        last_loss = loss.detach()
        if first_loss is None:
            first_loss = last_loss
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
        acc = (logits[0, n_p - 1 : n_p - 1 + n_t].argmax(-1) == targets).float().mean()
        code = [sorted(m.last_probs[0].topk(args.top_k).indices.tolist()) for m in layers]
    for i, b in enumerate(real):
        blocks[i] = b
    state.freeze_query = False
    sync(device)
    return {
        "seconds": time.perf_counter() - t0,
        "prompt_tokens": n_p,
        "target_tokens": n_t,
        "first_loss": float(first_loss),
        "last_loss": float(last_loss),
        "target_accuracy_after": float(acc),
        "allocation_code": code,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, required="--self-check" not in sys.argv)
    ap.add_argument("--site", help="FFN linear to wrap: c_fc (gpt2); up_proj|down_proj|gate_proj (llama)")
    ap.add_argument("--layers", type=int, default=6, help="MoLoRA layers L (the last L blocks unless --first-block)")
    ap.add_argument("--first-block", type=int, help="first MoLoRA block (the engine's preset: 3/4 of the depth)")
    ap.add_argument("--query-block", type=int, help="block whose --site input is the query (default: first MoLoRA block - 1)")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, help="LoRA alpha (default: rank, i.e. scaling 1)")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--experts-compute", choices=["dense", "topk"], default="dense",
                    help="dense: all experts computed, as the released code; topk: only the selected")  # fmt: skip
    ap.add_argument("--guide-weight", type=float, default=1e-2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-decay-every", type=int, default=0, help="StepLR step (0: constant lr)")
    ap.add_argument("--lr-decay", type=float, default=0.5)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--edits", type=int, default=5, help="timed edits")
    ap.add_argument("--warmup-edits", type=int, default=1)
    ap.add_argument("--random-tokens", action="store_true", help="random ids even if a tokenizer exists")
    ap.add_argument("--prompt-tokens", type=int, default=12)
    ap.add_argument("--target-tokens", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="eager")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--done-well", action="store_true",
                    help="PyTorch done well: selected experts only, the frozen prefix cached, the head on the target rows, SDPA")
    ap.add_argument("--compile", action="store_true", help="with --done-well: the model under torch.compile")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--self-check", action="store_true", help="check the MoLoRA layer and exit")
    args = ap.parse_args()
    if args.self_check:
        self_check()
        return 0
    if args.top_k > args.experts or min(args.experts, args.rank, args.top_k, args.iters, args.edits) < 1:
        ap.error("need 1 <= top-k <= experts, and positive rank, iters, edits")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2

    if args.done_well:
        args.experts_compute, args.attn = "topk", "sdpa"
    elif args.compile:
        ap.error("--compile goes with --done-well")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype], attn_implementation=args.attn)
    except Exception as e:  # noqa: BLE001
        print(f"error: transformers cannot load {args.model}: {e}", file=sys.stderr)
        return 2
    model = model.to(args.device).eval()  # eval: no dropout; gradients still flow
    model.requires_grad_(False)
    layers, state, layer_ids, query_block = install_elder(model, args)

    if args.compile:
        # Each trained block on its own (the blocks below are swapped for stand-ins per edit, which
        # a compiled whole model would take as a change and recompile); lengths vary per edit.
        blocks = blocks_of(model)
        for i in range(layer_ids[0], len(blocks)):
            blocks[i] = torch.compile(blocks[i], dynamic=True)

    edits = make_edits(args.model, args, model.config.vocab_size)
    warm = [run_edit(model, layers, state, next(edits), args, args.device) for _ in range(args.warmup_edits)]
    timed = [run_edit(model, layers, state, next(edits), args, args.device) for _ in range(args.edits)]
    secs = [r["seconds"] for r in timed]
    med = statistics.median(secs)
    site = args.site or SITES[model.config.model_type][0]
    result = {
        "bench": "torch_edit",
        "model": str(args.model),
        "site": site,
        "molora_blocks": layer_ids,
        "query_block": query_block,
        "experts": args.experts,
        "rank": args.rank,
        "top_k": args.top_k,
        "experts_compute": args.experts_compute,
        "iters": args.iters,
        "lr": args.lr,
        "guide_weight": args.guide_weight,
        "threads": args.threads,
        "dtype": args.dtype,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "attn": args.attn,
        "done_well": args.done_well,
        "compile": args.compile,
        "median_s_per_edit": med,
        "min_s_per_edit": min(secs),
        "ms_per_iter": med * 1e3 / (args.iters + 1),
        "warmup_s": [r["seconds"] for r in warm],
        "edits": timed,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    print(
        f"ELDER edit ({site} x{args.layers}, E={args.experts} r={args.rank} top-{args.top_k}, "
        f"{args.experts_compute} experts, {args.iters} iters, {args.device}, {args.threads} threads): "
        f"median {med:.3f} s/edit; loss {timed[0]['first_loss']:.3f} -> {timed[0]['last_loss']:.3f}, "
        f"target acc after {statistics.fmean(r['target_accuracy_after'] for r in timed):.2f}"
    )
    line = json.dumps(result)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
