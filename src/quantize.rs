//! (in progress)

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error("not implemented yet")]
    Todo,
}
