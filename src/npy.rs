//! (in progress)

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("not implemented yet")]
    Todo,
}
