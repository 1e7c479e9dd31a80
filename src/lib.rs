//! sidrec: a generative recommender that gives every catalog item a short semantic ID
//! (SID) and teaches a decoder-only language model to speak them.
//!
//! Data flows one way through the modules:
//!
//! ```text
//! catalog ──► template ──► embed ──► quantize (kmeans) ──► sid ──► trie
//!                                         │
//!                                 artifacts (sids.jsonl, codebooks, report)
//! ```
//!
//! [`tokenize`] wires the first half together; it is what `sidrec tokenize` runs.

pub mod artifacts;
pub mod atomic;
pub mod catalog;
pub mod collab;
pub mod decode;
pub mod embed;
pub mod error;
pub mod eval;
pub mod hub;
pub mod interactions;
pub mod kmeans;
pub mod memory;
pub mod model;
pub mod npy;
pub mod progress;
pub mod quantize;
pub mod runtime;
pub mod serve;
pub mod sid;
pub mod simd;
pub mod skipped;
pub mod template;
pub mod tokenize;
pub mod train;
pub mod trie;

pub use error::{Error, Result};
