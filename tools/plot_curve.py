#!/usr/bin/env python3
"""Chart of Rel / Gen / Loc against the number of sequential edits T, from `elder run` reports.

Each report.json (written by `elder run --eval-at 100,500 ...` into its state folder) holds a
curve: the final-protocol metrics after the first T edits of one stream. This script draws one
panel per metric, one line per report (labelled by preset and dataset), as a self-contained SVG
(no plotting library needed).

    python3 tools/plot_curve.py runs/*/report.json --out docs/edit-quality.svg
"""
import argparse
import json
import os
from html import escape

METRICS = [("reliability", "Reliability"), ("generalization", "Generalization"), ("locality", "Locality")]
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
PANEL_W, PANEL_H, MARGIN = 260, 200, 44


def label(report):
    if "label" in report:
        return report["label"]
    data = report.get("data", "?")
    if data.endswith(".jsonl"):
        data = os.path.splitext(os.path.basename(data))[0]
    return f"{report.get('preset', '?')} preset, {data}"


def dashes(report):
    if report.get("superseded"):
        return ' stroke-dasharray="2 3"'
    return "" if report.get("preset") == "default" else ' stroke-dasharray="6 4"'


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    reports = [json.load(open(p)) for p in args.reports]
    reports.sort(key=lambda r: (r.get("preset") != "default", r.get("data", "")))
    t_max = max(c["edits"] for r in reports for c in r["curve"])
    width = len(METRICS) * (PANEL_W + MARGIN) + MARGIN
    legend_h = 18 * len(reports) + 10
    height = PANEL_H + 2 * MARGIN + legend_h
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]

    def x_of(t, x0):
        return x0 + PANEL_W * t / t_max

    def y_of(v):
        return MARGIN + PANEL_H * (1.0 - v)

    for p, (key, title) in enumerate(METRICS):
        x0 = MARGIN + p * (PANEL_W + MARGIN)
        out.append(f'<text x="{x0 + PANEL_W / 2}" y="{MARGIN - 12}" text-anchor="middle" '
                   f'font-size="13">{title}</text>')
        out.append(f'<rect x="{x0}" y="{MARGIN}" width="{PANEL_W}" height="{PANEL_H}" '
                   'fill="none" stroke="#444"/>')
        for v in (0.0, 0.25, 0.5, 0.75, 1.0):
            y = y_of(v)
            out.append(f'<line x1="{x0}" y1="{y}" x2="{x0 + PANEL_W}" y2="{y}" stroke="#ddd"/>')
            out.append(f'<text x="{x0 - 4}" y="{y + 4}" text-anchor="end">{v:.2f}</text>')
        ticks = sorted({c["edits"] for r in reports for c in r["curve"]})
        for t in ticks:
            x = x_of(t, x0)
            out.append(f'<text x="{x}" y="{MARGIN + PANEL_H + 14}" text-anchor="middle">{t}</text>')
        out.append(f'<text x="{x0 + PANEL_W / 2}" y="{MARGIN + PANEL_H + 30}" '
                   'text-anchor="middle">edits T</text>')
        for i, r in enumerate(reports):
            colour = COLOURS[i % len(COLOURS)]
            pts = [(x_of(c["edits"], x0), y_of(c["metrics"][key])) for c in r["curve"]]
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                       f'stroke-width="2"{dashes(r)}/>')
            for x, y in pts:
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>')
    y = MARGIN + PANEL_H + 48
    for i, r in enumerate(reports):
        colour = COLOURS[i % len(COLOURS)]
        yy = y + 18 * i
        out.append(f'<line x1="{MARGIN}" y1="{yy}" x2="{MARGIN + 30}" y2="{yy}" stroke="{colour}" '
                   f'stroke-width="2"{dashes(r)}/>')
        out.append(f'<text x="{MARGIN + 38}" y="{yy + 4}">{escape(label(r))}</text>')
    out.append("</svg>")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"wrote {args.out} ({len(reports)} curves)")


if __name__ == "__main__":
    main()
