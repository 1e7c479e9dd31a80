//! Beam search over the catalog trie: the top-k distinct items for a prompt.
//!
//! Every beam is a trie node (a SID prefix). At each step only the children of each beam
//! that lead to an allowed item are scored (their logits gathered from the row, minus the
//! row's log-partition: full-softmax log-probabilities); the best `beams` candidates over
//! all beams survive, the ones that complete an item leave the beam as results. Items are
//! distinct by construction (one leaf per item, and beams are distinct prefixes). Since a
//! log-probability only falls as tokens are added, the search stops as soon as `k` items
//! are found and no live beam can beat the k-th.

use super::{logsumexp, DecodeError, LogitSource};
use crate::trie::{ItemIdx, Mask, NodeId, TokenId, Trie};

/// Beam search settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BeamConfig {
    /// Items to return.
    pub k: usize,
    /// Beam width; raised to `k` when smaller (fewer beams could not hold `k` items).
    pub beams: usize,
}

impl Default for BeamConfig {
    fn default() -> Self {
        BeamConfig { k: 10, beams: 20 }
    }
}

/// A returned item.
#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    pub item: ItemIdx,
    /// `log p(SID tokens | prompt)` under the model, summed over the SID's tokens.
    pub score: f32,
    /// The SID's tokens (trie token ids).
    pub path: Vec<TokenId>,
}

struct Beam {
    node: NodeId,
    score: f32,
    path: Vec<TokenId>,
}

/// The top `cfg.k` items allowed by `mask` after `prompt`, best first (ties by trie
/// order). Trie token `t` is model token `t + token_offset`.
///
/// Errors: [`DecodeError::NothingAllowed`] when the mask allows no item; fewer than `k`
/// hits only when fewer items are allowed. Beams never reach a dead end (the mask is
/// consulted for every child), so [`DecodeError::DeadEnd`] means an inconsistent trie.
pub fn beam_search(
    src: &mut dyn LogitSource,
    trie: &Trie,
    mask: &Mask,
    token_offset: u32,
    prompt: &[u32],
    cfg: BeamConfig,
) -> Result<Vec<Hit>, DecodeError> {
    beam_search_from(src, trie, mask, token_offset, prompt, &[], cfg)
}

/// [`beam_search`] for items under a given SID prefix (trie tokens, e.g. a type token
/// and a first-level code: "more from this cluster"). The prefix is appended to the
/// prompt. A prefix that is not in the trie, or under which the mask allows nothing, is
/// [`DecodeError::DeadEnd`]: the search never falls back to other items.
pub fn beam_search_from(
    src: &mut dyn LogitSource,
    trie: &Trie,
    mask: &Mask,
    token_offset: u32,
    prompt: &[u32],
    prefix: &[TokenId],
    cfg: BeamConfig,
) -> Result<Vec<Hit>, DecodeError> {
    let dead = || DecodeError::DeadEnd {
        prefix: prefix.to_vec(),
    };
    let start = trie.walk(prefix).ok_or_else(dead)?;
    if !prefix.is_empty() && (!mask.allows_node(trie, start) || trie.item(start).is_some()) {
        return Err(dead());
    }
    if mask.allowed_items() == 0 {
        return Err(DecodeError::NothingAllowed("every item is excluded".into()));
    }
    if cfg.k == 0 {
        return Ok(Vec::new());
    }
    let width = cfg.beams.max(cfg.k);
    let vocab = src.vocab_size();
    let full: Vec<u32> = prompt
        .iter()
        .copied()
        .chain(prefix.iter().map(|&t| t + token_offset))
        .collect();
    let mut logits = src.prefill(&full)?;
    let mut beams = vec![Beam {
        node: start,
        score: 0.0,
        path: prefix.to_vec(),
    }];
    let mut hits: Vec<Hit> = Vec::new();
    let mut children = Vec::new();
    // (score, beam, token, child)
    let mut cands: Vec<(f32, u32, TokenId, NodeId)> = Vec::new();
    loop {
        cands.clear();
        for (b, beam) in beams.iter().enumerate() {
            let row = &logits[b * vocab..(b + 1) * vocab];
            let lse = logsumexp(row);
            trie.allowed_children(beam.node, mask, &mut children);
            if children.is_empty() {
                return Err(DecodeError::DeadEnd {
                    prefix: beam.path.clone(),
                });
            }
            for &(tok, child) in &children {
                let Some(&logit) = row.get((tok + token_offset) as usize) else {
                    return Err(DecodeError::Invalid(format!(
                        "SID token {} is outside the model's vocabulary of {vocab}",
                        tok + token_offset
                    )));
                };
                let lp = logit - lse;
                cands.push((beam.score + lp, b as u32, tok, child));
            }
        }
        // Best first; ties broken by beam then token, so results are deterministic.
        let order = |a: &(f32, u32, TokenId, NodeId), b: &(f32, u32, TokenId, NodeId)| {
            b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
        };
        if cands.len() > width {
            cands.select_nth_unstable_by(width - 1, order);
            cands.truncate(width);
        }
        cands.sort_by(order);
        let mut next = Vec::with_capacity(width);
        let mut parents = Vec::with_capacity(width);
        let mut tokens = Vec::with_capacity(width);
        for &(score, b, tok, child) in &cands {
            let mut path = beams[b as usize].path.clone();
            path.push(tok);
            match trie.item(child) {
                Some(item) => hits.push(Hit { item, score, path }),
                None => {
                    parents.push(b);
                    tokens.push(tok + token_offset);
                    next.push(Beam {
                        node: child,
                        score,
                        path,
                    });
                }
            }
        }
        hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.path.cmp(&b.path)));
        hits.truncate(cfg.k);
        let kth = if hits.len() == cfg.k {
            hits[cfg.k - 1].score
        } else {
            f32::NEG_INFINITY
        };
        // Scores only fall as tokens are added: a beam below the k-th hit cannot enter.
        let live: Vec<usize> = (0..next.len()).filter(|&i| next[i].score > kth).collect();
        if live.is_empty() {
            break;
        }
        let parents: Vec<u32> = live.iter().map(|&i| parents[i]).collect();
        let tokens: Vec<u32> = live.iter().map(|&i| tokens[i]).collect();
        let mut keep: Vec<Option<Beam>> = next.into_iter().map(Some).collect();
        beams = live
            .iter()
            .map(|&i| keep[i].take().expect("once"))
            .collect();
        logits = src.extend(&parents, &tokens)?;
    }
    Ok(hits)
}
