#!/usr/bin/env python3
"""Which frozen signal tells *which question about a subject* a prompt asks?

The key store finds an edit's subject well; what it cannot do well is tell, among the edits (and
probes) about one subject, a rephrasing of an edit's question from another question about the
same subject. This diagnostic measures candidate relation signals of SmolLM2-135M on the first
records of both datasets (geo: 300, science: 600, where each element has several edits):

- `last`: the last prompt token's row at a site (the first key store's relation key);
- `ctx`: the mean of the prompt's rows outside its subject and position 0 (`relation_key =
  "context"`);
- `wctx`: the context rows as unit vectors, each weighted by one minus its best cosine to the
  background text's rows (`relation_key = "weighted_context"`, the default since 2026-12-05);
- `last+ctx`: both, concatenated;
- `lens`: the last row read through the final norm and the lm_head (logit lens), as centred
  log-probabilities;
- `answer`: the base model's own next-token distribution after the prompt (a full forward), as
  the cross-entropy of the edit's top-20 answer tokens under the prompt's distribution.

Rows are centred on the shipped background text's mean (data/generic_text.txt). For each signal:
- pick: share of rephrasings whose most similar edit among the edits of their subject is their
  own (rephrasings whose subject has more than one edit);
- AUC reph/ss: rephrasing -> own edit against a same-subject probe -> its subject's best edit
  (1: a relation gate could separate them);
- ss in scope: share of same-subject probes a gate lets through at the threshold that keeps 90%
  of the rephrasings;
- AUC reph/swap and kept@swap90: the gate calibrated without evaluation data, from the edit's
  subject placed in other relations' edit templates (what the engine may train and calibrate on):
  the share of rephrasings that pass the 0.9 quantile of those impostors.

Record relation labels (`knowledge_id`) are used only to build this diagnostic's prompt lists.

    python3 tools/relation_geometry.py [--model models/smollm2-135m] [--work /tmp/relation-geometry]

It runs `cargo run --release --example dump_rows` and `--example last_logits` once (a few
minutes on 2 cores), then the analysis (numpy).
"""
import argparse
import collections
import json
import os
import random
import struct
import subprocess

import numpy as np

SITES = ["up:12", "up:17", "up:21", "down:21"]
RECORDS = {"geo": 300, "science": 600}


def build_prompts(root, work):
    out, meta = [], []

    def add(text, subject, **m):
        out.append(json.dumps({"text": text, "subject": subject}))
        meta.append(m)

    generic = os.path.join(root, "data/generic_text.txt")
    for line in open(generic):
        line = line.strip()
        if line and not line.startswith("#"):
            add(line, "", role="bg")
    for ds, n in RECORDS.items():
        recs = [json.loads(l) for l in open(os.path.join(root, f"data/{ds}_facts.jsonl"))][:n]
        templates = {}
        for r in recs:
            templates.setdefault(r["knowledge_id"].split("/")[0], r["prompt"].replace(r["subject"], "{}"))
        for i, r in enumerate(recs):
            rel, s = r["knowledge_id"].split("/")[0], r["subject"]
            add(r["prompt"], s, ds=ds, rec=i, role="edit", subj=s)
            for p in r["rephrases"]:
                add(p, s, ds=ds, rec=i, role="reph", subj=s)
            for probe in r["locality"]:
                if probe["kind"] == "same_subject":
                    add(probe["prompt"], s, ds=ds, rec=i, role="ss", subj=s)
            # The subject in three other relations' edit templates (the first 150 records).
            others = [t for t in templates if t != rel]
            for other in random.Random(i).sample(others, 3) if i < 150 else []:
                add(templates[other].format(s), s, ds=ds, rec=i, role="swap", subj=s)
    with open(os.path.join(work, "prompts.jsonl"), "w") as f:
        f.write("\n".join(out) + "\n")
    json.dump(meta, open(os.path.join(work, "meta.json"), "w"))
    return meta


def run_examples(root, model, work):
    prompts = os.path.join(work, "prompts.jsonl")
    cargo = ["cargo", "run", "--release", "--quiet", "--example"]
    subprocess.run(cargo + ["dump_rows", "--", model, prompts, os.path.join(work, "rows"), ",".join(SITES)],
                   cwd=root, check=True)
    subprocess.run(cargo + ["last_logits", "--", model, prompts, os.path.join(work, "last.f16")],
                   cwd=root, check=True)


class Tensors:
    def __init__(self, path):
        self.f = open(path, "rb")
        n = struct.unpack("<Q", self.f.read(8))[0]
        self.header = json.loads(self.f.read(n))
        self.base = 8 + n

    def __getitem__(self, name):
        m = self.header[name]
        a, b = m["data_offsets"]
        self.f.seek(self.base + a)
        return np.frombuffer(self.f.read(b - a), dtype=np.float32).reshape(m["shape"])


def unit(v):
    return v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-12)


def auc(pos, neg):
    pos, neg = np.asarray(pos), np.asarray(neg)
    ranks = np.concatenate([pos, neg]).argsort().argsort() + 1
    return (ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def signals(work, model, meta, index, offsets):
    """Per signal name, a similarity function sim(i, j) over prompt indices."""
    weights = Tensors(os.path.join(model, "model.safetensors"))
    embed, final_norm = weights["model.embed_tokens.weight"], weights["model.norm.weight"]
    bg = [i for i, m in enumerate(meta) if m["role"] == "bg"]
    out = {}
    for site in SITES:
        proj, block = site.split(":")
        width = 1536 if proj == "down" else 576
        raw = np.fromfile(os.path.join(work, "rows", f"b{block}_{proj}.f16"), dtype=np.float16)
        rows = raw.reshape(-1, width).astype(np.float32)
        of = lambda i: rows[offsets[i]:offsets[i + 1]]
        mean = np.mean(np.concatenate([of(i)[1:] for i in bg]), 0)
        last = np.stack([of(i)[-1] for i in range(len(meta))])
        ctx = []
        for i in range(len(meta)):
            r, d = of(i), index[i]
            subject = set()
            if d["subject_pos"] is not None:
                subject = set(range(d["subject_pos"] - d["subject_len"] + 1, d["subject_pos"] + 1))
            kept = [p for p in range(1, len(r)) if p not in subject]
            ctx.append(r[kept].mean(0) if kept else r[-1])
        # `wctx` (relation_key = "weighted_context"): the context rows as unit vectors, each
        # weighted by one minus its best cosine to the background text's rows (positions 1 on).
        bg_rows = unit(np.concatenate([of(i)[1:] for i in bg]) - mean)
        wctx = []
        for i in range(len(meta)):
            r, d = of(i), index[i]
            subject = set()
            if d["subject_pos"] is not None:
                subject = set(range(d["subject_pos"] - d["subject_len"] + 1, d["subject_pos"] + 1))
            kept = [p for p in range(1, len(r)) if p not in subject] or [len(r) - 1]
            u = unit(r[kept] - mean)
            w = np.maximum(1 - (u @ bg_rows.T).max(1), 0.02)
            wctx.append((u * w[:, None]).sum(0))
        feats = {"last": unit(last - mean), "ctx": unit(np.stack(ctx) - mean), "wctx": unit(np.stack(wctx))}
        feats["last+ctx"] = unit(np.concatenate([feats["last"], feats["ctx"]], 1))
        if proj == "up":
            # up_proj's input is the post-attention norm of the residual: undo its weight, then
            # the final norm and the tied lm_head.
            h = last / weights[f"model.layers.{block}.post_attention_layernorm.weight"]
            h = h / np.sqrt((h * h).mean(1, keepdims=True)) * final_norm
            logits = h @ embed.T
            logp = logits - logits.max(1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(1, keepdims=True))
            feats["lens"] = unit(logp - logp.mean(1, keepdims=True))
        for name, x in feats.items():
            out[f"{site} {name}"] = (lambda x: lambda i, j: float(x[i] @ x[j]))(x)
    vocab = embed.shape[0]
    logp = np.fromfile(os.path.join(work, "last.f16"), dtype=np.float16).reshape(-1, vocab).astype(np.float32)
    top = np.argsort(logp, 1)[:, -20:]

    def answer(i, j):
        p = np.exp(logp[j, top[j]])
        return float((p * logp[i, top[j]]).sum() / p.sum())

    out["final answer"] = answer
    return out


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(root, "models/smollm2-135m"))
    ap.add_argument("--work", default="/tmp/relation-geometry")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    meta = build_prompts(root, args.work)
    if not os.path.exists(os.path.join(args.work, "last.f16")):
        run_examples(root, args.model, args.work)
    index = [json.loads(l) for l in open(os.path.join(args.work, "rows", "index.jsonl"))]
    offsets = np.concatenate([[0], np.cumsum([d["n"] for d in index])])
    print("| signal | data | pick | AUC reph/ss | ss in scope at 90% reph | AUC reph/swap | reph kept at swap q0.9 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, sim in signals(args.work, args.model, meta, index, offsets).items():
        for ds in RECORDS:
            edits = {m["rec"]: i for i, m in enumerate(meta) if m.get("ds") == ds and m["role"] == "edit"}
            by_subject = collections.defaultdict(list)
            for rec, i in edits.items():
                by_subject[meta[i]["subj"]].append(rec)
            pick, reph, ss, swap = [], [], [], []
            for i, m in enumerate(meta):
                if m.get("ds") != ds:
                    continue
                if m["role"] == "swap":
                    swap.append(sim(i, edits[m["rec"]]))
                    continue
                cands = by_subject[m["subj"]]
                s = {c: sim(i, edits[c]) for c in cands}
                if m["role"] == "reph":
                    reph.append(s[m["rec"]])
                    if len(cands) > 1:
                        pick.append(max(s, key=s.get) == m["rec"])
                elif m["role"] == "ss":
                    ss.append(max(s.values()))
            reph, ss = np.array(reph), np.array(ss)
            keep90 = np.quantile(reph, 0.1)
            tau = np.quantile(swap, 0.9)
            print(f"| {name} | {ds} | {np.mean(pick):.3f} | {auc(reph, ss):.3f} | {np.mean(ss >= keep90):.3f} "
                  f"| {auc(reph, swap):.3f} | {np.mean(reph >= tau):.3f} |", flush=True)


if __name__ == "__main__":
    main()
