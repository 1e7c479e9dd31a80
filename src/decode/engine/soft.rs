//! The engine's soft prompts: loading the encoder and item vectors a model was trained
//! with, and each request's vectors ([`crate::model::soft_prompt`]).

use super::*;
use crate::model::hfdir::SoftPromptCard;
use crate::model::soft_prompt::{Slot as SoftSlot, SoftVectors, REQUEST_TOKENS};

/// The vectors of one model input, read at its last position.
pub type InputVectors = Vec<(SoftSlot, Vec<f32>)>;

/// The encoder directory a model card names: as written when it exists (absolute, or
/// relative to the working directory), else under the sidrec checkout (the demo model
/// names `assets/minilm`, which `scripts/fetch-assets.sh` puts there).
fn encoder_dir(card: &SoftPromptCard) -> PathBuf {
    let given = PathBuf::from(&card.encoder);
    if given.is_absolute() || given.join("model.safetensors").is_file() {
        return given;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(given)
}

/// The soft-prompt vectors of the model in `dir`, when its card says it reads any:
/// item vectors from its codebooks, and the encoder it was trained with (checked by the
/// sha256 of its weights; `encoder` overrides where to find it).
pub fn load_vectors(
    dir: &Path,
    card: &SoftPromptCard,
    sids: &SidMap,
    encoder: Option<&Path>,
) -> Result<SoftVectors> {
    let codebooks = artifacts::read_codebooks(dir)?;
    let (items, dim) = artifacts::item_vectors(&codebooks, &sids.records)?;
    let encoder = match card.request {
        false => None,
        true => {
            let path = encoder
                .map(Path::to_path_buf)
                .unwrap_or_else(|| encoder_dir(card));
            let weights = path.join("model.safetensors");
            if !weights.is_file() {
                return Err(Error::Invalid(format!(
                    "{}: this model reads requests through the sentence encoder {:?}, \
                     which is not at {} (run scripts/fetch-assets.sh, or give --encoder DIR)",
                    dir.display(),
                    card.encoder,
                    path.display()
                )));
            }
            let sha = hfdir::sha256_file(&weights)?;
            if sha != card.encoder_sha256 {
                return Err(Error::Invalid(format!(
                    "{}: the encoder at {} is not the one the model was trained with \
                     (sha256 {} of model.safetensors, the model card says {})",
                    dir.display(),
                    path.display(),
                    &sha[..12],
                    &card.encoder_sha256[..card.encoder_sha256.len().min(12)]
                )));
            }
            Some(
                crate::embed::BertEncoder::from_dir(&path, REQUEST_TOKENS)
                    .map_err(|e| Error::Invalid(e.to_string()))?,
            )
        }
    };
    SoftVectors::new(encoder, items, dim).map_err(|e| Error::Invalid(e.to_string()))
}

impl Engine {
    /// Replaces the soft-prompt vectors (`None`: the model is asked without them).
    pub fn set_soft_vectors(&mut self, vectors: Option<SoftVectors>) {
        self.soft = vectors;
    }

    /// Whether requests reach the model as sentence vectors too.
    pub fn reads_request_vectors(&self) -> bool {
        self.soft.as_ref().is_some_and(SoftVectors::has_encoder)
            && self.sidecar.soft_prompt.as_ref().is_some_and(|c| c.request)
    }

    /// The request vector of `req`'s words, for a model that reads them (computed once
    /// per request: every model input of a ranking shares it).
    pub(super) fn request_vector(
        &self,
        req: &Request,
    ) -> std::result::Result<Option<Vec<f32>>, DecodeError> {
        let (Some(vectors), Some(card)) = (&self.soft, &self.sidecar.soft_prompt) else {
            return Ok(None);
        };
        let query = req.query.trim();
        if !(card.request && vectors.has_encoder()) || query.is_empty() {
            return Ok(None);
        }
        let mut v = vectors
            .requests(&[query.to_string()], &mut |_| {})
            .map_err(|e| DecodeError::Invalid(e.to_string()))?;
        Ok(v.pop())
    }

    /// The vectors of a model input for `req` with `history` as its history, as
    /// training attached them: the request's words (`request`, from
    /// [`Engine::request_vector`]) and the history's taste (recommend, describe); none
    /// for a history continuation, whose history is the answer's context.
    pub(super) fn input_vectors(
        &self,
        req: &Request,
        history: &[ItemIdx],
        request: Option<&Vec<f32>>,
    ) -> std::result::Result<InputVectors, DecodeError> {
        let (Some(vectors), Some(card)) = (&self.soft, &self.sidecar.soft_prompt) else {
            return Ok(Vec::new());
        };
        let continues = self.continues_history(&Request {
            history: history.to_vec(),
            ..req.clone()
        })?;
        if continues {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        if let Some(v) = request {
            out.push((SoftSlot::Request, v.clone()));
        }
        let mode = self.resolve_mode(req)?;
        if card.taste && matches!(mode, Mode::Recommend | Mode::Describe) {
            if let Some(v) = vectors.taste(history) {
                out.push((SoftSlot::Taste, v));
            }
        }
        Ok(out)
    }
}
