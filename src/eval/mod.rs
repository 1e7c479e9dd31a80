//! Offline evaluation on the standard sequential-recommendation protocol.
//!
//! **Protocol** (TIGER and followers, and the peers in `../shared/peers`): leave-one-out per
//! user ([`crate::interactions::Sequences::split`]: the last item is the test target, the
//! second to last the validation target, the rest is training, the only part
//! `sidrec train` reads for user tasks). The model ranks the whole catalog (no negative
//! sampling; history items are not masked, as in the peers) and the metrics are Recall@k
//! and NDCG@k for k = 5 and 10: with the target at 0-based rank `r < k`, a hit counts 1
//! and NDCG `1 / log2(r + 2)`; a miss counts 0. One relevant item per user, so the ideal
//! DCG is 1.
//!
//! **Rankings** come from beam search over the SID trie ([`Engine::rank`]), or, in exact
//! mode, from every item's exact SID log-probability ([`Engine::rank_exact`]), which
//! shows how much the beam loses. The most-popular baseline is computed here; the
//! Markov and SASRec baselines are the peers' scripts, run on the same sequences written
//! in their layout ([`crate::interactions::Sequences::to_json_object`]).
//!
//! **Steerability**: requests that state an attribute in words (a genre, a decade, a
//! category, a brand) are scored by the share of their top-10 items that have it, next to
//! the same user's request without the words (the base rate) and with the attribute as a
//! hard filter (which the trie enforces: 100% by construction, measured anyway).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::catalog::Catalog;
use crate::decode::{DecodeError, Engine, Filter, Hit, Mode, Request};
use crate::interactions::Split;
use crate::memory::TransitionMemory;
use crate::progress::Progress;
use crate::train::data;
use crate::trie::ItemIdx;

pub mod format;
pub mod language;
pub mod report;
pub mod run;

/// What can go wrong while evaluating, besides decoding.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Boxed, as in the crate's error: decoding errors are large.
    #[error(transparent)]
    Decode(Box<DecodeError>),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The output directory may not be replaced (see [`crate::atomic::check_target`]).
    #[error(transparent)]
    Refused(#[from] crate::atomic::Refusal),
    #[error("plot {path}: {reason}")]
    Plot { path: PathBuf, reason: String },
    #[error("peer {script}: {reason}")]
    Peer { script: String, reason: String },
    #[error("no user has a test item: the interactions need users with at least 3 items")]
    NoUsers,
    /// A held-out request file with a bad line.
    #[error("{}:{line}: {reason}", .path.display())]
    Requests {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("sentence encoder: {0}")]
    Encoder(String),
}

impl From<DecodeError> for EvalError {
    fn from(e: DecodeError) -> Self {
        EvalError::Decode(Box::new(e))
    }
}

/// Runs a peer baseline, `python script interactions.json args...`, and reads the JSON
/// line it prints last (see `../shared/peers/README.md`).
pub fn run_peer(
    python: &str,
    script: &Path,
    interactions: &Path,
    args: &[String],
) -> Result<(Metrics, serde_json::Value), EvalError> {
    let name = script.display().to_string();
    let err = |reason: String| EvalError::Peer {
        script: name.clone(),
        reason,
    };
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(interactions)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| err(format!("cannot start {python}: {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(err(format!(
            "exited with {}: {}",
            out.status,
            stderr.lines().last().unwrap_or("")
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| err("printed no JSON line".into()))?;
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| err(format!("bad JSON line: {e}")))?;
    let m = Metrics::from_json(&v).ok_or_else(|| err(format!("no metrics in {line}")))?;
    Ok((m, v))
}

/// Cut-offs of the reported metrics.
pub const KS: [usize; 2] = [5, 10];
/// The longest list any metric reads.
pub const TOP: usize = 10;

/// Recall and NDCG at [`KS`] over a set of users.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Metrics {
    pub users: usize,
    #[serde(rename = "recall@5")]
    pub recall_5: f64,
    #[serde(rename = "recall@10")]
    pub recall_10: f64,
    #[serde(rename = "ndcg@5")]
    pub ndcg_5: f64,
    #[serde(rename = "ndcg@10")]
    pub ndcg_10: f64,
}

impl Metrics {
    /// The metric named `recall@5`, `ndcg@10`, ... (the peers' JSON keys).
    pub fn get(&self, name: &str) -> Option<f64> {
        match name {
            "recall@5" => Some(self.recall_5),
            "recall@10" => Some(self.recall_10),
            "ndcg@5" => Some(self.ndcg_5),
            "ndcg@10" => Some(self.ndcg_10),
            _ => None,
        }
    }

    /// Metrics from a peer's JSON line (`{"users": .., "recall@5": .., ...}`).
    pub fn from_json(v: &serde_json::Value) -> Option<Metrics> {
        let f = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
        Some(Metrics {
            users: v
                .get("users")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0) as usize,
            recall_5: f("recall@5")?,
            recall_10: f("recall@10")?,
            ndcg_5: f("ndcg@5")?,
            ndcg_10: f("ndcg@10")?,
        })
    }
}

/// Sums per-user hits and gains; [`Accumulator::finish`] averages them.
#[derive(Clone, Debug, Default)]
pub struct Accumulator {
    users: usize,
    recall: [f64; 2],
    ndcg: [f64; 2],
}

impl Accumulator {
    /// Adds one user: `ranked` best first (only the first [`TOP`] are read).
    pub fn add(&mut self, ranked: &[ItemIdx], target: ItemIdx) {
        self.users += 1;
        if let Some(r) = ranked.iter().take(TOP).position(|&i| i == target) {
            let gain = 1.0 / ((r + 2) as f64).log2();
            for (slot, &k) in KS.iter().enumerate() {
                if r < k {
                    self.recall[slot] += 1.0;
                    self.ndcg[slot] += gain;
                }
            }
        }
    }

    pub fn finish(&self) -> Metrics {
        let n = self.users.max(1) as f64;
        Metrics {
            users: self.users,
            recall_5: self.recall[0] / n,
            recall_10: self.recall[1] / n,
            ndcg_5: self.ndcg[0] / n,
            ndcg_10: self.ndcg[1] / n,
        }
    }
}

/// The [`TOP`] most frequent items of the training parts (ties: lower index first), the
/// same counts the Markov peer falls back to.
pub fn most_popular(split: &Split, n_items: usize) -> Vec<ItemIdx> {
    let counts = train_counts(split, n_items);
    let mut order: Vec<ItemIdx> = (0..n_items as ItemIdx).collect();
    order.sort_by(|&a, &b| counts[b as usize].cmp(&counts[a as usize]).then(a.cmp(&b)));
    order.truncate(TOP);
    order
}

/// How often each item occurs in the training parts (indices past `n_items` ignored).
fn train_counts(split: &Split, n_items: usize) -> Vec<usize> {
    let mut counts = vec![0usize; n_items];
    for &i in split.train.iter().flatten() {
        if let Some(c) = counts.get_mut(i as usize) {
            *c += 1;
        }
    }
    counts
}

/// The transition memory alone as a ranker ([`crate::memory`]): each case's items by
/// the memory's probability, ties and the rest of the list by training popularity. A
/// baseline beside first-order counts: it also counts the successors of older history
/// items and those a few positions on.
pub fn memory_baseline(
    memory: &TransitionMemory,
    split: &Split,
    cases: &[(Vec<ItemIdx>, ItemIdx)],
    n_items: usize,
) -> Metrics {
    let counts = train_counts(split, n_items);
    let popular = most_popular(split, n_items);
    let mut acc = Accumulator::default();
    for (history, target) in cases {
        let mut dist = memory.distribution(history);
        dist.sort_by(|a, b| {
            b.1.total_cmp(&a.1)
                .then(counts[b.0 as usize].cmp(&counts[a.0 as usize]))
                .then(a.0.cmp(&b.0))
        });
        let mut ranked: Vec<ItemIdx> = dist.iter().take(TOP).map(|&(i, _)| i).collect();
        for &p in &popular {
            if ranked.len() >= TOP {
                break;
            }
            if !ranked.contains(&p) {
                ranked.push(p);
            }
        }
        acc.add(&ranked, *target);
    }
    acc.finish()
}

/// Metrics of one group of users (see [`transition_breakdown`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GroupMetrics {
    pub group: String,
    /// Share of the evaluated users in the group.
    pub share: f64,
    pub metrics: Metrics,
}

/// Splits ranked cases by whether their last transition (the history's last item → the
/// target) occurs in some user's training part. First-order transition counts can only
/// score the first group; a sequence model has to do both, so the split shows where it
/// gains or loses against them. Groups: `seen transition`, `unseen transition` (cases
/// with an empty history count as unseen).
pub fn transition_breakdown(
    train: &[Vec<ItemIdx>],
    cases: &[(Vec<ItemIdx>, ItemIdx)],
    rankings: &[Vec<ItemIdx>],
) -> Vec<GroupMetrics> {
    let pairs: HashSet<(ItemIdx, ItemIdx)> = train
        .iter()
        .flat_map(|t| t.windows(2).map(|w| (w[0], w[1])))
        .collect();
    let (mut seen, mut unseen) = (Accumulator::default(), Accumulator::default());
    for ((history, target), ranked) in cases.iter().zip(rankings) {
        match history.last() {
            Some(&last) if pairs.contains(&(last, *target)) => seen.add(ranked, *target),
            _ => unseen.add(ranked, *target),
        }
    }
    let n = cases.len().min(rankings.len()).max(1) as f64;
    [("seen transition", seen), ("unseen transition", unseen)]
        .into_iter()
        .map(|(group, acc)| GroupMetrics {
            group: group.into(),
            share: acc.users as f64 / n,
            metrics: acc.finish(),
        })
        .collect()
}

pub use crate::interactions::sample_users;

/// The validator `sidrec train` selects weights with (`select_best`): each validation
/// case ranked over the whole catalog by an engine on the weights being trained, exactly
/// as [`evaluate_model`] ranks test users, scored by NDCG@10.
pub fn select_validator() -> crate::train::pipeline::ValidatorHandle {
    use crate::train::pipeline::ValidationModel;
    let f = |m: &ValidationModel<'_>, cases: &[(Vec<u32>, u32)], mix_recent: usize| {
        let engine = Engine::from_model(
            m.model.clone(),
            m.tokenizer.clone(),
            m.catalog.clone(),
            m.sids.clone(),
            m.sidecar.clone(),
            m.prompts.clone(),
            m.dir,
        );
        let opts = ModelOptions {
            mix_recent,
            ..ModelOptions::default()
        };
        evaluate_model(&engine, cases, &opts, &Progress::new(true))
            .map(|r| r.metrics.ndcg_10)
            .map_err(|e| e.to_string())
    };
    crate::train::pipeline::ValidatorHandle(std::sync::Arc::new(f))
}

/// Settings of [`evaluate_model`].
#[derive(Clone, Debug)]
pub struct ModelOptions {
    /// Beam width (at least [`TOP`]).
    pub beams: usize,
    /// Also rank every item exactly (small catalogs).
    pub exact: bool,
    /// Items per group in exact mode (bounds memory).
    pub exact_group: usize,
    /// Leave each history's items out of its ranking. Not the peers' protocol (they rank
    /// the whole catalog); on data without repeats it shows what repeated items cost.
    pub exclude_seen: bool,
    /// Rank by the mixture of the whole history and its last N items alone
    /// ([`Request::mix_recent`]; 0: off).
    pub mix_recent: usize,
    /// Weight ratio of each further recent item under `mix_recent`
    /// ([`Request::recent_decay`]; `None`: the default).
    pub recent_decay: Option<f32>,
    /// Weight of the engine's transition memory ([`Request::memory`]; `None`: off).
    pub memory: Option<f32>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            beams: 20,
            exact: false,
            exact_group: 256,
            exclude_seen: false,
            mix_recent: 0,
            recent_decay: None,
            memory: None,
        }
    }
}

/// Latency of one user's ranking, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    fn of(mut ms: Vec<f64>) -> Latency {
        if ms.is_empty() {
            return Latency::default();
        }
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
        Latency {
            p50_ms: at(0.5),
            p90_ms: at(0.9),
            mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
        }
    }
}

/// What [`evaluate_model`] measures.
#[derive(Clone, Debug, Serialize)]
pub struct ModelResult {
    pub beams: usize,
    pub metrics: Metrics,
    /// Exact ranking of the same users, when asked for.
    pub exact: Option<Metrics>,
    /// Share of returned items that are catalog items with the SID decoded.
    pub valid_share: f64,
    /// Distinct items in all top-10 lists over the catalog size.
    pub coverage_at_10: f64,
    pub latency: Latency,
    pub exact_latency: Option<Latency>,
    /// Each case's top-10 from the beam, in case order (written to `rankings.jsonl`,
    /// not to `eval.json`).
    #[serde(skip)]
    pub rankings: Vec<Vec<ItemIdx>>,
}

/// Ranks the catalog for each `(history, target)` case and scores the rankings.
pub fn evaluate_model(
    engine: &Engine,
    cases: &[(Vec<ItemIdx>, ItemIdx)],
    opts: &ModelOptions,
    progress: &Progress,
) -> Result<ModelResult, DecodeError> {
    let beams = opts.beams.max(TOP);
    let n_items = engine.catalog().items.len();
    let (mut acc, mut exact_acc) = (Accumulator::default(), Accumulator::default());
    let (mut lat, mut exact_lat) = (Vec::new(), Vec::new());
    let (mut returned, mut valid) = (0usize, 0usize);
    let mut seen: HashSet<ItemIdx> = HashSet::new();
    let mut rankings = Vec::with_capacity(cases.len());
    let bar = progress.bar(cases.len() as u64, "ranking");
    for (history, target) in cases {
        let req = Request {
            exclude_seen: opts.exclude_seen,
            mix_recent: opts.mix_recent,
            recent_decay: opts.recent_decay,
            memory: opts.memory,
            ..history_request(history, beams)
        };
        let t = Instant::now();
        let hits = engine.rank(&req)?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        returned += hits.len();
        valid += hits.iter().filter(|h| is_valid(engine, h)).count();
        let ranked: Vec<ItemIdx> = hits.iter().map(|h| h.item).collect();
        seen.extend(ranked.iter().copied());
        acc.add(&ranked, *target);
        rankings.push(ranked.into_iter().take(TOP).collect());
        if opts.exact {
            let t = Instant::now();
            let all = engine.rank_exact(&req, opts.exact_group)?;
            exact_lat.push(t.elapsed().as_secs_f64() * 1e3);
            let ranked: Vec<ItemIdx> = all.iter().take(TOP).map(|h| h.item).collect();
            exact_acc.add(&ranked, *target);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(ModelResult {
        beams,
        metrics: acc.finish(),
        exact: opts.exact.then(|| exact_acc.finish()),
        valid_share: if returned == 0 {
            0.0
        } else {
            valid as f64 / returned as f64
        },
        coverage_at_10: seen.len() as f64 / n_items.max(1) as f64,
        latency: Latency::of(lat),
        exact_latency: opts.exact.then(|| Latency::of(exact_lat)),
        rankings,
    })
}

/// Whether a hit names a catalog item whose SID is the path decoded.
fn is_valid(engine: &Engine, hit: &Hit) -> bool {
    let trie = &engine.sids().trie;
    (hit.item as usize) < engine.catalog().items.len()
        && trie.path(hit.item) == Some(hit.path.as_slice())
}

/// An attribute a request can state in words and a filter can check.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Constraint {
    /// What is evaluated, e.g. `genre`, `decade`, `category`, `brand`.
    pub kind: String,
    /// The words, in the phrasing of the search training queries ("a comedy movie").
    pub text: String,
    /// The same constraint as a filter expression (`genre=Comedy`).
    pub filter: String,
}

/// Constraints drawn from the catalog's attributes: the `per_kind` most frequent genres,
/// decades, categories (last level of the path) and brands, each held by at least 1% of
/// the items (rarer ones say little about steering and much about the catalog).
pub fn constraints(catalog: &Catalog, per_kind: usize) -> Vec<Constraint> {
    let noun = data::catalog_noun(catalog);
    let n = catalog.items.len();
    let mut out = Vec::new();
    let mut add =
        |kind: &str, counts: BTreeMap<String, usize>, make: &dyn Fn(&str) -> (String, String)| {
            let mut v: Vec<(String, usize)> = counts.into_iter().collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            for (value, count) in v.into_iter().take(per_kind) {
                if count * 100 < n {
                    break;
                }
                let (text, filter) = make(&value);
                out.push(Constraint {
                    kind: kind.to_string(),
                    text,
                    filter,
                });
            }
        };
    let mut genres = BTreeMap::new();
    let mut decades = BTreeMap::new();
    let mut cats = BTreeMap::new();
    let mut brands = BTreeMap::new();
    // Values a filter expression cannot carry (its clauses are split at commas and
    // " and ") are left out.
    let usable = |v: &str| !v.contains(',') && !v.to_lowercase().contains(" and ");
    for item in &catalog.items {
        for g in data::genres(item) {
            *genres.entry(g).or_insert(0) += 1;
        }
        if let Some(y) = data::year(item) {
            *decades
                .entry((y.div_euclid(10) * 10).to_string())
                .or_insert(0) += 1;
        }
        if let Some(c) = data::categories(item).pop() {
            *cats.entry(c).or_insert(0) += 1;
        }
        if let Some(b) = data::brand(item) {
            *brands.entry(b).or_insert(0) += 1;
        }
    }
    for m in [&mut genres, &mut cats, &mut brands] {
        m.retain(|k: &String, _| usable(k));
    }
    let article = |w: &str| {
        if w.starts_with(['a', 'e', 'i', 'o', 'u', 'A', 'E', 'I', 'O', 'U']) {
            "an"
        } else {
            "a"
        }
    };
    add("genre", genres, &|g| {
        let g_l = g.to_lowercase();
        (
            format!("{} {g_l} {noun}", article(&g_l)),
            format!("genre={g}"),
        )
    });
    add("decade", decades, &|d| {
        let d0: i64 = d.parse().unwrap_or(0);
        (
            format!("{} {noun} from the {d0}s", article(&noun)),
            format!("year>={d0}, year<={}", d0 + 9),
        )
    });
    add("category", cats, &|c| {
        (c.to_lowercase(), format!("categories={c}"))
    });
    add("brand", brands, &|b| {
        (
            format!("{} {noun} by {b}", article(&noun)),
            format!("brand={b}"),
        )
    });
    out
}

/// Steerability of one constraint kind: mean share of top-10 items that satisfy the
/// constraint, per way of asking.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SteerResult {
    pub kind: String,
    pub requests: usize,
    /// The user's history alone (what the constraint would be without asking).
    pub base_rate: f64,
    /// The history with the constraint's words added to the prompt.
    pub history_and_text: f64,
    /// The words alone, as a search.
    pub text_only: f64,
    /// The history with the constraint as a filter on the trie.
    pub filter: f64,
}

/// Asks, for each case and each constraint in turn (round robin), in the four ways of
/// [`SteerResult`], and averages per constraint kind.
pub fn evaluate_steering(
    engine: &Engine,
    histories: &[Vec<ItemIdx>],
    constraints: &[Constraint],
    beams: usize,
    progress: &Progress,
) -> Result<Vec<SteerResult>, DecodeError> {
    let catalog = engine.catalog();
    let mut by_kind: BTreeMap<String, (usize, [f64; 4])> = BTreeMap::new();
    if constraints.is_empty() {
        return Ok(Vec::new());
    }
    let filters: Vec<Filter> = constraints
        .iter()
        .map(|c| Filter::parse(&c.filter, catalog))
        .collect::<Result<_, _>>()?;
    let bar = progress.bar(histories.len() as u64, "steering");
    for (u, history) in histories.iter().enumerate() {
        let c = &constraints[u % constraints.len()];
        let f = &filters[u % constraints.len()];
        let share = |req: Request| share_where(engine, &req, |i| f.matches(i));
        let base = history_request(history, beams);
        let shares = [
            share(base.clone())?,
            share(Request {
                query: c.text.clone(),
                ..base.clone()
            })?,
            share(Request {
                mode: Mode::Search,
                history: Vec::new(),
                query: c.text.clone(),
                ..base.clone()
            })?,
            share(Request {
                filter: Some(c.filter.clone()),
                ..base.clone()
            })?,
        ];
        let e = by_kind.entry(c.kind.clone()).or_insert((0, [0.0; 4]));
        e.0 += 1;
        for (sum, s) in e.1.iter_mut().zip(shares) {
            *sum += s;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(by_kind
        .into_iter()
        .map(|(kind, (n, s))| {
            let m = |i: usize| s[i] / n.max(1) as f64;
            SteerResult {
                kind,
                requests: n,
                base_rate: m(0),
                history_and_text: m(1),
                text_only: m(2),
                filter: m(3),
            }
        })
        .collect())
}

/// A top-10 recommend request for a history.
fn history_request(history: &[ItemIdx], beams: usize) -> Request {
    Request {
        mode: Mode::Recommend,
        history: history.to_vec(),
        k: TOP,
        beams: Some(beams.max(TOP)),
        ..Request::default()
    }
}

/// The share of a request's items for which `pred` holds.
fn share_where(
    engine: &Engine,
    req: &Request,
    pred: impl Fn(&crate::catalog::Item) -> bool,
) -> Result<f64, DecodeError> {
    let hits = engine.rank(req)?;
    let items = &engine.catalog().items;
    let ok = hits
        .iter()
        .filter(|h| pred(&items[h.item as usize]))
        .count();
    Ok(ok as f64 / hits.len().max(1) as f64)
}

/// Type steering for one requested type: the share of top-10 items of that type.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TypeSteerResult {
    #[serde(rename = "type")]
    pub item_type: String,
    pub requests: usize,
    /// Share of the type in the catalog.
    pub catalog_share: f64,
    /// The history alone, no type asked for.
    pub base_rate: f64,
    /// The type asked for in the prompt's words only (the steer prompt, no trie limit).
    pub text_only: f64,
    /// The type as a trie limit (`--type`): 100% by construction, measured.
    pub with_limit: f64,
}

/// For a catalog with several entity types: asks each history for each type, by words
/// alone and with the type limit, beside the history alone. Empty for one-type catalogs.
pub fn evaluate_type_steering(
    engine: &Engine,
    histories: &[Vec<ItemIdx>],
    beams: usize,
    progress: &Progress,
) -> Result<Vec<TypeSteerResult>, DecodeError> {
    let catalog = engine.catalog();
    let types = catalog.types();
    if types.len() < 2 || histories.is_empty() {
        return Ok(Vec::new());
    }
    let bar = progress.bar((histories.len() * types.len()) as u64, "type steering");
    let mut out = Vec::new();
    for t in &types {
        let share = |req: &Request| share_where(engine, req, |i| &i.item_type == t);
        let mut sums = [0.0; 3];
        for history in histories {
            let base = history_request(history, beams);
            let asked = Request {
                types: vec![t.clone()],
                ..base.clone()
            };
            let words = Request {
                types_in_prompt_only: true,
                ..asked.clone()
            };
            for (sum, req) in sums.iter_mut().zip([&base, &words, &asked]) {
                *sum += share(req)?;
            }
            bar.inc(1);
        }
        let n = histories.len() as f64;
        out.push(TypeSteerResult {
            item_type: t.clone(),
            requests: histories.len(),
            catalog_share: catalog.items.iter().filter(|i| &i.item_type == t).count() as f64
                / catalog.items.len().max(1) as f64,
            base_rate: sums[0] / n,
            text_only: sums[1] / n,
            with_limit: sums[2] / n,
        });
    }
    bar.finish_and_clear();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_match_hand_computed_values() {
        let mut acc = Accumulator::default();
        // Hit at rank 0: recall 1 at 5 and 10, NDCG 1.
        acc.add(&[7, 1, 2], 7);
        // Hit at rank 2: NDCG 1/log2(4) = 0.5 at both cut-offs.
        acc.add(&[1, 2, 7, 3], 7);
        // Hit at rank 6: only @10, NDCG 1/log2(8) = 1/3.
        acc.add(&[0, 1, 2, 3, 4, 5, 7], 7);
        // Miss, and a hit beyond the top 10 does not count.
        acc.add(&[1, 2], 7);
        acc.add(&(0..20).collect::<Vec<_>>(), 15);
        let m = acc.finish();
        assert_eq!(m.users, 5);
        assert!((m.recall_5 - 2.0 / 5.0).abs() < 1e-12);
        assert!((m.recall_10 - 3.0 / 5.0).abs() < 1e-12);
        assert!((m.ndcg_5 - 1.5 / 5.0).abs() < 1e-12);
        assert!((m.ndcg_10 - (1.5 + 1.0 / 3.0) / 5.0).abs() < 1e-12);
        assert_eq!(m.get("ndcg@10"), Some(m.ndcg_10));
        assert_eq!(Accumulator::default().finish().recall_10, 0.0);
    }

    #[test]
    fn breakdown_splits_cases_by_training_transitions() {
        // Training transitions: 1→2, 2→3, 5→6. Not 3→4: it is a validation → test pair,
        // which no training part holds.
        let train = vec![vec![1, 2, 3], vec![5, 6]];
        let cases = vec![
            (vec![0, 1], 2), // seen, hit at rank 0
            (vec![5], 6),    // seen, hit at rank 2: NDCG 0.5
            (vec![3], 4),    // unseen, miss
            (vec![], 1),     // no history: unseen, hit at rank 1
        ];
        let rankings = vec![vec![2, 9], vec![0, 1, 6], vec![1, 2], vec![0, 1]];
        let g = transition_breakdown(&train, &cases, &rankings);
        assert_eq!(g.len(), 2);
        assert_eq!((g[0].group.as_str(), g[0].share), ("seen transition", 0.5));
        assert_eq!(g[0].metrics.users, 2);
        assert!((g[0].metrics.ndcg_10 - 0.75).abs() < 1e-12);
        assert_eq!(g[0].metrics.recall_10, 1.0);
        assert_eq!(
            (g[1].group.as_str(), g[1].share),
            ("unseen transition", 0.5)
        );
        assert!((g[1].metrics.ndcg_10 - 0.5 / 3f64.log2()).abs() < 1e-12);
        assert_eq!(g[1].metrics.recall_10, 0.5);
    }

    #[test]
    fn popularity_counts_only_training_parts() {
        // Item 9 is every user's test target and item 8 every validation target: neither
        // may be counted.
        let seqs = crate::interactions::Sequences::from_seqs(
            vec!["a".into(), "b".into(), "c".into()],
            vec![vec![1, 2, 8, 9], vec![2, 3, 8, 9], vec![2, 1, 3, 8, 9]],
            3,
        );
        let top = most_popular(&seqs.split(), 10);
        assert_eq!(&top[..3], &[2, 1, 3]);
        let pos = |i: u32| top.iter().position(|&t| t == i).unwrap();
        assert!(pos(8) > 2 && pos(9) > 2);
    }

    #[test]
    fn user_samples_are_seeded_and_sorted() {
        let a = sample_users(100, Some(10), 3);
        assert_eq!(a, sample_users(100, Some(10), 3));
        assert_ne!(a, sample_users(100, Some(10), 4));
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(sample_users(5, Some(10), 0), vec![0, 1, 2, 3, 4]);
        assert_eq!(sample_users(3, None, 0), vec![0, 1, 2]);
    }

    #[test]
    fn peer_lines_parse() {
        let v = serde_json::json!({"peer": "markov", "users": 8317, "recall@5": 0.0759,
            "recall@10": 0.0898, "ndcg@5": 0.0635, "ndcg@10": 0.068});
        let m = Metrics::from_json(&v).unwrap();
        assert_eq!((m.users, m.ndcg_10), (8317, 0.068));
        assert!(Metrics::from_json(&serde_json::json!({"users": 1})).is_none());
    }

    #[test]
    fn latency_quantiles() {
        let l = Latency::of((1..=10).map(f64::from).collect());
        assert_eq!((l.p50_ms, l.p90_ms, l.mean_ms), (6.0, 9.0, 5.5));
        assert_eq!(Latency::of(Vec::new()), Latency::default());
    }
}
