#!/usr/bin/env python3
"""Summarises criterion logs of the GPU benches against the measured ceilings (no dependencies).

    tools/bench_table.py LOG...            # prints one row per benchmark
    tools/bench_table.py --self-test       # checks the parser on a canned log

Rows:
- kernels with a bytes throughput: achieved GB/s and its fraction of the measured copy rate (the
  `copy/` benchmark in the same logs, bytes read plus written);
- `decode_step/` rows: ms per token against the floor of the `FLOOR <id prefix> bytes=N` line the
  bench prints (the bytes every step must read, over the measured copy rate), and the ratio
  (target: <= 1.3);
- `edit/` rows: seconds per edit and the speed-up over the paper's published 1.82 s per edit
  (target: >= 20).
"""
import re
import sys

PAPER_SECONDS_PER_EDIT = 1.82
TIME_UNITS = {"ps": 1e-12, "ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
BYTE_UNITS = {"B/s": 1, "KiB/s": 2**10, "MiB/s": 2**20, "GiB/s": 2**30, "TiB/s": 2**40}


def parse(lines):
    """(id, median seconds, median bytes/s or None) per benchmark, and the FLOOR lines."""
    results, floors = [], {}
    previous, current = "", None
    for raw in lines:
        line = raw.rstrip("\n")
        m = re.match(r"FLOOR (.+) bytes=(\d+)\s*$", line)
        if m:
            floors[m.group(1).strip()] = int(m.group(2))
            continue
        if "time:" in line:
            head = line.split("time:")[0].strip()
            name = head or previous
            values = re.findall(r"([\d.]+) (ps|ns|µs|us|ms|s)\b", line.split("time:")[1])
            if len(values) == 3:
                current = [name, float(values[1][0]) * TIME_UNITS[values[1][1]], None]
                results.append(current)
            continue
        if "thrpt:" in line and current is not None:
            values = re.findall(r"([\d.]+) ((?:[KMGT]i)?B/s)", line)
            if len(values) == 3:
                current[2] = float(values[1][0]) * BYTE_UNITS[values[1][1]]
            continue
        if line.strip() and not line.startswith(" "):
            previous = line.strip()
    return results, floors


def rows(results, floors):
    copy = next((bps for name, _, bps in results if name.startswith("copy/") and bps), None)
    out = []
    if copy:
        out.append(f"copy rate (measured ceiling): {copy / 1e9:.0f} GB/s")
    else:
        out.append("copy rate: not measured (no copy/ benchmark): no fractions")
    for name, secs, bps in results:
        if name.startswith("edit/"):
            out.append(f"{name}: {secs:.3f} s/edit, {PAPER_SECONDS_PER_EDIT / secs:.1f}x faster "
                       f"than the paper's {PAPER_SECONDS_PER_EDIT} s (target >= 20x)")
        elif name.startswith("decode_step/"):
            floor = next((b for prefix, b in floors.items() if name.startswith(prefix)), None)
            text = f"{name}: {secs * 1e3:.3f} ms/token"
            if floor and copy:
                floor_s = floor / copy
                text += f", floor {floor_s * 1e3:.3f} ms ({floor / 1e9:.2f} GB), " \
                        f"{secs / floor_s:.2f}x the floor (target <= 1.3x)"
            out.append(text)
        elif bps:
            frac = f", {bps / copy:.0%} of copy" if copy else ""
            out.append(f"{name}: {secs * 1e6:.1f} us, {bps / 1e9:.0f} GB/s{frac}")
        else:
            out.append(f"{name}: {secs * 1e6:.1f} us")
    return out


SAMPLE = """\
Benchmarking copy/memcpy_dtod 512 MiB (read + write): Warming up for 3.0000 s
copy/memcpy_dtod 512 MiB (read + write)
                        time:   [355.10 µs 356.00 µs 357.20 µs]
                        thrpt:  [2.7900 TiB/s 2.7929 TiB/s 2.8000 TiB/s]
norm/short              time:   [40.0 µs 41.0 µs 42.0 µs]
                        thrpt:  [2.3 TiB/s 2.4 TiB/s 2.5 TiB/s]
FLOOR decode_step/gpt2-xl bf16 B1 ctx128 bytes=3200000000
decode_step/gpt2-xl bf16 B1 ctx128 graph
                        time:   [1.3000 ms 1.3100 ms 1.3200 ms]
                        thrpt:  [757.58  elem/s 763.36  elem/s 769.23  elem/s]
Found 2 outliers among 20 measurements (10.00%)
edit/bf16 gpt2-xl 50 iterations 20 tokens
                        time:   [60.000 ms 61.000 ms 62.000 ms]
                        thrpt:  [16.129  elem/s 16.393  elem/s 16.667  elem/s]
"""


def self_test():
    results, floors = parse(SAMPLE.splitlines())
    names = [r[0] for r in results]
    assert names == ["copy/memcpy_dtod 512 MiB (read + write)", "norm/short",
                     "decode_step/gpt2-xl bf16 B1 ctx128 graph",
                     "edit/bf16 gpt2-xl 50 iterations 20 tokens"], names
    assert abs(results[0][1] - 356e-6) < 1e-12 and abs(results[0][2] - 2.7929 * 2**40) < 1e6
    assert results[2][2] is None and floors == {"decode_step/gpt2-xl bf16 B1 ctx128": 3_200_000_000}
    table = rows(results, floors)
    floor_ms = 3.2e9 / (2.7929 * 2**40) * 1e3
    assert f"floor {floor_ms:.3f} ms" in table[3], table[3]
    assert f"{1.31 / floor_ms:.2f}x the floor" in table[3], table[3]
    assert "29.8x faster" in table[4], table[4]
    assert "of copy" in table[2], table[2]
    print("\n".join(table))
    print("bench_table self-test: ok")


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        self_test()
        sys.exit(0)
    lines = []
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines.extend(f)
    print("\n".join(rows(*parse(lines))))
