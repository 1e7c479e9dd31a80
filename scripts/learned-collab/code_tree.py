"""Code-tree fit of SIDs to validation transitions (last training item -> validation
target): share sharing the first code, the first two codes, and the target's first code in
the top 10 of first-code successor counts from the training parts. Usage: tree.py SIDS.jsonl INTER.json"""
import json, sys
from collections import Counter, defaultdict
codes = {}
for l in open(sys.argv[1]):
    r = json.loads(l); codes[r["id"]] = r["codes"]
seqs = json.load(open(sys.argv[2]))
succ = defaultdict(Counter)
for s in seqs.values():
    t = [str(i) for i in s[:-2]]
    for a, b in zip(t, t[1:]):
        succ[codes[a][0]][codes[b][0]] += 1
n = one = two = top = 0
for s in seqs.values():
    if len(s) < 3: continue
    a, b = codes[str(s[-3])], codes[str(s[-2])]
    n += 1; one += a[0] == b[0]; two += a[:2] == b[:2]
    top += b[0] in [c for c, _ in succ[a[0]].most_common(10)]
print(f"{n} users: first code {one/n:.1%}, first two {two/n:.1%}, top-10 successor first code {top/n:.1%}")
