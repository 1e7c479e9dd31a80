//! (in progress)

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum TrieError {
    #[error("not implemented yet")]
    Todo,
}
