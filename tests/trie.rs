//! Property tests for the semantic-ID trie and its masks on random catalogs.

use std::collections::{BTreeSet, HashMap, HashSet};

use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sidrec::trie::{ItemIdx, Mask, NodeId, TokenId, Trie};

/// A random catalog: distinct, variable-length paths with no prefix relations, over a
/// random (irregularly spaced) token alphabet, with dense or sparse item indices, in
/// random input order.
#[derive(Debug, Clone)]
struct Catalog {
    entries: Vec<(Vec<TokenId>, ItemIdx)>,
    alphabet: Vec<TokenId>,
}

fn catalog_from_seed(seed: u64, max_items: usize) -> Catalog {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let alpha_size = rng.gen_range(1..=40usize);
    let base: TokenId = rng.gen_range(0..1_000_000);
    let mut alphabet: Vec<TokenId> = Vec::with_capacity(alpha_size);
    let mut t = base;
    for _ in 0..alpha_size {
        t += rng.gen_range(1..50);
        alphabet.push(t);
    }
    let max_len = rng.gen_range(1..=6usize);
    let target = rng.gen_range(0..=max_items);
    let pick = |rng: &mut ChaCha8Rng| alphabet[rng.gen_range(0..alpha_size)];
    let paths: BTreeSet<Vec<TokenId>> = if rng.gen_bool(0.5) {
        // Free-form: any lengths; prefix pruning below thins these out.
        (0..target)
            .map(|_| {
                let len = rng.gen_range(1..=max_len);
                (0..len).map(|_| pick(&mut rng)).collect()
            })
            .collect()
    } else {
        // SID-like: type token plus fixed-length codes, and a dedup token appended only
        // to items whose codes collide.
        let mut groups: HashMap<Vec<TokenId>, usize> = HashMap::new();
        for _ in 0..target {
            let codes: Vec<TokenId> = (0..max_len).map(|_| pick(&mut rng)).collect();
            *groups.entry(codes).or_default() += 1;
        }
        let mut out = BTreeSet::new();
        for (codes, count) in groups {
            if count == 1 {
                out.insert(codes);
            } else {
                for d in 0..count as TokenId {
                    let mut p = codes.clone();
                    p.push(5_000_000 + d);
                    out.insert(p);
                }
            }
        }
        out
    };
    // In sorted order, a path's extensions follow it directly: keep the longer ones.
    let mut kept: Vec<Vec<TokenId>> = Vec::new();
    for p in paths {
        while kept.last().is_some_and(|q| p.starts_with(q)) {
            kept.pop();
        }
        kept.push(p);
    }
    let n = kept.len() as u32;
    let mut items: Vec<ItemIdx> = if rng.gen_bool(0.7) {
        (0..n).collect()
    } else {
        // Sparse, arbitrary catalog indices.
        let stride = rng.gen_range(1..100_000u32);
        (0..n).map(|i| i * stride + 7).collect()
    };
    items.shuffle(&mut rng);
    let mut entries: Vec<_> = kept.into_iter().zip(items).collect();
    entries.shuffle(&mut rng);
    Catalog { entries, alphabet }
}

fn catalog() -> impl Strategy<Value = Catalog> {
    (any::<u64>(), prop_oneof![Just(50usize), Just(3000usize)])
        .prop_map(|(seed, max)| catalog_from_seed(seed, max))
}

/// Every node in the trie with its prefix, depth-first.
fn all_nodes(trie: &Trie) -> Vec<(NodeId, Vec<TokenId>)> {
    let mut out = Vec::new();
    let mut stack = vec![(trie.root(), Vec::new())];
    while let Some((node, prefix)) = stack.pop() {
        for (&tok, &child) in trie.children(node).iter().zip(trie.child_nodes(node)) {
            let mut p = prefix.clone();
            p.push(tok);
            stack.push((child, p));
        }
        out.push((node, prefix));
    }
    out
}

fn pseudo_random(seed: u64, item: ItemIdx) -> f64 {
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ (item as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    rng.gen()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn every_item_round_trips(cat in catalog()) {
        let trie = Trie::build(cat.entries.clone()).unwrap();
        prop_assert_eq!(trie.len(), cat.entries.len());
        prop_assert_eq!(trie.is_empty(), cat.entries.is_empty());
        for (path, item) in &cat.entries {
            prop_assert_eq!(trie.path(*item), Some(&path[..]));
            prop_assert_eq!(trie.lookup(trie.path(*item).unwrap()), Some(*item));
            let r = trie.rank(*item).unwrap();
            prop_assert_eq!(trie.items()[r as usize], *item);
        }
        let depth = cat.entries.iter().map(|e| e.0.len()).max().unwrap_or(0);
        prop_assert_eq!(trie.depth(), depth);
    }

    #[test]
    fn structure_matches_brute_force(cat in catalog()) {
        let trie = Trie::build(cat.entries.clone()).unwrap();
        let by_path: HashMap<&[TokenId], ItemIdx> =
            cat.entries.iter().map(|(p, i)| (&p[..], *i)).collect();
        let nodes = all_nodes(&trie);
        prop_assert_eq!(nodes.len(), trie.num_nodes());
        let mut seen_ids = HashSet::new();
        let mut leaf_items = HashSet::new();
        let mut max_fanout = 0;
        for (node, prefix) in &nodes {
            prop_assert!(seen_ids.insert(*node), "node reached twice");
            prop_assert_eq!(trie.walk(prefix), Some(*node));
            let kids = trie.children(*node);
            max_fanout = max_fanout.max(kids.len());
            prop_assert!(kids.windows(2).all(|w| w[0] < w[1]), "children not sorted/unique");
            prop_assert_eq!(kids.len(), trie.child_nodes(*node).len());
            for (&tok, &child) in kids.iter().zip(trie.child_nodes(*node)) {
                prop_assert_eq!(trie.child(*node, tok), Some(child));
            }
            // Items under the node = items whose path starts with its prefix, contiguous.
            let mut under: Vec<ItemIdx> = cat
                .entries
                .iter()
                .filter(|(p, _)| p.starts_with(prefix))
                .map(|e| e.1)
                .collect();
            under.sort_unstable();
            let mut got = trie.items_under(*node).to_vec();
            prop_assert_eq!(got.len(), trie.leaf_range(*node).len());
            got.sort_unstable();
            prop_assert_eq!(got, under);
            if kids.is_empty() && !trie.is_empty() {
                let item = trie.item(*node);
                prop_assert!(item.is_some(), "leaf without item");
                prop_assert_eq!(item, by_path.get(&prefix[..]).copied());
                prop_assert!(leaf_items.insert(item.unwrap()), "item on two leaves");
            } else {
                prop_assert_eq!(trie.item(*node), None);
            }
        }
        prop_assert_eq!(leaf_items.len(), trie.len());
        prop_assert_eq!(trie.max_fanout(), max_fanout);
    }

    #[test]
    fn prefixes_walk_and_non_paths_fail(cat in catalog(), seed in any::<u64>()) {
        let trie = Trie::build(cat.entries.clone()).unwrap();
        let mut prefixes: HashSet<Vec<TokenId>> = HashSet::new();
        for (path, _) in &cat.entries {
            for k in 0..=path.len() {
                prop_assert!(trie.walk(&path[..k]).is_some());
                if k < path.len() {
                    prop_assert_eq!(trie.lookup(&path[..k]), None);
                }
                prefixes.insert(path[..k].to_vec());
            }
            let mut longer = path.clone();
            longer.push(cat.alphabet[0]);
            prop_assert_eq!(trie.walk(&longer), None);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for _ in 0..500 {
            let len = rng.gen_range(1..=7);
            let probe: Vec<TokenId> = (0..len)
                .map(|_| {
                    if rng.gen_bool(0.9) {
                        cat.alphabet[rng.gen_range(0..cat.alphabet.len())]
                    } else {
                        rng.gen()
                    }
                })
                .collect();
            let expected = prefixes.contains(&probe);
            prop_assert_eq!(trie.walk(&probe).is_some(), expected, "probe {:?}", probe);
            if !expected {
                prop_assert_eq!(trie.lookup(&probe), None);
            }
        }
    }

    #[test]
    fn masks_prune_exactly(cat in catalog(), seed in any::<u64>(), density in 0.0f64..1.0) {
        let trie = Trie::build(cat.entries.clone()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let all_items: Vec<ItemIdx> = cat.entries.iter().map(|e| e.1).collect();
        let excluded: Vec<ItemIdx> = all_items
            .iter()
            .copied()
            .filter(|_| rng.gen_bool(0.2))
            .chain([u32::MAX, 123_456_789]) // not in the trie: ignored
            .collect();
        let excluded_set: HashSet<ItemIdx> = excluded.iter().copied().collect();
        let pred = |i: ItemIdx| pseudo_random(seed, i) < density;
        let mask = Mask::from_fn(&trie, pred).exclude(&trie, &excluded);
        let expected: HashSet<ItemIdx> = all_items
            .iter()
            .copied()
            .filter(|&i| pred(i) && !excluded_set.contains(&i))
            .collect();
        prop_assert_eq!(mask.allowed_items(), expected.len());
        for &i in &all_items {
            prop_assert_eq!(mask.allows_item(&trie, i), expected.contains(&i));
        }
        // Same set through the allow-list constructor.
        let allow: Vec<ItemIdx> = expected.iter().copied().collect();
        prop_assert_eq!(&Mask::from_items(&trie, &allow), &mask);

        // Walk using only allowed_children: every node visited has an allowed item below,
        // allowed_children is exactly the children with allows_node, and the leaves
        // reached are exactly the allowed items.
        let mut reached = HashSet::new();
        let mut out = Vec::new();
        let mut stack = Vec::new();
        if mask.allows_node(&trie, trie.root()) {
            stack.push(trie.root());
        } else {
            prop_assert!(expected.is_empty());
        }
        while let Some(node) = stack.pop() {
            prop_assert!(trie.items_under(node).iter().any(|i| expected.contains(i)));
            prop_assert_eq!(
                mask.count_under(&trie, node),
                trie.items_under(node).iter().filter(|i| expected.contains(i)).count()
            );
            if let Some(item) = trie.item(node) {
                prop_assert!(expected.contains(&item), "reached disallowed item {}", item);
                reached.insert(item);
                continue;
            }
            trie.allowed_children(node, &mask, &mut out);
            let brute: Vec<(TokenId, NodeId)> = trie
                .children(node)
                .iter()
                .copied()
                .zip(trie.child_nodes(node).iter().copied())
                .filter(|&(_, c)| mask.allows_node(&trie, c))
                .collect();
            prop_assert_eq!(&out, &brute);
            prop_assert!(!out.is_empty());
            stack.extend(out.iter().map(|&(_, c)| c));
        }
        prop_assert_eq!(reached, expected);
        for i in &excluded {
            if let Some(p) = trie.path(*i) {
                // Excluded items cannot be completed by constrained decoding.
                let mut node = trie.root();
                let mut ok = true;
                for &tok in p {
                    trie.allowed_children(node, &mask, &mut out);
                    match out.iter().find(|&&(t, _)| t == tok) {
                        Some(&(_, c)) => node = c,
                        None => { ok = false; break; }
                    }
                }
                prop_assert!(!ok, "excluded item {} reachable", i);
            }
        }
    }

    #[test]
    fn from_types_equals_first_token_filter(cat in catalog(), seed in any::<u64>()) {
        let trie = Trie::build(cat.entries.clone()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut types: Vec<TokenId> = trie
            .children(trie.root())
            .iter()
            .copied()
            .filter(|_| rng.gen_bool(0.5))
            .collect();
        types.push(rng.gen()); // probably not a type token; must be ignored either way
        let by_types = Mask::from_types(&trie, &types);
        let by_fn = Mask::from_fn(&trie, |i| types.contains(&trie.path(i).unwrap()[0]));
        prop_assert_eq!(&by_types, &by_fn);
        for (node, _) in all_nodes(&trie) {
            prop_assert_eq!(by_types.allows_node(&trie, node), by_fn.allows_node(&trie, node));
        }
        // Intersection with "all" is the identity; with "none" is empty.
        prop_assert_eq!(&by_types.clone().intersect(&trie, &Mask::all(&trie)), &by_types);
        prop_assert_eq!(by_types.intersect(&trie, &Mask::none(&trie)).allowed_items(), 0);
    }

    #[test]
    fn build_is_order_independent(cat in catalog(), seed in any::<u64>()) {
        let a = Trie::build(cat.entries.clone()).unwrap();
        let mut shuffled = cat.entries.clone();
        shuffled.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let b = Trie::build(shuffled).unwrap();
        prop_assert_eq!(a.items(), b.items());
        prop_assert_eq!(a.num_nodes(), b.num_nodes());
        for (node, prefix) in all_nodes(&a) {
            let other = b.walk(&prefix).unwrap();
            prop_assert_eq!(node, other);
            prop_assert_eq!(a.children(node), b.children(other));
        }
    }
}

/// A path that is a prefix of another (or a duplicate) is rejected however the catalog
/// is ordered.
#[test]
fn injected_conflicts_are_rejected() {
    for seed in 0..40u64 {
        let cat = catalog_from_seed(seed, 300);
        if cat.entries.len() < 2 {
            continue;
        }
        let (p, _) = cat.entries[0].clone();
        let fresh = cat.entries.iter().map(|e| e.1).max().unwrap() + 1;
        // Duplicate path.
        let mut dup = cat.entries.clone();
        dup.push((p.clone(), fresh));
        assert!(Trie::build(dup).is_err());
        // Strict prefix of an existing path (if it has one), and an extension.
        if p.len() > 1 {
            let mut pre = cat.entries.clone();
            pre.push((p[..p.len() - 1].to_vec(), fresh));
            assert!(Trie::build(pre).is_err());
        }
        let mut ext = cat.entries.clone();
        let mut longer = p.clone();
        longer.push(0);
        ext.push((longer, fresh));
        assert!(Trie::build(ext).is_err());
    }
}
