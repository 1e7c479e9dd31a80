"""Model-successor collaborative vectors: each item's predicted successor distribution
(top 50, softmax of the scores), symmetrised, PPMI, top-64 eigenvectors by |lambda|
(u * sqrt|lambda|), joined to the text embedding at weight w (as sidrec tokenize
--interactions joins its PPMI vectors). Usage: succvec.py SUCC.jsonl EMB.npy W OUT.npy"""
import json, sys
import numpy as np
succ_p, emb_p, w, out_p = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
text = np.load(emb_p).astype(np.float64)
n = text.shape[0]
M = np.zeros((n, n))
for l in open(succ_p):
    r = json.loads(l); i = int(r["id"])
    ids = np.array([int(j) for j, _ in r["next"]]); sc = np.array([s for _, s in r["next"]])
    keep = ids != i
    p = np.exp(sc[keep] - sc[keep].max()); M[i, ids[keep]] = p / p.sum()
S = M + M.T
tot = S.sum(); rs = S.sum(1)
with np.errstate(divide="ignore", invalid="ignore"):
    pmi = np.log(S * tot / np.outer(rs, rs))
pmi[~np.isfinite(pmi)] = 0; pmi = np.maximum(pmi, 0)
lam, U = np.linalg.eigh(pmi)
top = np.argsort(-np.abs(lam))[:64]
C = U[:, top] * np.sqrt(np.abs(lam[top]))
def unit(x):
    nr = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(nr > 0, x / np.maximum(nr, 1e-12), 0.0)
out = np.concatenate([unit(text) * np.sqrt(1 - w), unit(C) * np.sqrt(w)], 1).astype(np.float32)
np.save(out_p, out)
print(out.shape, "nonzero pairs", int((S > 0).sum()))
