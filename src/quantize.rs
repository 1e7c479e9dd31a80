//! Residual k-means: embeddings → a tuple of codes per item, then a dedup code so that
//! every item's semantic ID is unique.
//!
//! Level 1 clusters the embeddings; level `l` clusters what levels `< l` left over (the
//! residuals), so codes go from coarse to fine and similar items share prefixes.
//!
//! The defect users report most about semantic IDs is collisions: two items with the same
//! code tuple, which only an arbitrary dedup code tells apart. Plain nearest-centroid
//! assignment (what faiss does) leaves many: on real catalogs, neighbours in embedding
//! space pick the same fine code too. [`Assign::Balanced`] attacks that directly:
//!
//! * at every level but the last, codes have a capacity (`⌈n/K⌉·(1+slack)` items each),
//!   during fitting and assignment, so no code becomes a dumping ground;
//! * at the last level, the capacity is one item per code *within each prefix* (type and
//!   codes of the levels above): items that share a prefix take distinct last codes,
//!   each the nearest still free. The tuple can then only collide if a prefix holds more
//!   than K items.
//!
//! Both are greedy: items are served in order of regret (how much worse their second
//! choice is than their first), so the items that care most get their nearest code.

use std::collections::HashMap;
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::kmeans::{self, Centroids, Init, KMeansConfig, Rows};

/// Errors of residual quantization.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error("no levels: at least one level of codes is needed")]
    NoLevels,
    #[error("level {level} has {codes} codes: each level needs at least 2")]
    TooFewCodes { level: usize, codes: usize },
    #[error("level {level} has {codes} codes: at most 65536 per level are supported")]
    TooManyCodes { level: usize, codes: usize },
    #[error("nothing to quantize: the embedding matrix is empty")]
    Empty,
    #[error("{types} type labels for {n} embeddings")]
    TypeCount { types: usize, n: usize },
}

/// How items are assigned to codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Assign {
    /// Nearest centroid at every level (faiss' residual k-means).
    Plain,
    /// Capacity-balanced levels and a prefix-unique last level (see the module docs).
    Balanced,
}

impl std::str::FromStr for Assign {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "plain" => Ok(Assign::Plain),
            "balanced" => Ok(Assign::Balanced),
            _ => Err(format!("unknown assignment {s:?}: use plain or balanced")),
        }
    }
}

impl std::fmt::Display for Assign {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Assign::Plain => "plain",
            Assign::Balanced => "balanced",
        })
    }
}

/// Residual k-means settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QuantizeConfig {
    /// Codes per level, coarse to fine.
    pub levels: Vec<usize>,
    /// Lloyd iterations per level.
    pub iters: usize,
    pub seed: u64,
    /// Training sample per level: at most this many points per centroid.
    pub max_points_per_centroid: usize,
    pub assign: Assign,
    /// Extra capacity of a code on balanced (non-last) levels, as a fraction of `n/K`.
    pub balance_slack: f32,
    /// On the prefix-unique last level, an item moves off its nearest code only if the
    /// free code costs at most this much more, relative to the nearest code's squared
    /// distance. Near-duplicate items (whose residuals are alike) then keep their code
    /// and are told apart by the dedup code, instead of paying a large error for a
    /// distinct but distant code.
    pub unique_max_cost: f32,
    #[serde(skip, default = "default_init")]
    pub init: Init,
}

fn default_init() -> Init {
    Init::PlusPlus
}

impl Default for QuantizeConfig {
    fn default() -> Self {
        QuantizeConfig {
            levels: vec![256, 256, 256],
            iters: 20,
            seed: 0,
            max_points_per_centroid: 256,
            assign: Assign::Balanced,
            balance_slack: 0.25,
            unique_max_cost: 0.25,
            init: Init::PlusPlus,
        }
    }
}

impl QuantizeConfig {
    fn validate(&self) -> Result<(), QuantizeError> {
        if self.levels.is_empty() {
            return Err(QuantizeError::NoLevels);
        }
        for (level, &codes) in self.levels.iter().enumerate() {
            if codes < 2 {
                return Err(QuantizeError::TooFewCodes { level, codes });
            }
            if codes > 65536 {
                return Err(QuantizeError::TooManyCodes { level, codes });
            }
        }
        Ok(())
    }
}

/// Diagnostics of one level.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LevelReport {
    pub codes: usize,
    /// Mean squared norm of the residual left after this level.
    pub mse: f64,
    /// Share of the level's codes used by at least one item.
    pub usage: f64,
    /// exp(entropy) of the code distribution: the number of equally used codes it is
    /// worth. `codes` at best.
    pub perplexity: f64,
}

/// Wall-clock seconds of one level (kept apart from [`LevelReport`] so that reports of
/// two runs on the same input compare equal).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LevelTiming {
    pub fit: f64,
    pub assign: f64,
}

/// Fan-out of the code prefix tree at one depth: distinct children per distinct prefix.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FanOut {
    /// Prefix length (0: the root, i.e. the first level's codes).
    pub depth: usize,
    pub max: usize,
    pub mean: f64,
}

/// Diagnostics of a whole quantization.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct QuantizeReport {
    pub n: usize,
    pub d: usize,
    pub assign: Assign,
    pub levels: Vec<LevelReport>,
    pub final_mse: f64,
    /// `1 − distinct tuples / n`, tuples including the type: the share of items beyond
    /// the first of each colliding group (faiss' peer reports the same ratio).
    pub collision_rate: f64,
    /// Items that carry a dedup code (every member of a colliding group).
    pub items_with_dedup: usize,
    /// Largest group of items sharing one tuple.
    pub max_collision_group: usize,
    pub fanout: Vec<FanOut>,
}

/// The result: codebooks, codes and dedup codes per item.
#[derive(Clone, Debug)]
pub struct Quantized {
    pub codebooks: Vec<Centroids>,
    /// `n × levels`, row-major.
    pub codes: Vec<u32>,
    /// Dedup code of items whose tuple collides; `None` for unique tuples.
    pub dedup: Vec<Option<u32>>,
    pub report: QuantizeReport,
    /// Seconds per level.
    pub timings: Vec<LevelTiming>,
}

impl Quantized {
    pub fn levels(&self) -> usize {
        self.codebooks.len()
    }

    /// Level codes of item `i`.
    pub fn item_codes(&self, i: usize) -> &[u32] {
        let l = self.levels();
        &self.codes[i * l..(i + 1) * l]
    }

    /// Number of dedup codes in use (0 when every tuple is unique).
    pub fn dedup_codes(&self) -> usize {
        self.dedup
            .iter()
            .flatten()
            .map(|&c| c as usize + 1)
            .max()
            .unwrap_or(0)
    }
}

/// Candidates per item for balanced assignment; an item whose candidates are all full
/// falls back to a scan of every code.
const CANDIDATES: usize = 16;

/// Quantizes `x` (`n × d`); `types[i]` is item i's entity type (any integer label), so
/// that uniqueness and prefixes are per type.
pub fn quantize(
    x: Rows<'_>,
    types: &[u32],
    cfg: &QuantizeConfig,
) -> Result<Quantized, QuantizeError> {
    cfg.validate()?;
    if x.n == 0 || x.d == 0 {
        return Err(QuantizeError::Empty);
    }
    if types.len() != x.n {
        return Err(QuantizeError::TypeCount {
            types: types.len(),
            n: x.n,
        });
    }
    let (n, d) = (x.n, x.d);
    let nl = cfg.levels.len();
    let mut res = x.data.to_vec();
    let mut codes = vec![0u32; n * nl];
    let mut codebooks = Vec::with_capacity(nl);
    let mut levels = Vec::with_capacity(nl);
    let mut timings = Vec::with_capacity(nl);

    for (l, &k) in cfg.levels.iter().enumerate() {
        let last = l + 1 == nl;
        let r = Rows::new(&res, n, d);
        let kcfg = KMeansConfig {
            k,
            iters: cfg.iters,
            seed: cfg.seed.wrapping_add(l as u64),
            max_points_per_centroid: cfg.max_points_per_centroid,
            init: cfg.init,
        };
        let tf = Instant::now();
        // The last level is fitted plainly even when balanced: its balance is the
        // per-prefix uniqueness applied at assignment, which has no meaning on a sample.
        let balanced_fit = cfg.assign == Assign::Balanced && !last;
        let slack = cfg.balance_slack;
        let fit_assign = move |s: Rows<'_>, c: Rows<'_>| -> Vec<u32> {
            let cap = capacity(s.n, c.n, slack);
            let groups = vec![0u32; s.n];
            capacity_assign(s, c, &groups, cap, None)
        };
        let cents = if balanced_fit {
            kmeans::fit(r, &kcfg, Some(&fit_assign))
        } else {
            kmeans::fit(r, &kcfg, None)
        };
        let fit_seconds = tf.elapsed().as_secs_f64();

        let ta = Instant::now();
        let labels = match (cfg.assign, last) {
            (Assign::Plain, _) => kmeans::assign(r, cents.rows()).0,
            (Assign::Balanced, false) => {
                let groups = vec![0u32; n];
                capacity_assign(r, cents.rows(), &groups, capacity(n, cents.k, slack), None)
            }
            (Assign::Balanced, true) => {
                let groups = prefix_groups(types, &codes, nl, l);
                capacity_assign(r, cents.rows(), &groups, 1, Some(cfg.unique_max_cost))
            }
        };
        let assign_seconds = ta.elapsed().as_secs_f64();

        // Subtract the chosen centroids: what is left is the next level's input.
        res.par_chunks_exact_mut(d)
            .zip(labels.par_iter())
            .for_each(|(row, &c)| {
                let cen = &cents.data[c as usize * d..(c as usize + 1) * d];
                row.iter_mut().zip(cen).for_each(|(v, c)| *v -= c);
            });
        for (i, &c) in labels.iter().enumerate() {
            codes[i * nl + l] = c;
        }
        let mse = kmeans::row_norms(Rows::new(&res, n, d))
            .iter()
            .map(|&v| v as f64)
            .sum::<f64>()
            / n as f64;
        let (usage, perplexity) = usage_and_perplexity(&labels, cents.k);
        levels.push(LevelReport {
            codes: cents.k,
            mse,
            usage,
            perplexity,
        });
        timings.push(LevelTiming {
            fit: fit_seconds,
            assign: assign_seconds,
        });
        codebooks.push(cents);
    }

    let (dedup, collision_rate, items_with_dedup, max_group) = dedup_codes(types, &codes, nl);
    let fanout = fanout(types, &codes, nl);
    let final_mse = levels.last().map(|l| l.mse).unwrap_or(0.0);
    let report = QuantizeReport {
        n,
        d,
        assign: cfg.assign,
        levels,
        final_mse,
        collision_rate,
        items_with_dedup,
        max_collision_group: max_group,
        fanout,
    };
    Ok(Quantized {
        codebooks,
        codes,
        dedup,
        report,
        timings,
    })
}

fn capacity(n: usize, k: usize, slack: f32) -> usize {
    (((n as f64 / k as f64) * (1.0 + slack as f64)).ceil() as usize).max(1)
}

/// Group index of every item's prefix: its type and its codes at levels `< level`.
fn prefix_groups(types: &[u32], codes: &[u32], nl: usize, level: usize) -> Vec<u32> {
    let mut ids: HashMap<(u32, &[u32]), u32> = HashMap::new();
    types
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let key = (t, &codes[i * nl..i * nl + level]);
            let next = ids.len() as u32;
            *ids.entry(key).or_insert(next)
        })
        .collect()
}

/// Greedy capacity-constrained assignment: each (group, code) pair takes at most `cap`
/// items. Items are served in order of regret (second-nearest minus nearest distance,
/// larger first; ties by index), each taking its nearest code with room left. If a
/// group holds more than `cap · K` items, the overflow takes its nearest code anyway.
/// With `max_cost`, an item takes its nearest code (over capacity) rather than a free
/// one whose squared distance exceeds the nearest's by more than that fraction.
pub fn capacity_assign(
    x: Rows<'_>,
    cents: Rows<'_>,
    groups: &[u32],
    cap: usize,
    max_cost: Option<f32>,
) -> Vec<u32> {
    let (n, k) = (x.n, cents.n);
    let m = CANDIDATES.min(k);
    let top = kmeans::nearest_m(x, cents, m);
    let mut order: Vec<u32> = (0..n as u32).collect();
    let regret = |i: u32| -> f32 {
        let r = &top[i as usize * m..(i as usize + 1) * m];
        if m > 1 {
            r[1].1 - r[0].1
        } else {
            0.0
        }
    };
    order.sort_by(|&a, &b| regret(b).total_cmp(&regret(a)).then(a.cmp(&b)));

    let mut used = Counts::new(groups.iter().max().map_or(0, |&g| g as usize + 1), k);
    let mut labels = vec![0u32; n];
    for &i in &order {
        let g = groups[i as usize];
        let cands = &top[i as usize * m..(i as usize + 1) * m];
        let limit = max_cost.map_or(f32::INFINITY, |f| cands[0].1 * (1.0 + f));
        let free = |c: u32| used.get(g, c) < cap;
        let in_cands = cands.iter().find(|c| free(c.0));
        let pick = match in_cands {
            Some(c) if c.1 <= limit => Some(c.0),
            Some(_) => None,
            None if cands[m - 1].1 > limit => None,
            None => {
                // All candidates full: scan every code, nearest with room first.
                let xi = x.row(i as usize);
                let mut all: Vec<(f32, u32)> = (0..k as u32)
                    .map(|c| (sq_dist(xi, cents.row(c as usize)), c))
                    .collect();
                all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                all.iter()
                    .find(|&&(dist, c)| free(c) && dist <= limit)
                    .map(|&(_, c)| c)
            }
        }
        .unwrap_or(cands[0].0);
        used.add(g, pick);
        labels[i as usize] = pick;
    }
    labels
}

/// Items per (group, code): a dense table when it is small (one group per balanced
/// level), a hash map when groups are many (one per prefix on the last level).
enum Counts {
    Dense { k: usize, counts: Vec<u32> },
    Sparse(HashMap<(u32, u32), usize>),
}

impl Counts {
    fn new(groups: usize, k: usize) -> Self {
        if groups.saturating_mul(k) <= 1 << 22 {
            Counts::Dense {
                k,
                counts: vec![0; groups * k],
            }
        } else {
            Counts::Sparse(HashMap::new())
        }
    }

    fn get(&self, g: u32, c: u32) -> usize {
        match self {
            Counts::Dense { k, counts } => counts[g as usize * k + c as usize] as usize,
            Counts::Sparse(m) => m.get(&(g, c)).copied().unwrap_or(0),
        }
    }

    fn add(&mut self, g: u32, c: u32) {
        match self {
            Counts::Dense { k, counts } => counts[g as usize * *k + c as usize] += 1,
            Counts::Sparse(m) => *m.entry((g, c)).or_insert(0) += 1,
        }
    }
}

#[inline]
fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

fn usage_and_perplexity(labels: &[u32], k: usize) -> (f64, f64) {
    let mut counts = vec![0usize; k];
    for &l in labels {
        counts[l as usize] += 1;
    }
    let n = labels.len().max(1) as f64;
    let used = counts.iter().filter(|&&c| c > 0).count();
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.ln()
        })
        .sum();
    (used as f64 / k as f64, entropy.exp())
}

/// Dedup codes: every member of a group of items sharing (type, tuple) gets its index in
/// the group (catalog order). Returns the codes, the collision rate, the number of items
/// with a dedup code and the largest group.
fn dedup_codes(types: &[u32], codes: &[u32], nl: usize) -> (Vec<Option<u32>>, f64, usize, usize) {
    let n = types.len();
    let mut groups: HashMap<(u32, &[u32]), Vec<usize>> = HashMap::new();
    for i in 0..n {
        groups
            .entry((types[i], &codes[i * nl..(i + 1) * nl]))
            .or_default()
            .push(i);
    }
    let mut dedup = vec![None; n];
    let mut with = 0;
    let mut max_group = 1;
    for members in groups.values() {
        max_group = max_group.max(members.len());
        if members.len() > 1 {
            with += members.len();
            for (j, &i) in members.iter().enumerate() {
                dedup[i] = Some(j as u32);
            }
        }
    }
    let rate = 1.0 - groups.len() as f64 / n as f64;
    (dedup, rate, with, max_group)
}

/// Fan-out at each depth of the (type-scoped) code prefix tree.
fn fanout(types: &[u32], codes: &[u32], nl: usize) -> Vec<FanOut> {
    (0..nl)
        .map(|depth| {
            let mut children: HashMap<(u32, &[u32]), std::collections::HashSet<u32>> =
                HashMap::new();
            for (i, &t) in types.iter().enumerate() {
                let row = &codes[i * nl..(i + 1) * nl];
                children
                    .entry((t, &row[..depth]))
                    .or_default()
                    .insert(row[depth]);
            }
            let max = children.values().map(|s| s.len()).max().unwrap_or(0);
            let mean = children.values().map(|s| s.len()).sum::<usize>() as f64
                / children.len().max(1) as f64;
            FanOut { depth, max, mean }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn data(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Clustered data: 20 centres, items near them.
        let centres: Vec<f32> = (0..20 * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        (0..n)
            .flat_map(|i| {
                let c = i % 20;
                (0..d)
                    .map(|t| centres[c * d + t] + rng.gen_range(-0.05..0.05))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn cfg(assign: Assign) -> QuantizeConfig {
        QuantizeConfig {
            levels: vec![8, 8, 4],
            iters: 10,
            assign,
            ..Default::default()
        }
    }

    #[test]
    fn mse_falls_with_each_level() {
        let x = data(2000, 16, 1);
        let q = quantize(Rows::new(&x, 2000, 16), &vec![0; 2000], &cfg(Assign::Plain)).unwrap();
        let m: Vec<f64> = q.report.levels.iter().map(|l| l.mse).collect();
        assert!(m[0] > m[1] && m[1] > m[2], "{m:?}");
        assert_eq!(q.codes.len(), 2000 * 3);
    }

    #[test]
    fn sids_are_unique_after_dedup() {
        let x = data(3000, 8, 2);
        let types: Vec<u32> = (0..3000).map(|i| (i % 3) as u32).collect();
        for a in [Assign::Plain, Assign::Balanced] {
            let q = quantize(Rows::new(&x, 3000, 8), &types, &cfg(a)).unwrap();
            let mut seen = std::collections::HashSet::new();
            for (i, t) in types.iter().enumerate() {
                assert!(seen.insert((*t, q.item_codes(i).to_vec(), q.dedup[i])));
            }
        }
    }

    #[test]
    fn balanced_reduces_collisions() {
        let x = data(3000, 8, 3);
        let t = vec![0; 3000];
        let p = quantize(Rows::new(&x, 3000, 8), &t, &cfg(Assign::Plain)).unwrap();
        let b = quantize(Rows::new(&x, 3000, 8), &t, &cfg(Assign::Balanced)).unwrap();
        assert!(
            b.report.collision_rate < p.report.collision_rate,
            "balanced {} plain {}",
            b.report.collision_rate,
            p.report.collision_rate
        );
    }

    #[test]
    fn capacity_is_respected() {
        let x = data(1000, 4, 4);
        let r = Rows::new(&x, 1000, 4);
        let c = kmeans::fit(
            r,
            &KMeansConfig {
                k: 10,
                ..Default::default()
            },
            None,
        );
        let labels = capacity_assign(r, c.rows(), &vec![0; 1000], 100, None);
        let mut counts = [0; 10];
        labels.iter().for_each(|&l| counts[l as usize] += 1);
        assert!(counts.iter().all(|&c| c == 100), "{counts:?}");
    }

    #[test]
    fn config_errors() {
        let x = vec![0.0f32; 8];
        let r = Rows::new(&x, 2, 4);
        let mut c = cfg(Assign::Plain);
        c.levels = vec![];
        assert!(matches!(
            quantize(r, &[0, 0], &c),
            Err(QuantizeError::NoLevels)
        ));
        c.levels = vec![1];
        assert!(quantize(r, &[0, 0], &c).is_err());
        c.levels = vec![4];
        assert!(matches!(
            quantize(r, &[0], &c),
            Err(QuantizeError::TypeCount { .. })
        ));
    }
}
