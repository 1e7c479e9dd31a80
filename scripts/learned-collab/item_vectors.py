"""Joins each item's text embedding to its learned item vector (model.embed_items.weight),
both L2-normalised, scaled by sqrt(1-w) and sqrt(w); items absent from every training part
get zeros on the learned side (placed by text alone). Usage: join.py EMB.npy MODEL_DIR
INTERACTIONS.json W OUT.npy"""
import json, struct, sys
import numpy as np
emb_p, model_dir, inter_p, w, out_p = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
text = np.load(emb_p).astype(np.float32)
raw = open(f"{model_dir}/model.safetensors", "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
hdr = json.loads(raw[8:8 + n])
meta = hdr["model.embed_items.weight"]
assert meta["dtype"] == "F32", meta
a, b = meta["data_offsets"]
table = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=np.float32).reshape(meta["shape"]).copy()
assert table.shape[0] == text.shape[0], (table.shape, text.shape)
seqs = json.load(open(inter_p))
seen = np.zeros(text.shape[0], bool)
for s in seqs.values():
    for i in s[:-2]:
        seen[int(i)] = True
table[~seen] = 0.0
def unit(x):
    nrm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(nrm > 0, x / np.maximum(nrm, 1e-12), 0.0)
out = np.concatenate([unit(text) * np.sqrt(1 - w), unit(table) * np.sqrt(w)], axis=1).astype(np.float32)
np.save(out_p, out)
print(f"{out.shape}, {int((~seen).sum())} items with no training occurrence, w={w}")
