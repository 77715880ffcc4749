#!/usr/bin/env python3
"""CPU seconds and peak RSS of the processes of one bench phase, from /proc (`make bench`).

usage: bench/report/procs.py OUT.json NAME=PID[,PID...] [NAME=PID...]
Samples every 0.2 s until SIGTERM, then writes {NAME: {"cpu_s": .., "peak_rss_kib": ..}} and
"machine": the mean and max of the 1-minute load average while sampling, and the machine's CPU
seconds busy in that time (other work on a shared machine shows here).
cpu_s is the CPU time used during the sampling (user + system) by the process and all its
descendants, including children that ended meanwhile (PostgreSQL's backends: their time is
in the postmaster's cutime/cstime once reaped). peak_rss_kib is the largest RSS seen of the
single process NAME=PID itself plus its descendants at one sample (PostgreSQL: shared buffers
touched by several backends are counted once per backend, so this overstates it).
A PID may be given as 'file:PATH' (read when it appears). A process that appears after the
first sample is counted from its start. Several PIDs for one NAME (a three-broker cluster,
several apply processes) are summed.
With BENCH_PROCS_SERIES_S=N set, each NAME also gets "rss_kib_series": [[seconds, KiB], ...]
every N seconds (flat memory over a long drain is what the production profile looks for).
"""
import json
import os
import signal
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is state (field 3); utime is field 14, stime 15, cutime 16, cstime 17, rss 24.
    ppid = int(fields[1])
    own = int(fields[11]) + int(fields[12])
    reaped = int(fields[13]) + int(fields[14])
    return ppid, own, reaped, int(fields[21]) * PAGE_KIB


def tree():
    """pid -> (ppid, own ticks, reaped children's ticks, rss KiB) of every live process."""
    procs = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                procs[int(d)] = stat(d)
            except (OSError, IndexError, ValueError):
                pass
    return procs


def measure(root, procs):
    """(CPU ticks, RSS KiB) of root and its live descendants; root's reaped children too."""
    if root not in procs:
        return None
    kids = {}
    for pid, (ppid, *_rest) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    ticks, rss, todo = procs[root][2], 0, [root]
    while todo:
        pid = todo.pop()
        ticks += procs[pid][1]
        rss += procs[pid][3]
        todo.extend(kids.get(pid, []))
    return ticks, rss


def resolve_all(spec):
    """The PIDs of 'PID,PID...' or of 'file:PATH' (the file holding 'PID,PID...', read each time)."""
    if spec.startswith("file:"):
        try:
            with open(spec[5:]) as f:
                spec = f.read().strip()
        except OSError:
            return []
    return [int(p) for p in spec.split(",") if p.strip().isdigit()]


def machine():
    """(1-minute load average, busy CPU ticks of the whole machine)."""
    with open("/proc/loadavg") as f:
        load = float(f.read().split()[0])
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    return load, sum(cpu) - cpu[3] - cpu[4]  # all but idle and iowait


def main():
    out, specs = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
    first, last, peak = {}, {}, {}
    stop, started = [], False
    loads, busy0 = [], machine()[1]
    every = float(os.environ.get("BENCH_PROCS_SERIES_S") or 0)
    series, t0, next_point = {}, time.monotonic(), 0.0
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while True:
        procs = tree()
        point = every and time.monotonic() - t0 >= next_point
        for name, spec in specs.items():
            ms = [m for m in (measure(pid, procs) for pid in resolve_all(spec)) if m]
            if not ms:
                continue
            m = (sum(x[0] for x in ms), sum(x[1] for x in ms))
            if point:
                series.setdefault(name, []).append([round(time.monotonic() - t0, 1), m[1]])
            # Started after the sampler: all its CPU time belongs to this phase.
            first.setdefault(name, m[0] if not started else 0)
            last[name] = m[0]
            peak[name] = max(peak.get(name, 0), m[1])
        if point:
            next_point += every
        loads.append(machine()[0])
        started = True
        if stop:
            break
        time.sleep(0.2)
    result = {n: {"cpu_s": round((last[n] - first[n]) / TICK, 2), "peak_rss_kib": peak[n]} for n in last}
    for n, points in series.items():
        result[n]["rss_kib_series"] = points
    result["machine"] = {"seconds": round(time.monotonic() - t0, 1), "cores": os.cpu_count()}
    result["machine"] |= {"load_avg_1m_mean": round(sum(loads) / len(loads), 1), "load_avg_1m_max": round(max(loads), 1),
                         "busy_cpu_s": round((machine()[1] - busy0) / TICK, 1)}
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
