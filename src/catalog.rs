//! (in progress)

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("not implemented yet")]
    Todo,
}
