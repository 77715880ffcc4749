#!/usr/bin/env python3
"""Draws bench/results.json as an SVG (stdlib only): throughput per stage and latency
percentiles, and, side by side, dualsync's and the Debezium peer's drain rates and latencies
(blue: dualsync, orange: Debezium). Usage: bench/report/chart.py RESULTS.json OUT.svg"""
import json
import sys
from html import escape


DUALSYNC, DEBEZIUM = "#3b7dd8", "#e8833a"


def bars(x0, y0, width, height, title, unit, items):
    """A horizontal bar panel; items = [(label, value)] or [(label, value, colour)]."""
    items = [(i[0], i[1] or 0, i[2] if len(i) > 2 else DUALSYNC) for i in items]
    out = [f'<text x="{x0}" y="{y0 - 10}" font-size="15" font-weight="bold">{escape(title)}</text>']
    top = max(v for _, v, _ in items) or 1
    row = height / len(items)
    label_w = 230
    for i, (label, value, colour) in enumerate(items):
        y = y0 + i * row
        w = (width - label_w - 150) * value / top
        out.append(f'<text x="{x0}" y="{y + row * 0.6}" font-size="13">{escape(label)}</text>')
        out.append(f'<rect x="{x0 + label_w}" y="{y + row * 0.15}" width="{w:.1f}" '
                   f'height="{row * 0.6:.1f}" fill="{colour}"/>')
        out.append(f'<text x="{x0 + label_w + w + 6:.1f}" y="{y + row * 0.6}" font-size="13">'
                   f'{value:,.1f} {escape(unit)}</text>')
    return out


def side_panels(side, width):
    """dualsync beside the Debezium peer: drain rates, then fixed-rate latencies."""
    both = [(name, colour, side[name.lower()]) for name, colour in (("dualsync", DUALSYNC), ("Debezium", DEBEZIUM))
            if side.get(name.lower(), {}).get("drain") or side.get(name.lower(), {}).get("fixed_rate")]
    drain = []
    for key, label in (("to_last_on_topic_events_per_s", "start → last on topic"),
                       ("first_to_last_on_topic_events_per_s", "first → last on topic"),
                       ("to_last_applied_events_per_s", "start → last applied")):
        drain += [(f"{n}: {label}", (r["drain"] or {}).get(key), c) for n, c, r in both]
    lat = []
    for key, label in (("commit_to_on_topic_ms", "commit → on topic"), ("commit_to_applied_ms", "commit → applied")):
        for q in ("p50", "p99"):
            lat += [(f"{n}: {label} {q}", ((r["fixed_rate"] or {}).get(key) or {}).get(q), c) for n, c, r in both]
    events = next(((r["drain"] or {}).get("events") for _, _, r in both if r["drain"]), 0)
    fixed = next((r["fixed_rate"] for _, _, r in both if r["fixed_rate"]), {}) or {}
    out = bars(20, 590, width, 190, f"Side by side: draining {events:,} events (Debezium: JSON; dualsync: Avro)",
               "events/s", drain)
    out += bars(20, 840, width, 250, f"Side by side: latency at {fixed.get('committed_events_per_s', '?')} "
                "events/s", "ms", lat)
    return out


def main():
    results = json.load(open(sys.argv[1]))
    drain, lat = results["drain"], results["latency"]
    pub, app = lat["commit_to_published_ms"], lat["commit_to_applied_postgres_ms"]
    width = 820
    side = results.get("side_by_side")
    height = 1110 if side else 560
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="sans-serif">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="20" y="28" font-size="17">dualsync benchmark, {escape(results["date"])}, '
           f'{escape(results["machine"])}</text>']
    e2e = results["end_to_end_postgres"]
    svg += bars(20, 75, width, 150, f'Throughput ({drain["events"]:,}-event backlog; end to end: '
                f'{e2e["events"]:,} events)', "events/s", [
        ("end to end → PostgreSQL", e2e["events_per_s"]),
        ("relay (outbox → Kafka)", drain["relay_events_per_s"]),
        ("apply → PostgreSQL", drain["apply_postgres_events_per_s"]),
        ("apply → MongoDB (SecantusDB)", drain["apply_mongo_events_per_s"]),
    ])
    svg += bars(20, 285, width, 250,
                f'Latency at {lat["rate_changes_per_s"]} order changes/s', "ms", [
        ("commit → published p50", pub["p50"]),
        ("commit → published p99", pub["p99"]),
        ("commit → published max", pub["max"]),
        ("commit → applied (PG) p50", app["p50"]),
        ("commit → applied (PG) p99", app["p99"]),
        ("commit → applied (PG) max", app["max"]),
    ])
    if side:
        svg += side_panels(side, width)
    svg.append("</svg>")
    open(sys.argv[2], "w").write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
