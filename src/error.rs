//! The library's error type: one variant per module, each wrapping that module's own
//! typed error, so callers can match on the stage that failed.

use std::path::PathBuf;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error the library returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error(transparent)]
    Template(#[from] crate::template::TemplateError),
    #[error(transparent)]
    Embed(#[from] crate::embed::EmbedError),
    #[error(transparent)]
    Npy(#[from] crate::npy::NpyError),
    #[error(transparent)]
    Quantize(#[from] crate::quantize::QuantizeError),
    #[error(transparent)]
    Sid(#[from] crate::sid::SidError),
    #[error(transparent)]
    Trie(#[from] crate::trie::TrieError),
    #[error(transparent)]
    Interactions(#[from] crate::interactions::InteractionsError),
    #[error(transparent)]
    Data(#[from] crate::train::data::DataError),
    #[error(transparent)]
    Train(#[from] crate::train::trainer::TrainError),
    #[error(transparent)]
    Model(#[from] crate::model::llama::ModelError),
    #[error(transparent)]
    Bpe(#[from] crate::model::bpe::BpeError),
    /// Boxed: decoding errors carry model and I/O errors and would bloat every `Result`.
    #[error(transparent)]
    Decode(Box<crate::decode::DecodeError>),
    #[error(transparent)]
    ModelIo(#[from] crate::model::gguf::ModelIoError),
    #[error(transparent)]
    Eval(#[from] crate::eval::EvalError),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Collab(#[from] crate::collab::CollabError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// An I/O error that names the file it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<crate::decode::DecodeError> for Error {
    fn from(e: crate::decode::DecodeError) -> Self {
        Error::Decode(Box::new(e))
    }
}
