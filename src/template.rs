//! (in progress)

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("not implemented yet")]
    Todo,
}
