#!/usr/bin/env python3
"""Where the relay's commit→published time goes, from its debug log (`make bench`, phase 3b).

Reads the relay's "batch published" lines written from SINCE up to UNTIL (RFC 3339 UTC
timestamps to the second, as `date -u +%Y-%m-%dT%H:%M:%S` prints them) and prints one JSON object with the p50 / p99 / max of
each part of a batch's way, in milliseconds:
  waited_ms   oldest row's insert → the read that returned it (commit, NOTIFY, linger, read)
  encode_ms   JSON → Avro messages
  publish_ms  hand-over to the producer → Kafka's last acknowledgement of the batch
  mark_ms     acknowledgement → rows marked published (`published_at` is set here)

usage: bench/report/breakdown.py RELAY_LOG SINCE [UNTIL]
"""
import json
import re
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*m")
FIELD = re.compile(r"\b(rows|waited_ms|encode_ms|publish_ms|mark_ms)=([0-9.]+)")
PARTS = ("waited_ms", "encode_ms", "publish_ms", "mark_ms")


def quantiles(values):
    values = sorted(values)
    if not values:
        return {"p50": None, "p99": None, "max": None}
    pick = lambda q: values[min(len(values) - 1, round((len(values) - 1) * q))]
    return {"p50": round(pick(0.5), 1), "p99": round(pick(0.99), 1), "max": round(values[-1], 1)}


def main():
    log, since = sys.argv[1], sys.argv[2]
    until = sys.argv[3] if len(sys.argv) > 3 else "9999"
    batches = []
    with open(log, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = ANSI.sub("", line)
            stamp = line[: len(since)]
            if "batch published" not in line or stamp < since or stamp > until[: len(since)]:
                continue
            fields = {k: float(v) for k, v in FIELD.findall(line)}
            if all(p in fields for p in PARTS):
                batches.append(fields)
    result = {"batches": len(batches), "rows_per_batch": quantiles([b["rows"] for b in batches])}
    for part in PARTS:
        result[part] = quantiles([b[part] for b in batches])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
