"""Asks the served model for each item's 50 most likely successors (history = that item
alone) and writes them as JSONL {"id", "next": [[id, score], ...]}."""
import json, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
port, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def ask(i):
    body = json.dumps({"history": [str(i)], "k": 50, "beams": 50, "mode": "recommend", "literal": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/recommend", body, {"content-type": "application/json"})
    r = json.load(urllib.request.urlopen(req))
    return {"id": str(i), "next": [[x["id"], x["score"]] for x in r["items"]]}
t = time.time()
with ThreadPoolExecutor(2) as ex, open(out, "w") as f:
    for row in ex.map(ask, range(n)):
        f.write(json.dumps(row) + "\n")
print(f"{n} items in {time.time()-t:.1f}s")
