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

# dualsync_wal: dualsync capturing from the WAL (`[source] capture = "wal"`), issue #38.
PIPELINES = ("dualsync", "dualsync_wal", "debezium")
NAMES = {"dualsync": "dualsync (polling)", "dualsync_wal": "dualsync (WAL)", "debezium": "Debezium"}
CAPTURE = {"dualsync": "polling", "dualsync_wal": "WAL"}
PROCS = {"dualsync": ("relay", "apply"), "dualsync_wal": ("relay", "apply"), "debezium": ("connect",)}


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

    # Columns: each pipeline measured (dualsync's two capture modes when both ran), then the
    # ratio of Debezium's figure to each dualsync column's.
    cols = [p for p in PIPELINES if res[p]["drain"] or res[p]["fixed_rate"]]
    ours = [p for p in cols if p != "debezium"]
    drain = {p: res[p]["drain"] or {} for p in cols}
    fixed = {p: res[p]["fixed_rate"] or {} for p in cols}
    rows = []

    def row(label, get, unit="", higher_is_better=None):
        vals = {p: get(p) for p in cols}
        cells = [fmt(vals[p], unit) for p in cols]
        if "debezium" in cols:
            cells += [ratio(vals[p], vals["debezium"], higher_is_better) if higher_is_better is not None else ""
                      for p in ours]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")

    def pct(phase, key):
        v = phase.get(key)
        return f"{v['p50']} / {v['p99']} / {v['max']}" if v else None

    def first(phases, key):
        return next((f.get(key) for f in phases.values() if f.get(key)), None)

    row("load generator, events/s committed (backlog writes)", lambda p: drain[p].get("load_events_per_s"))
    row(f"drain of {fmt(first(drain, 'events'))} events: start → last on its topic, events/s",
        lambda p: drain[p].get("to_last_on_topic_events_per_s"), "", True)
    row("drain: first → last on its topic, events/s",
        lambda p: drain[p].get("first_to_last_on_topic_events_per_s"), "", True)
    row("drain: start → last row applied in PostgreSQL, events/s",
        lambda p: drain[p].get("to_last_applied_events_per_s"), "", True)
    row("drain: first on topic → last row applied, events/s",
        lambda p: drain[p].get("first_to_last_applied_events_per_s"), "", True)
    row(f"fixed rate ({fmt(first(fixed, 'committed_events_per_s'))} events/s "
        f"committed, {fixed_s} s after {warmup} s not counted): commit → on topic p50 / p99 / max, ms",
        lambda p: pct(fixed[p], "commit_to_on_topic_ms"))
    row("fixed rate: commit → applied p50 / p99 / max, ms", lambda p: pct(fixed[p], "commit_to_applied_ms"))
    row("fixed rate: commit → applied p99 (ratio: Debezium's / dualsync's)",
        lambda p: (fixed[p].get("commit_to_applied_ms") or {}).get("p99"), " ms", False)
    row("fixed rate: commit → applied p99 per minute, ms",
        lambda p: ", ".join(str(m["applied_p99_ms"]) for m in fixed[p].get("per_minute") or []) or None)
    row("fixed rate: the writers' commit latency p50 / p99 / max, ms (pgbench, schedule lag taken off)",
        lambda p: pct(fixed[p], "writer_commit_ms"))
    row("fixed rate: WAL bytes per event, whole cluster (outbox, business rows, sink rows)",
        lambda p: fixed[p].get("wal_bytes_per_event"), "", False)
    for phase_name, ph in (("drain", drain), ("fixed rate", fixed)):
        pipeline = lambda p: round(sum(filter(None, (cpu_per_k(ph[p], x) for x in PROCS[p]))), 3) or None
        row(f"{phase_name}: CPU s per 1,000 events, pipeline (dualsync: relay + apply; peer: Connect)",
            pipeline, "", False)
        row(f"{phase_name}: CPU s per 1,000 events, relay / apply",
            lambda p: " / ".join(fmt(cpu_per_k(ph[p], x)) for x in PROCS[p]) if p != "debezium" else "–")
        for proc in ("postgres", "broker"):
            row(f"{phase_name}: CPU s per 1,000 events, {proc}", lambda p: cpu_per_k(ph[p], proc), "", False)
        row(f"{phase_name}: CPU s per 1,000 events, pipeline + PostgreSQL + broker",
            lambda p: round(sum(filter(None, [pipeline(p), cpu_per_k(ph[p], "postgres"),
                                               cpu_per_k(ph[p], "broker")])), 3) or None, "", False)
        reqs = lambda p: (None if requests_per_k(ph[p], None) is None else " / ".join(
            fmt(requests_per_k(ph[p], k)) for k in (("Produce",), ("Fetch",), None)))
        row(f"{phase_name}: broker requests per 1,000 events, produce / fetch / all", reqs)
        row(f"{phase_name}: peak RSS MiB, relay / apply vs Connect",
            lambda p: " / ".join(fmt(rss_mib(ph[p], x)) for x in PROCS[p]))
        row(f"{phase_name}: peak RSS MiB, PostgreSQL (all processes, shared memory counted per process) / broker",
            lambda p: f"{fmt(rss_mib(ph[p], 'postgres'))} / {fmt(rss_mib(ph[p], 'broker'))}")
    for phase_name, ph in (("drain", drain), ("fixed rate", fixed)):
        m = lambda x: (x.get("processes") or {}).get("machine") or {}
        row(f"{phase_name}: the machine meanwhile, mean load average / CPU s busy (all its work)",
            lambda p: f"{m(ph[p])['load_avg_1m_mean']} / {m(ph[p])['busy_cpu_s']}" if m(ph[p]) else None)
    header = [NAMES[p] for p in cols] + ([f"ratio, {CAPTURE[p]}" for p in ours] if "debezium" in cols else [])
    md = [f"Side by side ({side['date']}, {side['machine']}, default profile: one Kafka node, RF 1; the machine's load in each phase is in the last rows). dualsync: Avro values; "
          f"Debezium: JSON converter with schemas, Kafka Connect 4.3.2, PostgreSQL connector 3.6.1.Final "
          f"(pgoutput, EventRouter), JDBC sink 3.6.0.Final (upsert), poll.interval.ms {poll_ms}. "
          f"Load: {side['settings']['load_generator']}. Ratio: how many times better dualsync is "
          "(below 1: worse).", "",
          "| measurement | " + " | ".join(header) + " |", "|" + " --- |" * (len(header) + 1), *rows]
    open(out_md, "w").write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
