//! Training: data built from the catalog artifacts and interaction sequences, and the
//! optimisation loop.
//!
//! - `data`: training examples per task (alignment, sequential recommendation, search,
//!   type steering, user understanding) from the templates in `prompts/`.
//! - `language`: requests in words (the lexicon in `prompts/requests/`);
//! - `optim`: AdamW with resumable state, warmup + cosine schedule, gradient clipping;
//! - `trainer`: the loop (batches, validation, checkpoints, resume), model-agnostic;
//! - `soft`: soft targets, the transition memory as a teacher for next items;
//! - `pipeline`: `sidrec train` end to end (base model, SID tokens, stages, model dir).

pub mod chat;
pub mod data;
pub mod language;
pub mod optim;
pub mod pipeline;
pub mod recipe;
pub mod soft;
pub mod trainer;
