#!/usr/bin/env python3
"""bench/production.json, the tables bench/production.md and the chart bench/sweep.svg from
scripts/bench_production.sh's pieces (the production profile, docs/benchmarks-method.md).

usage: production.py WORK_DIR OUT.json OUT.md OUT.svg KEY=VALUE...   (the run's settings)

The knee of a pipeline is the highest rate it held: commit → applied p99 ≤ 100 ms, the
backlog flat (its fitted slope below 1 % of the rate a second), every event applied, and the
load generator within 5 % of the rate. Each step also names what bounded it, from CPU figures.
"""
import glob
import json
import os
import platform
import sys
import time
from html import escape

P99_LIMIT_MS = 100
FLAT_SHARE = 0.01  # backlog growth per second, as a share of the rate
LOADGEN_SHARE = 0.95
PIPELINES = ("dualsync", "debezium")
OWN = {"dualsync": ("relay", "apply"), "debezium": ("connect",)}
COLOURS = {"dualsync": "#3b7dd8", "debezium": "#e8833a"}


def load(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None


def core_share(procs, name):
    """A process's CPU over the window, in % of one core."""
    p, secs = procs.get(name), procs.get("machine", {}).get("seconds")
    return round(100 * p["cpu_s"] / secs) if p and secs else None


def judge(step):
    """Adds ok, flat, bound (what limited the step, with CPU figures) and cpu_core_pct."""
    rate, procs = step["rate"], load(step.get("procs_file") or "") or {}
    m = procs.get("machine", {})
    step["machine"] = m
    step["cpu_core_pct"] = {n: core_share(procs, n) for n in procs if n != "machine"}
    slope = (step.get("backlog") or {}).get("slope_per_s")
    step["flat"] = slope is not None and slope <= FLAT_SHARE * rate
    p99 = (step.get("commit_to_applied_ms") or {}).get("p99")
    reached = (step.get("committed_events_per_s") or 0) >= LOADGEN_SHARE * rate
    step["ok"] = bool(reached and step["flat"] and p99 is not None and p99 <= P99_LIMIT_MS
                      and not step.get("missing_applied"))
    busy = (100 * m["busy_cpu_s"] / (m["seconds"] * m["cores"])) if m.get("seconds") and m.get("cores") else None
    step["machine_busy_pct"] = round(busy) if busy is not None else None
    pct = step["cpu_core_pct"]
    top = max(((n, v) for n, v in pct.items() if v is not None), key=lambda x: x[1], default=(None, None))
    if not reached:
        step["bound"] = (f"load generator: {step.get('committed_events_per_s')} of {rate} events/s committed "
                         f"(pgbench {pct.get('loadgen')} %, PostgreSQL {pct.get('postgres')} % of a core)")
    elif busy is not None and busy >= 90:
        step["bound"] = f"the {m['cores']} cores: {step['machine_busy_pct']} % busy; largest: {top[0]} {top[1]} % of a core"
    elif not step["ok"]:
        own = max(((n, pct.get(n)) for n in OWN[step["pipeline"]] if pct.get(n) is not None),
                  key=lambda x: x[1], default=(None, None))
        step["bound"] = f"the pipeline: {own[0]} at {own[1]} % of a core (machine {step['machine_busy_pct']} % busy)"
    else:
        step["bound"] = None
    return step


def knee(steps):
    measured = [s for s in steps if s["kind"] == "measured"]
    held = [s["rate"] for s in measured if s["ok"]]
    top = max((s["rate"] for s in measured), default=None)
    if not held:
        return {"rate": None, "reached": bool(measured)}
    # Reached when a higher step was measured and failed; otherwise the sweep did not go far enough.
    return {"rate": max(held), "reached": max(held) != top}


def fmt_pct(d):
    return f"{d['p50']} / {d['p99']} / {d['max']}" if d and d.get("p99") is not None else "–"


def sweep_rows(sweeps):
    rows = ["| pipeline | rate, events/s (committed) | commit → on topic p50 / p99 / max, ms | "
            "commit → applied p50 / p99 / max, ms | backlog slope, events/s (max) | held? | CPU, % of a core | bound |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p, steps in sweeps.items():
        for s in steps:
            cpu = ", ".join(f"{n} {v}" for n, v in sorted(s["cpu_core_pct"].items()) if v is not None)
            b = s.get("backlog") or {}
            label = f"{s['rate']:,}" + (" (failover)" if s["kind"] == "failover" else "")
            rows.append(f"| {p} | {label} ({s.get('committed_events_per_s')}) | {fmt_pct(s.get('commit_to_on_topic_ms'))} | "
                        f"{fmt_pct(s.get('commit_to_applied_ms'))} | {b.get('slope_per_s')} ({b.get('max')}) | "
                        f"{'yes' if s['ok'] else 'no'} | {cpu} | {s.get('bound') or '–'} |")
    return rows


def chart(sweeps, out, title):
    """p99 commit → applied (solid) and → on topic (dotted) against the rate, log scale."""
    import math
    rates = sorted({s["rate"] for steps in sweeps.values() for s in steps if s["kind"] == "measured"})
    if not rates:
        return
    w, h, left, top, right, bottom = 760, 420, 70, 50, 150, 60
    values = [v for steps in sweeps.values() for s in steps for k in ("commit_to_applied_ms", "commit_to_on_topic_ms")
              if (v := (s.get(k) or {}).get("p99"))]
    hi = 10 ** math.ceil(math.log10(max(values + [P99_LIMIT_MS * 2])))
    lo = 10 ** math.floor(math.log10(max(min(values + [1]), 0.1)))
    x = lambda r: left + (rates.index(r) + 0.5) * (w - left - right) / len(rates)
    y = lambda v: top + (h - top - bottom) * (1 - (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)))
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{left}" y="28" font-size="15">{escape(title)}</text>']
    d = lo
    while d <= hi:
        svg.append(f'<line x1="{left}" x2="{w - right}" y1="{y(d):.1f}" y2="{y(d):.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 8}" y="{y(d) + 4:.1f}" font-size="11" text-anchor="end">{d:g} ms</text>')
        d *= 10
    svg.append(f'<line x1="{left}" x2="{w - right}" y1="{y(P99_LIMIT_MS):.1f}" y2="{y(P99_LIMIT_MS):.1f}" '
               f'stroke="#c00" stroke-dasharray="6 4"/><text x="{w - right + 4}" y="{y(P99_LIMIT_MS) + 4:.1f}" '
               f'font-size="11" fill="#c00">knee limit 100 ms</text>')
    for r in rates:
        svg.append(f'<text x="{x(r):.1f}" y="{h - bottom + 18}" font-size="11" text-anchor="middle">{r:,}</text>')
    svg.append(f'<text x="{(left + w - right) / 2}" y="{h - 18}" font-size="12" text-anchor="middle">'
               'offered rate, events/s (p99 per step; solid: commit → applied, dotted: commit → on topic)</text>')
    for i, (p, steps) in enumerate(sweeps.items()):
        c = COLOURS.get(p, "#555")
        for key, dash in (("commit_to_applied_ms", ""), ("commit_to_on_topic_ms", ' stroke-dasharray="2 3"')):
            pts = [(x(s["rate"]), y(s[key]["p99"])) for s in steps
                   if s["kind"] == "measured" and (s.get(key) or {}).get("p99") is not None]
            if pts:
                svg.append(f'<polyline fill="none" stroke="{c}" stroke-width="2"{dash} points="'
                           + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
                svg += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{c}"/>' for a, b in pts]
        svg.append(f'<text x="{w - right + 4}" y="{top + 20 + 18 * i}" font-size="12" fill="{c}">{escape(p)}</text>')
    svg.append("</svg>")
    open(out, "w").write("\n".join(svg) + "\n")


def per_k(procs, names, events):
    cpu = sum((procs.get(n) or {}).get("cpu_s", 0) for n in names)
    return round(cpu * 1000 / events, 3) if events else None


def main():
    work, out_json, out_md, out_svg = sys.argv[1:5]
    settings = dict(a.split("=", 1) for a in sys.argv[5:])
    sweeps = {}
    for p in PIPELINES:
        files = sorted(glob.glob(os.path.join(work, f"{p}-step-*.json")),
                       key=lambda f: (("failover" in f), int(f.rsplit("-step-", 1)[1].split("-")[0])))
        steps = [judge({**load(f), "pipeline": p}) for f in files if load(f)]
        if steps:
            sweeps[p] = steps
    scale = []
    for f in sorted(glob.glob(os.path.join(work, "scale-*.json"))):
        s = load(f)
        procs = load(s.get("procs_file") or "") or {}
        s["events_per_s"] = round(s["events"] / s["seconds"]) if s.get("seconds") else None
        s["cpu_s_per_1000_events"] = {n: per_k(procs, [n], s["events"]) for n in ("apply", "postgres", "broker")}
        s["machine"] = procs.get("machine")
        scale.append(s)
    drains = {p: load(os.path.join(work, f"{p}-drain.json")) for p in PIPELINES}
    purge = load(os.path.join(work, "purge.json"))
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "profile": "production",
              "machine": f"{os.cpu_count()} cores, {platform.machine()}",
              "cluster": "3 KRaft nodes (Apache Kafka 4.4.0), topics RF 3, min.insync.replicas 2, acks=all",
              "settings": settings, "sweep": sweeps, "knee": {p: knee(s) for p, s in sweeps.items()},
              "scale_out": scale, "big_drain": drains, "purge": purge}
    json.dump(result, open(out_json, "w"), indent=1)

    md = [f"Production profile ({result['date']}, {result['machine']}; {result['cluster']}). "
          f"Settings: {', '.join(f'{k} {v}' for k, v in settings.items())}.", ""]
    if sweeps:
        md += ["**Rate sweep**", "", *sweep_rows(sweeps), ""]
        for p, k in result["knee"].items():
            md.append(f"- knee, {p}: " + ("none held" if k["rate"] is None else
                      f"{k['rate']:,} events/s" + ("" if k["reached"] else " (the highest step measured: not reached)")))
        kd, kz = (result["knee"].get(p, {}).get("rate") for p in PIPELINES)
        if kd and kz:
            md.append(f"- knees, dualsync against Debezium: {kd / kz:.1f}× (issue #39's target: at least 3×)")
        at10k = next((s for s in sweeps.get("dualsync", []) if s["kind"] == "measured" and s["rate"] == 10000), None)
        if at10k:
            md.append(f"- dualsync at 10,000 events/s: commit → applied p99 {at10k['commit_to_applied_ms']['p99']} ms "
                      "(issue #39's target: at most 50 ms)")
        for s in sweeps.get("dualsync", []):
            f = s.get("failover")
            if f:
                md.append(f"- relay failover at {s['rate']:,} events/s (leader killed at {f['killed_at']}): the standby "
                          f"published {f['resume_s']} s later; the first event committed after the kill was on its topic "
                          f"{f.get('first_later_commit_on_topic_s')} s after it; commit → applied "
                          f"p50 / p99 / max from 1 s before to 10 s after: {fmt_pct(f.get('gap_commit_to_applied_ms'))} ms; "
                          f"over the whole step: {fmt_pct(s.get('commit_to_applied_ms'))} ms")
        md.append("")
        chart(sweeps, out_svg, f"p99 against the offered rate, production profile, {result['date']}")
    if scale:
        md += ["**Apply scale-out** (6 partitions, one group)", "",
               "| apply processes | events | drain, events/s | CPU s per 1,000 events: apply / PostgreSQL / broker | machine busy, CPU s (load avg) |",
               "| --- | --- | --- | --- | --- |"]
        for s in scale:
            c, m = s["cpu_s_per_1000_events"], s.get("machine") or {}
            md.append(f"| {s['applies']} | {s['events']:,} | {s['events_per_s']} | {c['apply']} / {c['postgres']} / {c['broker']} | "
                      f"{m.get('busy_cpu_s')} ({m.get('load_avg_1m_mean')}) |")
        md.append("")
    if any(drains.values()):
        md += ["**Large drain**", "", "| pipeline | events | start → last applied, events/s | pipeline peak RSS, MiB | RSS first / last sample, MiB |",
               "| --- | --- | --- | --- | --- |"]
        for p, d in drains.items():
            if not d:
                continue
            procs = d.get("processes", {})
            peaks, series = [], []
            for n in OWN[p]:
                pr = procs.get(n) or {}
                peaks.append(f"{n} {round(pr.get('peak_rss_kib', 0) / 1024)}")
                s = pr.get("rss_kib_series") or []
                if s:
                    series.append(f"{n} {round(s[0][1] / 1024)} / {round(s[-1][1] / 1024)}")
            md.append(f"| {p} | {d.get('events'):,} | {d.get('to_last_applied_events_per_s')} | {', '.join(peaks)} | {', '.join(series)} |")
        if purge:
            rate = round(purge["rows"] / purge["empty_after_s"]) if purge.get("empty_after_s") else None
            md.append(f"\nOutbox purge after dualsync's drain (the relay restarted with retention {purge['retention_s']} s): "
                      f"{purge['rows']:,} rows deleted in {purge['empty_after_s']} s ({rate} rows/s; "
                      f"{purge['rows_left']} left), against the drain's {drains['dualsync'].get('to_last_applied_events_per_s')} events/s.")
    open(out_md, "w").write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
