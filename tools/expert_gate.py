#!/usr/bin/env python3
"""Replays selection and gating rules on the output of `examples/expert_gate.rs`.

For every rephrasing and locality probe the example tried the key store's best-scoring edits one at
a time. A rule picks one of them (or none: the base model answers) from what an engine could know
at inference (key scores, the scope threshold, how strongly each edit's experts push towards that
edit's own target); this script prints the generalization and locality each rule would score.

Usage: python3 tools/expert_gate.py OUT.jsonl [OUT.jsonl ...]
"""
import json
import math
import sys
from collections import defaultdict


def load(paths):
    items = []
    for p in paths:
        with open(p) as f:
            items.extend(json.loads(line) for line in f)
    return items


def evaluate(items, rule):
    sums = defaultdict(float)
    counts = defaultdict(int)
    for it in items:
        cand = rule(it)
        acc = it["acc_base"] if cand is None else cand["acc"]
        key = "gen" if it["role"] == "rephrase" else "loc"
        sums[key] += acc
        counts[key] += 1
        if key == "loc":
            sums["loc:" + it["kind"]] += acc
            counts["loc:" + it["kind"]] += 1
    return {k: sums[k] / counts[k] for k in sorted(counts)}


def engine(it):
    # The engine's own decision, as scored (a pseudo candidate with its accuracy).
    return {"acc": it["acc_engine"]}


def in_scope(it, margin):
    c = [x for x in it["candidates"] if x["score"] >= it["threshold"]]
    if not c:
        return []
    top = max(x["score"] for x in c)
    return [x for x in c if x["score"] >= top - margin]


def by_key(margin):
    def rule(it):
        c = in_scope(it, margin)
        return max(c, key=lambda x: x["score"]) if c else None

    return rule


def by_push(margin, gate=None, signal="lp"):
    """Among the in-scope candidates within `margin` of the best key score, the one whose experts
    push hardest towards its own target; with `gate`, none when that push is below it."""

    def value(x):
        if signal == "lp":
            return x["lp_own"]
        return x["lp_own"] - x["lp_own_base"]

    def rule(it):
        c = in_scope(it, margin)
        if not c:
            return None
        best = max(c, key=value)
        if gate is not None and value(best) < gate:
            return None
        return best

    return rule


def main():
    items = load(sys.argv[1:])
    rules = [("engine (as scored)", engine)]
    for m in (0.05, 0.2):
        rules.append((f"best key, margin {m}", by_key(m)))
    for m in (0.05, 0.1, 0.2, 1.0):
        rules.append((f"max lp_own, margin {m}", by_push(m)))
    for m in (0.05, 0.2, 1.0):
        for p in (0.1, 0.3, 0.5):
            rules.append((f"max lp_own, margin {m}, gate p>={p}", by_push(m, math.log(p))))
    for m in (0.2, 1.0):
        for g in (1.0, 3.0):
            rules.append((f"max push, margin {m}, gate push>={g}", by_push(m, g, "push")))
    rows = [(name, evaluate(items, r)) for name, r in rules]
    keys = sorted({k for _, r in rows for k in r})
    print("| rule | " + " | ".join(keys) + " |")
    print("| --- | " + " | ".join("---" for _ in keys) + " |")
    for name, r in rows:
        print(f"| {name} | " + " | ".join(f"{r.get(k, float('nan')):.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
