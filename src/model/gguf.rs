//! Loading Llama-family GGUF checkpoints (llama.cpp's format) as f32 tensors with
//! Hugging Face names, and rebuilding their tokenizer from the GGUF metadata.
//!
//! Training needs full-precision weights and a Hugging Face tokenizer; GGUF files are
//! the most widely available small checkpoints. [`GgufModel`] bridges the two:
//!
//! - [`GgufModel::open`] reads the header only (metadata and tensor infos), so a wrong
//!   or unsupported file fails fast with an error naming it;
//! - [`GgufModel::dequantize_all`] dequantises every tensor to f32, renames it to the
//!   Hugging Face convention and undoes llama.cpp's q/k row permutation (see
//!   [`unpermute_qk`]);
//! - [`GgufModel::tokenizer`] builds a byte-level BPE [`Tokenizer`] from the
//!   `tokenizer.ggml.*` keys;
//! - [`GgufModel::hf_config`] gives the matching Hugging Face `config.json`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Tokenizer};

/// Result alias of the model I/O modules.
pub type Result<T, E = ModelIoError> = std::result::Result<T, E>;

/// Errors of GGUF loading and model-directory I/O. Every variant names the file (or hub
/// repository) it concerns, since the same code reads checkpoints, tokenizers and
/// sidecars from several places.
#[derive(Debug, thiserror::Error)]
pub enum ModelIoError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a readable GGUF file: {reason}")]
    Gguf { path: PathBuf, reason: String },
    #[error("{path}: architecture {found:?} is not supported (only \"llama\" is)")]
    Architecture { path: PathBuf, found: String },
    #[error("{path}: metadata key {key:?} is missing")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: metadata key {key:?}: {reason}")]
    BadKey {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("{path}: tensor {name:?} is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {name:?} has shape {found:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor {name:?}: {reason}")]
    Tensor {
        path: PathBuf,
        name: String,
        reason: String,
    },
    #[error("{path}: tensor {name:?} is not part of a plain Llama checkpoint")]
    UnknownTensor { path: PathBuf, name: String },
    #[error("{path}: cannot build tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("{path}: invalid model config: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: cannot read or write model weights: {reason}")]
    Weights { path: PathBuf, reason: String },
    #[error("model file {path} is missing ({what})")]
    MissingFile { path: PathBuf, what: &'static str },
    #[error("downloading {file} from {repo}: {reason}")]
    Hub {
        repo: String,
        file: String,
        reason: String,
    },
    /// The output directory may not be replaced (see [`crate::atomic::check_target`]).
    #[error(transparent)]
    Refused(#[from] crate::atomic::Refusal),
    /// A file of a model directory does not match its `SHA256SUMS` line.
    #[error("{}:{line}: {reason}", .path.display())]
    Checksum {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: invalid sidrec.json: {reason}")]
    Sidecar { path: PathBuf, reason: String },
    #[error(
        "the model in {model_dir} was trained on another SID map: it expects sids.jsonl with \
         sha256 {expected} (from {trained_on}), but {sids} has sha256 {found}"
    )]
    SidMapMismatch {
        model_dir: PathBuf,
        sids: PathBuf,
        trained_on: String,
        expected: String,
        found: String,
    },
}

impl ModelIoError {
    /// An I/O error that names the file it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelIoError::Io {
            path: path.into(),
            source,
        }
    }
}

/// The GGUF `general.architecture` this module understands.
pub const LLAMA_ARCH: &str = "llama";

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_NORMAL: i64 = 1;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The hyper-parameters of a GGUF Llama checkpoint (the `llama.*` keys).
#[derive(Clone, Debug, PartialEq)]
pub struct GgufMetadata {
    /// `general.architecture` (always `"llama"` once opened).
    pub architecture: String,
    /// `general.name`, when present.
    pub name: Option<String>,
    pub block_count: usize,
    pub embedding_length: usize,
    pub feed_forward_length: usize,
    pub head_count: usize,
    pub head_count_kv: usize,
    /// Size of the rotary part of a head; must equal the head size here.
    pub rope_dimension_count: usize,
    pub rope_freq_base: f32,
    pub rms_norm_eps: f64,
    pub context_length: usize,
    pub vocab_size: usize,
    /// Whether the file has no `output.weight` (the LM head reuses the embeddings).
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub padding_token_id: Option<u32>,
    /// `tokenizer.chat_template`, when present.
    pub chat_template: Option<String>,
}

impl GgufMetadata {
    pub fn head_dim(&self) -> usize {
        self.embedding_length / self.head_count
    }
}

/// The subset of a Hugging Face Llama `config.json` that a GGUF checkpoint determines.
/// Serialises to a `config.json` that `transformers` and candle's Llama loader accept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HfLlamaConfig {
    pub architectures: Vec<String>,
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bos_token_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eos_token_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pad_token_id: Option<u32>,
    pub hidden_act: String,
    pub torch_dtype: String,
}

/// An opened GGUF Llama checkpoint: its header (metadata and tensor infos) only; tensor
/// data is read by [`GgufModel::dequantize_all`].
pub struct GgufModel {
    path: PathBuf,
    content: Content,
    metadata: GgufMetadata,
}

impl std::fmt::Debug for GgufModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufModel")
            .field("path", &self.path)
            .field("metadata", &self.metadata)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

impl GgufModel {
    /// Reads the header of a GGUF file and checks it is a Llama checkpoint whose
    /// hyper-parameters are all present and consistent.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| ModelIoError::io(&path, e))?;
        let content = Content::read(&mut BufReader::new(file)).map_err(|e| ModelIoError::Gguf {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let metadata = read_metadata(&path, &content)?;
        let model = GgufModel {
            path,
            content,
            metadata,
        };
        model.check_tensors()?;
        Ok(model)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &GgufMetadata {
        &self.metadata
    }

    /// The raw GGUF header, for keys this module does not interpret.
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// Every tensor of the file: GGUF name → (shape, storage type). Shapes are in
    /// candle's (row-major) order, e.g. `[out, in]` for a projection.
    pub fn tensor_infos(&self) -> BTreeMap<String, (Vec<usize>, GgmlDType)> {
        self.content
            .tensor_infos
            .iter()
            .map(|(k, v)| (k.clone(), (v.shape.dims().to_vec(), v.ggml_dtype)))
            .collect()
    }

    /// The Hugging Face `config.json` of this checkpoint.
    pub fn hf_config(&self) -> HfLlamaConfig {
        let m = &self.metadata;
        HfLlamaConfig {
            architectures: vec!["LlamaForCausalLM".to_string()],
            model_type: "llama".to_string(),
            vocab_size: m.vocab_size,
            hidden_size: m.embedding_length,
            intermediate_size: m.feed_forward_length,
            num_hidden_layers: m.block_count,
            num_attention_heads: m.head_count,
            num_key_value_heads: m.head_count_kv,
            rms_norm_eps: m.rms_norm_eps,
            rope_theta: m.rope_freq_base as f64,
            max_position_embeddings: m.context_length,
            tie_word_embeddings: m.tie_word_embeddings,
            bos_token_id: m.bos_token_id,
            eos_token_id: m.eos_token_id,
            pad_token_id: m.padding_token_id,
            hidden_act: "silu".to_string(),
            torch_dtype: "float32".to_string(),
        }
    }

    /// The GGUF tensor names and shapes a Llama checkpoint with these hyper-parameters
    /// must have. `output.weight` is listed only for untied checkpoints.
    fn expected_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let m = &self.metadata;
        let (h, f, v) = (m.embedding_length, m.feed_forward_length, m.vocab_size);
        let kv = m.head_count_kv * m.head_dim();
        let mut out = vec![
            ("token_embd.weight".to_string(), vec![v, h]),
            ("output_norm.weight".to_string(), vec![h]),
        ];
        if !m.tie_word_embeddings {
            out.push(("output.weight".to_string(), vec![v, h]));
        }
        for i in 0..m.block_count {
            for (n, s) in [
                ("attn_norm", vec![h]),
                ("ffn_norm", vec![h]),
                ("attn_q", vec![h, h]),
                ("attn_k", vec![kv, h]),
                ("attn_v", vec![kv, h]),
                ("attn_output", vec![h, h]),
                ("ffn_gate", vec![f, h]),
                ("ffn_up", vec![f, h]),
                ("ffn_down", vec![h, f]),
            ] {
                out.push((format!("blk.{i}.{n}.weight"), s));
            }
        }
        out
    }

    /// Checks that every tensor the architecture needs is present with the right shape,
    /// and that no tensor is left over (a leftover would be silently dropped on
    /// conversion, e.g. biases or experts of a variant we do not support).
    fn check_tensors(&self) -> Result<()> {
        let infos = &self.content.tensor_infos;
        for (name, shape) in self.expected_shapes() {
            let info = infos
                .get(&name)
                .ok_or_else(|| ModelIoError::MissingTensor {
                    path: self.path.clone(),
                    name: name.clone(),
                })?;
            if info.shape.dims() != shape.as_slice() {
                return Err(ModelIoError::TensorShape {
                    path: self.path.clone(),
                    name,
                    expected: shape,
                    found: info.shape.dims().to_vec(),
                });
            }
        }
        let expected: std::collections::HashSet<String> =
            self.expected_shapes().into_iter().map(|(n, _)| n).collect();
        for name in infos.keys() {
            // E.g. rope_freqs (llama-3.1 frequency factors), biases or extra layers:
            // dropping them would silently change the model, so refuse instead.
            if !expected.contains(name) {
                return Err(ModelIoError::UnknownTensor {
                    path: self.path.clone(),
                    name: name.clone(),
                });
            }
        }
        Ok(())
    }

    /// Dequantises every tensor to f32 on the CPU and returns them under their Hugging
    /// Face names. The q and k projections are un-permuted (see [`unpermute_qk`]) so the
    /// weights work with Hugging Face's rotate-half RoPE. Tied checkpoints have no
    /// `lm_head.weight`.
    pub fn dequantize_all(&self) -> Result<HashMap<String, Tensor>> {
        let file = File::open(&self.path).map_err(|e| ModelIoError::io(&self.path, e))?;
        let mut reader = BufReader::new(file);
        let device = Device::Cpu;
        let m = &self.metadata;
        let mut out = HashMap::with_capacity(self.content.tensor_infos.len());
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let tensor_err = |reason: String| ModelIoError::Tensor {
                path: self.path.clone(),
                name: name.clone(),
                reason,
            };
            let target = hf_name(name).ok_or_else(|| ModelIoError::UnknownTensor {
                path: self.path.clone(),
                name: name.clone(),
            })?;
            let q = self
                .content
                .tensor(&mut reader, name, &device)
                .map_err(|e| tensor_err(e.to_string()))?;
            let mut t = q
                .dequantize(&device)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(|e| tensor_err(e.to_string()))?;
            if name.ends_with(".attn_q.weight") {
                t = unpermute_qk(&t, m.head_count).map_err(|e| tensor_err(e.to_string()))?;
            } else if name.ends_with(".attn_k.weight") {
                t = unpermute_qk(&t, m.head_count_kv).map_err(|e| tensor_err(e.to_string()))?;
            }
            out.insert(target, t);
        }
        Ok(out)
    }

    /// Builds the Hugging Face tokenizer described by the `tokenizer.ggml.*` keys.
    ///
    /// Only byte-level BPE (`tokenizer.ggml.model = "gpt2"`) is supported, with the
    /// pre-tokenizers `smollm` (digits split one by one, then GPT-2's byte-level regex)
    /// and `gpt-2`/`default` (the byte-level regex alone). Control tokens become special
    /// added tokens (matched whole, before BPE); user-defined tokens become plain added
    /// tokens.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let path = &self.path;
        let md = &self.content.metadata;
        let tok_err = |reason: String| ModelIoError::Tokenizer {
            path: path.clone(),
            reason,
        };
        let model = get_str(path, md, "tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(tok_err(format!(
                "tokenizer.ggml.model {model:?} is not supported (only \"gpt2\", byte-level BPE)"
            )));
        }
        let tokens: Vec<String> = get_str_array(path, md, "tokenizer.ggml.tokens")?
            .into_iter()
            .cloned()
            .collect();
        let merges_raw = get_str_array(path, md, "tokenizer.ggml.merges")?;
        let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => int_array(path, "tokenizer.ggml.token_type", v)?,
            None => vec![TOKEN_TYPE_NORMAL; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(tok_err(format!(
                "{} token types for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let mut vocab = Vocab::default();
        for (i, t) in tokens.iter().enumerate() {
            if vocab.insert(t.clone(), i as u32).is_some() {
                return Err(tok_err(format!("token {t:?} appears twice")));
            }
        }
        let mut merges = Vec::with_capacity(merges_raw.len());
        for (i, m) in merges_raw.iter().enumerate() {
            // Byte-level tokens never contain a space (it is mapped to 'Ġ'), so the
            // first space separates the pair.
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| tok_err(format!("merge {i} ({m:?}) is not \"a b\"")))?;
            merges.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| tok_err(e.to_string()))?;

        let pre = get_opt_str(path, md, "tokenizer.ggml.pre")?.unwrap_or("default");
        let byte_level = ByteLevel::default()
            .add_prefix_space(false)
            .trim_offsets(true)
            .use_regex(true);
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            "gpt-2" | "gpt2" | "default" => byte_level.into(),
            other => {
                return Err(tok_err(format!(
                    "pre-tokenizer {other:?} is not supported (known: smollm, gpt-2, default)"
                )))
            }
        };

        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

        let mut special = Vec::new();
        let mut added = Vec::new();
        for (t, &ty) in tokens.iter().zip(&types) {
            match ty {
                TOKEN_TYPE_CONTROL => special.push(AddedToken::from(t.clone(), true)),
                TOKEN_TYPE_USER_DEFINED => {
                    added.push(AddedToken::from(t.clone(), false).normalized(false))
                }
                _ => {}
            }
        }
        tokenizer.add_special_tokens(&special);
        tokenizer.add_tokens(&added);

        let add_bos = get_opt_bool(path, md, "tokenizer.ggml.add_bos_token")?.unwrap_or(false);
        let add_eos = get_opt_bool(path, md, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let post: PostProcessorWrapper = if add_bos || add_eos {
            let token = |id: Option<u32>, what: &str| {
                let id = id.ok_or_else(|| tok_err(format!("add_{what}_token without an id")))?;
                tokens
                    .get(id as usize)
                    .map(|t| (t.clone(), id))
                    .ok_or_else(|| tok_err(format!("{what} token id {id} is out of range")))
            };
            let bos = if add_bos {
                Some(token(self.metadata.bos_token_id, "bos")?)
            } else {
                None
            };
            let eos = if add_eos {
                Some(token(self.metadata.eos_token_id, "eos")?)
            } else {
                None
            };
            // "<bos>:0 $A:0 <eos>:0" and the same again for $B with type id 1.
            let template = |seq: &str, type_id: u8| {
                let mut parts = Vec::new();
                if let Some((t, _)) = &bos {
                    parts.push(format!("{t}:{type_id}"));
                }
                parts.push(format!("${seq}:{type_id}"));
                if let Some((t, _)) = &eos {
                    parts.push(format!("{t}:{type_id}"));
                }
                parts.join(" ")
            };
            let single = template("A", 0);
            let pair = format!("{single} {}", template("B", 1));
            let specials: Vec<(String, u32)> = bos.iter().chain(eos.iter()).cloned().collect();
            TemplateProcessing::builder()
                .try_single(single.as_str())
                .and_then(|b| b.try_pair(pair.as_str()))
                .map_err(|e| tok_err(e.to_string()))?
                .special_tokens(specials)
                .build()
                .map_err(|e| tok_err(e.to_string()))?
                .into()
        } else {
            // Offsets only; matches the post-processor of Hugging Face's byte-level BPE
            // tokenizers.
            ByteLevel::default()
                .add_prefix_space(true)
                .trim_offsets(false)
                .use_regex(true)
                .into()
        };
        tokenizer.with_post_processor(Some(post));
        Ok(tokenizer)
    }
}

/// The Hugging Face Llama name of a GGUF tensor, if it has one.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, name) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match name {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Undoes the row permutation llama.cpp's converter applies to the q and k projections.
///
/// llama.cpp rotates interleaved pairs (rows `2i`, `2i+1` of a head), Hugging Face
/// rotates halves (rows `i`, `i + head_dim/2`), so the converter reorders each head's
/// rows with `w.reshape(n_head, 2, head_dim/2, in).swapaxes(1, 2)`. The inverse viewed as
/// `(n_head, head_dim/2, 2, in)` swaps the same axes back. For k, `n_head` is the number
/// of key/value heads.
pub fn unpermute_qk(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if n_head == 0 || out % (2 * n_head) != 0 {
        candle_core::bail!("{out} rows cannot be split into {n_head} heads of even size");
    }
    let half = out / n_head / 2;
    w.reshape((n_head, half, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))
}

/// llama.cpp's q/k permutation (the converter's direction), the inverse of
/// [`unpermute_qk`]: needed to write GGUF files, and to check the round trip.
pub fn permute_qk(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if n_head == 0 || out % (2 * n_head) != 0 {
        candle_core::bail!("{out} rows cannot be split into {n_head} heads of even size");
    }
    let half = out / n_head / 2;
    w.reshape((n_head, 2, half, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))
}

type Md = HashMap<String, Value>;

fn get<'a>(path: &Path, md: &'a Md, key: &str) -> Result<&'a Value> {
    md.get(key).ok_or_else(|| ModelIoError::MissingKey {
        path: path.to_path_buf(),
        key: key.to_string(),
    })
}

fn bad_key(path: &Path, key: &str, reason: String) -> ModelIoError {
    ModelIoError::BadKey {
        path: path.to_path_buf(),
        key: key.to_string(),
        reason,
    }
}

/// Any GGUF integer as an `i64` (writers differ in the integer width they pick).
fn as_int(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

fn get_usize(path: &Path, md: &Md, key: &str) -> Result<usize> {
    let v = get(path, md, key)?;
    as_int(v)
        .and_then(|x| usize::try_from(x).ok())
        .ok_or_else(|| {
            bad_key(
                path,
                key,
                format!("expected a non-negative integer, found {v:?}"),
            )
        })
}

fn get_opt_u32(path: &Path, md: &Md, key: &str) -> Result<Option<u32>> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => as_int(v)
            .and_then(|x| u32::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| bad_key(path, key, format!("expected a token id, found {v:?}"))),
    }
}

fn get_f64(path: &Path, md: &Md, key: &str) -> Result<f64> {
    let v = get(path, md, key)?;
    match v {
        Value::F32(x) => Ok(*x as f64),
        Value::F64(x) => Ok(*x),
        v => as_int(v)
            .map(|x| x as f64)
            .ok_or_else(|| bad_key(path, key, format!("expected a number, found {v:?}"))),
    }
}

fn get_str<'a>(path: &Path, md: &'a Md, key: &str) -> Result<&'a str> {
    match get(path, md, key)? {
        Value::String(s) => Ok(s),
        v => Err(bad_key(
            path,
            key,
            format!("expected a string, found {v:?}"),
        )),
    }
}

fn get_opt_str<'a>(path: &Path, md: &'a Md, key: &str) -> Result<Option<&'a str>> {
    match md.get(key) {
        None => Ok(None),
        Some(_) => get_str(path, md, key).map(Some),
    }
}

fn get_opt_bool(path: &Path, md: &Md, key: &str) -> Result<Option<bool>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(bad_key(path, key, format!("expected a bool, found {v:?}"))),
    }
}

fn get_str_array<'a>(path: &Path, md: &'a Md, key: &str) -> Result<Vec<&'a String>> {
    match get(path, md, key)? {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s),
                v => Err(bad_key(
                    path,
                    key,
                    format!("item {i} is not a string: {v:?}"),
                )),
            })
            .collect(),
        v => Err(bad_key(
            path,
            key,
            format!("expected an array, found {:?}", v.value_type()),
        )),
    }
}

fn int_array(path: &Path, key: &str, v: &Value) -> Result<Vec<i64>> {
    match v {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                as_int(v)
                    .ok_or_else(|| bad_key(path, key, format!("item {i} is not an integer: {v:?}")))
            })
            .collect(),
        v => Err(bad_key(
            path,
            key,
            format!("expected an array, found {:?}", v.value_type()),
        )),
    }
}

fn read_metadata(path: &Path, content: &Content) -> Result<GgufMetadata> {
    let md = &content.metadata;
    let architecture = get_str(path, md, "general.architecture")?.to_string();
    if architecture != LLAMA_ARCH {
        return Err(ModelIoError::Architecture {
            path: path.to_path_buf(),
            found: architecture,
        });
    }
    let name = get_opt_str(path, md, "general.name")?.map(str::to_string);
    let block_count = get_usize(path, md, "llama.block_count")?;
    let embedding_length = get_usize(path, md, "llama.embedding_length")?;
    let feed_forward_length = get_usize(path, md, "llama.feed_forward_length")?;
    let head_count = get_usize(path, md, "llama.attention.head_count")?;
    let head_count_kv = get_usize(path, md, "llama.attention.head_count_kv")?;
    let context_length = get_usize(path, md, "llama.context_length")?;
    let rms_norm_eps = get_f64(path, md, "llama.attention.layer_norm_rms_epsilon")?;
    // llama.cpp's own default when the key is absent.
    let rope_freq_base = match md.get("llama.rope.freq_base") {
        Some(_) => get_f64(path, md, "llama.rope.freq_base")? as f32,
        None => 10_000.0,
    };
    if head_count == 0 || head_count_kv == 0 || embedding_length % head_count != 0 {
        return Err(bad_key(
            path,
            "llama.attention.head_count",
            format!("{head_count} heads do not divide the embedding size {embedding_length}"),
        ));
    }
    if head_count % head_count_kv != 0 {
        return Err(bad_key(
            path,
            "llama.attention.head_count_kv",
            format!("{head_count_kv} key/value heads do not divide {head_count} heads"),
        ));
    }
    let head_dim = embedding_length / head_count;
    if head_dim % 2 != 0 {
        return Err(bad_key(
            path,
            "llama.attention.head_count",
            format!("head size {head_dim} is odd: RoPE needs pairs"),
        ));
    }
    let rope_dimension_count = match md.get("llama.rope.dimension_count") {
        Some(_) => get_usize(path, md, "llama.rope.dimension_count")?,
        None => head_dim,
    };
    if rope_dimension_count != head_dim {
        return Err(bad_key(
            path,
            "llama.rope.dimension_count",
            format!(
                "partial RoPE ({rope_dimension_count} of {head_dim} dimensions) is not supported"
            ),
        ));
    }
    if md.contains_key("llama.rope.scaling.type") {
        return Err(bad_key(
            path,
            "llama.rope.scaling.type",
            "RoPE scaling is not supported".to_string(),
        ));
    }
    let embd = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| ModelIoError::MissingTensor {
            path: path.to_path_buf(),
            name: "token_embd.weight".to_string(),
        })?;
    // llama.vocab_size is optional in GGUF; the embedding matrix is authoritative.
    let vocab_size = embd.shape.dims().first().copied().unwrap_or(0);
    if let Some(v) = md.get("llama.vocab_size") {
        if as_int(v) != Some(vocab_size as i64) {
            return Err(bad_key(
                path,
                "llama.vocab_size",
                format!("{v:?} disagrees with token_embd.weight ({vocab_size} rows)"),
            ));
        }
    }
    let tie_word_embeddings = !content.tensor_infos.contains_key("output.weight");
    Ok(GgufMetadata {
        architecture,
        name,
        block_count,
        embedding_length,
        feed_forward_length,
        head_count,
        head_count_kv,
        rope_dimension_count,
        rope_freq_base,
        rms_norm_eps,
        context_length,
        vocab_size,
        tie_word_embeddings,
        bos_token_id: get_opt_u32(path, md, "tokenizer.ggml.bos_token_id")?,
        eos_token_id: get_opt_u32(path, md, "tokenizer.ggml.eos_token_id")?,
        padding_token_id: get_opt_u32(path, md, "tokenizer.ggml.padding_token_id")?,
        chat_template: get_opt_str(path, md, "tokenizer.chat_template")?.map(str::to_string),
    })
}
