//! A transition memory: what followed each item, a few positions on, in the training
//! sequences.
//!
//! A small decoder trained for an hour recalls the transitions it saw about as often as a
//! count table does only at the price of generalising worse to the ones it did not see
//! (docs/lab/amazon-recipes.md). A memory recalls every training transition exactly and costs
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
        settings.check()?;
        let counts = crate::interactions::windowed_successors(sequences, n_items, settings.window)
            .map_err(|bad| {
                MemoryError::Settings(format!(
                    "item index {bad} is outside the catalog of {n_items}"
                ))
            })?;
        let successors = counts
            .into_iter()
            .map(|c| {
                let total: f64 = c.values().sum();
                // In index order: the map is ordered.
                c.into_iter()
                    .map(|(b, w)| (b, (w / total) as f32))
                    .collect()
            })
            .collect();
        Ok(TransitionMemory {
            settings,
            successors,
        })
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
        let mut scores: HashMap<ItemIdx, f64> = HashMap::new();
        let mut weight = 1.0f64;
        for &h in history.iter().rev().take(self.settings.recent) {
            for &(b, w) in self.successors(h) {
                *scores.entry(b).or_default() += weight * w as f64;
            }
            weight *= self.settings.decay as f64;
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
