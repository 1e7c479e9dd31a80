//! (in progress)

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum SidError {
    #[error("not implemented yet")]
    Todo,
}
