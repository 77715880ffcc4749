# MongoDB source measurement: N documents inserted (insert_many, 1,000 per call) into a watched
# collection while the release relay runs; the relay's own published counter is polled.
import json, re, subprocess, sys, time, urllib.request, pymongo
N = int(sys.argv[1]); cfg = sys.argv[2]; port = int(sys.argv[3]); db_name = sys.argv[4]
c = pymongo.MongoClient("mongodb://127.0.0.1:27117/?directConnection=true")
db = c[db_name]
def published():
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except Exception:
        return 0
    return sum(float(m) for m in re.findall(r'^dualsync_events_published_total\{[^}]*\} ([0-9.e+]+)$', text, re.M))
relay = subprocess.Popen(["target/release/dualsync", "relay", "-c", cfg, "--http-port", str(port)],
                         stderr=open("/tmp/mb/relay.log", "w"), stdout=subprocess.DEVNULL)
deadline = time.time() + 60
while published() == 0 and time.time() < deadline:
    # the relay leads once /metrics answers and the position is saved
    if db.dualsync_offsets.find_one({"start_at": {"$ne": None}}) or db.dualsync_offsets.find_one({"token": {"$ne": None}}):
        break
    time.sleep(0.2)
t0 = time.time()
for b in range(0, N, 1000):
    db.carts.insert_many([{"n": i, "items": [{"sku": "s%d" % (i % 50), "qty": i % 7}], "note": "x" * 100} for i in range(b, min(N, b + 1000))])
t_written = time.time()
while published() < N and time.time() < t0 + 600:
    time.sleep(0.05)
t_done = time.time()
relay.terminate(); relay.wait()
print(json.dumps({"documents": N, "insert_secs": round(t_written - t0, 2), "published_secs": round(t_done - t0, 2),
                  "write_rate": round(N / (t_written - t0)), "relay_rate_end_to_end": round(N / (t_done - t0)),
                  "lag_after_last_write_secs": round(t_done - t_written, 2)}))
