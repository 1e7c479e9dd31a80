//! Soft targets: the transition memory as a teacher for every next item the model writes.
//!
//! Why: a training example shows one next item after a history, while the training parts
//! as a whole know the distribution of what follows its recent items (decayed successor
//! counts of its last few items, [`TransitionMemory`]). That distribution ranks held-out
//! items better than any single observed successor does (docs/evaluation.md: the memory
//! alone beats first-order Markov by 11% on Amazon), and a small decoder recalls a
//! transition it saw once or twice far less surely than counts do. So wherever the model
//! predicts an item, a share of the target is the memory's distribution for the items
//! it has read so far in the same example, the rest the item that came: every time an
//! item is the recent context, every one of its successors is taught, not only the one
//! this user took (distillation, with the counts as the teacher).
//!
//! The teacher speaks items; the model speaks SID tokens one code at a time. At code
//! level `l`, with the observed item's first `l` tokens as the prefix (teacher forcing),
//! the soft target is the teacher's mass below each child of that prefix, renormalised:
//! the teacher's distribution of the next code given the same prefix. Where the teacher
//! has no mass below the prefix, the observed token keeps the whole target. Everything
//! else (text, separators, the end token) keeps its one-hot target.
//!
//! The memory is counted from the training parts only (as `transitions.json` is), so the
//! validation and test items stay unseen.

use candle_core::Tensor;

use crate::memory::{Distribution, TransitionMemory};
use crate::model::items::ItemKeys;
use crate::model::ops;
use crate::trie::{ItemIdx, NodeId, TokenId};

/// Sparse per-position targets: position `i` has `tokens[offsets[i]..offsets[i + 1]]`
/// with the same range of `weights` (what [`ops::soft_nll`] takes).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Targets {
    pub offsets: Vec<usize>,
    pub tokens: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Targets {
    fn new() -> Self {
        Targets {
            offsets: vec![0],
            ..Targets::default()
        }
    }

    fn push(&mut self, token: u32, weight: f32) {
        self.tokens.push(token);
        self.weights.push(weight);
    }

    fn end_position(&mut self) {
        self.offsets.push(self.tokens.len());
    }

    /// The plain one-hot targets of a batch, weighted as
    /// [`crate::model::llama::masked_cross_entropy`] weighs them (the mask over its sum):
    /// `targets` `[b, t]` u32, `loss_mask` `[b, t]` f32; a masked position has none.
    pub fn one_hot(targets: &Tensor, loss_mask: &Tensor) -> Result<Self, SoftError> {
        if targets.dims() != loss_mask.dims() {
            return Err(SoftError::Shape(format!(
                "targets {:?} and loss mask {:?}",
                targets.dims(),
                loss_mask.dims()
            )));
        }
        let ids = targets.flatten_all()?.to_vec1::<u32>()?;
        let mask = loss_mask
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let scale = 1.0 / mask.iter().sum::<f32>().max(1.0);
        let mut out = Targets::new();
        for (&id, &m) in ids.iter().zip(&mask) {
            if m != 0.0 {
                out.push(id, m * scale);
            }
            out.end_position();
        }
        Ok(out)
    }

    /// The positions with at least one target: the only ones a loss over these targets
    /// reads (the rest contribute nothing, forward or backward).
    pub fn positions(&self) -> Vec<u32> {
        self.offsets
            .windows(2)
            .enumerate()
            .filter(|(_, w)| w[0] < w[1])
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// These targets at `positions` only, in that order (each must be below the number
    /// of positions).
    pub fn select(&self, positions: &[u32]) -> Targets {
        let mut out = Targets::new();
        for &p in positions {
            let r = self.offsets[p as usize]..self.offsets[p as usize + 1];
            out.tokens.extend_from_slice(&self.tokens[r.clone()]);
            out.weights.extend_from_slice(&self.weights[r]);
            out.end_position();
        }
        out
    }

    /// The cross-entropy against these targets with logits projected only where there
    /// are targets: `project` gets those flat positions and returns their logits
    /// `[positions, vocab]` (e.g. [`crate::model::llama::Llama::forward_train_rows`]).
    /// Equal to [`ops::soft_nll`] over every position's logits, for the cost of the
    /// scored ones.
    pub fn scored_loss(
        &self,
        project: impl FnOnce(&[u32]) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let mut rows = self.positions();
        if rows.is_empty() {
            // Nothing scored: one position without targets keeps the loss (0) a function
            // of the weights.
            rows.push(0);
        }
        let logits = project(&rows)?;
        let picked = self.select(&rows);
        ops::soft_nll(&logits, &picked.offsets, &picked.tokens, &picked.weights)
    }
}

/// The teacher and how much of each item target it gets.
#[derive(Clone, Debug)]
pub struct SoftTargets {
    /// The catalog's SID trie and where the SID tokens sit in the vocabulary.
    keys: ItemKeys,
    memory: TransitionMemory,
    /// Share of an item target given to the teacher, in `[0, 1]`.
    share: f32,
}

/// Errors building soft targets.
#[derive(Debug, thiserror::Error)]
pub enum SoftError {
    #[error("the teacher's share must be in [0, 1], got {0}")]
    Share(f32),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("soft targets: {0}")]
    Shape(String),
}

/// Where a row stands while [`SoftTargets::row`] reads it.
struct Reading {
    /// Items read so far in this example, oldest first.
    items: Vec<ItemIdx>,
    /// The SID being written: its trie node and how many of its tokens are read.
    open: Option<(NodeId, usize)>,
    /// The teacher's distribution for the next item (from `items`; empty before the
    /// first one).
    teacher: Distribution,
}

impl SoftTargets {
    /// `keys` over the same catalog as `memory` indexes.
    pub fn new(keys: ItemKeys, memory: TransitionMemory, share: f32) -> Result<Self, SoftError> {
        if !(0.0..=1.0).contains(&share) {
            return Err(SoftError::Share(share));
        }
        Ok(SoftTargets {
            keys,
            memory,
            share,
        })
    }

    /// Appends the targets of one example's positions: `input[i]` is read and
    /// `targets[i]` predicted at weight `mask[i]` (0: not scored, no targets).
    pub fn row(&self, input: &[u32], targets: &[u32], mask: &[f32], out: &mut Targets) {
        let mut st = Reading {
            items: Vec::new(),
            open: None,
            teacher: Vec::new(),
        };
        for ((&x, &y), &w) in input.iter().zip(targets).zip(mask) {
            self.read(&mut st, x);
            if w != 0.0 {
                self.position(&st, y, w, out);
            }
            out.end_position();
        }
    }

    /// Advances the reading state by one input token.
    fn read(&self, st: &mut Reading, token: u32) {
        let Some(local) = self.keys.local(token) else {
            st.open = None;
            return;
        };
        let trie = self.keys.trie();
        if self.keys.is_type(local) {
            st.open = trie.child(trie.root(), local).map(|node| (node, 1));
            return;
        }
        st.open = st
            .open
            .and_then(|(node, depth)| Some((trie.child(node, local)?, depth + 1)));
        if let Some(item) = st.open.and_then(|(node, _)| trie.item(node)) {
            // An item is complete: the teacher is asked once for what may follow it.
            st.items.push(item);
            st.open = None;
            if self.share > 0.0 {
                st.teacher = self.memory.distribution(&st.items);
            }
        }
    }

    /// The targets of one position that predicts `target` at weight `w`.
    fn position(&self, st: &Reading, target: u32, w: f32, out: &mut Targets) {
        // The prefix the next token continues: the open SID's, or the root when the
        // target starts a new SID (a type token).
        let prefix = match (st.open, self.keys.local(target)) {
            (Some((node, depth)), Some(_)) => Some((node, depth)),
            (None, Some(l)) if self.keys.is_type(l) => Some((self.keys.trie().root(), 0)),
            _ => None,
        };
        let teacher = match prefix {
            Some((node, depth)) if self.share > 0.0 && !st.teacher.is_empty() => {
                self.next_tokens(&st.teacher, node, depth)
            }
            _ => Vec::new(),
        };
        if teacher.is_empty() {
            out.push(target, w);
            return;
        }
        out.push(target, w * (1.0 - self.share));
        for (local, p) in teacher {
            out.push(self.keys.token(local), w * self.share * p);
        }
    }

    /// The teacher's distribution of the token after the prefix at `node` (`depth`
    /// tokens deep): its mass below each child, renormalised; empty when it has none
    /// below the prefix.
    fn next_tokens(
        &self,
        teacher: &Distribution,
        node: NodeId,
        depth: usize,
    ) -> Vec<(TokenId, f32)> {
        let mut mass: Vec<(TokenId, f64)> = Vec::new();
        // Items below the prefix are a contiguous run of trie order.
        let below = self.keys.trie().leaf_range(node);
        for &(item, p) in teacher {
            if !self
                .keys
                .trie()
                .rank(item)
                .is_some_and(|r| below.contains(&r))
            {
                continue;
            }
            let Some(next) = self.keys.trie().path(item).and_then(|path| path.get(depth)) else {
                continue;
            };
            match mass.iter_mut().find(|(t, _)| t == next) {
                Some(e) => e.1 += f64::from(p),
                None => mass.push((*next, f64::from(p))),
            }
        }
        let total: f64 = mass.iter().map(|(_, m)| m).sum();
        if total <= 0.0 {
            return Vec::new();
        }
        mass.into_iter()
            .map(|(t, m)| (t, (m / total) as f32))
            .collect()
    }

    /// Mean cross-entropy of a batch against the soft targets, weighted as
    /// [`crate::model::llama::masked_cross_entropy`] weighs the one-hot ones (so with a
    /// share of 0 the two agree): `logits` `[b, t, V]`, `input`, `targets` `[b, t]` u32,
    /// `loss_mask` `[b, t]` f32.
    pub fn loss(
        &self,
        logits: &Tensor,
        input: &Tensor,
        targets: &Tensor,
        loss_mask: &Tensor,
    ) -> Result<Tensor, SoftError> {
        let (b, t, v) = logits.dims3()?;
        if input.dims() != [b, t] {
            return Err(SoftError::Shape(format!(
                "logits for {b} rows of {t}, inputs {:?}",
                input.dims()
            )));
        }
        let out = self.targets(input, targets, loss_mask)?;
        Ok(ops::soft_nll(
            &logits.reshape((b * t, v))?,
            &out.offsets,
            &out.tokens,
            &out.weights,
        )?)
    }

    /// The targets [`SoftTargets::loss`] trains towards, per position of the batch
    /// (row-major): `input`, `targets` `[b, t]` u32, `loss_mask` `[b, t]` f32.
    pub fn targets(
        &self,
        input: &Tensor,
        targets: &Tensor,
        loss_mask: &Tensor,
    ) -> Result<Targets, SoftError> {
        let (b, t) = input.dims2()?;
        let input = input.to_vec2::<u32>()?;
        let target_rows = targets.to_vec2::<u32>()?;
        let mask = loss_mask.to_vec2::<f32>()?;
        if target_rows.len() != b || mask.len() != b {
            return Err(SoftError::Shape(format!(
                "inputs for {b} rows, targets and masks for {} and {}",
                target_rows.len(),
                mask.len()
            )));
        }
        let count: f32 = mask.iter().flatten().sum();
        let scale = 1.0 / count.max(1.0);
        let mut out = Targets::new();
        for r in 0..b {
            let w: Vec<f32> = mask[r].iter().map(|m| m * scale).collect();
            if input[r].len() != t || target_rows[r].len() != t || w.len() != t {
                return Err(SoftError::Shape(format!(
                    "row {r} is not {t} positions long"
                )));
            }
            self.row(&input[r], &target_rows[r], &w, &mut out);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemorySettings;
    use crate::trie::Trie;

    /// One type (local 0), codes 1..=4, offset 100; items: 0 = [0, 1, 3], 1 = [0, 1, 4],
    /// 2 = [0, 2, 3].
    fn soft(sequences: &[Vec<ItemIdx>], share: f32) -> SoftTargets {
        let trie = Trie::build(vec![
            (vec![0, 1, 3], 0),
            (vec![0, 1, 4], 1),
            (vec![0, 2, 3], 2),
        ])
        .expect("trie");
        let settings = MemorySettings {
            window: 1,
            recent: 1,
            decay: 0.5,
        };
        let memory = TransitionMemory::build(3, sequences, settings).expect("memory");
        SoftTargets::new(ItemKeys::new(trie, 100, 5, 1), memory, share).expect("soft")
    }

    fn rows(t: &Targets) -> Vec<Vec<(u32, f32)>> {
        t.offsets
            .windows(2)
            .map(|w| (w[0]..w[1]).map(|k| (t.tokens[k], t.weights[k])).collect())
            .collect()
    }

    fn close(a: &[(u32, f32)], b: &[(u32, f32)]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.0 == y.0 && (x.1 - y.1).abs() < 1e-6)
    }

    #[test]
    fn item_codes_get_the_teachers_next_code_distribution_given_the_prefix() {
        // Item 0 was followed by item 1 three times and by item 2 once.
        let s = soft(&[vec![0, 1], vec![0, 1], vec![0, 1], vec![0, 2]], 0.5);
        // Tokens: text 7, item 0 (100 101 103), text 9, item 1 (100 101 104), text 8.
        let seq = [7u32, 100, 101, 103, 9, 100, 101, 104, 8];
        let (input, targets) = (&seq[..seq.len() - 1], &seq[1..]);
        let mask = [1f32; 8];
        let mut out = Targets::new();
        s.row(input, targets, &mask, &mut out);
        let got = rows(&out);
        // The first item has nothing before it: one-hot targets throughout.
        assert_eq!(got[0], vec![(100, 1.0)]);
        assert_eq!(got[1], vec![(101, 1.0)]);
        assert_eq!(got[2], vec![(103, 1.0)]);
        assert_eq!(got[3], vec![(9, 1.0)]);
        // The second item's type token: the teacher has all its mass under type 0.
        assert!(close(&got[4], &[(100, 0.5), (100, 0.5)]));
        // First code: 3/4 under code 1 (item 1), 1/4 under code 2 (item 2).
        assert!(close(&got[5], &[(101, 0.5), (101, 0.375), (102, 0.125)]));
        // Second code given the observed prefix [0, 1]: only item 1 is below it.
        assert!(close(&got[6], &[(104, 0.5), (104, 0.5)]));
        // Text after the item keeps its one-hot target.
        assert_eq!(got[7], vec![(8, 1.0)]);
    }

    #[test]
    fn no_mass_below_the_prefix_and_share_zero_leave_one_hot_targets() {
        // Item 0 was only ever followed by item 2 (prefix [0, 2]).
        let s = soft(&[vec![0, 2]], 0.5);
        let seq = [100u32, 101, 103, 100, 101, 104];
        let mut out = Targets::new();
        s.row(&seq[..5], &seq[1..], &[1.0; 5], &mut out);
        let got = rows(&out);
        // First code: the teacher says code 2 (the observed is code 1).
        assert!(close(&got[3], &[(101, 0.5), (102, 0.5)]));
        // Second code under the observed prefix [0, 1]: the teacher has nothing there.
        assert_eq!(got[4], vec![(104, 1.0)]);
        // Masked positions get no targets at all.
        let mut out = Targets::new();
        s.row(&seq[..5], &seq[1..], &[0.0, 0.0, 0.0, 0.0, 2.0], &mut out);
        assert_eq!(out.offsets, vec![0, 0, 0, 0, 0, 1]);
        // A share of 0 is the plain cross-entropy's targets.
        let plain = soft(&[vec![0, 2]], 0.0);
        let mut out = Targets::new();
        plain.row(&seq[..5], &seq[1..], &[1.0; 5], &mut out);
        assert_eq!(out.tokens, seq[1..].to_vec());
        assert!(SoftTargets::new(
            ItemKeys::new(Trie::build(vec![(vec![0], 0)]).unwrap(), 0, 1, 1),
            TransitionMemory::build(1, &[], MemorySettings::default()).unwrap(),
            1.5
        )
        .is_err());
    }

    #[test]
    fn share_zero_loss_equals_masked_cross_entropy() {
        use candle_core::Device;
        let s = soft(&[vec![0, 1], vec![0, 2]], 0.0);
        let taught = soft(&[vec![0, 1], vec![0, 2]], 0.5);
        let dev = Device::Cpu;
        let seq = [100u32, 101, 103, 100, 101, 104, 7];
        let input = Tensor::from_slice(&seq[..6], (1, 6), &dev).unwrap();
        let targets = Tensor::from_slice(&seq[1..], (1, 6), &dev).unwrap();
        let mask = Tensor::from_slice(&[0f32, 1.0, 1.0, 1.0, 1.0, 1.0], (1, 6), &dev).unwrap();
        let logits = Tensor::randn(0f32, 1.0, (1, 6, 110), &dev).unwrap();
        let ours = s.loss(&logits, &input, &targets, &mask).unwrap();
        let plain = crate::model::llama::masked_cross_entropy(&logits, &targets, &mask).unwrap();
        let (a, b) = (
            ours.to_scalar::<f32>().unwrap(),
            plain.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        // The teacher changes the loss (it spreads item 1's first code over item 2's).
        let c = taught
            .loss(&logits, &input, &targets, &mask)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((c - a).abs() > 1e-4);
    }

    #[test]
    fn one_hot_targets_select_and_score_only_their_positions() {
        use candle_core::Device;
        let dev = Device::Cpu;
        let ids = Tensor::new(&[[5u32, 6, 7], [8, 9, 1]], &dev).unwrap();
        let mask = Tensor::new(&[[0f32, 1.0, 1.0], [1.0, 0.0, 0.0]], &dev).unwrap();
        let t = Targets::one_hot(&ids, &mask).unwrap();
        assert_eq!(t.offsets, vec![0, 0, 1, 2, 3, 3, 3]);
        assert_eq!(t.tokens, vec![6, 7, 8]);
        assert!(t.weights.iter().all(|&w| (w - 1.0 / 3.0).abs() < 1e-7));
        assert_eq!(t.positions(), vec![1, 2, 3]);
        let s = t.select(&[3, 1]);
        assert_eq!((s.offsets, s.tokens), (vec![0, 1, 2], vec![8, 6]));
        // The scored loss reads the logits of the scored positions only, in their order.
        let logits = Tensor::randn(0f32, 1.0, (6, 10), &dev).unwrap();
        let full = ops::soft_nll(&logits, &t.offsets, &t.tokens, &t.weights).unwrap();
        let scored = t
            .scored_loss(|rows| {
                assert_eq!(rows, &[1, 2, 3]);
                logits.index_select(&Tensor::new(rows, &dev).unwrap(), 0)
            })
            .unwrap();
        let (a, b) = (
            full.to_scalar::<f32>().unwrap(),
            scored.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        // Nothing scored: one position is projected and the loss is 0.
        let none = Targets::one_hot(&ids, &mask.zeros_like().unwrap()).unwrap();
        let zero = none
            .scored_loss(|rows| {
                assert_eq!(rows, &[0]);
                logits.narrow(0, 0, 1)
            })
            .unwrap();
        assert_eq!(zero.to_scalar::<f32>().unwrap(), 0.0);
        assert!(Targets::one_hot(&ids, &mask.narrow(1, 0, 2).unwrap()).is_err());
    }
}
