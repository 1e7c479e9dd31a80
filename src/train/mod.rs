//! Training: data built from the catalog artifacts and interaction sequences, and the
//! optimisation loop.
//!
//! - `data`: training examples per task (alignment, sequential recommendation, search,
//!   type steering, user understanding) from the templates in `prompts/`.

pub mod data;
