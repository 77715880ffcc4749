# Catch-up: N changes made while the relay is stopped, then the relay restarted from its
# saved token; time until all N are published (change-stream read + encode + publish).
import json, re, subprocess, sys, time, urllib.request, pymongo
N = int(sys.argv[1]); cfg = sys.argv[2]; port = int(sys.argv[3]); db_name = sys.argv[4]
db = pymongo.MongoClient("mongodb://127.0.0.1:27117/?directConnection=true")[db_name]
def published():
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except Exception:
        return 0
    return sum(float(m) for m in re.findall(r'^dualsync_events_published_total\{[^}]*\} ([0-9.e+]+)$', text, re.M))
def start():
    return subprocess.Popen(["target/release/dualsync", "relay", "-c", cfg, "--http-port", str(port)],
                            stderr=open("/tmp/mb/relay.log", "a"), stdout=subprocess.DEVNULL)
relay = start()
while not db.dualsync_offsets.find_one({"$or": [{"start_at": {"$ne": None}}, {"token": {"$ne": None}}]}):
    time.sleep(0.2)
relay.terminate(); relay.wait()
for b in range(0, N, 1000):
    db.carts.insert_many([{"n": i, "items": [{"sku": "s%d" % (i % 50), "qty": i % 7}], "note": "x" * 100} for i in range(b, min(N, b + 1000))])
t0 = time.time(); relay = start()
while published() < N and time.time() < t0 + 300:
    time.sleep(0.05)
t1 = time.time(); relay.terminate(); relay.wait()
t2 = time.time()
out = subprocess.run(["target/release/dualsync", "snapshot", "-c", cfg, "--json"], capture_output=True, text=True)
t3 = time.time()
print(json.dumps({"changes": N, "catch_up_secs": round(t1 - t0, 2), "catch_up_rate": round(N / (t1 - t0)),
                  "snapshot_docs": N, "snapshot_secs": round(t3 - t2, 2), "snapshot_rate": round(N / (t3 - t2)), "snapshot_ok": out.returncode == 0}))
