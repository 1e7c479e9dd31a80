//! Constrained, language-steerable decoding.
//!
//! * [`beam`]: beam search over the catalog trie for the top-k distinct items, scored by
//!   full-softmax log-probabilities, with per-request limits as a trie [`Mask`].
//! * [`generate`]: mixed output: free text, and items wherever the model opens one (a
//!   type token), written under the trie so every item named exists.
//! * [`filter`]: attribute filters (`year>=1990`, `genre=Comedy`, `category~Lab`) turned
//!   into masks.
//! * [`mixture`]: several prompts of one model decoded as their mixture (the whole
//!   history and each recent item alone).
//! * [`memory`]: an item distribution (the transition memory's) as next-token
//!   probabilities over the trie, so it can join the mixture.
//! * [`engine`]: a trained model directory with its catalog: requests in, ranked items or
//!   segments out. What `sidrec recommend`, `repl` and `serve` call.
//! * [`batch`]: requests that decode at the same time share their forward passes.
//! * [`prefix`]: keys and values of prompts already run, reused by later prompts that
//!   share a prefix (the instruction words, a returning user's history).
//! * [`limits`]: the bounds of a request (k, beams, query and history length, generated
//!   tokens, `mix_recent`) that `recommend`, `repl` and `serve` all check, in one wording.
//!
//! The model enters the search through [`LogitSource`] (prefill a prompt, then extend
//! chosen rows by one token each), so the search is tested on random logits and random
//! catalogs as well as run on the real decoder.
//!
//! [`Mask`]: crate::trie::Mask

pub mod batch;
pub mod beam;
pub mod engine;
pub mod filter;
pub mod generate;
pub mod limits;
pub mod memory;
pub mod mixture;
pub mod prefix;
pub mod query;

pub use beam::{beam_search, beam_search_from, BeamConfig, Hit};
pub use engine::{Engine, Format, Mode, Output, Request, RECENT_DECAY};
pub use filter::Filter;
pub use generate::{GenConfig, Segment};
pub use limits::Limits;
pub use memory::MemorySource;
pub use query::Reading;

use crate::trie::TokenId;

/// Errors of decoding.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The request's limits (types, exclusions, filter) leave no item to return.
    #[error("no catalog item satisfies the request's limits ({0})")]
    NothingAllowed(String),
    /// A prefix was reached from which no allowed item can be completed. Decoding never
    /// falls back to unconstrained generation.
    #[error("dead end: no allowed continuation after SID prefix {prefix:?}")]
    DeadEnd { prefix: Vec<TokenId> },
    #[error("bad filter {expr:?}: {reason}")]
    Filter { expr: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    /// The model computed NaN or infinite logits: its weights are broken (a training run
    /// that diverged, a damaged file). An error, never an empty or arbitrary answer.
    #[error(
        "the model computed a non-finite score ({what}): its weights are broken (a training \
         run that diverged, or a damaged file); retrain it or restore the model directory"
    )]
    NonFinite { what: String },
    #[error(transparent)]
    Model(#[from] crate::model::llama::ModelError),
    #[error(transparent)]
    ModelIo(#[from] crate::model::hfdir::ModelIoError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A forward pass shared with other requests failed ([`batch`]).
    #[error("decoding pass: {0}")]
    Pass(String),
}

/// What the search needs from a language model: next-token logits after a prompt, then
/// after extending chosen rows by one token.
pub trait LogitSource {
    /// Runs `prompt` (token ids) as one row; returns the next-token logits of its last
    /// position (`vocab` floats).
    fn prefill(&mut self, prompt: &[u32]) -> Result<Vec<f32>, DecodeError>;

    /// Continues from the current rows: row `i` of the new batch is the old row
    /// `parents[i]` (rows may be repeated to fork or dropped) extended by `tokens[i]`.
    /// Returns the next-token logits of every new row, row-major (`parents.len() × vocab`).
    fn extend(&mut self, parents: &[u32], tokens: &[u32]) -> Result<Vec<f32>, DecodeError>;

    /// Vocabulary size (the length of one logits row).
    fn vocab_size(&self) -> usize;
}

/// `log Σ exp(row)`, stable.
pub fn logsumexp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    max + row.iter().map(|&x| (x - max).exp()).sum::<f32>().ln()
}
