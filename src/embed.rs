//! Item embeddings: turning item texts into unit vectors, or loading vectors a user
//! computed elsewhere.
//!
//! - [`Encoder`] is the backend trait (one method: a batch of texts in, unit vectors out).
//! - [`BertEncoder`] runs a sentence-transformers BERT (e.g. all-MiniLM-L6-v2) with candle
//!   on the CPU: right-padded batches with an attention mask, mean pooling over the real
//!   tokens, L2 normalisation.
//! - [`encode_all`] drives an encoder over a whole catalog in length-sorted batches.
//! - [`load_precomputed`] / [`save_npy`] read and write `[n, d]` float matrices.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::npy::{self, NpyError};

/// Default token limit per text (sentence-transformers' `max_seq_length` for MiniLM).
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// The three files a BERT model directory must hold.
pub const MODEL_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model file {path} is missing ({what})")]
    MissingFile { path: PathBuf, what: &'static str },
    #[error("{path}: invalid model config: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: cannot load tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("{path}: cannot load model weights: {reason}")]
    Weights { path: PathBuf, reason: String },
    #[error("downloading {file} from {repo}: {reason}")]
    Hub {
        repo: String,
        file: String,
        reason: String,
    },
    #[error("encoder {encoder}: {reason}")]
    Encode { encoder: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{origin}: embeddings are empty ({n} rows x {d} columns)")]
    Empty { origin: String, n: usize, d: usize },
    #[error("{origin}: {n} rows x {d} columns needs {expected} values, found {found}")]
    Size {
        origin: String,
        n: usize,
        d: usize,
        expected: usize,
        found: usize,
    },
    #[error("{origin}: row {row} contains NaN or infinite values ({count} bad rows in total)")]
    NonFinite {
        origin: String,
        row: usize,
        count: usize,
    },
    #[error("encoder {encoder} returned a {found}-dimensional vector for text {index}, expected {expected}")]
    Dim {
        encoder: String,
        index: usize,
        expected: usize,
        found: usize,
    },
    #[error("encoder {encoder} returned {found} vectors for a batch of {expected} texts")]
    Count {
        encoder: String,
        expected: usize,
        found: usize,
    },
    #[error("{path}: {reason}")]
    Precomputed { path: PathBuf, reason: String },
    #[error(transparent)]
    Npy(#[from] NpyError),
}

/// Item embeddings: row-major f32 `[n, d]`.
#[derive(Clone, Debug)]
pub struct Embeddings {
    pub n: usize,
    pub d: usize,
    pub data: Vec<f32>,
}

impl Embeddings {
    /// Row `i` (panics if `i >= n`).
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.d..(i + 1) * self.d]
    }

    /// Checks the shape is non-empty and consistent and every value is finite.
    /// `origin` names where the embeddings came from (a file, an encoder) for the message.
    pub fn validate(&self, origin: &str) -> Result<(), EmbedError> {
        if self.n == 0 || self.d == 0 {
            return Err(EmbedError::Empty {
                origin: origin.to_string(),
                n: self.n,
                d: self.d,
            });
        }
        let expected = self.n.saturating_mul(self.d);
        if self.data.len() != expected {
            return Err(EmbedError::Size {
                origin: origin.to_string(),
                n: self.n,
                d: self.d,
                expected,
                found: self.data.len(),
            });
        }
        let mut bad = self
            .data
            .chunks_exact(self.d)
            .enumerate()
            .filter(|(_, r)| r.iter().any(|v| !v.is_finite()))
            .map(|(i, _)| i);
        if let Some(row) = bad.next() {
            return Err(EmbedError::NonFinite {
                origin: origin.to_string(),
                row,
                count: 1 + bad.count(),
            });
        }
        Ok(())
    }
}

/// Anything that turns texts into unit vectors (a text-embeddings-inference style backend).
pub trait Encoder {
    /// A short name for messages and artifact metadata.
    fn name(&self) -> &str;
    /// Dimension of the vectors `encode_batch` returns.
    fn dim(&self) -> usize;
    /// One unit vector of length `dim()` per text, in input order.
    fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError>;
}

/// Encodes all texts in batches of `batch_size`, calling `on_progress(done)` after each
/// batch with the number of texts encoded so far.
///
/// Texts are grouped by length (sorted by byte length, ties in input order) so each batch
/// pads little; rows come back in the original order. The grouping depends only on the
/// input, so the same call gives the same bits every time.
pub fn encode_all(
    enc: &dyn Encoder,
    texts: &[String],
    batch_size: usize,
    on_progress: &mut dyn FnMut(usize),
) -> Result<Embeddings, EmbedError> {
    if batch_size == 0 {
        return Err(EmbedError::Invalid("batch size must be at least 1".into()));
    }
    let d = enc.dim();
    let n = texts.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| texts[i].len());
    let mut data = vec![0f32; n * d];
    let mut done = 0;
    for chunk in order.chunks(batch_size) {
        let batch: Vec<&str> = chunk.iter().map(|&i| texts[i].as_str()).collect();
        let vectors = enc.encode_batch(&batch)?;
        if vectors.len() != chunk.len() {
            return Err(EmbedError::Count {
                encoder: enc.name().to_string(),
                expected: chunk.len(),
                found: vectors.len(),
            });
        }
        for (&i, v) in chunk.iter().zip(&vectors) {
            if v.len() != d {
                return Err(EmbedError::Dim {
                    encoder: enc.name().to_string(),
                    index: i,
                    expected: d,
                    found: v.len(),
                });
            }
            data[i * d..(i + 1) * d].copy_from_slice(v);
        }
        done += chunk.len();
        on_progress(done);
    }
    Ok(Embeddings { n, d, data })
}

/// `assets/minilm` beside the current directory, or beside the executable's crate
/// (where `scripts/fetch-assets.sh` puts all-MiniLM-L6-v2).
pub fn default_encoder_dir() -> PathBuf {
    let local = PathBuf::from("assets/minilm");
    if local.exists() {
        return local;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/minilm")
}

/// A sentence-transformers BERT (mean pooling, L2 normalised) run with candle on the CPU in f32.
pub struct BertEncoder {
    name: String,
    model: BertModel,
    tokenizer: Tokenizer,
    dim: usize,
    device: Device,
}

impl BertEncoder {
    /// Loads `config.json`, `tokenizer.json` and `model.safetensors` from `dir`.
    /// Texts longer than `max_tokens` tokens (special tokens included) are truncated.
    pub fn from_dir(dir: &Path, max_tokens: usize) -> Result<Self, EmbedError> {
        let [config, tokenizer, weights] = MODEL_FILES.map(|f| dir.join(f));
        let name = dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        Self::from_files(name, &config, &tokenizer, &weights, max_tokens)
    }

    /// Downloads (or finds in the local Hugging Face cache) the three model files of
    /// `repo_id` at `revision` (default: `main`), then loads them like [`Self::from_dir`].
    pub fn from_hub(
        repo_id: &str,
        revision: Option<&str>,
        max_tokens: usize,
    ) -> Result<Self, EmbedError> {
        let hub_err = |file: &str, reason: String| EmbedError::Hub {
            repo: repo_id.to_string(),
            file: file.to_string(),
            reason,
        };
        let repo = crate::hub::model_repo(repo_id, revision)
            .map_err(|e| hub_err("(api)", e.to_string()))?;
        let mut paths = Vec::with_capacity(3);
        for file in MODEL_FILES {
            paths.push(repo.get(file).map_err(|e| hub_err(file, e.to_string()))?);
        }
        Self::from_files(
            repo_id.to_string(),
            &paths[0],
            &paths[1],
            &paths[2],
            max_tokens,
        )
    }

    fn from_files(
        name: String,
        config_path: &Path,
        tokenizer_path: &Path,
        weights_path: &Path,
        max_tokens: usize,
    ) -> Result<Self, EmbedError> {
        for (path, what) in [
            (config_path, "BERT config"),
            (tokenizer_path, "Hugging Face tokenizer"),
            (weights_path, "model weights"),
        ] {
            if !path.is_file() {
                return Err(EmbedError::MissingFile {
                    path: path.to_path_buf(),
                    what,
                });
            }
        }
        let text = std::fs::read_to_string(config_path).map_err(|source| EmbedError::Io {
            path: config_path.to_path_buf(),
            source,
        })?;
        let config: Config = serde_json::from_str(&text).map_err(|e| EmbedError::Config {
            path: config_path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if max_tokens < 2 || max_tokens > config.max_position_embeddings {
            return Err(EmbedError::Invalid(format!(
                "max_tokens {max_tokens} must be between 2 and the model's {} positions ({})",
                config.max_position_embeddings,
                config_path.display()
            )));
        }

        let tok_err = |reason: String| EmbedError::Tokenizer {
            path: tokenizer_path.to_path_buf(),
            reason,
        };
        let mut tokenizer =
            Tokenizer::from_file(tokenizer_path).map_err(|e| tok_err(e.to_string()))?;
        let padding = PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..tokenizer.get_padding().cloned().unwrap_or_default()
        };
        tokenizer.with_padding(Some(padding));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| tok_err(e.to_string()))?;

        let weights = std::fs::read(weights_path).map_err(|source| EmbedError::Io {
            path: weights_path.to_path_buf(),
            source,
        })?;
        let device = Device::Cpu;
        let weights_err = |e: candle_core::Error| EmbedError::Weights {
            path: weights_path.to_path_buf(),
            reason: e.to_string(),
        };
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &device)
            .map_err(weights_err)?;
        let model = BertModel::load(vb, &config).map_err(weights_err)?;
        Ok(Self {
            name,
            model,
            tokenizer,
            dim: config.hidden_size,
            device,
        })
    }

    /// Token ids of one text as the encoder sees it (special tokens included, truncated).
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, EmbedError> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| self.encode_err(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    fn encode_err(&self, reason: String) -> EmbedError {
        EmbedError::Encode {
            encoder: self.name.clone(),
            reason,
        }
    }

    fn forward(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let enc_err = |e: candle_core::Error| self.encode_err(e.to_string());
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| self.encode_err(e.to_string()))?;
        let b = encodings.len();
        let s = encodings.iter().map(|e| e.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(b * s);
        let mut mask = Vec::with_capacity(b * s);
        for e in &encodings {
            // BatchLongest padding makes every encoding `s` long.
            debug_assert_eq!(e.len(), s);
            ids.extend_from_slice(e.get_ids());
            mask.extend_from_slice(e.get_attention_mask());
        }
        let ids_t = Tensor::from_vec(ids, (b, s), &self.device).map_err(enc_err)?;
        let mask_t = Tensor::from_vec(mask.clone(), (b, s), &self.device).map_err(enc_err)?;
        let types_t = ids_t.zeros_like().map_err(enc_err)?;
        let hidden = self
            .model
            .forward(&ids_t, &types_t, Some(&mask_t))
            .and_then(|h| h.flatten_all()?.to_vec1::<f32>())
            .map_err(enc_err)?;
        let d = self.dim;
        if hidden.len() != b * s * d {
            return Err(self.encode_err(format!(
                "model returned {} values for a {b}x{s} batch of dimension {d}",
                hidden.len()
            )));
        }
        let mut out = Vec::with_capacity(b);
        for r in 0..b {
            // Mean over the positions the mask keeps, accumulated in f64.
            let mut acc = vec![0f64; d];
            let mut kept = 0usize;
            for t in 0..s {
                if mask[r * s + t] == 0 {
                    continue;
                }
                kept += 1;
                let h = &hidden[(r * s + t) * d..(r * s + t + 1) * d];
                for (a, &v) in acc.iter_mut().zip(h) {
                    *a += v as f64;
                }
            }
            let kept = kept.max(1) as f64;
            let norm = acc
                .iter()
                .map(|a| (a / kept) * (a / kept))
                .sum::<f64>()
                .sqrt();
            let scale = if norm > 0.0 { 1.0 / (kept * norm) } else { 0.0 };
            out.push(acc.iter().map(|a| (a * scale) as f32).collect());
        }
        Ok(out)
    }
}

impl Encoder for BertEncoder {
    fn name(&self) -> &str {
        &self.name
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        self.forward(texts)
    }
}

/// Precomputed embeddings a user brings: `.npy` float32 `[n, d]` (float64/float16 are
/// converted), or `.safetensors` holding a 2-D tensor named `embeddings` or a single
/// tensor of any name (f32, f16, bf16 or f64, converted to f32). The result is validated.
pub fn load_precomputed(path: &Path) -> Result<Embeddings, EmbedError> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let emb = match ext.as_str() {
        "npy" => {
            let (data, n, d) = npy::read_f32_matrix(path)?;
            Embeddings { n, d, data }
        }
        "safetensors" => load_safetensors(path)?,
        _ => {
            return Err(EmbedError::Precomputed {
                path: path.to_path_buf(),
                reason: "unknown embeddings format (expected a .npy or .safetensors file)".into(),
            })
        }
    };
    emb.validate(&path.display().to_string())?;
    Ok(emb)
}

fn load_safetensors(path: &Path) -> Result<Embeddings, EmbedError> {
    let err = |reason: String| EmbedError::Precomputed {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|source| EmbedError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| err(format!("not a readable safetensors file: {e}")))?;
    let tensor = if let Some(t) = tensors.remove("embeddings") {
        t
    } else if tensors.len() == 1 {
        tensors.into_values().next().expect("one tensor")
    } else {
        let mut names: Vec<_> = tensors.keys().cloned().collect();
        names.sort();
        return Err(err(format!(
            "no tensor named \"embeddings\" and {} tensors to choose from: [{}]",
            names.len(),
            names.join(", ")
        )));
    };
    let (n, d) = match tensor.dims() {
        [n, d] => (*n, *d),
        dims => {
            return Err(err(format!(
                "expected a 2-D [n, d] tensor, found shape {dims:?}"
            )))
        }
    };
    match tensor.dtype() {
        DType::F32 | DType::F16 | DType::BF16 | DType::F64 => {}
        other => {
            return Err(err(format!(
                "unsupported dtype {other:?} (expected f32, f16, bf16 or f64)"
            )))
        }
    }
    let data = tensor
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .map_err(|e| err(e.to_string()))?;
    Ok(Embeddings { n, d, data })
}

/// Writes embeddings as a float32 `.npy` file.
pub fn save_npy(emb: &Embeddings, path: &Path) -> Result<(), EmbedError> {
    npy::write_f32_matrix(path, &emb.data, emb.n, emb.d)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed {
        dim: usize,
        out_dim: usize,
    }

    impl Encoder for Fixed {
        fn name(&self) -> &str {
            "fixed"
        }
        fn dim(&self) -> usize {
            self.dim
        }
        fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
            Ok(texts
                .iter()
                .map(|t| {
                    let mut v = vec![0.0; self.out_dim];
                    v[0] = t.len() as f32;
                    v
                })
                .collect())
        }
    }

    #[test]
    fn encode_all_restores_order_and_reports_progress() {
        let texts: Vec<String> = ["ccc", "a", "bbbbb", "dd", "", "eeee"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut seen = Vec::new();
        let emb = encode_all(&Fixed { dim: 2, out_dim: 2 }, &texts, 4, &mut |d| {
            seen.push(d)
        })
        .unwrap();
        assert_eq!(seen, vec![4, 6]);
        assert_eq!((emb.n, emb.d), (6, 2));
        for (i, t) in texts.iter().enumerate() {
            assert_eq!(emb.row(i), &[t.len() as f32, 0.0]);
        }
    }

    #[test]
    fn encode_all_rejects_wrong_dim_and_zero_batch() {
        let texts = vec!["x".to_string()];
        let err = encode_all(&Fixed { dim: 3, out_dim: 2 }, &texts, 8, &mut |_| {}).unwrap_err();
        assert!(
            matches!(
                err,
                EmbedError::Dim {
                    expected: 3,
                    found: 2,
                    ..
                }
            ),
            "{err}"
        );
        let err = encode_all(&Fixed { dim: 2, out_dim: 2 }, &texts, 0, &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("batch size"), "{err}");
    }

    #[test]
    fn validate_reports_first_bad_row_and_count() {
        let mut e = Embeddings {
            n: 4,
            d: 2,
            data: vec![0.0; 8],
        };
        e.validate("t").unwrap();
        e.data[3] = f32::NAN;
        e.data[7] = f32::INFINITY;
        let msg = e.validate("items.npy").unwrap_err().to_string();
        assert!(
            msg.contains("items.npy") && msg.contains("row 1") && msg.contains("2 bad rows"),
            "{msg}"
        );
        let empty = Embeddings {
            n: 0,
            d: 4,
            data: vec![],
        };
        assert!(matches!(empty.validate("e"), Err(EmbedError::Empty { .. })));
        let short = Embeddings {
            n: 2,
            d: 2,
            data: vec![0.0; 3],
        };
        assert!(matches!(short.validate("s"), Err(EmbedError::Size { .. })));
    }
}
