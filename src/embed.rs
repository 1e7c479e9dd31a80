//! (in progress)

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("not implemented yet")]
    Todo,
}
