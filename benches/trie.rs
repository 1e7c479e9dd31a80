//! Trie build and query timings on a synthetic 100k-item catalog shaped like real semantic
//! IDs: a type token, three levels of 256 codes, and a dedup token only where codes collide.
//!
//! Run with `cargo bench --bench trie`; prints one JSON line of median timings.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sidrec::trie::{ItemIdx, Mask, NodeId, TokenId, Trie};

const ITEMS: usize = 100_000;
const TYPES: u32 = 4;
const CODES: u32 = 256;
const LEVELS: u32 = 3;
const REPS: usize = 9;

/// Token id layout: type tokens, then one block of `CODES` per level, then dedup tokens.
fn level_token(level: u32, code: u32) -> TokenId {
    TYPES + level * CODES + code
}

fn catalog(seed: u64) -> (Vec<(Vec<TokenId>, ItemIdx)>, usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Skewed codes (as unbalanced k-means produces) so some items collide and need dedup.
    let code = |rng: &mut ChaCha8Rng| {
        let u: f64 = rng.gen();
        ((u * u) * CODES as f64) as u32
    };
    let mut paths: Vec<Vec<TokenId>> = Vec::with_capacity(ITEMS);
    let mut groups: HashMap<Vec<TokenId>, Vec<usize>> = HashMap::new();
    for i in 0..ITEMS {
        let mut p = vec![rng.gen_range(0..TYPES)];
        for level in 0..LEVELS {
            p.push(level_token(level, code(&mut rng)));
        }
        groups.entry(p.clone()).or_default().push(i);
        paths.push(p);
    }
    let dedup_base = level_token(LEVELS, 0);
    let mut deduped = 0;
    for members in groups.values() {
        if members.len() > 1 {
            for (k, &i) in members.iter().enumerate() {
                paths[i].push(dedup_base + k as u32);
                deduped += 1;
            }
        }
    }
    let entries = paths
        .into_iter()
        .enumerate()
        .map(|(i, p)| (p, i as ItemIdx))
        .collect();
    (entries, deduped)
}

/// Median, rounded to three decimals for a readable report.
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (xs[xs.len() / 2] * 1e3).round() / 1e3
}

/// Nanoseconds to microseconds, two decimals.
fn us(ns: f64) -> f64 {
    (ns / 10.0).round() / 100.0
}

/// Median over `REPS` runs of the time per call, in nanoseconds, of `f` run `calls` times.
fn per_call_ns(calls: usize, mut f: impl FnMut()) -> f64 {
    median(
        (0..REPS)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_nanos() as f64 / calls as f64
            })
            .collect(),
    )
}

fn main() {
    let (entries, deduped) = catalog(7);

    let build_ms = median(
        (0..REPS)
            .map(|_| {
                let input = entries.clone();
                let t = Instant::now();
                let trie = Trie::build(input).unwrap();
                let ms = t.elapsed().as_secs_f64() * 1e3;
                black_box(trie);
                ms
            })
            .collect(),
    );
    let trie = Trie::build(entries.clone()).unwrap();

    // Query workload: inner nodes met on the way to random items, as beam search meets
    // them, plus tokens to look up (half present, half absent).
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut inner: Vec<NodeId> = Vec::new();
    let mut probes: Vec<(NodeId, TokenId)> = Vec::new();
    while inner.len() < 100_000 {
        let (path, _) = &entries[rng.gen_range(0..entries.len())];
        let mut node = trie.root();
        for &tok in path {
            inner.push(node);
            let probe = if rng.gen_bool(0.5) {
                tok
            } else {
                rng.gen_range(0..level_token(LEVELS, 0))
            };
            probes.push((node, probe));
            node = trie.child(node, tok).unwrap();
        }
    }

    let children_ns = per_call_ns(inner.len(), || {
        let mut acc = 0usize;
        for &n in &inner {
            acc += black_box(trie.children(black_box(n))).len();
        }
        black_box(acc);
    });
    let child_ns = per_call_ns(probes.len(), || {
        let mut acc = 0usize;
        for &(n, t) in &probes {
            acc += black_box(trie.child(black_box(n), black_box(t))).is_some() as usize;
        }
        black_box(acc);
    });

    let seen: Vec<ItemIdx> = (0..50).map(|_| rng.gen_range(0..ITEMS as u32)).collect();
    let allowed_types = [0, 2];
    let mask_from_fn_us = us(per_call_ns(1, || {
        black_box(Mask::from_fn(&trie, |i| i % 3 != 0));
    }));
    let mask_from_types_us = us(per_call_ns(1, || {
        black_box(Mask::from_types(&trie, &allowed_types));
    }));
    let mask_request_us = us(per_call_ns(1, || {
        // A typical request: type filter, attribute filter, minus 50 seen items.
        let m = Mask::from_types(&trie, &allowed_types)
            .intersect(&trie, &Mask::from_fn(&trie, |i| i % 3 != 0))
            .exclude(&trie, &seen);
        black_box(m);
    }));

    let mask = Mask::from_types(&trie, &allowed_types).exclude(&trie, &seen);
    let mut out = Vec::with_capacity(trie.max_fanout());
    let allowed_children_ns = per_call_ns(inner.len(), || {
        let mut acc = 0usize;
        for &n in &inner {
            trie.allowed_children(black_box(n), &mask, &mut out);
            acc += out.len();
        }
        black_box(acc);
    });
    let walk_ns = per_call_ns(entries.len(), || {
        let mut acc = 0usize;
        for (p, _) in &entries {
            acc += trie.lookup(black_box(p)).is_some() as usize;
        }
        black_box(acc);
    });

    let report = serde_json::json!({
        "bench": "trie",
        "items": trie.len(),
        "nodes": trie.num_nodes(),
        "depth": trie.depth(),
        "max_fanout": trie.max_fanout(),
        "deduped_items": deduped,
        "reps": REPS,
        "build_ms": build_ms,
        "children_ns": children_ns,
        "child_ns": child_ns,
        "allowed_children_ns": allowed_children_ns,
        "lookup_ns": walk_ns,
        "mask_from_fn_us": mask_from_fn_us,
        "mask_from_types_us": mask_from_types_us,
        "mask_request_us": mask_request_us,
    });
    println!("{report}");
}
