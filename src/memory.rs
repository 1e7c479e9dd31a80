//! A transition memory: what followed each item, a few positions on, in the training
//! sequences.
//!
//! A small decoder trained for an hour recalls the transitions it saw about as often as a
//! count table does only at the price of generalising worse to the ones it did not see
//! (README, Evaluation). A memory recalls every training transition exactly and costs
//! nothing to train, as a nearest-neighbour memory does for a language model: the
//! decoder's distribution and the memory's are mixed token by token
//! ([`crate::decode::MemorySource`]), so every score stays a log-probability and beam search
//! over the trie is unchanged.
//!
//! The memory's distribution for a history is decayed co-occurrence counts: item `b`
//! scores `Σ_k decay^k · c(h_k → b)` over the `recent` most recent history items `h_k`
//! (`k = 0` the last), where `c(a → b)` counts `b` at `1 / d` when it came `d ≤ window`
//! positions after `a`, normalised per `a`. It is built from the training parts only, so
//! it sees what the decoder saw and nothing of the validation or test items.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::trie::ItemIdx;

/// The file a model directory keeps its memory in (`sidrec train` writes it).
pub const MEMORY_FILE: &str = "transitions.json";

/// Positions after an item whose items count as its successors (at weight `1/d`).
pub const DEFAULT_WINDOW: usize = 3;
/// History items, most recent first, whose successors are asked.
pub const DEFAULT_RECENT: usize = 5;
/// Weight of the k-th most recent item's successors: `decay^k`.
pub const DEFAULT_DECAY: f32 = 0.3;

/// `(item, probability)` by item index, summing to one.
pub type Distribution = Vec<(ItemIdx, f32)>;

/// Errors reading or building a memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a transition memory: {msg}")]
    Parse { path: PathBuf, msg: String },
    #[error("{path}: item {id:?} is not in the model's catalog (was the memory built for another catalog?)")]
    UnknownItem { path: PathBuf, id: String },
    #[error("memory settings: {0}")]
    Settings(String),
}

/// How a memory counts and asks (recorded in its file).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemorySettings {
    pub window: usize,
    pub recent: usize,
    pub decay: f32,
}

impl Default for MemorySettings {
    fn default() -> Self {
        MemorySettings {
            window: DEFAULT_WINDOW,
            recent: DEFAULT_RECENT,
            decay: DEFAULT_DECAY,
        }
    }
}

impl MemorySettings {
    fn check(&self) -> Result<(), MemoryError> {
        if self.window == 0 || self.recent == 0 {
            return Err(MemoryError::Settings(format!(
                "window and recent must be at least 1, got {} and {}",
                self.window, self.recent
            )));
        }
        if !(self.decay.is_finite() && self.decay > 0.0) {
            return Err(MemoryError::Settings(format!(
                "decay must be a positive number, got {}",
                self.decay
            )));
        }
        Ok(())
    }
}

/// Successors per item, normalised to sum to one (items never followed by anything have
/// none).
#[derive(Clone, Debug, PartialEq)]
pub struct TransitionMemory {
    settings: MemorySettings,
    /// Per catalog item: `(successor, weight)`, by successor index.
    successors: Vec<Vec<(ItemIdx, f32)>>,
}

/// The file layout: ids, not catalog indices, so a memory names what it counted.
#[derive(Serialize, Deserialize)]
struct MemoryFile {
    settings: MemorySettings,
    successors: BTreeMap<String, Vec<(String, f32)>>,
}

impl TransitionMemory {
    /// Counts the successors in `sequences` (catalog indices below `n_items`, oldest
    /// first). Indices out of range are an error, not skipped.
    pub fn build(
        n_items: usize,
        sequences: &[Vec<ItemIdx>],
        settings: MemorySettings,
    ) -> Result<TransitionMemory, MemoryError> {
        Ok(TransitionCounts::build(n_items, sequences, settings)?.memory())
    }

    pub fn settings(&self) -> MemorySettings {
        self.settings
    }

    /// The successors of one item, by index.
    pub fn successors(&self, item: ItemIdx) -> &[(ItemIdx, f32)] {
        self.successors
            .get(item as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The memory's distribution for a history (oldest first): `(item, probability)` by
    /// item index, summing to one. Empty when none of the recent items was ever followed
    /// by anything: the memory then has nothing to say.
    pub fn distribution(&self, history: &[ItemIdx]) -> Distribution {
        mix_successors(history, self.settings, |h, add| {
            for &(b, w) in self.successors(h) {
                add(b, w as f64);
            }
        })
    }

    /// Writes the memory as JSON (item ids from `catalog`).
    pub fn save(&self, path: &Path, catalog: &Catalog) -> Result<(), MemoryError> {
        let id = |i: ItemIdx| catalog.items[i as usize].id.clone();
        let successors = self
            .successors
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .map(|(a, s)| {
                (
                    id(a as ItemIdx),
                    s.iter().map(|&(b, w)| (id(b), w)).collect(),
                )
            })
            .collect();
        let file = MemoryFile {
            settings: self.settings,
            successors,
        };
        let json = serde_json::to_string(&file).map_err(|e| MemoryError::Parse {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        std::fs::write(path, json + "\n").map_err(|source| MemoryError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads a memory written by [`TransitionMemory::save`] for this catalog.
    pub fn load(path: &Path, catalog: &Catalog) -> Result<TransitionMemory, MemoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| MemoryError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let file: MemoryFile = serde_json::from_str(&text).map_err(|e| MemoryError::Parse {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        file.settings.check().map_err(|e| MemoryError::Parse {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        let index = |id: &str| {
            catalog
                .index_of(id)
                .map(|i| i as ItemIdx)
                .ok_or_else(|| MemoryError::UnknownItem {
                    path: path.to_path_buf(),
                    id: id.to_string(),
                })
        };
        let mut successors = vec![Vec::new(); catalog.items.len()];
        for (a, list) in &file.successors {
            let mut v = Vec::with_capacity(list.len());
            for (b, w) in list {
                if !(w.is_finite() && *w >= 0.0) {
                    return Err(MemoryError::Parse {
                        path: path.to_path_buf(),
                        msg: format!("successor {b:?} of {a:?} has weight {w}"),
                    });
                }
                v.push((index(b)?, *w));
            }
            v.sort_unstable_by_key(|&(b, _)| b);
            successors[index(a)? as usize] = v;
        }
        Ok(TransitionMemory {
            settings: file.settings,
            successors,
        })
    }
}

/// The memory's scores for a history, `Σ_k decay^k · p(b | h_k)` over its `recent` most
/// recent items, normalised to sum to one (empty when nothing follows any of them).
/// `successors(h, add)` calls `add(b, p(b | h))` for each successor of `h`.
fn mix_successors(
    history: &[ItemIdx],
    settings: MemorySettings,
    successors: impl Fn(ItemIdx, &mut dyn FnMut(ItemIdx, f64)),
) -> Distribution {
    let mut scores: HashMap<ItemIdx, f64> = HashMap::new();
    let mut weight = 1.0f64;
    for &h in history.iter().rev().take(settings.recent) {
        successors(h, &mut |b, p| *scores.entry(b).or_default() += weight * p);
        weight *= settings.decay as f64;
    }
    let total: f64 = scores.values().sum();
    if total <= 0.0 {
        return Vec::new();
    }
    let mut out: Vec<(ItemIdx, f32)> = scores
        .into_iter()
        .map(|(b, s)| (b, (s / total) as f32))
        .collect();
    out.sort_unstable_by_key(|&(b, _)| b);
    out
}

/// The `m` most likely items of a distribution, most likely first (ties by index): the
/// candidates a hinted prompt names (`prompts/hint.txt`).
pub fn top_items(dist: &Distribution, m: usize) -> Vec<ItemIdx> {
    let mut v = dist.clone();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v.into_iter().take(m).map(|(b, _)| b).collect()
}

/// The raw successor counts a [`TransitionMemory`] is normalised from, kept so that a
/// sequence's own transitions can be left out of the memory it is asked about.
///
/// A training example whose prompt names the memory's candidates must not find its own
/// answer among them because the answer was counted from that very sequence: at
/// inference the next item was never counted. [`TransitionCounts::distribution_without`]
/// asks the memory built from every other sequence, so the model learns how far to
/// trust the candidates from what others did, as it will see them.
#[derive(Clone, Debug)]
pub struct TransitionCounts {
    settings: MemorySettings,
    /// Per item: `(successor, count)` by successor index.
    counts: Vec<BTreeMap<ItemIdx, f64>>,
    /// Per item: the sum of its counts.
    totals: Vec<f64>,
}

impl TransitionCounts {
    /// Counts the successors in `sequences` as [`TransitionMemory::build`] does.
    pub fn build(
        n_items: usize,
        sequences: &[Vec<ItemIdx>],
        settings: MemorySettings,
    ) -> Result<TransitionCounts, MemoryError> {
        settings.check()?;
        let counts = crate::interactions::windowed_successors(sequences, n_items, settings.window)
            .map_err(|bad| {
                MemoryError::Settings(format!(
                    "item index {bad} is outside the catalog of {n_items}"
                ))
            })?;
        let totals = counts.iter().map(|c| c.values().sum()).collect();
        Ok(TransitionCounts {
            settings,
            counts,
            totals,
        })
    }

    /// The normalised memory.
    pub fn memory(&self) -> TransitionMemory {
        let successors = self
            .counts
            .iter()
            .zip(&self.totals)
            .map(|(c, &total)| {
                // In index order: the map is ordered.
                c.iter().map(|(&b, &w)| (b, (w / total) as f32)).collect()
            })
            .collect();
        TransitionMemory {
            settings: self.settings,
            successors,
        }
    }

    /// One counted sequence's own counts, to leave out with
    /// [`TransitionCounts::distribution_without`] (built once per sequence, asked at each
    /// of its positions).
    pub fn own(&self, sequence: &[ItemIdx]) -> OwnCounts {
        let mut own = OwnCounts::default();
        for (i, &a) in sequence.iter().enumerate() {
            for (d, &b) in sequence[i + 1..]
                .iter()
                .take(self.settings.window)
                .enumerate()
            {
                let w = 1.0 / (d + 1) as f64;
                *own.pairs.entry((a, b)).or_default() += w;
                *own.totals.entry(a).or_default() += w;
            }
        }
        own
    }

    /// [`TransitionMemory::distribution`] of `history` under the memory built without
    /// one counted sequence ([`TransitionCounts::own`]: its counts are subtracted).
    /// Items out of range have no successors.
    pub fn distribution_without(&self, history: &[ItemIdx], own: &OwnCounts) -> Distribution {
        mix_successors(history, self.settings, |h, add| {
            let Some(counts) = self.counts.get(h as usize) else {
                return;
            };
            let total = self.totals[h as usize] - own.totals.get(&h).copied().unwrap_or(0.0);
            // Float sums: what is left of a count less itself is rounding.
            if total <= 1e-9 {
                return;
            }
            for (&b, &c) in counts {
                let left = c - own.pairs.get(&(h, b)).copied().unwrap_or(0.0);
                if left > 1e-9 {
                    add(b, left / total);
                }
            }
        })
    }
}

/// A sequence's own successor counts ([`TransitionCounts::own`]).
#[derive(Clone, Debug, Default)]
pub struct OwnCounts {
    pairs: HashMap<(ItemIdx, ItemIdx), f64>,
    totals: HashMap<ItemIdx, f64>,
}
