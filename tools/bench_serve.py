#!/usr/bin/env python3
"""Load test for `elder serve` on loopback: N query clients for a bounded time, optionally with an
edit stream, then a table (and JSON) of QPS, latency percentiles, edits/s, errors and lost edits.

    python3 tools/bench_serve.py --url http://127.0.0.1:8080 --clients 8 --seconds 60 \
        --kind score --edits-per-request 1 --data data/geo_facts.jsonl --json out.json

Query clients send `/v1/score` (the edit prompt's rephrasings and locality probes with their
answers) or greedy `/v1/completions` (`--kind complete`, 4 tokens), round-robin over the data.
With `--edit-stream`, one more client posts the data's edits (fresh ids per run) back to back,
keeping at most `--edit-backlog` queued, and at the end waits (bounded) until every accepted edit is
committed: an accepted edit that never commits counts as lost. Only the standard library is used;
every request has a timeout and the run has a request cap, so it always ends.
"""

import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse
import uuid


def request(conn, method, path, body=None, key=None, timeout=120):
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    conn.timeout = timeout
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    payload = resp.read()
    try:
        return resp.status, json.loads(payload)
    except ValueError:
        return resp.status, payload.decode(errors="replace")


def connect(url):
    u = urllib.parse.urlparse(url)
    assert u.hostname in ("127.0.0.1", "localhost", "::1"), "load tests talk to loopback only"
    return http.client.HTTPConnection(u.hostname, u.port, timeout=120)


def queries_of(records, kind):
    out = []
    for r in records:
        for p in r.get("rephrases", []):
            out.append((p, " " + r["target_new"]))
        for l in r.get("locality", []):
            out.append((l["prompt"], " " + l["answer"]))
    if kind == "complete":
        out = [(p, None) for p, _ in out]
    return out


def percentile(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--key")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--max-requests", type=int, default=100000)
    ap.add_argument("--kind", choices=["score", "complete"], default="score")
    ap.add_argument("--data", default="data/geo_facts.jsonl")
    ap.add_argument("--edit-stream", action="store_true")
    ap.add_argument("--edit-backlog", type=int, default=4)
    ap.add_argument("--drain-seconds", type=float, default=300)
    ap.add_argument("--json")
    args = ap.parse_args()

    records = [json.loads(l) for l in open(args.data) if l.strip()]
    queries = queries_of(records, args.kind)
    deadline = time.monotonic() + args.seconds
    lock = threading.Lock()
    latencies, statuses, sent = [], {}, [0]
    next_query = [0]

    def query_client():
        conn = connect(args.url)
        while time.monotonic() < deadline:
            with lock:
                if sent[0] >= args.max_requests:
                    return
                sent[0] += 1
                prompt, target = queries[next_query[0] % len(queries)]
                next_query[0] += 1
            if target is None:
                body, path = {"prompt": prompt, "max_tokens": 4, "temperature": 0}, "/v1/completions"
            else:
                body, path = {"prompt": prompt, "target": target}, "/v1/score"
            t = time.monotonic()
            try:
                status, _ = request(conn, "POST", path, body, args.key)
            except Exception as e:  # a dropped connection counts as an error
                status = f"exception: {type(e).__name__}"
                conn = connect(args.url)
            dt = time.monotonic() - t
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(dt)

    run_id = uuid.uuid4().hex[:8]
    accepted, edit_errors = [], []

    def edit_client():
        conn = connect(args.url)
        i = 0
        while time.monotonic() < deadline and i < len(records):
            # Keep the backlog bounded: wait while too many accepted edits are not committed.
            pending = [e for e in accepted[-args.edit_backlog * 2:]]
            waiting = 0
            for eid in pending:
                s, v = request(conn, "GET", f"/v1/edits/{eid}", key=args.key)
                if s == 200 and v["status"] in ("queued", "training"):
                    waiting += 1
            if waiting >= args.edit_backlog:
                time.sleep(0.2)
                continue
            r = dict(records[i])
            r["id"] = f"{run_id}-{r['id']}"
            s, v = request(conn, "POST", "/v1/edits", {"edits": [r]}, args.key)
            if s == 202:
                accepted.append(r["id"])
            else:
                edit_errors.append((s, v))
            i += 1

    threads = [threading.Thread(target=query_client) for _ in range(args.clients)]
    if args.edit_stream:
        threads.append(threading.Thread(target=edit_client))
    t0 = time.monotonic()
    conn = connect(args.url)
    _, ready = request(conn, "GET", "/ready")
    gen0 = ready.get("generation", 0) if isinstance(ready, dict) else 0
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0

    committed_in_window = 0
    lost = 0
    if args.edit_stream:
        _, ready = request(conn, "GET", "/ready")
        statuses_now = {}
        for eid in accepted:
            s, v = request(conn, "GET", f"/v1/edits/{eid}", key=args.key)
            statuses_now[eid] = v.get("status") if isinstance(v, dict) else s
        committed_in_window = sum(1 for s in statuses_now.values() if s == "committed")
        drain_end = time.monotonic() + args.drain_seconds
        for eid in accepted:
            while time.monotonic() < drain_end:
                s, v = request(conn, "GET", f"/v1/edits/{eid}", key=args.key)
                if s == 200 and v["status"] in ("committed", "failed"):
                    break
                time.sleep(0.5)
            if not (s == 200 and v["status"] == "committed"):
                lost += 1

    ok = statuses.get(200, 0)
    errors = sum(n for s, n in statuses.items() if s != 200) + len(edit_errors)
    result = {
        "clients": args.clients,
        "kind": args.kind,
        "seconds": round(elapsed, 2),
        "requests_ok": ok,
        "qps": round(ok / elapsed, 3),
        "p50_ms": round(1e3 * percentile(latencies, 0.5), 1),
        "p99_ms": round(1e3 * percentile(latencies, 0.99), 1),
        "mean_ms": round(1e3 * statistics.mean(latencies), 1) if latencies else None,
        "errors": errors,
        "statuses": {str(k): v for k, v in statuses.items()},
        "edit_stream": args.edit_stream,
        "edits_accepted": len(accepted),
        "edits_committed_in_window": committed_in_window,
        "edits_per_s": round(committed_in_window / elapsed, 3) if args.edit_stream else None,
        "edits_lost": lost,
        "generation_start": gen0,
    }
    print(f"{'clients':>8} {'kind':>8} {'s':>6} {'ok':>6} {'QPS':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'edits/s':>8} {'lost':>5}")
    print(f"{args.clients:>8} {args.kind:>8} {elapsed:>6.1f} {ok:>6} {result['qps']:>7.2f} {result['p50_ms']:>8.1f} "
          f"{result['p99_ms']:>8.1f} {errors:>6} {str(result['edits_per_s']):>8} {lost:>5}")
    if edit_errors:
        print("edit errors:", edit_errors[:3])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
