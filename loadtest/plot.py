#!/usr/bin/env python3
"""Plots p99 latency against offered rate from loadtest/results/*.json (written by
loadtest/run-benchmarks.sh): the service (durable Reserve unary, in batches of
100 and on streams: `max` steps, items/s), the echo server (the gRPC ceiling of
each) and the seed's design (pgbench peer). Writes an SVG
with no dependencies beyond the standard library.

    python3 loadtest/plot.py [RESULTS_DIR] [OUT.svg]
"""
import json
import math
import os
import sys

results = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results")
out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(results, "p99-vs-rate.svg")


def load(name):
    path = os.path.join(results, name + ".json")
    return json.load(open(path)) if os.path.exists(path) else None


series = []
for name, label, colour in [("reserve-sync-max", "account-service, durable Reserve", "#1f77b4"),
                            ("echo-max", "echo server (gRPC ceiling)", "#2ca02c"),
                            ("batch-max", "account-service, ReserveBatch of 100", "#ff7f0e"),
                            ("stream-max", "account-service, ReserveStream", "#8c564b"),
                            ("echo-batch-max", "echo server, ReserveBatch of 100", "#bcbd22"),
                            ("echo-stream-max", "echo server, ReserveStream", "#17becf")]:
    d = load(name)
    if d:
        series.append((label, colour, [(s["rate"], s["p99_us"]) for s in d["steps"]]))
peer = [(d["target_rate"], d["latency_us"]["p99"]) for d in (load("seed-pg-1k"), load("seed-pg-5k")) if d]
if peer:
    series.append(("seed design (PostgreSQL tx per Reserve)", "#d62728", peer))
fixed = [(d["target_rate"], d["latency_us"]["p99"]) for d in (load("reserve-sync-1k"),) if d]
if fixed:
    series.append(("account-service at 1,000/s (10 s run)", "#9467bd", fixed))

W, H, L, R, T, B = 760, 460, 80, 20, 40, 60
xs = [x for _, _, pts in series for x, _ in pts]
ys = [max(y, 1) for _, _, pts in series for _, y in pts]
x_max = max(xs) * 1.05
y_lo, y_hi = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))


def px(x):
    return L + (W - L - R) * x / x_max


def py(y):
    return T + (H - T - B) * (1 - (math.log10(max(y, 1)) - y_lo) / max(y_hi - y_lo, 1))


svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{W/2}" y="22" text-anchor="middle" font-size="14">p99 latency vs offered Reserve rate (open loop, same run)</text>']
for e in range(y_lo, y_hi + 1):
    y = py(10 ** e)
    label = f"{10**e} µs" if e < 3 else f"{10**(e-3)} ms" if e < 6 else f"{10**(e-6)} s"
    svg.append(f'<line x1="{L}" x2="{W-R}" y1="{y}" y2="{y}" stroke="#ddd"/>')
    svg.append(f'<text x="{L-6}" y="{y+4}" text-anchor="end">{label}</text>')
step = max(1000, 10 ** int(math.log10(x_max)) // 2)
for x in range(0, int(x_max) + 1, step):
    svg.append(f'<line x1="{px(x)}" x2="{px(x)}" y1="{T}" y2="{H-B}" stroke="#eee"/>')
    svg.append(f'<text x="{px(x)}" y="{H-B+16}" text-anchor="middle">{x:,}</text>')
svg.append(f'<text x="{(L+W-R)/2}" y="{H-18}" text-anchor="middle">offered rate (Reserve/s)</text>')
for i, (label, colour, pts) in enumerate(series):
    pts = sorted(pts)
    if len(pts) > 1:
        svg.append('<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>'
                   % (colour, " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)))
    for x, y in pts:
        svg.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{colour}"/>')
    svg.append(f'<rect x="{L+12}" y="{T+8+i*18}" width="12" height="12" fill="{colour}"/>')
    svg.append(f'<text x="{L+30}" y="{T+18+i*18}">{label}</text>')
svg.append("</svg>")
open(out, "w").write("\n".join(svg))
print(out)
