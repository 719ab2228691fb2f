#!/usr/bin/env python3
"""The default preset's edit stream in PyTorch, done well: the counterpart of `elder edit` (issue 19).

`bench_torch_edit.py` times the paper-style edit (routers, 50 iterations). This script trains what
the engine's default preset trains, the same way, so the two can be timed side by side:

- edits in batches of --batch-size (8), from the project's JSONL (data/geo_facts.jsonl), in file
  order; each edit gets fresh experts: one rank --rank (4) LoRA (A ~ U(+-1/sqrt(r)), B = 0,
  scaling alpha / r = 1) on `mlp.down_proj` of each of --layers (4) blocks from --first-block (22);
- three sequences per edit, built as the engine builds them (src/elder/plan.rs): the prompt, the
  prompt after a short background prefix (the first 3 to 7 words of a sentence of
  data/generic_text.txt, chosen by an FNV-1a hash of the record id, as
  `data::background::background_prefix`), and the prompt in the first generic question framing;
  each followed by " " + target_new; no negatives;
- the experts act on every row (`expert_rows = "all"`, the default preset), or with --expert-rows
  answer only from each sequence's last prompt token on (the throughput setting); the loss is each
  edit's mean cross-entropy over its target rows, summed over the batch's edits (each edit trains
  as alone);
  Adam (lr 1e-2, betas 0.9 / 0.999, eps 1e-8);
- an edit stops as soon as every target token is the argmax and every target row's loss is under
  --stop-loss (0.01): its sequences leave the batch (later iterations cost only what still trains);
  the batch ends when every edit has stopped or after --iterations (50).

Done well: the frozen prefix (the blocks below --first-block) runs once per batch under no_grad; each
iteration runs only the blocks from --first-block on, with SDPA causal attention on right-padded
sequences (padded to the longest still training), and the head only on the target rows. With
answer rows the frozen pass runs every block once and keeps the prompt rows' keys and values, and
each iteration runs only the answer windows against them (as the engine's `PreparedBatch::
answer_window`). The per-edit experts are gathered per sequence and applied with two batched
matmuls; with --compile the trained blocks run under torch.compile(dynamic=True). The first
batch's first losses are checked against the full model's forward.

What the engine does besides (key reads, commits) has no counterpart here and is not timed. Timed:
per batch, the prepare (tokenising, the frozen prefix) and the iterations, wall clock, after
--warmup-batches untimed batches. Prints a summary and a JSON line.

Usage:
  python tools/bench_torch_stream.py --model models/smollm2-135m --edits data/geo_facts.jsonl \
      --limit 24 --threads 2 [--expert-rows answer] [--compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

REPO = Path(__file__).resolve().parent.parent
# src/elder/config.rs QUESTION_FRAMES[0]: the default preset's one question framing.
QUESTION_FRAME = "Fill in the blank: {} ___. The answer is"


def fnv1a(text: str) -> int:
    """`util::stable_hash`: FNV-1a, 64 bits."""
    h = 0xCBF29CE484222325
    for b in text.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def background_sentences() -> list[str]:
    lines = (REPO / "data" / "generic_text.txt").read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]


def background_prefix(sentences: list[str], key: str, n: int) -> str:
    """`data::background::background_prefix`: 3 to 7 words of a hashed sentence, then a period."""
    h = fnv1a(key)
    words = sentences[(h + n) % (1 << 64) % len(sentences)].split()
    length = 3 + (h + 7 * n) % (1 << 64) % 5
    text = " ".join(words[: min(length, len(words))])
    while text and not text[-1].isalnum():
        text = text[:-1]
    return text + "."


class PerSequenceLoRA(nn.Module):
    """`base(x) + s * (x A_e) B_e`, with e the edit of each sequence (`state["edit"]`, [S])."""

    def __init__(self, base: nn.Linear, state: dict, edits: int, rank: int, alpha: float):
        super().__init__()
        self.base, self.state, self.scaling = base, state, alpha / rank
        self.a = nn.Parameter(torch.empty(edits, base.in_features, rank))
        self.b = nn.Parameter(torch.empty(edits, rank, base.out_features))
        self.rank = rank
        self.reset()

    @torch.no_grad()
    def reset(self):
        bound = 1.0 / math.sqrt(self.rank)
        self.a.uniform_(-bound, bound)
        self.b.zero_()

    def forward(self, x):  # [S, T, d_in]
        if not self.state["lora"]:
            return self.base(x)
        e = self.state["edit"]
        delta = torch.bmm(torch.bmm(x, self.a[e]), self.b[e])
        row_from = self.state.get("row_from")
        if row_from is not None:  # the full forward of the check: answer rows by masking
            delta = delta * (torch.arange(x.shape[1])[None, :, None] >= row_from[:, None, None])
        return self.base(x) + self.scaling * delta


def run_blocks(model, blocks, hidden, position_ids):
    """transformers' own blocks; with no attention mask its SDPA path is causal, and right padding
    never reaches a real row."""
    cos_sin = model.model.rotary_emb(hidden, position_ids)
    for block in blocks:
        out = block(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=cos_sin)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def load_records(path: Path, limit: int) -> list[dict]:
    records = []
    with path.open() as f:
        for line in f:
            if line.strip():
                records.append(json.loads(line))
            if len(records) == limit:
                break
    return records


def sequences_of(records, tok: Tokenizer, sentences):
    """Per edit: its three (prompt ids, target ids) pairs, as the engine builds them."""
    out = []
    for r in records:
        target = tok.encode(" " + r["target_new"], add_special_tokens=False).ids
        texts = [
            r["prompt"],
            f"{background_prefix(sentences, r['id'], 0)} {r['prompt']}",
            QUESTION_FRAME.replace("{}", r["prompt"]),
        ]
        out.append([(tok.encode(t, add_special_tokens=True).ids, target) for t in texts])
    return out


def block_forward(block, hidden, cos_sin, cache=None, mask=None):
    """One Llama block written out, so its keys and values can be kept (the answer windows'
    prompt cache) and a window can attend to them: returns the output and this call's keys and
    values (after the rotary embedding). Without `mask`, causal attention over `hidden` alone."""
    attn = block.self_attn
    x = block.input_layernorm(hidden)
    n, w, _ = x.shape
    d = attn.head_dim
    q = attn.q_proj(x).view(n, w, -1, d).transpose(1, 2)
    k = attn.k_proj(x).view(n, w, -1, d).transpose(1, 2)
    v = attn.v_proj(x).view(n, w, -1, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *cos_sin)
    keys, values = (k, v) if cache is None else (torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2))
    o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    hidden = hidden + attn.o_proj(o.transpose(1, 2).reshape(n, w, -1))
    return hidden + block.mlp(block.post_attention_layernorm(hidden)), k, v


def window_blocks(model, blocks, hidden, positions, caches, mask):
    cos_sin = model.model.rotary_emb(hidden, positions)
    for block, cache in zip(blocks, caches):
        hidden = block_forward(block, hidden, cos_sin, cache, mask)[0]
    return hidden


class FullRows:
    """`expert_rows = "all"`: each iteration runs every row of the sequences still training
    through the blocks from the first trained one (padded to the longest of them)."""

    def __init__(self, model, args, ids, positions, lens, prompt_lens):
        self.model, self.args, self.positions, self.lens = model, args, positions, lens
        self.upper = model.model.layers[args.first_block :]
        with torch.no_grad():
            self.hidden = prefix_hidden(model, ids, positions, args.first_block)

    def rows(self, alive, seq, pos):
        """The last hidden states (before the final norm) at rows (`seq` local to `alive`, `pos`)."""
        w = int(self.lens[alive].max())
        h = self.args.upper(self.model, self.upper, self.hidden[alive, :w], self.positions[: len(alive), :w])
        return h[seq, pos]


class AnswerWindows:
    """`expert_rows = "answer"`: the experts change only the rows from the last prompt token on,
    so every earlier row is the frozen model's in every block. The frozen pass runs every row
    through every block once and keeps the prompt rows' keys and values of the trained-through
    blocks; each iteration runs only the windows (the last prompt token and the targets but the
    last) against that cache."""

    def __init__(self, model, args, ids, positions, lens, prompt_lens):
        self.model, self.args = model, args
        first = args.first_block
        self.upper = model.model.layers[first:]
        n = len(lens)
        self.start = prompt_lens - 1  # each window's first row: the last prompt token
        cached = int(self.start.max())
        window = int((lens - self.start).max())
        with torch.no_grad():
            hidden = prefix_hidden(model, ids, positions, first)
            idx = (self.start[:, None] + torch.arange(window)[None, :]).clamp(max=ids.shape[1] - 1)
            self.window = hidden[torch.arange(n)[:, None], idx]
            self.window_positions = self.start[:, None] + torch.arange(window)[None, :]
            cos_sin = model.model.rotary_emb(hidden, positions)
            self.caches = []
            for block in self.upper:
                hidden, k, v = block_forward(block, hidden, cos_sin)
                self.caches.append((k[:, :, :cached], v[:, :, :cached]))
        # A window row sees its sequence's prompt rows before the window and the window's rows up
        # to itself.
        see_prompt = torch.arange(cached)[None, None, :] < self.start[:, None, None]
        see_window = torch.ones(window, window, dtype=torch.bool).tril()[None].expand(n, -1, -1)
        self.mask = torch.cat([see_prompt.expand(-1, window, -1), see_window], 2)[:, None]
        self.alive = None

    def rows(self, alive, seq, pos):
        if self.alive is None or not torch.equal(alive, self.alive):
            self.alive = alive
            self.alive_caches = [(k[alive], v[alive]) for k, v in self.caches]
        h = self.args.upper(
            self.model, self.upper, self.window[alive], self.window_positions[alive],
            self.alive_caches, self.mask[alive],
        )  # fmt: skip
        return h[seq, pos - self.start[alive][seq]]


def prefix_hidden(model, ids, positions, first):
    """The hidden states entering block `first`, the experts off."""
    return run_blocks(model, model.model.layers[:first], model.model.embed_tokens(ids), positions)


def train_batch(model, lora_layers, state, batch, args, check: bool) -> dict:
    """Trains one batch of edits (each a list of (prompt ids, target ids)); returns its timings."""
    t0 = time.perf_counter()
    seqs = [(e, p, t) for e, pairs in enumerate(batch) for p, t in pairs]
    width = max(len(p) + len(t) - 1 for _, p, t in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    rows, targets, row_edit = [], [], []
    for s, (e, p, t) in enumerate(seqs):
        full = p + t[:-1]
        ids[s, : len(full)] = torch.tensor(full)
        for j, tgt in enumerate(t):
            rows.append((s, len(p) - 1 + j))
            targets.append(tgt)
            row_edit.append(e)
    seq_edit = torch.tensor([e for e, _, _ in seqs])
    seq_len = torch.tensor([len(p) + len(t) - 1 for _, p, t in seqs])
    prompt_len = torch.tensor([len(p) for _, p, _ in seqs])
    row_seq = torch.tensor([s for s, _ in rows])
    row_pos = torch.tensor([j for _, j in rows])
    targets = torch.tensor(targets)
    row_edit = torch.tensor(row_edit)
    n_edits = len(batch)
    rows_per_edit = torch.bincount(row_edit, minlength=n_edits).float()
    position_ids = torch.arange(width)[None, :].expand(len(seqs), width)
    state["lora"] = False
    mode = AnswerWindows if args.expert_rows == "answer" else FullRows
    run = mode(model, args, ids, position_ids, seq_len, prompt_len)
    if check:
        check_against_full_model(model, run, state, lora_layers, ids, rows, seq_edit, prompt_len - 1, args)
    for layer in lora_layers:
        layer.reset()
    params = [p for layer in lora_layers for p in (layer.a, layer.b)]
    opt = torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    t_prepare = time.perf_counter() - t0

    t1 = time.perf_counter()
    alive_seq = torch.arange(len(seqs))
    alive_row = torch.arange(len(rows))
    done = torch.zeros(n_edits, dtype=torch.bool)
    stopped_at = torch.full((n_edits,), -1)
    iterations = 0
    # Each edit's mean target-row loss, kept at its last value once it stops (as the engine's).
    edit_loss = torch.zeros(n_edits)
    first_loss = None
    state["lora"] = True
    for it in range(args.iterations):
        state["edit"] = seq_edit[alive_seq]
        # Rows of the surviving sequences, renumbered into the compacted batch.
        local = torch.searchsorted(alive_seq, row_seq[alive_row])
        logits = model.lm_head(model.model.norm(run.rows(alive_seq, local, row_pos[alive_row])))
        tgt = targets[alive_row]
        ce = F.cross_entropy(logits, tgt, reduction="none")
        edit_of_row = row_edit[alive_row]
        row_loss = ce / rows_per_edit[edit_of_row]
        loss = row_loss.sum()
        with torch.no_grad():
            ok = (logits.argmax(-1) == tgt) & (ce < args.stop_loss)
            bad = torch.zeros(n_edits, dtype=torch.long).index_add_(0, edit_of_row, (~ok).long())
            learned = (bad == 0) & ~done
            edit_loss[~done] = torch.zeros(n_edits).index_add_(0, edit_of_row, row_loss)[~done]
        if first_loss is None:
            first_loss = float(edit_loss.mean())
        # The edits stopped earlier have left the batch.
        if bool((learned | done).all()):
            stopped_at[learned] = it
            break
        # A learned edit's rows still give gradients this step, but only to its own experts,
        # which the engine writes out before the step: the other edits' steps are the same.
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        iterations = it + 1
        if bool(learned.any()):
            # Its sequences leave the batch: later iterations cost only what still trains.
            done |= learned
            stopped_at[learned] = it
            alive_seq = alive_seq[~done[seq_edit[alive_seq]]]
            alive_row = alive_row[~done[row_edit[alive_row]]]
    state["lora"] = False
    return {
        "prepare_s": t_prepare,
        "iterations_s": time.perf_counter() - t1,
        "iterations": iterations,
        "sequences": len(seqs),
        "padded_width": width,
        "edit_iterations": stopped_at.tolist(),
        "first_loss": first_loss,
        "last_loss": float(edit_loss.mean()),
    }


@torch.no_grad()
def check_against_full_model(model, run, state, lora_layers, ids, rows, seq_edit, last_prompt_row, args):
    """With random experts, the cached prefix (and answer windows) give the full model's logits
    at the target rows (the full forward masks the experts to the same rows)."""
    g = torch.Generator().manual_seed(1)
    for layer in lora_layers:
        layer.b.copy_(torch.randn(layer.b.shape, generator=g) * 0.05)
    seq = torch.tensor([s for s, _ in rows])
    pos = torch.tensor([j for _, j in rows])
    state.update(lora=True, edit=seq_edit, row_from=None)
    mine = model.lm_head(model.model.norm(run.rows(torch.arange(len(seq_edit)), seq, pos)))
    state["row_from"] = last_prompt_row if args.expert_rows == "answer" else None
    full = model(input_ids=ids, use_cache=False).logits[seq, pos]
    state.update(lora=False, row_from=None)
    base = model(input_ids=ids, use_cache=False).logits[seq, pos]
    err = float((mine - full).abs().max())
    moved = float((full - base).abs().max())
    if err > 1e-3 or moved < 0.1:
        raise SystemExit(f"check failed: the cached path differs from the full forward by {err} (experts moved logits by {moved})")
    print(f"check: target-row logits equal the full forward's within {err:.1e} (experts moved them by {moved:.2f})", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "smollm2-135m")
    ap.add_argument("--edits", type=Path, default=REPO / "data" / "geo_facts.jsonl")
    ap.add_argument("--limit", type=int, default=24, help="edits timed (whole batches)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--warmup-batches", type=int, default=1, help="untimed batches first (the first edits)")
    ap.add_argument("--first-block", type=int, default=22)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--stop-loss", type=float, default=0.01)
    ap.add_argument("--expert-rows", choices=["all", "answer"], default="all",
                    help="all: the experts on every row (the default preset); answer: from the last prompt token on")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="the trained blocks under torch.compile(dynamic=True)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.limit % args.batch_size:
        ap.error("--limit must be a multiple of --batch-size")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    model = model.eval().requires_grad_(False)
    if model.config.model_type != "llama":
        raise SystemExit(f"model_type {model.config.model_type!r}: this script trains Llama's down_proj")
    state = {"lora": False, "edit": None}
    blocks = model.model.layers
    lora_layers = []
    for i in range(args.first_block, args.first_block + args.layers):
        wrapped = PerSequenceLoRA(blocks[i].mlp.down_proj, state, args.batch_size, args.rank, args.alpha)
        blocks[i].mlp.down_proj = wrapped
        lora_layers.append(wrapped)
    args.upper = window_blocks if args.expert_rows == "answer" else run_blocks
    if args.compile:
        args.upper = torch.compile(args.upper, dynamic=True)

    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    sentences = background_sentences()
    records = load_records(args.edits, args.limit)
    if len(records) < args.limit:
        raise SystemExit(f"{args.edits} has {len(records)} records, --limit asks for {args.limit}")
    edits = sequences_of(records, tok, sentences)
    batches = [edits[i : i + args.batch_size] for i in range(0, len(edits), args.batch_size)]
    warm = [train_batch(model, lora_layers, state, b, args, check=i == 0) for i, b in enumerate(batches[: args.warmup_batches])]
    timed = [train_batch(model, lora_layers, state, b, args, check=False) for b in batches]
    prepare = sum(b["prepare_s"] for b in timed)
    iters = sum(b["iterations_s"] for b in timed)
    result = {
        "bench": "torch_stream",
        "model": str(args.model),
        "edits": args.limit,
        "batch_size": args.batch_size,
        "molora_blocks": list(range(args.first_block, args.first_block + args.layers)),
        "rank": args.rank,
        "expert_rows": args.expert_rows,
        "threads": args.threads,
        "compile": args.compile,
        "prepare_s_per_edit": prepare / args.limit,
        "iterations_s_per_edit": iters / args.limit,
        "s_per_edit": (prepare + iters) / args.limit,
        "mean_iterations": statistics.fmean(b["iterations"] for b in timed),
        "warmup_s": [b["prepare_s"] + b["iterations_s"] for b in warm],
        "batches": timed,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    print(
        f"torch stream ({args.limit} edits, batches of {args.batch_size}, {args.threads} threads"
        f"{', compiled' if args.compile else ''}): {result['s_per_edit']:.3f} s/edit "
        f"(prepare {result['prepare_s_per_edit']:.3f}, iterations {result['iterations_s_per_edit']:.3f}), "
        f"{result['mean_iterations']:.1f} iterations per batch"
    )
    line = json.dumps(result)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
