#!/usr/bin/env python3
"""bench/side.json and the side-by-side table bench/side.md from scripts/bench_side.sh's pieces.

usage: bench/report/side_report.py WORK_DIR OUT.json OUT.md FIXED_SECONDS LOAD_CLIENTS LOAD_BATCH DBZ_POLL_MS
                            FIXED_CLIENTS FIXED_BATCH FIXED_WARMUP
"""
import json
import os
import platform
import subprocess
import sys
import time

PIPELINES = ("dualsync", "debezium")
PROCS = {"dualsync": ("relay", "apply"), "debezium": ("connect",)}


def load(work, name):
    path = os.path.join(work, name)
    return json.load(open(path)) if os.path.exists(path) else None


def cpu_per_k(phase, proc):
    p = (phase or {}).get("processes", {}).get(proc)
    return round(p["cpu_s"] * 1000 / phase["events"], 3) if p and phase.get("events") else None


def requests_per_k(phase, kinds):
    """The broker's requests of these types per 1,000 events (None when not counted)."""
    req = (phase or {}).get("processes", {}).get("broker", {}).get("requests")
    if not req or not phase.get("events"):
        return None
    # FetchConsumer and FetchFollower are Fetch's requests again, split by who sent them.
    every = [k for k in req if k not in ("FetchConsumer", "FetchFollower")]
    n = sum(req.get(k, 0) for k in (every if kinds is None else kinds))
    return round(n * 1000 / phase["events"])


def rss_mib(phase, proc):
    p = (phase or {}).get("processes", {}).get(proc)
    return round(p["peak_rss_kib"] / 1024) if p else None


def fmt(v, unit=""):
    return "–" if v is None else f"{v:,}{unit}" if isinstance(v, int) else f"{v}{unit}"


def ratio(a, b, higher_is_better):
    if not a or not b:
        return "–"
    r = a / b if higher_is_better else b / a
    return f"{r:.2f}×"


def main():
    work, out_json, out_md = sys.argv[1:4]
    fixed_s, clients, batch, poll_ms, fixed_clients, fixed_batch, warmup = sys.argv[4:11]
    res = {p: {"drain": load(work, f"{p}-drain.json"), "fixed_rate": load(work, f"{p}-fixed.json")}
           for p in PIPELINES}
    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[0]
    side = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "profile": "default (one Kafka node, RF 1)",
        "machine": f"{os.cpu_count()} cores, {platform.machine()}",
        "settings": {
            "load_generator": f"pgbench; backlog: {clients} connections, {batch} events per transaction "
                              "(one multi-row upsert of shop.orders + its outbox rows); fixed rate: "
                              f"{fixed_clients} connections, {fixed_batch} new orders per transaction",
            "fixed_rate_seconds": int(fixed_s),
            "fixed_rate_warmup_seconds": int(warmup),
            "debezium": {"connect": "Kafka Connect 4.3.2 standalone", "postgres_connector": "3.6.1.Final",
                         "jdbc_sink": "3.6.0.Final", "converter": "JSON (schemas.enable=true)",
                         "poll_interval_ms": int(poll_ms), "java": java},
            "dualsync": {"converter": "Avro (schemas/*.avsc)", "config": "connectors/demo.toml"},
        },
        **res,
    }
    json.dump(side, open(out_json, "w"), indent=1)

    d, z = res["dualsync"], res["debezium"]
    dd, zd, df, zf = d["drain"] or {}, z["drain"] or {}, d["fixed_rate"] or {}, z["fixed_rate"] or {}
    rows = []

    def row(label, a, b, unit="", higher_is_better=None):
        r = ratio(a, b, higher_is_better) if higher_is_better is not None else ""
        rows.append(f"| {label} | {fmt(a, unit)} | {fmt(b, unit)} | {r} |")

    def pct(phase, key):
        v = phase.get(key)
        return f"{v['p50']} / {v['p99']} / {v['max']}" if v else None

    row("load generator, events/s committed (backlog writes)", dd.get("load_events_per_s"),
        zd.get("load_events_per_s"))
    row(f"drain of {fmt(dd.get('events') or zd.get('events'))} events: start → last on its topic, events/s",
        dd.get("to_last_on_topic_events_per_s"), zd.get("to_last_on_topic_events_per_s"), "", True)
    row("drain: first → last on its topic, events/s", dd.get("first_to_last_on_topic_events_per_s"),
        zd.get("first_to_last_on_topic_events_per_s"), "", True)
    row("drain: start → last row applied in PostgreSQL, events/s", dd.get("to_last_applied_events_per_s"),
        zd.get("to_last_applied_events_per_s"), "", True)
    row("drain: first on topic → last row applied, events/s", dd.get("first_to_last_applied_events_per_s"),
        zd.get("first_to_last_applied_events_per_s"), "", True)
    row(f"fixed rate ({fmt(df.get('committed_events_per_s') or zf.get('committed_events_per_s'))} events/s "
        f"committed, {fixed_s} s after {warmup} s not counted): commit → on topic p50 / p99 / max, ms",
        pct(df, "commit_to_on_topic_ms"), pct(zf, "commit_to_on_topic_ms"))
    row("fixed rate: commit → applied p50 / p99 / max, ms", pct(df, "commit_to_applied_ms"),
        pct(zf, "commit_to_applied_ms"))
    a99 = lambda f: (f.get("commit_to_applied_ms") or {}).get("p99")
    row("fixed rate: commit → applied p99 (ratio: Debezium's / dualsync's)", a99(df), a99(zf), " ms", False)
    per_min = lambda f: ", ".join(str(m["applied_p99_ms"]) for m in f.get("per_minute") or []) or None
    row("fixed rate: commit → applied p99 per minute, ms", per_min(df), per_min(zf))
    for phase_name, a, b in (("drain", dd, zd), ("fixed rate", df, zf)):
        ca = sum(filter(None, (cpu_per_k(a, p) for p in PROCS["dualsync"]))) or None
        cb = cpu_per_k(b, "connect")
        row(f"{phase_name}: CPU s per 1,000 events, pipeline (dualsync: relay + apply; peer: Connect)",
            round(ca, 3) if ca else None, cb, "", False)
        row(f"{phase_name}: CPU s per 1,000 events, relay / apply",
            " / ".join(fmt(cpu_per_k(a, p)) for p in PROCS["dualsync"]), "–")
        for proc in ("postgres", "broker"):
            row(f"{phase_name}: CPU s per 1,000 events, {proc}", cpu_per_k(a, proc), cpu_per_k(b, proc))
        reqs = lambda x: (None if requests_per_k(x, None) is None else " / ".join(
            fmt(requests_per_k(x, k)) for k in (("Produce",), ("Fetch",), None)))
        row(f"{phase_name}: broker requests per 1,000 events, produce / fetch / all", reqs(a), reqs(b))
        row(f"{phase_name}: peak RSS MiB, relay / apply vs Connect",
            " / ".join(fmt(rss_mib(a, p)) for p in PROCS["dualsync"]), rss_mib(b, "connect"))
        row(f"{phase_name}: peak RSS MiB, PostgreSQL (all processes, shared memory counted per process) / broker",
            f"{fmt(rss_mib(a, 'postgres'))} / {fmt(rss_mib(a, 'broker'))}",
            f"{fmt(rss_mib(b, 'postgres'))} / {fmt(rss_mib(b, 'broker'))}")
    for phase_name, a, b in (("drain", dd, zd), ("fixed rate", df, zf)):
        m = lambda x: (x.get("processes") or {}).get("machine") or {}
        fm = lambda x: f"{m(x)['load_avg_1m_mean']} / {m(x)['busy_cpu_s']}" if m(x) else None
        row(f"{phase_name}: the machine meanwhile, mean load average / CPU s busy (all its work)", fm(a), fm(b))
    md = [f"Side by side ({side['date']}, {side['machine']}, default profile: one Kafka node, RF 1; the machine's load in each phase is in the last rows). dualsync: Avro values; "
          f"Debezium: JSON converter with schemas, Kafka Connect 4.3.2, PostgreSQL connector 3.6.1.Final "
          f"(pgoutput, EventRouter), JDBC sink 3.6.0.Final (upsert), poll.interval.ms {poll_ms}. "
          f"Load: {side['settings']['load_generator']}. Ratio: how many times better dualsync is "
          "(below 1: worse).", "",
          "| measurement | dualsync | Debezium | ratio |", "| --- | --- | --- | --- |", *rows]
    open(out_md, "w").write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
