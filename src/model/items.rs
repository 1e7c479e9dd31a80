//! Item embeddings on the input side: one learned vector per catalog item, added to the
//! token embeddings wherever the model has just read that item's whole SID.
//!
//! Why: a SID is a few shared codes, so "this exact item" exists in the decoder only as a
//! composition of those codes. Transitions the training data shows once or twice (item
//! A, then item B) must then be memorised through weights shared by every item with the
//! same codes, and a small model recalls them poorly (docs/lab/amazon-recipes.md: where the gap
//! to Markov is). An item vector gives every item its own key at no compute cost (one
//! row gathered per item read), while the output side stays SID tokens: the trie, beam
//! search and every other part of decoding are unchanged.
//!
//! Which positions get which item is a pure function of the tokens so far
//! ([`ItemKeys::step`]), so the model computes it itself in every forward pass, for
//! training batches and for decoding, and no caller passes anything new:
//!
//! - the token that completes an item's SID (the last code) gets that item's vector;
//! - so does every later position up to and including the next item's type token: that
//!   is where the model predicts the next item's first code, and the previous item is
//!   what a transition is keyed on; the next item's codes find it there by attention
//!   (keeping it over those codes too was measured on Amazon, docs/lab/amazon-recipes.md: no steady gain);
//! - the code tokens of an item being written get none: they are not known to form an
//!   item yet, so teacher forcing cannot leak an answer into its own prediction.

use crate::trie::{NodeId, TokenId, Trie};

/// The weight name of the item table, `[items, hidden]`, in `model.safetensors`.
pub const ITEM_TABLE: &str = "model.embed_items.weight";

/// Maps token ids to item rows: the catalog's SID trie (local SID token ids) and where the
/// SID tokens sit in the model's vocabulary.
#[derive(Clone, Debug)]
pub struct ItemKeys {
    trie: Trie,
    /// Model id of SID token 0.
    offset: u32,
    /// SID tokens in the vocabulary (types first, then codes).
    sid_tokens: u32,
    /// Type tokens: local ids `0..types`.
    types: u32,
}

/// Where a sequence stands while [`ItemKeys::step`] reads it; `Default` is the start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ItemState {
    /// The trie node of the SID being read, if one is open.
    node: Option<NodeId>,
    /// Row + 1 of the last item read while it is still current, 0 for none.
    last: u32,
}

impl ItemKeys {
    /// `trie` over local SID token ids (type token first, as `SidMap` builds it), item
    /// `i` = table row `i`; SID token `j` is model token `offset + j`, `types` of the
    /// `sid_tokens` are type tokens.
    pub fn new(trie: Trie, offset: u32, sid_tokens: u32, types: u32) -> Self {
        ItemKeys {
            trie,
            offset,
            sid_tokens,
            types,
        }
    }

    /// Number of items (rows the table must have).
    pub fn len(&self) -> usize {
        self.trie.len()
    }

    pub fn is_empty(&self) -> bool {
        self.trie.is_empty()
    }

    /// The catalog's SID trie (local SID token ids).
    pub fn trie(&self) -> &Trie {
        &self.trie
    }

    /// The local SID token id of a model token, if it is a SID token.
    pub fn local(&self, token: u32) -> Option<TokenId> {
        let local = token.checked_sub(self.offset)?;
        (local < self.sid_tokens).then_some(local)
    }

    /// Whether a local SID token id is a type token (the first of every SID).
    pub fn is_type(&self, local: TokenId) -> bool {
        local < self.types
    }

    /// The model token id of a local SID token id.
    pub fn token(&self, local: TokenId) -> u32 {
        self.offset + local
    }

    /// Reads one token: returns row + 1 of the item whose vector this position gets, or 0.
    pub fn step(&self, state: &mut ItemState, token: u32) -> u32 {
        let Some(local) = self.local(token) else {
            // Text between items: the last item stays current.
            state.node = None;
            return state.last;
        };
        if self.is_type(local) {
            // A new SID starts; its type token is where the next first code is predicted.
            state.node = self.trie.child(self.trie.root(), local);
            return state.last;
        }
        state.last = 0;
        state.node = state.node.and_then(|n| self.trie.child(n, local));
        if let Some(item) = state.node.and_then(|n| self.trie.item(n)) {
            state.node = None;
            state.last = item + 1;
        }
        state.last
    }

    /// [`ItemKeys::step`] over a whole sequence from `state`.
    pub fn annotate(&self, state: &mut ItemState, tokens: &[u32]) -> Vec<u32> {
        tokens.iter().map(|&t| self.step(state, t)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two types (local 0, 1), codes 2..6; items: 0 = [0, 2, 4], 1 = [0, 2, 5], 2 = [1, 3].
    fn keys() -> ItemKeys {
        let trie = Trie::build(vec![
            (vec![0, 2, 4], 0),
            (vec![0, 2, 5], 1),
            (vec![1, 3], 2),
        ])
        .expect("trie");
        ItemKeys::new(trie, 100, 6, 2)
    }

    #[test]
    fn completed_sids_mark_their_last_code_and_what_follows() {
        let k = keys();
        let mut st = ItemState::default();
        // text, item 0, text ";", item 1's type + codes, text, item 2
        let toks = [7, 100, 102, 104, 9, 100, 102, 105, 8, 101, 103];
        let got = k.annotate(&mut st, &toks);
        assert_eq!(got, vec![0, 0, 0, 1, 1, 1, 0, 2, 2, 2, 3]);
    }

    #[test]
    fn an_open_sid_reveals_nothing_and_a_broken_one_is_no_item() {
        let k = keys();
        let mut st = ItemState::default();
        // item 2, then a type token and a code that no item continues, then a stray code
        let got = k.annotate(&mut st, &[101, 103, 100, 103, 104, 7]);
        assert_eq!(got, vec![0, 3, 3, 0, 0, 0]);
        // The state carries across calls (decoding feeds one token at a time).
        let mut st = ItemState::default();
        let mut one_by_one: Vec<u32> = Vec::new();
        for t in [100, 102, 104, 100] {
            one_by_one.extend(k.annotate(&mut st, &[t]));
        }
        assert_eq!(one_by_one, vec![0, 0, 1, 1]);
    }
}
