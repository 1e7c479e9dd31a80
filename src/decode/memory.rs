//! A distribution over items as a [`LogitSource`] over the catalog trie.
//!
//! [`crate::memory::TransitionMemory`] gives a history a distribution over items; to mix
//! it with the decoder's ([`super::mixture`]) it must answer what the decoder answers:
//! the next token's distribution after a SID prefix. That is `p(child) / p(node)`, the
//! mass of the items under each child over the mass under the prefix, computed from the
//! items' leaf ranks (the items under a trie node are one contiguous range of them) by
//! binary search over the distribution's support. Tokens outside the trie get `-inf`;
//! a prefix with no mass gives a row of `-inf`, which the mixture reads as "this
//! component has nothing here" (its posterior weight is zero from then on).

use super::{DecodeError, LogitSource};
use crate::trie::{ItemIdx, NodeId, Trie};

/// An item distribution as next-token log-probabilities over the trie.
pub struct MemorySource<'a> {
    trie: &'a Trie,
    token_offset: u32,
    vocab: usize,
    /// Leaf ranks of the support, ascending.
    ranks: Vec<u32>,
    /// `cum[i]`: the mass of the first `i` support items in rank order.
    cum: Vec<f64>,
    /// The trie node each live row stands at.
    rows: Vec<NodeId>,
}

impl<'a> MemorySource<'a> {
    /// `dist`: `(item, probability)`; items the trie does not hold are an error. Rows
    /// start at the trie root: the prompt passed to [`LogitSource::prefill`] is not read
    /// (the distribution already is the answer to it).
    pub fn new(
        trie: &'a Trie,
        token_offset: u32,
        vocab: usize,
        dist: &[(ItemIdx, f32)],
    ) -> Result<Self, DecodeError> {
        let mut by_rank = Vec::with_capacity(dist.len());
        for &(item, p) in dist {
            let rank = trie.rank(item).ok_or_else(|| {
                DecodeError::Invalid(format!("memory item {item} is not in the trie"))
            })?;
            if !(p.is_finite() && p >= 0.0) {
                return Err(DecodeError::Invalid(format!(
                    "memory probability {p} of item {item} is not a probability"
                )));
            }
            by_rank.push((rank, p as f64));
        }
        by_rank.sort_unstable_by_key(|&(r, _)| r);
        let mut cum = Vec::with_capacity(by_rank.len() + 1);
        cum.push(0.0);
        for &(_, p) in &by_rank {
            cum.push(cum.last().copied().unwrap_or(0.0) + p);
        }
        Ok(MemorySource {
            trie,
            token_offset,
            vocab,
            ranks: by_rank.into_iter().map(|(r, _)| r).collect(),
            cum,
            rows: Vec::new(),
        })
    }

    /// The mass of the items under `node`.
    fn mass(&self, node: NodeId) -> f64 {
        let r = self.trie.leaf_range(node);
        let lo = self.ranks.partition_point(|&x| x < r.start);
        let hi = self.ranks.partition_point(|&x| x < r.end);
        self.cum[hi] - self.cum[lo]
    }

    /// Log mass of each child of each live row; `-inf` elsewhere.
    fn logits(&self) -> Result<Vec<f32>, DecodeError> {
        let v = self.vocab;
        let mut out = vec![f32::NEG_INFINITY; self.rows.len() * v];
        for (r, &node) in self.rows.iter().enumerate() {
            let tokens = self.trie.children(node);
            let nodes = self.trie.child_nodes(node);
            for (&tok, &child) in tokens.iter().zip(nodes) {
                let t = (tok + self.token_offset) as usize;
                if t >= v {
                    return Err(DecodeError::Invalid(format!(
                        "SID token {t} is outside the vocabulary of {v}"
                    )));
                }
                let m = self.mass(child);
                if m > 0.0 {
                    out[r * v + t] = m.ln() as f32;
                }
            }
        }
        Ok(out)
    }
}

impl LogitSource for MemorySource<'_> {
    fn prefill(&mut self, _prompt: &[u32]) -> Result<Vec<f32>, DecodeError> {
        self.rows = vec![self.trie.root()];
        self.logits()
    }

    fn extend(&mut self, parents: &[u32], tokens: &[u32]) -> Result<Vec<f32>, DecodeError> {
        let mut next = Vec::with_capacity(parents.len());
        for (&p, &t) in parents.iter().zip(tokens) {
            let node = self.rows.get(p as usize).copied().ok_or_else(|| {
                DecodeError::Invalid(format!("row {p} out of range ({} rows)", self.rows.len()))
            })?;
            let child = t
                .checked_sub(self.token_offset)
                .and_then(|tok| self.trie.child(node, tok))
                .ok_or_else(|| {
                    DecodeError::Invalid(format!("token {t} does not continue a SID here"))
                })?;
            next.push(child);
        }
        self.rows = next;
        self.logits()
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }
}
