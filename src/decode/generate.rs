//! Mixed generation: free text, with items wherever the model opens one.
//!
//! Text is generated freely (greedy, or sampled with temperature and top-p from a seeded
//! generator). SID level tokens are never allowed in free text, and a type token only
//! when the request allows an item of that type: emitting one opens an item, and from
//! there every token is chosen among the trie children that lead to an allowed item, by
//! the same rule (greedy or sampled), until the SID is complete. Then text resumes.
//! Every item in the output therefore exists in the catalog and satisfies the request's
//! limits, and no item is named twice in one answer.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{DecodeError, LogitSource};
use crate::trie::{ItemIdx, Mask, NodeId, TokenId, Trie};

/// Generation settings.
#[derive(Clone, Debug, PartialEq)]
pub struct GenConfig {
    /// Most tokens to generate (text and SID tokens together).
    pub max_tokens: usize,
    /// 0 for greedy decoding; otherwise the softmax temperature.
    pub temperature: f32,
    /// Nucleus sampling: smallest set of tokens with this much probability (1 = all).
    pub top_p: f32,
    pub seed: u64,
    /// Tokens that end the answer (e.g. `<|im_end|>`).
    pub stop: Vec<u32>,
    /// Whether the answer may name items; `false` bans every SID token (text only).
    pub items: bool,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            max_tokens: 128,
            temperature: 0.0,
            top_p: 0.9,
            seed: 0,
            stop: Vec::new(),
            items: true,
        }
    }
}

/// A piece of generated output, before detokenization.
#[derive(Clone, Debug, PartialEq)]
pub enum Segment {
    /// Model tokens of free text.
    Text(Vec<u32>),
    /// A catalog item, with the log-probability of its SID tokens.
    Item { item: ItemIdx, score: f32 },
}

/// Generates after `prompt` until a stop token or `max_tokens`. Trie token `t` is model
/// token `t + token_offset`, and `sid_tokens` is the number of SID tokens (all model ids
/// in `token_offset..token_offset + sid_tokens` are banned in free text except allowed
/// type tokens).
pub fn generate(
    src: &mut dyn LogitSource,
    trie: &Trie,
    mask: &Mask,
    token_offset: u32,
    sid_tokens: u32,
    prompt: &[u32],
    cfg: &GenConfig,
) -> Result<Vec<Segment>, DecodeError> {
    let vocab = src.vocab_size();
    if (token_offset + sid_tokens) as usize > vocab {
        return Err(DecodeError::Invalid(format!(
            "SID tokens {token_offset}..{} do not fit the vocabulary of {vocab}",
            token_offset + sid_tokens
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut mask = mask.clone();
    let mut out: Vec<Segment> = Vec::new();
    let mut text: Vec<u32> = Vec::new();
    let mut logits = src.prefill(prompt)?;
    // Inside an item: the node reached, its log-probability, its path.
    let mut inside: Option<(NodeId, f32, Vec<TokenId>)> = None;
    let mut children = Vec::new();
    // Free text chooses among the whole vocabulary (banned tokens are at -inf).
    let all: Vec<u32> = (0..vocab as u32).collect();
    for _ in 0..cfg.max_tokens {
        let lse = super::logsumexp(&logits);
        let token = match &mut inside {
            None => {
                // Free text: ban SID tokens, then re-allow the type tokens that still
                // lead to an allowed item.
                let mut row = logits.clone();
                let sid = token_offset as usize..(token_offset + sid_tokens) as usize;
                row[sid].fill(f32::NEG_INFINITY);
                if cfg.items {
                    trie.allowed_children(trie.root(), &mask, &mut children);
                } else {
                    children.clear();
                }
                for &(tok, _) in &children {
                    let i = (tok + token_offset) as usize;
                    row[i] = logits[i];
                }
                let t = choose(&row, &all, cfg, &mut rng);
                if cfg.stop.contains(&t) {
                    break;
                }
                if let Some(&(tok, node)) =
                    children.iter().find(|&&(tok, _)| tok + token_offset == t)
                {
                    if !text.is_empty() {
                        out.push(Segment::Text(std::mem::take(&mut text)));
                    }
                    inside = Some((node, logits[t as usize] - lse, vec![tok]));
                } else {
                    text.push(t);
                }
                t
            }
            Some((node, score, path)) => {
                trie.allowed_children(*node, &mask, &mut children);
                if children.is_empty() {
                    return Err(DecodeError::DeadEnd {
                        prefix: path.clone(),
                    });
                }
                let ids: Vec<u32> = children.iter().map(|&(t, _)| t + token_offset).collect();
                let t = choose(&logits, &ids, cfg, &mut rng);
                let (tok, child) = children[ids.iter().position(|&i| i == t).unwrap_or(0)];
                *score += logits[t as usize] - lse;
                path.push(tok);
                *node = child;
                if let Some(item) = trie.item(child) {
                    out.push(Segment::Item {
                        item,
                        score: *score,
                    });
                    // Name each item once per answer.
                    mask = mask.exclude(trie, &[item]);
                    inside = None;
                }
                t
            }
        };
        logits = src.extend(&[0], &[token])?;
    }
    // A SID cut off by `max_tokens` is dropped: it names no item.
    if !text.is_empty() {
        out.push(Segment::Text(text));
    }
    Ok(out)
}

/// Picks one of `candidates` from `row` (their logits): the best when greedy, else a
/// sample from the temperature-scaled, top-p-truncated softmax over them. Ties go to the
/// earlier candidate.
fn choose(row: &[f32], candidates: &[u32], cfg: &GenConfig, rng: &mut ChaCha8Rng) -> u32 {
    let best = candidates
        .iter()
        .copied()
        .fold(None::<u32>, |b, c| match b {
            Some(b) if row[b as usize] >= row[c as usize] => Some(b),
            _ => Some(c),
        })
        .unwrap_or(0);
    if cfg.temperature <= 0.0 {
        return best;
    }
    let max = row[best as usize];
    let mut probs: Vec<(u32, f32)> = candidates
        .iter()
        .map(|&c| (c, ((row[c as usize] - max) / cfg.temperature).exp()))
        .filter(|&(_, p)| p > 0.0)
        .collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: f32 = probs.iter().map(|p| p.1).sum();
    let mut acc = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        acc += p.1 / total;
        if acc >= cfg.top_p {
            cut = i + 1;
            break;
        }
    }
    probs.truncate(cut.max(1));
    let total: f32 = probs.iter().map(|p| p.1).sum();
    let mut x = rng.gen::<f32>() * total;
    for &(c, p) in &probs {
        if x < p {
            return c;
        }
        x -= p;
    }
    probs.last().map(|p| p.0).unwrap_or(best)
}
