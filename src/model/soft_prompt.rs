//! Soft prompts: sentence-encoder vectors that the decoder reads as input vectors.
//!
//! Why: the catalog's SIDs are quantised sentence embeddings of the items' text, so the
//! request's own embedding (by the same encoder) already points at the SID prefixes it
//! asks for, and the encoder, pretrained on a billion sentence pairs, knows that "ghosts
//! and haunted houses" and "something scary" are near each other, which a few-million
//! parameter decoder trained on a catalog cannot learn from titles. Projected into the
//! decoder's input space, the vector is a short path from words to items (Spotify's
//! GLIDE injects a user's long-term taste the same way; docs/training.md measures both).
//!
//! Two slots, each with its own learned projection `[hidden, dim]`:
//!
//! - [`Slot::Request`]: the embedding of the request's words;
//! - [`Slot::Taste`]: the mean of the history's item vectors (the items' codebook
//!   reconstructions, so a model directory needs no embeddings file).
//!
//! Each vector is added at one position of the prompt, its last token (the position
//! that predicts the first answer token): prompts are cut from the left when too long,
//! so the last position always survives, and every later position reads it by
//! attention. The projections start at zero, so a model given vectors starts exactly
//! where it was without them (a pretrained base is not disturbed by an untrained
//! projection), and the first gradient step moves them.

use candle_core::{Device, Tensor};

use super::llama::{ModelError, Result};

/// Weight names in `model.safetensors`, `[hidden, dim]` each.
pub const REQUEST_WEIGHT: &str = "model.soft_prompt.request.weight";
pub const TASTE_WEIGHT: &str = "model.soft_prompt.taste.weight";

/// What a vector is (each has its own projection).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    /// The sentence embedding of the request's words.
    Request,
    /// The mean item vector of the user's history.
    Taste,
}

impl Slot {
    pub const ALL: [Slot; 2] = [Slot::Request, Slot::Taste];

    /// The weight name of the slot's projection.
    pub fn weight_name(self) -> &'static str {
        match self {
            Slot::Request => REQUEST_WEIGHT,
            Slot::Taste => TASTE_WEIGHT,
        }
    }
}

/// The vectors of one forward pass, each added (through its slot's projection) to the
/// input at one flat position `row · t + j` of the `[b, t]` input.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SoftInputs {
    /// Row-major `[n, dim]`.
    pub vectors: Vec<f32>,
    pub dim: usize,
    pub slots: Vec<Slot>,
    pub at: Vec<u32>,
}

impl SoftInputs {
    pub fn new(dim: usize) -> Self {
        SoftInputs {
            dim,
            ..SoftInputs::default()
        }
    }

    /// Adds `vector` for `slot` at flat position `at`.
    pub fn push(&mut self, slot: Slot, at: u32, vector: &[f32]) {
        debug_assert_eq!(vector.len(), self.dim);
        self.vectors.extend_from_slice(vector);
        self.slots.push(slot);
        self.at.push(at);
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// The learned projections of a model that reads soft prompts.
#[derive(Clone, Debug)]
pub(crate) struct SoftPrompt {
    /// `[hidden, dim]` per slot, in [`Slot::ALL`] order.
    weights: [Tensor; 2],
}

impl SoftPrompt {
    /// `request` and `taste` `[hidden, dim]` (trainable `Var` tensors while training).
    pub(crate) fn new(request: Tensor, taste: Tensor, hidden: usize) -> Result<Self> {
        let (h, d) = request.dims2()?;
        for (name, w) in [(REQUEST_WEIGHT, &request), (TASTE_WEIGHT, &taste)] {
            let dims = w.dims();
            if dims.len() != 2 || dims[0] != hidden || dims[1] != d || h != hidden {
                return Err(ModelError::Shape {
                    what: "soft prompt projection",
                    expected: format!("[{hidden}, {d}] for {name}"),
                    found: format!("{dims:?}"),
                });
            }
        }
        Ok(SoftPrompt {
            weights: [request, taste],
        })
    }

    pub(crate) fn dim(&self) -> usize {
        self.weights[0].dims()[1]
    }

    pub(crate) fn weight(&self, slot: Slot) -> &Tensor {
        &self.weights[slot as usize]
    }

    pub(crate) fn detached(&self) -> SoftPrompt {
        SoftPrompt {
            weights: [self.weights[0].detach(), self.weights[1].detach()],
        }
    }

    /// `x` `[b, t, hidden]` plus every vector of `inputs`, projected, at its position.
    /// Differentiable in the projections (a one-hot scatter matrix times the projected
    /// vectors: a few thousand positions by a few vectors, cheap beside any layer).
    pub(crate) fn add(&self, x: Tensor, inputs: &SoftInputs) -> Result<Tensor> {
        if inputs.is_empty() {
            return Ok(x);
        }
        let (b, t, h) = x.dims3()?;
        if inputs.dim != self.dim() || inputs.vectors.len() != inputs.len() * inputs.dim {
            return Err(ModelError::Shape {
                what: "soft prompt vectors",
                expected: format!("{} values per vector", self.dim()),
                found: format!(
                    "{} values for {} vectors",
                    inputs.vectors.len(),
                    inputs.len()
                ),
            });
        }
        if let Some(&row) = inputs.at.iter().find(|&&p| p as usize >= b * t) {
            return Err(ModelError::PositionOutOfRange {
                row,
                positions: b * t,
            });
        }
        let dev = x.device().clone();
        let mut x = x.reshape((b * t, h))?;
        for slot in Slot::ALL {
            let picked: Vec<usize> = (0..inputs.len())
                .filter(|&i| inputs.slots[i] == slot)
                .collect();
            if picked.is_empty() {
                continue;
            }
            let n = picked.len();
            let mut v = Vec::with_capacity(n * inputs.dim);
            let mut scatter = vec![0f32; b * t * n];
            for (k, &i) in picked.iter().enumerate() {
                v.extend_from_slice(&inputs.vectors[i * inputs.dim..(i + 1) * inputs.dim]);
                scatter[inputs.at[i] as usize * n + k] = 1.0;
            }
            let v = Tensor::from_vec(v, (n, inputs.dim), &dev)?;
            let projected = v.matmul(&self.weight(slot).t()?)?; // [n, hidden]
            let scatter = Tensor::from_vec(scatter, (b * t, n), &dev)?;
            x = (x + scatter.matmul(&projected)?)?;
        }
        Ok(x.reshape((b, t, h))?)
    }
}

/// Zero projections `[hidden, dim]` for both slots: a model given vectors starts where
/// it was without them.
pub fn init_weights(hidden: usize, dim: usize) -> Result<Vec<(String, Tensor)>> {
    Slot::ALL
        .iter()
        .map(|s| {
            Ok((
                s.weight_name().to_string(),
                Tensor::zeros((hidden, dim), candle_core::DType::F32, &Device::Cpu)?,
            ))
        })
        .collect()
}

/// Errors of [`SoftVectors`].
#[derive(Debug, thiserror::Error)]
pub enum SoftVectorError {
    #[error("soft prompts: {0}")]
    Embed(#[from] crate::embed::EmbedError),
    #[error("soft prompts: {0}")]
    Invalid(String),
}

/// Where soft-prompt vectors come from: the sentence encoder (request vectors) and the
/// catalog's item vectors (taste vectors), shared by training and decoding so that both
/// compute them the same way.
pub struct SoftVectors {
    encoder: Option<crate::embed::BertEncoder>,
    /// Row-major `[items, dim]`.
    items: Vec<f32>,
    dim: usize,
}

/// Tokens of a request the encoder reads (requests are a sentence or two; item texts
/// in align examples are cut here too).
pub const REQUEST_TOKENS: usize = 128;

impl SoftVectors {
    /// `items` row-major `[n, dim]` (the codebooks' reconstructions); `encoder` for
    /// request vectors (`None`: a model that reads taste vectors only). The encoder must
    /// write `dim`-wide vectors: the request and the items must live in one space.
    pub fn new(
        encoder: Option<crate::embed::BertEncoder>,
        items: Vec<f32>,
        dim: usize,
    ) -> Result<Self, SoftVectorError> {
        use crate::embed::Encoder;
        if let Some(e) = &encoder {
            if e.dim() != dim {
                return Err(SoftVectorError::Invalid(format!(
                    "the encoder {} writes {}-wide vectors, the catalog's SIDs were made \
                     from {dim}-wide ones (tokenize and train with the same encoder)",
                    e.name(),
                    e.dim()
                )));
            }
        }
        Ok(SoftVectors {
            encoder,
            items,
            dim,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn has_encoder(&self) -> bool {
        self.encoder.is_some()
    }

    /// The request vectors of `texts` (in order), in batches of 64 texts of similar
    /// length; `on_progress(done)` after each batch.
    pub fn requests(
        &self,
        texts: &[String],
        on_progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<f32>>, SoftVectorError> {
        let enc = self.encoder.as_ref().ok_or_else(|| {
            SoftVectorError::Invalid("no sentence encoder for request vectors".into())
        })?;
        let e = crate::embed::encode_all(enc, texts, 64, on_progress)?;
        Ok((0..e.n).map(|i| e.row(i).to_vec()).collect())
    }

    /// The taste vector of a history: the mean of its items' vectors (`None` for an
    /// empty history or an item past the catalog).
    pub fn taste(&self, history: &[u32]) -> Option<Vec<f32>> {
        let n = self.items.len() / self.dim.max(1);
        if history.is_empty() || history.iter().any(|&i| i as usize >= n) {
            return None;
        }
        let mut acc = vec![0f32; self.dim];
        for &i in history {
            let row = &self.items[i as usize * self.dim..(i as usize + 1) * self.dim];
            acc.iter_mut().zip(row).for_each(|(a, x)| *a += x);
        }
        let k = history.len() as f32;
        acc.iter_mut().for_each(|a| *a /= k);
        Some(acc)
    }
}
