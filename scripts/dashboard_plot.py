#!/usr/bin/env python3
"""Draws the Grafana dashboard's queries from a real run as a PNG (docs/img/dashboard.png):
one chart per panel of deploy/grafana/dualsync.json, from the query_range results the live
dashboard test dumps. Usage:

    DUALSYNC_DASHBOARD_DUMP=/tmp/dash.json DUALSYNC_DASHBOARD_LOAD_SECS=120 \\
        cargo test --test it dashboard::every_dashboard
    python3 scripts/dashboard_plot.py /tmp/dash.json docs/img/dashboard.png

Needs matplotlib (Debian: python3-matplotlib)."""
import json
import math
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

UNITS = {"s": "seconds", "ops": "events/s", "bytes": "MiB", "percentunit": "cores", "short": ""}


def legend(fmt, labels):
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()


def main():
    dump = json.load(open(sys.argv[1]))
    dashboard = json.load(open("deploy/grafana/dualsync.json"))
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    by_panel = {}
    for entry in dump:
        by_panel.setdefault(entry["panel"], []).append(entry)
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.4 * rows))
    t0 = min(float(v[0]) for e in dump for s in e["data"]["result"] for v in s["values"][:1])
    for ax, panel in zip(axes.flat, panels):
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        for target, entry in zip(panel["targets"], by_panel.get(panel["title"], [])):
            for s in entry["data"]["result"]:
                xs = [float(t) - t0 for t, _ in s["values"]]
                ys = [float(v) for _, v in s["values"]]
                if unit == "bytes":
                    ys = [y / 2**20 for y in ys]
                name = legend(target.get("legendFormat", ""), s["metric"]) or entry["expr"][:40]
                ax.plot(xs, ys, linewidth=1, label=name)
        ax.set_title(panel["title"], fontsize=10, loc="left")
        ax.set_ylabel(UNITS.get(unit, unit), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=6, loc="upper left", ncol=2)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("seconds into the run", fontsize=8)
    fig.suptitle("dualsync dashboard queries (deploy/grafana/dualsync.json) from a live Prometheus", fontsize=12)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=90)


if __name__ == "__main__":
    main()
