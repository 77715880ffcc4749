# MongoDB source measurements (BENCHMARKS.md), run with SecantusDB's Python:
#   python bench/mongo_source.py follow|catchup <documents> <pipeline.toml> <http port> <database>
# follow:  N documents inserted (insert_many, 1,000 per call) while the release relay runs.
# catchup: N changes made while the relay is stopped, then the relay restarted from its saved
#          token, and `dualsync snapshot` of the same documents.
# Both poll the relay's own published counter on its /metrics endpoint.
import json, re, subprocess, sys, time, urllib.request, pymongo

MODE = sys.argv[1]; N = int(sys.argv[2]); CFG = sys.argv[3]; PORT = int(sys.argv[4])
db = pymongo.MongoClient("mongodb://127.0.0.1:27117/?directConnection=true")[sys.argv[5]]


def published():
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=2).read().decode()
    except Exception:
        return 0
    return sum(float(m) for m in re.findall(r'^dualsync_events_published_total\{[^}]*\} ([0-9.e+]+)$', text, re.M))


def start_relay():
    return subprocess.Popen(["target/release/dualsync", "relay", "-c", CFG, "--http-port", str(PORT)],
                            stderr=open("/tmp/dualsync-bench-relay.log", "a"), stdout=subprocess.DEVNULL)


def wait_for_position():
    while not db.dualsync_offsets.find_one({"$or": [{"start_at": {"$ne": None}}, {"token": {"$ne": None}}]}):
        time.sleep(0.2)


def insert_all():
    for b in range(0, N, 1000):
        db.carts.insert_many([{"n": i, "items": [{"sku": "s%d" % (i % 50), "qty": i % 7}], "note": "x" * 100}
                              for i in range(b, min(N, b + 1000))])


def wait_published(since):
    while published() < N and time.time() < since + 600:
        time.sleep(0.05)
    return time.time()


relay = start_relay()
wait_for_position()
if MODE == "follow":
    t0 = time.time()
    insert_all()
    t_written = time.time()
    t_done = wait_published(t0)
    relay.terminate(); relay.wait()
    print(json.dumps({"documents": N, "insert_secs": round(t_written - t0, 2), "published_secs": round(t_done - t0, 2),
                      "write_rate": round(N / (t_written - t0)), "relay_rate_end_to_end": round(N / (t_done - t0)),
                      "lag_after_last_write_secs": round(t_done - t_written, 2)}))
else:
    relay.terminate(); relay.wait()
    insert_all()
    t0 = time.time(); relay = start_relay()
    t1 = wait_published(t0)
    relay.terminate(); relay.wait()
    t2 = time.time()
    out = subprocess.run(["target/release/dualsync", "snapshot", "-c", CFG, "--json"], capture_output=True, text=True)
    t3 = time.time()
    print(json.dumps({"changes": N, "catch_up_secs": round(t1 - t0, 2), "catch_up_rate": round(N / (t1 - t0)),
                      "snapshot_docs": N, "snapshot_secs": round(t3 - t2, 2), "snapshot_rate": round(N / (t3 - t2)),
                      "snapshot_ok": out.returncode == 0}))
