//! The Hugging Face hub, for users with the internet: one place that opens a model
//! repository at a revision, so the encoder and the language model resolve repositories
//! the same way (local cache first, `main` by default). No test needs it.

use hf_hub::api::sync::{Api, ApiError, ApiRepo};
use hf_hub::{Repo, RepoType};

/// The model repository `repo_id` at `revision` (default `main`).
pub fn model_repo(repo_id: &str, revision: Option<&str>) -> Result<ApiRepo, ApiError> {
    Ok(Api::new()?.repo(Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        revision.unwrap_or("main").to_string(),
    )))
}
