//! Constrained decoding: property tests of the trie beam search on random catalogs and
//! random logits, and the real decoder through [`Engine`] with a model trained here.

use std::collections::HashSet;

use proptest::prelude::*;
use sidrec::decode::engine::{Output, RECENT_DECAY};
use sidrec::decode::mixture::{Component, MixtureSource};
use sidrec::decode::{
    beam_search, beam_search_from, logsumexp, BeamConfig, DecodeError, Engine, GenConfig,
    LogitSource, MemorySource, Mode, Request,
};
use sidrec::trie::{ItemIdx, Mask, TokenId, Trie};

mod common;
use common::scores;

/// Logits that depend only on the token sequence so far (a hash of it), so any search
/// order sees one consistent "model".
struct HashModel {
    vocab: usize,
    rows: Vec<Vec<u32>>,
    seed: u64,
}

impl HashModel {
    fn new(vocab: usize, seed: u64) -> Self {
        HashModel {
            vocab,
            rows: Vec::new(),
            seed,
        }
    }

    fn row(&self, seq: &[u32]) -> Vec<f32> {
        let mut h: u64 = 1469598103934665603 ^ self.seed;
        for &t in seq {
            h = (h ^ u64::from(t)).wrapping_mul(1099511628211);
        }
        (0..self.vocab as u64)
            .map(|j| {
                let x =
                    (h ^ j.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 10.0 - 5.0
            })
            .collect()
    }

    /// Exact `log p(path | prompt)` of a trie path.
    fn path_logprob(&self, prompt: &[u32], path: &[TokenId], offset: u32) -> f32 {
        let mut seq = prompt.to_vec();
        let mut s = 0.0;
        for &t in path {
            let row = self.row(&seq);
            s += row[(t + offset) as usize] - logsumexp(&row);
            seq.push(t + offset);
        }
        s
    }
}

impl LogitSource for HashModel {
    fn prefill(&mut self, prompt: &[u32]) -> Result<Vec<f32>, DecodeError> {
        self.rows = vec![prompt.to_vec()];
        Ok(self.row(prompt))
    }

    fn extend(&mut self, parents: &[u32], tokens: &[u32]) -> Result<Vec<f32>, DecodeError> {
        self.rows = parents
            .iter()
            .zip(tokens)
            .map(|(&p, &t)| {
                let mut r = self.rows[p as usize].clone();
                r.push(t);
                r
            })
            .collect();
        Ok(self.rows.iter().flat_map(|r| self.row(r)).collect())
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }
}

/// A random catalog: `types` type tokens, then levels of `codes` codes each, distinct
/// tuples, colliding tuples told apart by a dedup token (paths of two lengths).
fn catalog(types: u32, levels: usize, codes: u32, tuples: &[Vec<u32>]) -> (Trie, u32) {
    let mut seen = std::collections::HashMap::<Vec<u32>, u32>::new();
    let mut entries = Vec::new();
    let dedup_base = types + levels as u32 * codes;
    for (i, t) in tuples.iter().enumerate() {
        let ty = t[0] % types;
        let mut path = vec![ty];
        for (l, &c) in t[1..=levels].iter().enumerate() {
            path.push(types + l as u32 * codes + c % codes);
        }
        let n = seen.entry(path.clone()).or_insert(0);
        *n += 1;
        entries.push((path, i as ItemIdx));
    }
    // Every path of a colliding tuple gets a dedup token, so none is a prefix of another.
    let colliding: HashSet<Vec<u32>> = seen
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(p, _)| p)
        .collect();
    let mut counters = std::collections::HashMap::<Vec<u32>, u32>::new();
    for (path, _) in entries.iter_mut() {
        if colliding.contains(path) {
            let c = counters.entry(path.clone()).or_insert(0);
            path.push(dedup_base + *c);
            *c += 1;
        }
    }
    let max_dedup = counters.values().copied().max().unwrap_or(0);
    (Trie::build(entries).unwrap(), dedup_base + max_dedup + 1)
}

fn tuples_strategy() -> impl Strategy<Value = (u32, usize, u32, Vec<Vec<u32>>)> {
    (1u32..4, 1usize..4, 2u32..6).prop_flat_map(|(types, levels, codes)| {
        (
            Just(types),
            Just(levels),
            Just(codes),
            prop::collection::vec(prop::collection::vec(0u32..100, levels + 1), 1..60),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Every returned item is valid, distinct, allowed by the limits, sorted by score, as
    /// many as asked (or as allowed); a beam as wide as the catalog is exact.
    #[test]
    fn beam_search_returns_valid_distinct_sorted_allowed_items(
        (types, levels, codes, tuples) in tuples_strategy(),
        k in 1usize..12,
        beams in 1usize..16,
        seed in any::<u64>(),
        allowed_types in prop::collection::vec(any::<bool>(), 3),
        excluded in prop::collection::vec(0u32..60, 0..10),
        filter_mod in 1u32..4,
    ) {
        let (trie, n_tokens) = catalog(types, levels, codes, &tuples);
        let offset = 7;
        let vocab = (offset + n_tokens) as usize + 3;
        let prompt = [1u32, 2, 3];
        let type_toks: Vec<u32> = (0..types).filter(|&t| allowed_types[t as usize]).collect();
        let mask = Mask::from_types(&trie, &type_toks)
            .exclude(&trie, &excluded)
            .intersect(&trie, &Mask::from_fn(&trie, |i| i % filter_mod == 0));
        let allowed: Vec<ItemIdx> = trie.items().iter().copied()
            .filter(|&i| mask.allows_item(&trie, i)).collect();
        let mut m = HashModel::new(vocab, seed);
        let res = beam_search(&mut m, &trie, &mask, offset, &prompt, BeamConfig { k, beams });
        if allowed.is_empty() {
            prop_assert!(matches!(res, Err(DecodeError::NothingAllowed(_))), "expected NothingAllowed");
            return Ok(());
        }
        let hits = res.unwrap();
        prop_assert_eq!(hits.len(), k.min(allowed.len()));
        let mut seen = HashSet::new();
        for h in &hits {
            prop_assert!(seen.insert(h.item), "item {} twice", h.item);
            prop_assert_eq!(trie.path(h.item).unwrap(), h.path.as_slice());
            prop_assert!(mask.allows_item(&trie, h.item));
            prop_assert!(!excluded.contains(&h.item));
            prop_assert!(type_toks.contains(&h.path[0]));
            prop_assert!(h.item % filter_mod == 0);
            // The score is the exact log-probability of the item's path.
            let exact = m.path_logprob(&prompt, &h.path, offset);
            prop_assert!((h.score - exact).abs() < 1e-3, "{} vs {}", h.score, exact);
        }
        prop_assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));

        // As wide as the catalog: the exact top-k.
        let wide = beam_search(&mut m, &trie, &mask, offset, &prompt,
            BeamConfig { k, beams: trie.len() }).unwrap();
        let mut exact: Vec<(f32, ItemIdx)> = allowed.iter()
            .map(|&i| (m.path_logprob(&prompt, trie.path(i).unwrap(), offset), i))
            .collect();
        exact.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (h, e) in wide.iter().zip(&exact) {
            prop_assert!((h.score - e.0).abs() < 1e-3);
        }
    }

    /// A mixture of conditionals, decoded token by token with posterior weights, scores
    /// every item with the exact `log Σ_m λ_m p_m(path | prompt_m)` (normalised λ), and a
    /// beam as wide as the catalog ranks exactly by it.
    #[test]
    fn mixture_beam_search_scores_the_exact_mixture(
        (types, levels, codes, tuples) in tuples_strategy(),
        seeds in prop::collection::vec(any::<u64>(), 1..4),
        weights in prop::collection::vec(0.05f32..3.0, 3),
        k in 1usize..12,
    ) {
        let (trie, n_tokens) = catalog(types, levels, codes, &tuples);
        let offset = 5;
        let vocab = (offset + n_tokens) as usize + 2;
        let prompts: Vec<Vec<u32>> = (0..seeds.len() as u32).map(|m| vec![1, 2 + m, 3]).collect();
        let parts = || seeds.iter().zip(&prompts).zip(&weights).map(|((&seed, p), &w)| Component {
            source: Box::new(HashModel::new(vocab, seed)),
            prompt: p.clone(),
            weight: w,
        }).collect::<Vec<_>>();
        let total: f32 = weights[..seeds.len()].iter().sum();
        let exact = |path: &[TokenId]| {
            let terms: Vec<f32> = seeds.iter().zip(&prompts).zip(&weights).map(|((&seed, p), &w)| {
                (w / total).ln() + HashModel::new(vocab, seed).path_logprob(p, path, offset)
            }).collect();
            logsumexp(&terms)
        };
        let all = Mask::all(&trie);
        let mut mix = MixtureSource::new(parts()).unwrap();
        let wide = beam_search(&mut mix, &trie, &all, offset, &[], BeamConfig { k, beams: trie.len() }).unwrap();
        let mut want: Vec<(f32, ItemIdx)> = trie.items().iter()
            .map(|&i| (exact(trie.path(i).unwrap()), i)).collect();
        want.sort_by(|a, b| b.0.total_cmp(&a.0));
        prop_assert_eq!(wide.len(), k.min(trie.len()));
        for (h, e) in wide.iter().zip(&want) {
            prop_assert!((h.score - exact(&h.path)).abs() < 1e-3, "{} vs {}", h.score, exact(&h.path));
            prop_assert!((h.score - e.0).abs() < 1e-3, "rank differs: {} vs {}", h.score, e.0);
        }
        // One component is the plain search on its prompt.
        if seeds.len() == 1 {
            let mut plain = HashModel::new(vocab, seeds[0]);
            let p = beam_search(&mut plain, &trie, &all, offset, &prompts[0], BeamConfig { k, beams: 8 }).unwrap();
            let mut one = MixtureSource::new(parts()).unwrap();
            let m = beam_search(&mut one, &trie, &all, offset, &[], BeamConfig { k, beams: 8 }).unwrap();
            prop_assert_eq!(p.iter().map(|h| h.item).collect::<Vec<_>>(), m.iter().map(|h| h.item).collect::<Vec<_>>());
        }
    }

    /// An item distribution (the transition memory's) as a trie source: alone it scores
    /// every item of its support with its own log-probability, and mixed with a decoder
    /// every item gets the exact `log(λ_d p_d(path) + λ_m p_m(item))`, including items
    /// outside the memory's support (its component then has no mass).
    #[test]
    fn memory_source_mixes_exactly(
        (types, levels, codes, tuples) in tuples_strategy(),
        seed in any::<u64>(),
        support in prop::collection::vec((any::<prop::sample::Index>(), 0.01f32..1.0), 1..8),
        weights in (0.05f32..3.0, 0.05f32..3.0),
    ) {
        let (trie, n_tokens) = catalog(types, levels, codes, &tuples);
        let offset = 5;
        let vocab = (offset + n_tokens) as usize + 2;
        let mut dist: std::collections::BTreeMap<ItemIdx, f32> = Default::default();
        for (i, p) in &support {
            *dist.entry(trie.items()[i.index(trie.len())]).or_default() += p;
        }
        let total: f32 = dist.values().sum();
        let dist: Vec<(ItemIdx, f32)> = dist.into_iter().map(|(i, p)| (i, p / total)).collect();
        let p_mem = |item: ItemIdx| dist.iter().find(|d| d.0 == item).map_or(0.0, |d| d.1);
        let all = Mask::all(&trie);
        let wide = BeamConfig { k: trie.len(), beams: trie.len() };

        let mut alone = MemorySource::new(&trie, offset, vocab, &dist).unwrap();
        let hits = beam_search(&mut alone, &trie, &all, offset, &[], wide).unwrap();
        for h in hits.iter().filter(|h| p_mem(h.item) > 0.0) {
            prop_assert!((h.score - p_mem(h.item).ln()).abs() < 1e-4, "{} vs {}", h.score, p_mem(h.item).ln());
        }
        prop_assert_eq!(hits.iter().filter(|h| h.score.is_finite()).count(), dist.len());

        let prompt = vec![1, 2, 3];
        let (wd, wm) = weights;
        let mut mix = MixtureSource::new(vec![
            Component { source: Box::new(HashModel::new(vocab, seed)), prompt: prompt.clone(), weight: wd },
            Component { source: Box::new(MemorySource::new(&trie, offset, vocab, &dist).unwrap()), prompt: Vec::new(), weight: wm },
        ]).unwrap();
        let hits = beam_search(&mut mix, &trie, &all, offset, &[], wide).unwrap();
        prop_assert_eq!(hits.len(), trie.len());
        let model = HashModel::new(vocab, seed);
        for h in &hits {
            let want = ((wd * model.path_logprob(&prompt, &h.path, offset).exp() + wm * p_mem(h.item)) / (wd + wm)).ln();
            prop_assert!((h.score - want).abs() < 1e-3, "item {}: {} vs {}", h.item, h.score, want);
        }
        prop_assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
    }

    /// Under a prefix: only items below it, and a prefix with nothing allowed below it is
    /// a dead end (an error, never a fallback to other items).
    #[test]
    fn prefixes_constrain_or_fail(
        (types, levels, codes, tuples) in tuples_strategy(),
        pick in any::<prop::sample::Index>(),
        seed in any::<u64>(),
    ) {
        let (trie, n_tokens) = catalog(types, levels, codes, &tuples);
        let vocab = n_tokens as usize + 2;
        let item = trie.items()[pick.index(trie.len())];
        let path = trie.path(item).unwrap().to_vec();
        let prefix = &path[..1];
        let mut m = HashModel::new(vocab, seed);
        let all = Mask::all(&trie);
        if path.len() > 1 {
            let hits = beam_search_from(&mut m, &trie, &all, 0, &[1], prefix,
                BeamConfig { k: 100, beams: 100 }).unwrap();
            prop_assert!(hits.iter().all(|h| h.path.starts_with(prefix)));
            prop_assert!(hits.iter().any(|h| h.item == item));
            // Everything under the prefix excluded: dead end.
            let under: Vec<ItemIdx> = hits.iter().map(|h| h.item).collect();
            let none_under = Mask::all(&trie).exclude(&trie, &under);
            if none_under.allowed_items() > 0 {
                let r = beam_search_from(&mut m, &trie, &none_under, 0, &[1], prefix,
                    BeamConfig::default());
                prop_assert!(matches!(r, Err(DecodeError::DeadEnd { .. })), "{:?}", r.map(|h| h.len()));
            }
        }
        // A prefix that is not in the trie.
        let r = beam_search_from(&mut m, &trie, &all, 0, &[1], &[n_tokens + 1],
            BeamConfig::default());
        prop_assert!(matches!(r, Err(DecodeError::DeadEnd { .. })), "expected a dead end");
    }
}

/// The fixture model, trained once per test binary run, and its directory.
fn fixture_model() -> &'static (tempfile::TempDir, std::path::PathBuf, Engine) {
    static MODEL: std::sync::OnceLock<(tempfile::TempDir, std::path::PathBuf, Engine)> =
        std::sync::OnceLock::new();
    MODEL.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let dir = common::trained_model(tmp.path());
        let engine = Engine::load(&dir).unwrap();
        (tmp, dir, engine)
    })
}

fn engine() -> &'static Engine {
    &fixture_model().2
}

fn sidrec() -> assert_cmd::Command {
    assert_cmd::Command::cargo_bin("sidrec").unwrap()
}

#[test]
fn recommend_command_prints_items_or_json_and_explains_bad_input() {
    let dir = &fixture_model().1;
    let out = sidrec()
        .args(["recommend", "--model"])
        .arg(dir)
        .args(["--history", "m1,Heat", "-k", "3", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    for it in items {
        assert!(engine().index_of(it["id"].as_str().unwrap()).is_some());
        assert!(it["score"].as_f64().unwrap() <= 0.0);
        assert!(it["sid"].as_str().unwrap().starts_with('<'));
    }
    assert!(v["prompt"].as_str().unwrap().contains("Heat"));

    // A table, limited to a type.
    let out = sidrec()
        .args(["recommend", "--model"])
        .arg(dir)
        .args(["--history", "m1", "--type", "podcast", "-k", "2"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.lines().all(|l| l.contains("podcast")), "{text}");

    // Bad input: an unknown filter field, an unknown title, a mode without its input.
    for (args, needle) in [
        (vec!["--history", "m1", "--filter", "yeer>=1990"], "yeer"),
        (vec!["--history", "Nonexistent Film"], "Nonexistent Film"),
        (vec!["--mode", "describe"], "history"),
    ] {
        let out = sidrec()
            .args(["recommend", "--model"])
            .arg(dir)
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// A scripted session, as a person would type it: commands change the session, a bad
/// command is reported and the session goes on, requests answer.
#[test]
fn repl_session() {
    let dir = &fixture_model().1;
    let script = "\
:help
:history add Toy Story
:history add m2
:history
:k 2
:type podcast
:go
:type all
:filter year>=1990
:exclude-seen on
:json on
:go
:json off
:bogus
:history add No Such Title
:history rm 1
:history clear
:mode describe
:go
:quit
";
    let out = sidrec()
        .args(["repl", "--no-history-file", "--model"])
        .arg(dir)
        .write_stdin(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(":history add ID|TITLE"), "help: {text}");
    assert!(text.contains("added Toy Story (m1)"), "{text}");
    assert!(
        text.contains("1. Toy Story (m1)") && text.contains("2. Heat (m2)"),
        "{text}"
    );
    // Two podcasts for `:type podcast`.
    let pods = text.lines().filter(|l| l.contains(" podcast ")).count();
    assert_eq!(pods, 2, "{text}");
    // The JSON answer: 2 items, filtered and unseen.
    let json_line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("a JSON answer");
    let v: serde_json::Value = serde_json::from_str(json_line).unwrap();
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    for it in items {
        let id = it["id"].as_str().unwrap();
        assert!(id != "m1" && id != "m2");
        let item = &engine().catalog().items[engine().index_of(id).unwrap() as usize];
        assert!(item.attrs["year"].as_i64().unwrap() >= 1990);
    }
    assert!(text.contains("error: unknown command \":bogus\""), "{text}");
    assert!(text.contains("no item matches \"No Such Title\""), "{text}");
    assert!(text.contains("removed Toy Story") && text.contains("history cleared"));
    // describe without a history is explained, not a crash.
    assert!(text.contains("describe needs a history"), "{text}");
}

/// A line that is not UTF-8 is reported and skipped; the session goes on with the next.
#[test]
fn repl_survives_a_line_that_is_not_utf8() {
    let dir = &fixture_model().1;
    let mut script = b":k 2\n".to_vec();
    script.extend_from_slice(b"a comedy \xff\xfe\xc3(\n");
    script.extend_from_slice(b":history add Toy Story\n:show\n:quit\n");
    let out = sidrec()
        .args(["repl", "--no-history-file", "--model"])
        .arg(dir)
        .write_stdin(script)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("error: the line is not valid UTF-8"),
        "{text}"
    );
    assert!(text.contains("added Toy Story (m1)"), "{text}");
    assert!(text.contains("| k 2 |"), "{text}");
}

fn req(history: &[&str], k: usize) -> Request {
    let e = engine();
    Request {
        history: history.iter().map(|id| e.index_of(id).unwrap()).collect(),
        k,
        ..Default::default()
    }
}

#[test]
fn engine_recommends_valid_items_under_limits() {
    let e = engine();
    let n = e.catalog().items.len();
    let all = e.recommend(&req(&["m1", "m2"], n)).unwrap();
    assert_eq!(all.len(), n, "k = catalog size returns every item");
    let ids: HashSet<&str> = all.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), n);
    assert!(all.windows(2).all(|w| w[0].score >= w[1].score));

    // Types, exclusions and filters hold.
    let mut r = req(&["m1", "m2"], 10);
    r.types = vec!["podcast".into()];
    let pods = e.recommend(&r).unwrap();
    assert_eq!(pods.len(), 4);
    assert!(pods.iter().all(|p| p.item_type == "podcast"));
    let mut r = req(&["m1", "m2"], 10);
    r.exclude_seen = true;
    assert!(e
        .recommend(&r)
        .unwrap()
        .iter()
        .all(|p| p.id != "m1" && p.id != "m2"));
    let mut r = req(&["m1"], 10);
    r.filter = Some("year>=1990".into());
    for p in e.recommend(&r).unwrap() {
        let it = &e.catalog().items[e.index_of(&p.id).unwrap() as usize];
        assert!(it.attrs["year"].as_i64().unwrap() >= 1990, "{p:?}");
    }
    let mut r = req(&["m1"], 10);
    r.filter = Some("year>=3000".into());
    assert!(matches!(
        e.recommend(&r),
        Err(DecodeError::NothingAllowed(_))
    ));
    let mut r = req(&["m1"], 10);
    r.types = vec!["song".into()];
    assert!(e.recommend(&r).unwrap_err().to_string().contains("song"));
    // A request needs what its mode reads.
    let r = Request {
        mode: Mode::Recommend,
        k: 3,
        ..Default::default()
    };
    assert!(e.recommend(&r).unwrap_err().to_string().contains("history"));
}

#[test]
fn mixtures_need_components_with_positive_weights() {
    let c = |w: f32| Component {
        source: Box::new(HashModel::new(8, 0)),
        prompt: vec![1],
        weight: w,
    };
    assert!(MixtureSource::new(Vec::new()).is_err());
    for w in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let e = MixtureSource::new(vec![c(1.0), c(w)])
            .err()
            .expect("refused");
        assert!(e.to_string().contains("weight"), "{e}");
    }
    let other = Component {
        source: Box::new(HashModel::new(9, 0)),
        prompt: vec![1],
        weight: 1.0,
    };
    assert!(MixtureSource::new(vec![c(1.0), other]).is_err());
}

/// `mix_recent` on the real decoder: every item's score is the mixture of the exact
/// scores under the whole history and under each recent item alone, with the documented
/// weights; a single-item history and `mix_recent = 0` are the plain ranking.
#[test]
fn engine_mixes_the_whole_history_with_recent_items_alone() {
    let e = engine();
    let n = e.catalog().items.len();
    let exact = |r: &Request| scores(e.rank_exact(r, 64).unwrap());
    let history = ["m1", "m3", "m4"];
    let whole = exact(&req(&history, n));
    // The recent items alone, most recent first.
    let alone: Vec<_> = ["m4", "m3", "m1"]
        .iter()
        .map(|id| exact(&req(&[id], n)))
        .collect();
    let mut r = req(&history, n);
    // The default decay over two items, then a given one over all three.
    for (mix, decay) in [(2, None), (3, Some(0.25f32))] {
        r.mix_recent = mix;
        r.recent_decay = decay;
        let hits = e.rank(&r).unwrap();
        assert_eq!(hits.len(), n);
        let d = decay.unwrap_or(RECENT_DECAY);
        let w: Vec<f32> = std::iter::once(1.0)
            .chain((0..mix).map(|k| d.powi(k as i32)))
            .collect();
        let total: f32 = w.iter().sum();
        for h in &hits {
            let terms: Vec<f32> = std::iter::once(&whole)
                .chain(&alone[..mix])
                .zip(&w)
                .map(|(scores, wk)| (wk / total).ln() + scores[&h.item])
                .collect();
            let want = logsumexp(&terms);
            assert!(
                (h.score - want).abs() < 1e-3,
                "mix {mix}, decay {d}, {}: {} vs {want}",
                h.item,
                h.score
            );
        }
        assert!(hits.windows(2).all(|p| p[0].score >= p[1].score));
    }
    // A decay that weighs nothing or is no number is refused, not ranked.
    for bad in [0.0, -0.5, f32::NAN, f32::INFINITY] {
        r.recent_decay = Some(bad);
        let err = e.rank(&r).unwrap_err().to_string();
        assert!(err.contains("decay"), "{bad}: {err}");
    }
    r.mix_recent = 2;
    r.recent_decay = None;
    // Exclusions still apply to the whole history.
    r.exclude_seen = true;
    r.k = 5;
    let seen: Vec<ItemIdx> = history.iter().map(|id| e.index_of(id).unwrap()).collect();
    assert!(e.rank(&r).unwrap().iter().all(|h| !seen.contains(&h.item)));
    // Nothing to mix: the plain ranking.
    for (hist, mix) in [(&["m2"][..], 3), (&["m1", "m2"][..], 0)] {
        let mut r = req(hist, 5);
        let plain = e.rank(&r).unwrap();
        r.mix_recent = mix;
        assert_eq!(e.rank(&r).unwrap(), plain);
    }
}

/// `memory` on the real decoder: the model directory carries the transition memory
/// `sidrec train` wrote, and every item's score is the exact mixture of the whole
/// history's score and the memory's probability; bad weights are refused, 0 is off, and
/// an engine without a memory says so.
#[test]
fn engine_mixes_the_transition_memory() {
    let e = engine();
    let n = e.catalog().items.len();
    let memory = e.memory().expect("train writes transitions.json");
    let history = ["m1", "m3", "m4"];
    let mut r = req(&history, n);
    let dist = memory.distribution(&r.history);
    assert!(!dist.is_empty(), "the fixture's histories have successors");
    let whole = scores(e.rank_exact(&r, 64).unwrap());
    let p_mem = |i: ItemIdx| dist.iter().find(|d| d.0 == i).map_or(0.0, |d| d.1);
    let w = 0.7f32;
    r.memory = Some(w);
    let hits = e.rank(&r).unwrap();
    assert_eq!(hits.len(), n);
    for h in &hits {
        let want = ((whole[&h.item].exp() + w * p_mem(h.item)) / (1.0 + w)).ln();
        assert!(
            (h.score - want).abs() < 1e-3,
            "{}: {} vs {want}",
            h.item,
            h.score
        );
    }
    for bad in [-1.0, f32::NAN, f32::INFINITY] {
        r.memory = Some(bad);
        let err = e.rank(&r).unwrap_err().to_string();
        assert!(err.contains("memory weight"), "{bad}: {err}");
    }
    r.memory = Some(0.0);
    r.k = 5;
    let plain = e.rank(&req(&history, 5)).unwrap();
    assert_eq!(e.rank(&r).unwrap(), plain);
    let mut bare = Engine::load(&fixture_model().1).unwrap();
    bare.set_memory(None);
    r.memory = Some(1.0);
    let err = bare.rank(&r).unwrap_err().to_string();
    assert!(err.contains("no transition memory"), "{err}");
}

/// Exact ranking ranks the same model as beam search: with recent items asked alone and
/// the memory mixed in, every item's exact score (taken in small groups) is its score
/// from a beam as wide as the catalog, and the plain request still ranks differently.
#[test]
fn exact_ranking_mixes_what_beam_search_mixes() {
    let e = engine();
    let n = e.catalog().items.len();
    let mut r = req(&["m1", "m3", "m4"], n);
    let plain = scores(e.rank_exact(&r, 3).unwrap());
    r.mix_recent = 2;
    r.memory = Some(0.7);
    let beam = scores(e.rank(&r).unwrap());
    let exact = scores(e.rank_exact(&r, 3).unwrap());
    assert_eq!(exact.len(), n);
    let mut moved = 0;
    for (item, s) in &exact {
        assert!(
            (s - beam[item]).abs() < 1e-3,
            "{item}: exact {s}, beam {}",
            beam[item]
        );
        moved += usize::from((s - plain[item]).abs() > 1e-3);
    }
    assert!(moved > 0, "the mixture changed no score");
}

/// The KV-cached beam search over the real decoder scores each item exactly as a full
/// forward pass over prompt + SID does.
#[test]
fn engine_scores_match_a_full_forward_pass() {
    use candle_core::{Device, Tensor};
    let e = engine();
    let r = req(&["m3", "m4"], 5);
    let hits = e.recommend(&r).unwrap();
    let text = e.model_input(&r).unwrap();
    let tok = tokenizers::Tokenizer::from_file(e.dir().join("tokenizer.json")).unwrap();
    let prompt = tok.encode(text, false).unwrap().get_ids().to_vec();
    for h in &hits {
        let sid_ids = tok
            .encode(h.sid.as_str(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        let ids: Vec<u32> = prompt.iter().chain(&sid_ids).copied().collect();
        let x = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = e.model().forward(&x, None).unwrap().squeeze(0).unwrap();
        let rows = logits.to_vec2::<f32>().unwrap();
        let mut s = 0.0;
        for (j, &t) in sid_ids.iter().enumerate() {
            let row = &rows[prompt.len() - 1 + j];
            s += row[t as usize] - logsumexp(row);
        }
        assert!((s - h.score).abs() < 1e-3, "{}: {s} vs {}", h.sid, h.score);
    }
}

#[test]
fn engine_generates_text_and_only_catalog_items() {
    let e = engine();
    let mut r = req(&["m1", "m2", "m3"], 5);
    r.mode = Mode::Describe;
    for seed in 0..3 {
        let cfg = GenConfig {
            max_tokens: 40,
            temperature: if seed == 0 { 0.0 } else { 1.0 },
            seed,
            ..Default::default()
        };
        let out = e.generate(&r, &cfg).unwrap();
        for o in &out {
            if let Output::Item(it) = o {
                let i = e.index_of(&it.id).expect("a catalog item");
                assert_eq!(e.sids().records[i as usize].sid, it.sid);
            }
        }
        // Same seed, same answer.
        assert_eq!(out, e.generate(&r, &cfg).unwrap());
    }
    // Titles resolve to items.
    assert_eq!(
        e.find_items("toy story", 5),
        vec![e.index_of("m1").unwrap()]
    );
    assert_eq!(e.find_items("m2", 5), vec![e.index_of("m2").unwrap()]);
    assert!(e.find_items("no such film", 5).is_empty());
}

#[test]
fn titles_named_in_a_request_become_its_history() {
    let e = engine();
    let read = |q: &str| {
        let mut r = Request {
            query: q.into(),
            k: 5,
            ..Default::default()
        };
        let items = e.read_titles_in_query(&mut r);
        (items, r)
    };
    let m = |id: &str| e.index_of(id).unwrap();
    let (items, r) = read("a 90s comedy like Toy Story");
    assert_eq!(items, vec![m("m1")]);
    assert_eq!(
        (r.query.as_str(), r.history.clone()),
        ("a 90s comedy", vec![m("m1")])
    );
    assert!(r.exclude_seen, "the named films are not recommended back");
    // Several titles, a leading article moved, "similar to", trailing punctuation.
    let (items, r) = read("Something similar to the matrix, Heat and Fargo!");
    assert_eq!(items, vec![m("m4"), m("m2"), m("m6")]);
    assert_eq!(r.query, "Something");
    let (items, r) = read("like Casablanca");
    assert_eq!((items, r.query.as_str()), (vec![m("m3")], ""));
    // Letters whose lower case is longer do not shift what is cut.
    let (items, r) = read("İİİ Ǆ like Heat");
    assert_eq!((items, r.query.as_str()), (vec![m("m2")], "İİİ Ǆ"));
    // Words that do not all name items are left alone: nothing guessed.
    for q in [
        "a movie I'd like",
        "like something funny",
        "like Heat and something else",
        "unlike Heat",
        "a comedy",
    ] {
        let (items, r) = read(q);
        assert!(items.is_empty(), "{q}: {items:?}");
        assert_eq!(r.query, q);
        assert!(r.history.is_empty() && !r.exclude_seen);
    }
    // Only recommend-like requests are read.
    let mut r = Request {
        mode: Mode::Chat,
        query: "like Heat".into(),
        ..Default::default()
    };
    assert!(e.read_titles_in_query(&mut r).is_empty());
}

#[test]
fn attribute_words_become_limits_unless_nothing_would_be_left() {
    let e = engine();
    let m = |id: &str| e.index_of(id).unwrap();
    let mut r = Request {
        query: "a 90s thriller like Heat".into(),
        filter: Some("type=movie".into()),
        k: 5,
        ..Default::default()
    };
    let read = e.read_request(&mut r);
    let clauses: Vec<&str> = read.iter().map(|x| x.clause.as_str()).collect();
    assert_eq!(
        clauses,
        ["history+=m2", "year>=1990, year<=1999", "genre=Thriller"]
    );
    assert_eq!(r.history, vec![m("m2")]);
    assert_eq!(
        r.filter.as_deref(),
        Some("type=movie, year>=1990, year<=1999, genre=Thriller")
    );
    let got: Vec<String> = e.recommend(&r).unwrap().into_iter().map(|x| x.id).collect();
    assert_eq!(got, ["m6"], "Fargo is the only other 90s thriller");
    // The words stay in the prompt.
    assert!(e.prompt_text(&r).unwrap().contains("a 90s thriller"));
    // A reading that would leave nothing is dropped, not turned into an error.
    let mut r = Request {
        query: "a comedy from the 1920s".into(),
        k: 3,
        ..Default::default()
    };
    assert!(e.read_request(&mut r).is_empty());
    assert_eq!(r.filter, None);
    assert_eq!(e.recommend(&r).unwrap().len(), 3);
    // Describe and chat are not read.
    let mut r = Request {
        mode: Mode::Chat,
        query: "a thriller".into(),
        ..Default::default()
    };
    assert!(e.read_request(&mut r).is_empty());
}
