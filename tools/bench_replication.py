#!/usr/bin/env python3
"""Replication on loopback: lag from a commit on the leader to the same generation served by each
replica, and aggregate query throughput over 1..N replicas. Starts nothing: give it a running
leader and replicas (`elder serve --edit-log nats://... --role leader|replica`).

    python3 tools/bench_replication.py --leader URL --replica URL [--replica URL ...] \
        --edits 20 --data data/geo_facts.jsonl --qps-seconds 20 --json out.json

Lag: edits are posted one at a time; for each, the time it is seen `committed` on the leader and
the time each replica's `/ready` first reports that generation (both polled every 5 ms, so the
numbers carry about 5 ms of polling error). Throughput: tools/bench_serve.py's query clients
(scores) against the first k replicas at once, k = 1..N, the QPS summed. Loopback only; every
request has a timeout and every wait a bound.
"""

import argparse
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve  # noqa: E402


def get(url, path):
    conn = bench_serve.connect(url)
    return bench_serve.request(conn, "GET", path)


def post(url, path, body):
    conn = bench_serve.connect(url)
    return bench_serve.request(conn, "POST", path, body)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--leader", required=True)
    ap.add_argument("--replica", action="append", required=True)
    ap.add_argument("--edits", type=int, default=20)
    ap.add_argument("--data", default="data/geo_facts.jsonl")
    ap.add_argument("--qps-seconds", type=float, default=20)
    ap.add_argument("--clients-per-replica", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--json")
    args = ap.parse_args()

    records = [json.loads(l) for l in open(args.data) if l.strip()][: args.edits]
    run = uuid.uuid4().hex[:6]
    lags = {r: [] for r in args.replica}
    for rec in records:
        rec = dict(rec, id=f"{run}-{rec['id']}")
        status, v = post(args.leader, "/v1/edits", {"edits": [rec]})
        assert status == 202, v
        deadline = time.monotonic() + args.timeout
        while True:
            _, e = get(args.leader, f"/v1/edits/{rec['id']}")
            if e["status"] == "committed":
                committed_at, generation = time.monotonic(), e["generation"]
                break
            assert e["status"] != "failed" and time.monotonic() < deadline, e
            time.sleep(0.005)
        pending = set(args.replica)
        while pending:
            for r in list(pending):
                _, ready = get(r, "/ready")
                if ready.get("generation", 0) >= generation:
                    lags[r].append(time.monotonic() - committed_at)
                    pending.discard(r)
            assert time.monotonic() < deadline, "a replica did not follow"
            time.sleep(0.005)

    rows = []
    all_lags = sorted(x for v in lags.values() for x in v)
    print(f"replication lag over {len(records)} edits x {len(args.replica)} replicas: "
          f"p50 {1e3 * bench_serve.percentile(all_lags, 0.5):.1f} ms, "
          f"p99 {1e3 * bench_serve.percentile(all_lags, 0.99):.1f} ms, "
          f"max {1e3 * max(all_lags):.1f} ms")

    here = Path(__file__).resolve().parent
    for k in range(1, len(args.replica) + 1):
        outs = []
        procs = []
        for r in args.replica[:k]:
            out = f"/tmp/bench_replication_{run}_{k}_{len(procs)}.json"
            outs.append(out)
            procs.append(subprocess.Popen(
                [sys.executable, str(here / "bench_serve.py"), "--url", r, "--clients",
                 str(args.clients_per_replica), "--seconds", str(args.qps_seconds), "--data",
                 args.data, "--json", out], stdout=subprocess.DEVNULL))
        for p in procs:
            p.wait(timeout=args.qps_seconds + 300)
        results = [json.load(open(o)) for o in outs]
        qps = sum(r["qps"] for r in results)
        errors = sum(r["errors"] for r in results)
        rows.append({"replicas": k, "qps": round(qps, 2), "errors": errors,
                     "p50_ms": [r["p50_ms"] for r in results], "p99_ms": [r["p99_ms"] for r in results]})
        print(f"{k} replica(s), {args.clients_per_replica} clients each: {qps:.2f} QPS in all, "
              f"{errors} errors, p50 {rows[-1]['p50_ms']} ms")
    result = {
        "edits": len(records),
        "lag_ms": {r: [round(1e3 * x, 1) for x in v] for r, v in lags.items()},
        "lag_p50_ms": round(1e3 * bench_serve.percentile(all_lags, 0.5), 1),
        "lag_p99_ms": round(1e3 * bench_serve.percentile(all_lags, 0.99), 1),
        "throughput": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
