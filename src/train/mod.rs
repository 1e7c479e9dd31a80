//! Training: data built from the catalog artifacts and interaction sequences, and the
//! optimisation loop.
//!
//! - `data`: training examples per task (alignment, sequential recommendation, search,
//!   type steering, user understanding) from the templates in `prompts/`.
//! - `optim`: AdamW with resumable state, warmup + cosine schedule, gradient clipping;
//! - `trainer`: the loop (batches, validation, checkpoints, resume), model-agnostic.

pub mod data;
pub mod optim;
pub mod trainer;
