//! A Llama-family decoder written for training as well as for decoding.
//!
//! `candle_transformers::models::llama` is an inference model: its softmax, RMSNorm and
//! RoPE are fused kernels without a backward pass, its forward returns only the last
//! position's logits and its KV cache cannot be forked or reordered. This module is the
//! same architecture (same tensor names, same numbers — tested for parity) with:
//!
//! - [`Llama::forward`]: logits at every position, causal + padding mask, differentiable end
//!   to end (every op is one candle's autograd knows, see [`super::ops`]);
//! - [`Llama::forward_cached`]: incremental decoding with a [`KvCache`] that beam search can
//!   fork ([`KvCache::select`] with `[0, 0, 0]`) and reorder after every step;
//! - three ways to train: full fine-tuning (weights from a `VarMap`, see
//!   [`varmap_from_tensors`]), LoRA adapters ([`Llama::new_with_lora`]), and training only
//!   the rows added by [`extend_vocab`] ([`LoraConfig::train_new_rows_from`]);
//! - export: [`Llama::merged_weights`] folds adapters into plain Hugging Face tensors.
//!
//! Grouped-query attention is computed without materialising repeated key/value heads: the
//! queries of the heads that share a key/value head are stacked along the sequence axis and
//! multiplied by that head once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::config::{LlamaConfig, RopeScaling};
use super::items::{ItemKeys, ItemState, ITEM_TABLE};
use super::ops;
use super::packed::{Packed, WeightFormat};
use super::skinny;
use super::soft_prompt::{Slot as SoftSlot, SoftInputs, SoftPrompt};

mod decoding;
pub use decoding::Part;

/// Errors of the model module.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A `config.json` that cannot be parsed, naming where it came from.
    #[error("{origin}: {reason}")]
    Config { origin: String, reason: String },
    /// A parsed config that describes no buildable model.
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    #[error("invalid LoRA config: {0}")]
    Lora(String),
    #[error("weight {name} is missing")]
    MissingTensor { name: String },
    #[error("{what}: expected {expected}, found {found}")]
    Shape {
        what: &'static str,
        expected: String,
        found: String,
    },
    #[error("token id {id} is outside the vocabulary ({vocab_size} tokens)")]
    TokenOutOfRange { id: u32, vocab_size: usize },
    #[error("{needed} positions exceed max_position_embeddings ({max})")]
    TooLong { needed: usize, max: usize },
    #[error("the KV cache holds {cache} rows but the input has {input}")]
    BatchMismatch { cache: usize, input: usize },
    #[error("row {row} selected from a KV cache of {batch} rows")]
    RowOutOfRange { row: u32, batch: usize },
    #[error("position {row} selected from a batch of {positions} positions")]
    PositionOutOfRange { row: u32, positions: usize },
    #[error("cannot pack {name} into bf16 or int8: {why}")]
    Packing { name: String, why: &'static str },
}

/// Result alias of this module.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Additive attention bias for masked positions. Finite rather than `-inf` so that a row
/// with every key masked (an all-padding sequence) gives a uniform softmax, not NaN;
/// `exp(-1e30 - max)` is exactly 0 in f32, so unmasked rows are unaffected.
const MASKED: f32 = -1e30;

/// Standard deviation of freshly initialised weights (`initializer_range` in
/// `transformers`' Llama).
const INIT_STD: f64 = 0.02;

/// The linear layers LoRA can target, by their Hugging Face names.
pub const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Parameter-efficient training: low-rank adapters and/or new vocabulary rows.
///
/// A model built with [`Llama::new_with_lora`] has frozen base weights. Each linear layer
/// named in `targets` gets `A` (`[rank, in]`, uniform in ±1/√in, PEFT's Kaiming init) and
/// `B` (`[out, rank]`, zeros), and computes `W x + (alpha / rank) · B A x`: the model starts
/// exactly equal to the base model. Because `B` starts at zero, the very first backward pass
/// gives `A` a zero gradient; it moves once `B` has.
///
/// `train_new_rows_from = Some(n_old)` also trains the embedding rows `n_old..vocab_size`
/// (the tokens [`extend_vocab`] added, e.g. SID tokens), and the same `lm_head` rows when
/// the head is untied. They are trained as a zero-initialised delta added to those rows
/// only, rather than as the whole matrix: the old rows stay bit-identical, gradients and
/// optimiser state cost `n_new × hidden` instead of `vocab × hidden`, and the lookup adds
/// the delta only where a token is new. A tied head uses the updated rows automatically.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Short names from [`LORA_TARGETS`], e.g. `["q_proj", "v_proj"]`.
    pub targets: Vec<String>,
    /// Train the vocabulary rows from this id on (the first added token).
    #[serde(default)]
    pub train_new_rows_from: Option<usize>,
}

impl LoraConfig {
    /// The factor applied to `B A x`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank.max(1) as f64
    }

    fn validate(&self, cfg: &LlamaConfig) -> Result<()> {
        for t in &self.targets {
            if !LORA_TARGETS.contains(&t.as_str()) {
                return Err(ModelError::Lora(format!(
                    "unknown target {t:?} (expected one of {})",
                    LORA_TARGETS.join(", ")
                )));
            }
        }
        if !self.targets.is_empty() && self.rank == 0 {
            return Err(ModelError::Lora("rank must be at least 1".into()));
        }
        if !(self.alpha.is_finite()) {
            return Err(ModelError::Lora("alpha must be finite".into()));
        }
        if let Some(n_old) = self.train_new_rows_from {
            if n_old == 0 || n_old >= cfg.vocab_size {
                return Err(ModelError::Lora(format!(
                    "train_new_rows_from {n_old} leaves no new rows in a vocabulary of {}",
                    cfg.vocab_size
                )));
            }
        }
        if self.targets.is_empty() && self.train_new_rows_from.is_none() {
            return Err(ModelError::Lora(
                "no targets and no new rows: nothing would be trained".into(),
            ));
        }
        Ok(())
    }
}

/// Low-rank adapter of one linear layer.
#[derive(Clone, Debug)]
struct Lora {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

/// A bias-free linear layer `y = x Wᵀ` with an optional adapter.
#[derive(Clone, Debug)]
struct Linear {
    /// Hugging Face name without `.weight`.
    name: String,
    /// `[out, in]`; an empty `[0, in]` once packed.
    weight: Tensor,
    lora: Option<Lora>,
    /// The weight in bf16 or int8, for decoding ([`Llama::with_weights`]).
    packed: Option<Arc<Packed>>,
}

impl Linear {
    fn detached(&self) -> Linear {
        Linear {
            name: self.name.clone(),
            weight: self.weight.detach(),
            lora: self.lora.as_ref().map(|l| Lora {
                a: l.a.detach(),
                b: l.b.detach(),
                scale: l.scale,
            }),
            packed: self.packed.clone(),
        }
    }

    /// The weight stored as `format`, the f32 copy released.
    fn pack(&mut self, format: WeightFormat) -> Result<()> {
        if self.lora.is_some() && self.packed.is_none() {
            return Err(ModelError::Packing {
                name: self.name.clone(),
                why: "it has an adapter (merge it first)",
            });
        }
        pack_weight(&mut self.weight, &mut self.packed, format)
    }

    /// `x Wᵀ` (+ the adapter's share). `rowwise` (decoding): every row through the
    /// streaming product, whose result for a row does not depend on the other rows in
    /// the pass, so a prompt computed in pieces (prefix cache) or batched with other
    /// requests gives bit for bit what it gives alone.
    fn forward(&self, x: &Tensor, rowwise: bool) -> Result<Tensor> {
        let (b, t, i) = x.dims3()?;
        let x2 = x.reshape((b * t, i))?;
        if let Some(p) = &self.packed {
            let y = p.matmul_t(&x2)?;
            let out = y.dim(1)?;
            return Ok(y.reshape((b, t, out))?);
        }
        let product = match rowwise {
            true => skinny::matmul_t_rows(&x2, &self.weight)?,
            false => skinny::matmul_t(&x2, &self.weight)?,
        };
        let mut y = match product {
            Some(y) => y,
            None => x2.matmul(&self.weight.t()?)?,
        };
        if let Some(l) = &self.lora {
            let low = x2.matmul(&l.a.t()?)?.matmul(&l.b.t()?)?;
            y = (y + low.affine(l.scale, 0.0)?)?;
        }
        let out = y.dim(1)?;
        Ok(y.reshape((b, t, out))?)
    }

    fn merged(&self) -> Result<Tensor> {
        if let Some(p) = &self.packed {
            return Ok(p.dequantize()?);
        }
        let w = self.weight.detach();
        Ok(match &self.lora {
            None => w.copy()?,
            Some(l) => (w + l.b.detach().matmul(&l.a.detach())?.affine(l.scale, 0.0)?)?,
        })
    }
}

/// `weight` stored as `format` in `packed`, replaced by an empty `[0, in]` tensor (the f32
/// copy released); nothing when it is packed already or `format` is f32.
fn pack_weight(
    weight: &mut Tensor,
    packed: &mut Option<Arc<Packed>>,
    format: WeightFormat,
) -> Result<()> {
    if packed.is_some() {
        return Ok(());
    }
    if let Some(p) = Packed::new(weight, format)? {
        *weight = Tensor::zeros((0, p.dims().1), DType::F32, weight.device())?;
        *packed = Some(Arc::new(p));
    }
    Ok(())
}

/// A `[vocab, hidden]` matrix used as embedding table or output head, with optional
/// trainable rows from `n_old` on (see [`LoraConfig::train_new_rows_from`]).
#[derive(Clone, Debug)]
struct TokenMatrix {
    name: String,
    weight: Tensor,
    /// `(n_old, delta [vocab - n_old, hidden])`.
    new_rows: Option<(usize, Tensor)>,
    /// The matrix in bf16 or int8, for decoding ([`Llama::with_weights`]).
    packed: Option<Arc<Packed>>,
}

impl TokenMatrix {
    fn detached(&self) -> TokenMatrix {
        TokenMatrix {
            name: self.name.clone(),
            weight: self.weight.detach(),
            new_rows: self.new_rows.as_ref().map(|(n, d)| (*n, d.detach())),
            packed: self.packed.clone(),
        }
    }

    /// The matrix stored as `format`, the f32 copy released.
    fn pack(&mut self, format: WeightFormat) -> Result<()> {
        if self.new_rows.is_some() && self.packed.is_none() {
            return Err(ModelError::Packing {
                name: self.name.clone(),
                why: "it has trainable new rows (merge them first)",
            });
        }
        pack_weight(&mut self.weight, &mut self.packed, format)
    }

    /// Rows for `ids` (`[n]` u32, already range-checked) → `[n, hidden]`.
    fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        if let Some(p) = &self.packed {
            return Ok(p.embedding(ids)?.to_device(ids.device())?);
        }
        let base = self.weight.embedding(ids)?;
        let Some((n_old, delta)) = &self.new_rows else {
            return Ok(base);
        };
        let ids_v = ids.to_vec1::<u32>()?;
        let n_old = *n_old as u32;
        let idx: Vec<u32> = ids_v.iter().map(|&i| i.saturating_sub(n_old)).collect();
        let is_new: Vec<f32> = ids_v
            .iter()
            .map(|&i| if i >= n_old { 1.0 } else { 0.0 })
            .collect();
        let dev = ids.device();
        let n = ids_v.len();
        let d = delta
            .embedding(&Tensor::new(idx, dev)?)?
            .broadcast_mul(&Tensor::from_vec(is_new, (n, 1), dev)?)?;
        Ok((base + d)?)
    }

    /// Output logits for `x` (`[n, hidden]`) → `[n, vocab]`; `rowwise` as in
    /// [`Linear::forward`].
    fn project(&self, x: &Tensor, rowwise: bool) -> Result<Tensor> {
        if let Some(p) = &self.packed {
            return Ok(p.matmul_t(x)?);
        }
        let product = match rowwise {
            true => skinny::matmul_t_rows(x, &self.weight)?,
            false => skinny::matmul_t(x, &self.weight)?,
        };
        match &self.new_rows {
            None => match product {
                Some(y) => Ok(y),
                None => Ok(x.matmul(&self.weight.t()?)?),
            },
            Some((n_old, delta)) => {
                let old = self.weight.narrow(0, 0, *n_old)?;
                let new = (self.weight.narrow(0, *n_old, delta.dim(0)?)? + delta)?;
                let lo = x.matmul(&old.t()?)?;
                let hi = x.matmul(&new.t()?)?;
                Ok(Tensor::cat(&[&lo, &hi], 1)?)
            }
        }
    }

    fn merged(&self) -> Result<Tensor> {
        if let Some(p) = &self.packed {
            return Ok(p.dequantize()?);
        }
        let w = self.weight.detach();
        Ok(match &self.new_rows {
            None => w.copy()?,
            Some((n_old, delta)) => {
                let old = w.narrow(0, 0, *n_old)?;
                let new = (w.narrow(0, *n_old, delta.dim(0)?)? + delta.detach())?;
                Tensor::cat(&[&old, &new], 0)?
            }
        })
    }
}

#[derive(Clone, Debug)]
struct RmsNorm {
    name: String,
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn detached(&self) -> RmsNorm {
        RmsNorm {
            name: self.name.clone(),
            weight: self.weight.detach(),
            eps: self.eps,
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

#[derive(Clone, Debug)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
}

impl Attention {
    /// Training: `x` `[b, t, hidden]`; `cos`/`sin` narrowed to the positions of `x`;
    /// `bias` broadcast to `[b, heads, t, keys]` (causal and padding masks).
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (q, k, v) = self.heads(
            &self.q.forward(x, false)?,
            &self.k.forward(x, false)?,
            &self.v.forward(x, false)?,
            b,
            t,
            cos,
            sin,
        )?;
        let y = self.attend(&q, &k, &v, bias, None)?;
        self.o.forward(&y, false)
    }

    /// Projected queries, keys and values (`[b, t, heads · head_dim]` each) as heads
    /// `[b, heads, t, head_dim]`, queries and keys rotated for their positions.
    #[allow(clippy::too_many_arguments)]
    fn heads(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        b: usize,
        t: usize,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (nh, nkv, hd) = (self.n_heads, self.n_kv, self.head_dim);
        let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?;
        let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?;
        let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let q = ops::rope(&q, cos, sin)?.contiguous()?;
        let k = ops::rope(&k, cos, sin)?.contiguous()?;
        Ok((q, k, v))
    }

    /// Attention of queries `[b, heads, t, head_dim]` over keys and values
    /// `[b, kv_heads, s, head_dim]` → `[b, t, heads · head_dim]`, before the output
    /// projection. `causal_from`: decoding, the queries are positions `s - t..s` and
    /// each row is computed on its own (see [`skinny::attention`]); otherwise `bias`
    /// holds the masks.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: Option<&Tensor>,
        causal_from: Option<usize>,
    ) -> Result<Tensor> {
        let (b, _, t, _) = q.dims4()?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv, self.head_dim);
        let s = k.dim(2)?;
        let rep = nh / nkv;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut causal_bias = None;
        if let Some(offset) = causal_from {
            let qg = q.reshape((b, nkv, rep * t, hd))?;
            let causal = skinny::Causal { rows: t, offset };
            if let Some(y) = skinny::attention(&qg, k, v, scale as f32, causal)? {
                return Ok(y
                    .reshape((b, nh, t, hd))?
                    .transpose(1, 2)?
                    .reshape((b, t, nh * hd))?);
            }
            // Autograd on: the same attention as tensor operations.
            let m: Vec<f32> = (0..t)
                .flat_map(|i| (0..s).map(move |j| if j > offset + i { MASKED } else { 0.0 }))
                .collect();
            causal_bias = Some(Tensor::from_vec(m, (1, 1, t, s), q.device())?);
        }
        // Heads h = g·rep + r share key/value head g (Hugging Face's `repeat_kv` order):
        // stack their queries along the sequence axis instead of copying k and v `rep` times.
        let att = q
            .reshape((b, nkv, rep * t, hd))?
            .matmul(&k.t()?)?
            .affine(scale, 0.0)?
            .reshape((b, nh, t, s))?;
        let att = match bias.or(causal_bias.as_ref()) {
            Some(bias) => att.broadcast_add(bias)?,
            None => att,
        };
        let att = ops::softmax_last_dim(&att)?;
        Ok(att
            .reshape((b, nkv, rep * t, s))?
            .matmul(v)?
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?)
    }
}

#[derive(Clone, Debug)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor, rowwise: bool) -> Result<Tensor> {
        let h = (self.gate.forward(x, rowwise)?.silu()? * self.up.forward(x, rowwise)?)?;
        self.down.forward(&h, rowwise)
    }
}

#[derive(Clone, Debug)]
struct Block {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    /// Training (decoding runs the layers in `decoding`).
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: Option<&Tensor>,
        drop: Option<(Dropout, u64)>,
    ) -> Result<Tensor> {
        let attn = self
            .attn
            .forward(&self.input_norm.forward(x)?, cos, sin, bias)?;
        let h = (x + apply_dropout(&attn, drop.map(|(d, site)| (d, 2 * site)))?)?;
        let mlp = self.mlp.forward(&self.post_norm.forward(&h)?, false)?;
        let out = (&h + apply_dropout(&mlp, drop.map(|(d, site)| (d, 2 * site + 1)))?)?;
        Ok(out)
    }
}

/// Dropout for training: each call of [`Llama::forward_train`] zeroes a share `p` of the
/// token embeddings and of every residual branch (attention and MLP outputs), scaling the
/// rest by `1 / (1 - p)`, as GPT-2 and SASRec do. Small catalogs give few training
/// sequences, and a model trained on them for many epochs memorises them (on Amazon
/// Scientific the training loss of a whole-history model fell far below its validation
/// loss); dropout is the usual remedy.
///
/// The masks come from `key` (and the site), not from a global generator: candle's CPU
/// generator cannot be seeded, and a key derived from the seed and the batch makes a run
/// reproducible and a resumed run identical to an uninterrupted one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    /// Probability of zeroing an element, in `[0, 1)`.
    pub p: f32,
    /// Seeds the masks of one forward pass.
    pub key: u64,
    /// Probability that a position loses its item vector ([`super::items`]) altogether,
    /// in `[0, 1)`; the vectors kept are not rescaled, so a kept vector is what inference
    /// adds. Item vectors let the model recall exact sequences, which it then prefers to
    /// what the SID codes generalise; dropping them makes it learn both.
    pub items: f32,
}

/// `x` with dropout `d` at site `site` (each site of a forward pass draws its own mask).
fn apply_dropout(x: &Tensor, d: Option<(Dropout, u64)>) -> Result<Tensor> {
    let Some((d, site)) = d else {
        return Ok(x.clone());
    };
    if d.p <= 0.0 {
        return Ok(x.clone());
    }
    let mask = dropout_mask(x.elem_count(), d.p, d.key, site);
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok(x.mul(&mask)?)
}

/// `n` mask values: 0 with probability `p`, else `1 / (1 - p)`; a pure function of
/// `(key, site)`.
pub fn dropout_mask(n: usize, p: f32, key: u64, site: u64) -> Vec<f32> {
    let mut rng =
        ChaCha8Rng::seed_from_u64(key ^ site.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let keep = 1.0 - p;
    let scale = 1.0 / keep;
    (0..n)
        .map(|_| if rng.gen::<f32>() < keep { scale } else { 0.0 })
        .collect()
}

/// `cat([cache[rows], new], 2)` for `cache` `[b0, h, len, d]` and `new` `[b, h, t, d]`
/// (`rows` of length `b`, or all rows of `cache` in order when `None`).
///
/// One copy of the cache per step: gathering the rows and then appending were two, and
/// they were the largest cost of a beam step after the weights (profiled on SmolLM2).
fn append_rows(cache: &Tensor, rows: Option<&[u32]>, new: &Tensor) -> Result<Tensor> {
    let (b0, h, _, d) = cache.dims4()?;
    let (b, h2, _, d2) = new.dims4()?;
    let identity: Vec<u32>;
    let rows = match rows {
        Some(r) => r,
        None => {
            identity = (0..b0 as u32).collect();
            &identity
        }
    };
    if rows.len() != b || h2 != h || d2 != d {
        return Err(ModelError::Shape {
            what: "KV cache append",
            expected: format!("[{}, {h}, _, {d}]", rows.len()),
            found: format!("{:?}", new.shape()),
        });
    }
    if let Some(&row) = rows.iter().find(|&&r| r as usize >= b0) {
        return Err(ModelError::RowOutOfRange { row, batch: b0 });
    }
    if let Some(out) = append_rows_f32(cache, rows, new)? {
        return Ok(out);
    }
    let gathered = match rows.iter().enumerate().all(|(i, &r)| i == r as usize) && b == b0 {
        true => cache.clone(),
        false => cache.index_select(&Tensor::new(rows, cache.device())?, 0)?,
    };
    Ok(Tensor::cat(&[&gathered, new], 2)?)
}

/// [`append_rows`] as one copy into a fresh buffer, where no gradient is recorded and the
/// data is f32 on the CPU; `None` otherwise (the caller falls back to tensor ops).
fn append_rows_f32(
    cache: &Tensor,
    rows: &[u32],
    new: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    use candle_core::{DType, Storage};
    if cache.dtype() != DType::F32
        || new.dtype() != DType::F32
        || cache.track_op()
        || new.track_op()
        || !matches!(cache.device(), candle_core::Device::Cpu)
    {
        return Ok(None);
    }
    let (_, h, len, d) = cache.dims4()?;
    let (b, _, t, _) = new.dims4()?;
    let (cache, new) = (cache.contiguous()?, new.contiguous()?);
    let (cs, cl) = cache.storage_and_layout();
    let (ns, nl) = new.storage_and_layout();
    let (Storage::Cpu(cs), Storage::Cpu(ns)) = (&*cs, &*ns) else {
        return Ok(None);
    };
    let (Some((ca, cb)), Some((na, nb))) = (cl.contiguous_offsets(), nl.contiguous_offsets())
    else {
        return Ok(None);
    };
    let (cv, nv) = (
        &cs.as_slice::<f32>()?[ca..cb],
        &ns.as_slice::<f32>()?[na..nb],
    );
    let mut out = Vec::with_capacity(b * h * (len + t) * d);
    for (i, &r) in rows.iter().enumerate() {
        for head in 0..h {
            out.extend_from_slice(&cv[(r as usize * h + head) * len * d..][..len * d]);
            out.extend_from_slice(&nv[(i * h + head) * t * d..][..t * d]);
        }
    }
    Ok(Some(Tensor::from_vec(
        out,
        (b, h, len + t, d),
        cache.device(),
    )?))
}

/// Per-layer keys and values of the positions decoded so far, for [`Llama::forward_cached`].
///
/// Tensors are `[batch, kv_heads, len, head_dim]`, after RoPE. Cloning is cheap (tensors
/// are shared), which is what lets beam search keep and fork caches freely. Reordering
/// rows ([`KvCache::select`]) is lazy: it records which stored rows each sequence
/// continues, and the next forward pass gathers them while it appends the new positions.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    /// Row `i` of the batch continues stored row `rows[i]`; `None`: row `i` is row `i`.
    rows: Option<std::sync::Arc<[u32]>>,
    /// Per batch row (in the current order): where [`super::items`] stands in that
    /// sequence; empty before the first pass.
    items: Vec<ItemState>,
}

impl KvCache {
    /// An empty cache for a model with `cfg`'s layers.
    pub fn new(cfg: &LlamaConfig) -> Self {
        KvCache {
            layers: vec![None; cfg.num_hidden_layers],
            len: 0,
            rows: None,
            items: Vec::new(),
        }
    }

    /// Positions cached so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rows (sequences) in the cache, `None` while it is empty.
    pub fn batch_size(&self) -> Option<usize> {
        if let Some(rows) = &self.rows {
            return Some(rows.len());
        }
        self.stored_rows()
    }

    /// Rows of the stored tensors (before a pending [`KvCache::select`]).
    fn stored_rows(&self) -> Option<usize> {
        self.layers
            .iter()
            .flatten()
            .next()
            .and_then(|(k, _)| k.dim(0).ok())
    }

    /// Bytes held by the stored keys and values.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }

    /// A cache made of rows `rows` of this one, in that order: reorders beams after a
    /// beam-search step, or forks a prompt prefilled once into several beams
    /// (`select(&[0, 0, 0])`). Rows may repeat.
    pub fn select(&self, rows: &[u32]) -> Result<KvCache> {
        if rows.is_empty() {
            return Err(ModelError::Shape {
                what: "KvCache::select",
                expected: "at least one row".into(),
                found: "none".into(),
            });
        }
        let Some(batch) = self.batch_size() else {
            // Nothing cached yet: there is nothing to select from, only a batch to start.
            return Ok(self.clone());
        };
        if let Some(&row) = rows.iter().find(|&&r| r as usize >= batch) {
            return Err(ModelError::RowOutOfRange { row, batch });
        }
        let rows_in = rows;
        // Compose with a selection still pending: nothing is copied until the next pass.
        let rows: std::sync::Arc<[u32]> = match &self.rows {
            Some(prev) => rows.iter().map(|&r| prev[r as usize]).collect(),
            None => rows.into(),
        };
        // Item states are small: they are reordered now, in the new row order.
        let items = if self.items.len() == batch {
            rows_in.iter().map(|&r| self.items[r as usize]).collect()
        } else {
            Vec::new()
        };
        Ok(KvCache {
            layers: self.layers.clone(),
            len: self.len,
            rows: Some(rows),
            items,
        })
    }
}

/// What [`Llama`] loads its weights from.
struct Loader<'a> {
    vb: VarBuilder<'a>,
    /// Detach base weights (LoRA / new-rows mode): they must get no gradient even when `vb`
    /// is a `VarMap`.
    freeze: bool,
    lora: Option<(VarBuilder<'a>, &'a LoraConfig)>,
    /// Matrices already packed ([`Llama::new_packed`]), by name.
    packed: HashMap<String, Arc<Packed>>,
}

impl Loader<'_> {
    /// The packed matrix `name` (`[rows, cols]`), if there is one.
    fn packed(&self, name: &str, rows: usize, cols: usize) -> Result<Option<Arc<Packed>>> {
        match self.packed.get(name) {
            Some(p) if p.dims() != (rows, cols) => Err(ModelError::Shape {
                what: "packed matrix",
                expected: format!("{name} [{rows}, {cols}]"),
                found: format!("{:?}", p.dims()),
            }),
            p => Ok(p.cloned()),
        }
    }

    fn get(&self, shape: &[usize], name: &str, init: Init) -> Result<Tensor> {
        let w = self
            .vb
            .get_with_hints(shape, name, init)?
            .to_dtype(DType::F32)?;
        Ok(if self.freeze { w.detach() } else { w })
    }

    fn linear(&self, name: String, short: &str, d_in: usize, d_out: usize) -> Result<Linear> {
        if let Some(p) = self.packed(&format!("{name}.weight"), d_out, d_in)? {
            return Ok(Linear {
                name,
                weight: Tensor::zeros((0, d_in), DType::F32, &Device::Cpu)?,
                lora: None,
                packed: Some(p),
            });
        }
        let weight = self.get(
            &[d_out, d_in],
            &format!("{name}.weight"),
            Init::Randn {
                mean: 0.0,
                stdev: INIT_STD,
            },
        )?;
        let lora = match &self.lora {
            Some((vb, lc)) if lc.targets.iter().any(|t| t == short) => {
                let bound = 1.0 / (d_in as f64).sqrt();
                let a = vb.get_with_hints(
                    (lc.rank, d_in),
                    &format!("{name}.lora_A.weight"),
                    Init::Uniform {
                        lo: -bound,
                        up: bound,
                    },
                )?;
                let b = vb.get_with_hints(
                    (d_out, lc.rank),
                    &format!("{name}.lora_B.weight"),
                    Init::Const(0.0),
                )?;
                Some(Lora {
                    a,
                    b,
                    scale: lc.scale(),
                })
            }
            _ => None,
        };
        Ok(Linear {
            name,
            weight,
            lora,
            packed: None,
        })
    }

    fn token_matrix(&self, name: &str, vocab: usize, hidden: usize) -> Result<TokenMatrix> {
        if let Some(p) = self.packed(&format!("{name}.weight"), vocab, hidden)? {
            return Ok(TokenMatrix {
                name: name.to_string(),
                weight: Tensor::zeros((0, hidden), DType::F32, &Device::Cpu)?,
                new_rows: None,
                packed: Some(p),
            });
        }
        let weight = self.get(
            &[vocab, hidden],
            &format!("{name}.weight"),
            Init::Randn {
                mean: 0.0,
                stdev: INIT_STD,
            },
        )?;
        let new_rows = match &self.lora {
            Some((vb, lc)) => match lc.train_new_rows_from {
                Some(n_old) => Some((
                    n_old,
                    vb.get_with_hints(
                        (vocab - n_old, hidden),
                        &format!("{name}.new_rows"),
                        Init::Const(0.0),
                    )?,
                )),
                None => None,
            },
            None => None,
        };
        Ok(TokenMatrix {
            name: name.to_string(),
            weight,
            new_rows,
            packed: None,
        })
    }

    fn norm(&self, name: String, hidden: usize, eps: f64) -> Result<RmsNorm> {
        let weight = self.get(&[hidden], &format!("{name}.weight"), Init::Const(1.0))?;
        Ok(RmsNorm { name, weight, eps })
    }
}

/// A Llama-family decoder (f32).
#[derive(Clone, Debug)]
pub struct Llama {
    cfg: LlamaConfig,
    embed: TokenMatrix,
    /// `None` when tied to `embed`.
    lm_head: Option<TokenMatrix>,
    layers: Vec<Block>,
    norm: RmsNorm,
    /// `[max_position_embeddings, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
    /// Input-side item vectors ([`super::items`]), when the model was trained with them.
    items: Option<ItemInput>,
    /// Projections of sentence-encoder vectors ([`super::soft_prompt`]), when the model
    /// was trained with them.
    soft: Option<SoftPrompt>,
}

/// The item table `[items, hidden]` and the keys that say which position gets which row.
#[derive(Clone, Debug)]
struct ItemInput {
    table: Tensor,
    keys: std::sync::Arc<ItemKeys>,
}

impl Llama {
    /// Builds the model from Hugging Face-named weights.
    ///
    /// Weights from a `VarMap` (`VarBuilder::from_varmap`) are trainable: this is full
    /// fine-tuning, and a fresh `VarMap` initialises missing weights (N(0, 0.02), norms 1;
    /// unseeded — use [`Llama::init_tensors`] + [`varmap_from_tensors`] for reproducible
    /// runs). Weights from safetensors or a tensor map are constants.
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Llama> {
        Self::new_packed(cfg, vb, HashMap::new())
    }

    /// [`Llama::new`] with some matrices already packed (by name, as
    /// [`super::hfdir::HfDir::load_packed`] reads them): an inference model, as
    /// [`Llama::with_weights`] makes one, without ever holding those matrices in f32.
    pub fn new_packed(
        cfg: &LlamaConfig,
        vb: VarBuilder,
        packed: HashMap<String, Packed>,
    ) -> Result<Llama> {
        let loader = Loader {
            vb,
            freeze: false,
            lora: None,
            packed: packed.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
        };
        Self::build(cfg, &loader)
    }

    /// Builds the model with frozen base weights (detached, whatever `base_vb` is) and the
    /// adapters / new-row deltas of `lora_cfg` taken from `lora_vb` (created there when
    /// missing: pass a `VarMap`'s builder, and give that `VarMap`'s variables to the
    /// optimiser). Adapter names are the layer's name + `.lora_A.weight` / `.lora_B.weight`,
    /// new rows `model.embed_tokens.new_rows` and `lm_head.new_rows`.
    pub fn new_with_lora(
        cfg: &LlamaConfig,
        base_vb: VarBuilder,
        lora_vb: VarBuilder,
        lora_cfg: &LoraConfig,
    ) -> Result<Llama> {
        cfg.validate()?;
        lora_cfg.validate(cfg)?;
        let lora_vb = lora_vb.to_dtype(DType::F32);
        let loader = Loader {
            vb: base_vb,
            freeze: true,
            lora: Some((lora_vb, lora_cfg)),
            packed: HashMap::new(),
        };
        Self::build(cfg, &loader)
    }

    fn build(cfg: &LlamaConfig, ld: &Loader) -> Result<Llama> {
        cfg.validate()?;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let embed = ld.token_matrix("model.embed_tokens", cfg.vocab_size, h)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(ld.token_matrix("lm_head", cfg.vocab_size, h)?)
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let at = |s: &str| format!("{p}.self_attn.{s}");
            let ml = |s: &str| format!("{p}.mlp.{s}");
            let attn = Attention {
                q: ld.linear(at("q_proj"), "q_proj", h, nh * hd)?,
                k: ld.linear(at("k_proj"), "k_proj", h, nkv * hd)?,
                v: ld.linear(at("v_proj"), "v_proj", h, nkv * hd)?,
                o: ld.linear(at("o_proj"), "o_proj", nh * hd, h)?,
                n_heads: nh,
                n_kv: nkv,
                head_dim: hd,
            };
            let mlp = Mlp {
                gate: ld.linear(ml("gate_proj"), "gate_proj", h, cfg.intermediate_size)?,
                up: ld.linear(ml("up_proj"), "up_proj", h, cfg.intermediate_size)?,
                down: ld.linear(ml("down_proj"), "down_proj", cfg.intermediate_size, h)?,
            };
            layers.push(Block {
                input_norm: ld.norm(format!("{p}.input_layernorm"), h, cfg.rms_norm_eps)?,
                attn,
                post_norm: ld.norm(format!("{p}.post_attention_layernorm"), h, cfg.rms_norm_eps)?,
                mlp,
            });
        }
        let norm = ld.norm("model.norm".into(), h, cfg.rms_norm_eps)?;
        let (cos, sin) = rope_tables(cfg, ld.vb.device())?;
        Ok(Llama {
            cfg: cfg.clone(),
            embed,
            lm_head,
            layers,
            norm,
            cos,
            sin,
            items: None,
            soft: None,
        })
    }

    /// The same model reading item vectors ([`super::items`]): `table` `[items, hidden]`
    /// (a trainable `Var`'s tensor while training, the saved [`ITEM_TABLE`] after), row
    /// `i` for item `i` of `keys`.
    pub fn with_items(mut self, table: Tensor, keys: ItemKeys) -> Result<Llama> {
        let want = [keys.len(), self.cfg.hidden_size];
        if table.dims() != want {
            return Err(ModelError::Shape {
                what: "item table",
                expected: format!("{want:?} (items × hidden)"),
                found: format!("{:?}", table.dims()),
            });
        }
        self.items = Some(ItemInput {
            table,
            keys: std::sync::Arc::new(keys),
        });
        Ok(self)
    }

    /// Whether the model reads item vectors.
    pub fn has_items(&self) -> bool {
        self.items.is_some()
    }

    /// The same model reading soft prompts ([`super::soft_prompt`]): `request` and
    /// `taste` `[hidden, dim]` (trainable `Var` tensors while training).
    pub fn with_soft_prompt(mut self, request: Tensor, taste: Tensor) -> Result<Llama> {
        self.soft = Some(SoftPrompt::new(request, taste, self.cfg.hidden_size)?);
        Ok(self)
    }

    /// The same model with its matrices (every layer's projections and the token
    /// matrix) stored as `format`, for decoding: see [`super::packed`] for what each
    /// format keeps. The f32 copies are released (a SmolLM2-135M in int8 holds about a
    /// quarter of the bytes), so the model is for inference only. Fails on a model with
    /// adapters or trainable new rows (merge them first).
    pub fn with_weights(mut self, format: WeightFormat) -> Result<Llama> {
        if format == WeightFormat::F32 {
            return Ok(self);
        }
        self.embed.pack(format)?;
        if let Some(head) = &mut self.lm_head {
            head.pack(format)?;
        }
        for b in &mut self.layers {
            for l in [
                &mut b.attn.q,
                &mut b.attn.k,
                &mut b.attn.v,
                &mut b.attn.o,
                &mut b.mlp.gate,
                &mut b.mlp.up,
                &mut b.mlp.down,
            ] {
                l.pack(format)?;
            }
        }
        Ok(self)
    }

    /// The width of the vectors the model reads as soft prompts, if it reads any.
    pub fn soft_dim(&self) -> Option<usize> {
        self.soft.as_ref().map(SoftPrompt::dim)
    }

    /// Adds soft-prompt vectors to the embedded input (none given, or a model without
    /// projections: unchanged; vectors for a model without projections are an error, so
    /// a caller never believes words were read that were not).
    fn add_soft(&self, x: Tensor, soft: Option<&SoftInputs>) -> Result<Tensor> {
        match (soft.filter(|s| !s.is_empty()), &self.soft) {
            (None, _) => Ok(x),
            (Some(inputs), Some(proj)) => proj.add(x, inputs),
            (Some(_), None) => Err(ModelError::InvalidConfig(
                "soft-prompt vectors given to a model trained without them".into(),
            )),
        }
    }

    /// Adds the item vectors of `input_ids` `[b, t]` to `x` `[b, t, hidden]`, reading each
    /// row on from `states` (one per row, advanced past the new tokens).
    fn add_items(
        &self,
        x: Tensor,
        input_ids: &Tensor,
        states: &mut [ItemState],
        dropout: Option<Dropout>,
    ) -> Result<Tensor> {
        let Some(items) = &self.items else {
            return Ok(x);
        };
        let (b, t, h) = x.dims3()?;
        let ids = input_ids.to_vec2::<u32>()?;
        let marks: Vec<u32> = ids
            .iter()
            .zip(states.iter_mut())
            .flat_map(|(row, st)| items.keys.annotate(st, row))
            .collect();
        if marks.iter().all(|&m| m == 0) {
            return Ok(x);
        }
        let rows: Vec<u32> = marks.iter().map(|&m| m.saturating_sub(1)).collect();
        let mut keep: Vec<f32> = marks.iter().map(|&m| f32::from(u8::from(m > 0))).collect();
        if let Some(d) = dropout.filter(|d| d.items > 0.0) {
            // Site u64::MAX: apart from the per-layer sites of `apply_dropout`.
            let drop = dropout_mask(keep.len(), d.items, d.key, u64::MAX);
            for (k, m) in keep.iter_mut().zip(drop) {
                if m == 0.0 {
                    *k = 0.0;
                }
            }
        }
        let dev = x.device();
        let v = items
            .table
            .embedding(&Tensor::from_vec(rows, b * t, dev)?)?
            .broadcast_mul(&Tensor::from_vec(keep, (b * t, 1), dev)?)?
            .reshape((b, t, h))?;
        Ok((x + v)?)
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        self.cos.device()
    }

    /// Fresh weights for `cfg` (N(0, 0.02), norms 1), a pure function of `seed`: candle's
    /// CPU generator cannot be seeded, so reproducible training from scratch starts here
    /// (then [`varmap_from_tensors`]).
    pub fn init_tensors(cfg: &LlamaConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
        cfg.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let dev = Device::Cpu;
        let mut out = HashMap::new();
        for (name, shape) in weight_shapes(cfg) {
            let n: usize = shape.iter().product();
            let t = if shape.len() == 1 {
                Tensor::ones(n, DType::F32, &dev)?
            } else {
                let v: Vec<f32> = (0..n)
                    .map(|_| (gaussian(&mut rng) * INIT_STD) as f32)
                    .collect();
                Tensor::from_vec(v, shape.as_slice(), &dev)?
            };
            out.insert(name, t);
        }
        Ok(out)
    }

    /// `[b, t]` u32 ids → `(b, t)`, checking rank, dtype, emptiness and the id range.
    fn check_ids(&self, input_ids: &Tensor) -> Result<(usize, usize)> {
        let (b, t) = input_ids.dims2().map_err(|_| ModelError::Shape {
            what: "input_ids",
            expected: "[batch, seq]".into(),
            found: format!("{:?}", input_ids.dims()),
        })?;
        if input_ids.dtype() != DType::U32 {
            return Err(ModelError::Shape {
                what: "input_ids dtype",
                expected: "u32".into(),
                found: format!("{:?}", input_ids.dtype()),
            });
        }
        if b == 0 || t == 0 {
            return Err(ModelError::Shape {
                what: "input_ids",
                expected: "at least one token".into(),
                found: format!("{:?}", input_ids.dims()),
            });
        }
        let max = input_ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max as usize >= self.cfg.vocab_size {
            return Err(ModelError::TokenOutOfRange {
                id: max,
                vocab_size: self.cfg.vocab_size,
            });
        }
        Ok((b, t))
    }

    fn embed_ids(&self, input_ids: &Tensor, b: usize, t: usize) -> Result<Tensor> {
        Ok(self
            .embed
            .lookup(&input_ids.flatten_all()?)?
            .reshape((b, t, self.cfg.hidden_size))?)
    }

    /// The same model with every weight detached from autograd: an inference view for
    /// validation and decoding during training. It shares storage with the trained
    /// parameters (no copy), so it sees every optimiser update, while its forward pass
    /// records no graph: intermediate tensors are freed as soon as they are used instead of
    /// being kept for a backward pass that never comes (for SmolLM2 on 8 × 256-token
    /// validation batches, that was 7 GB of peak memory).
    pub fn detached(&self) -> Llama {
        let lin = |l: &Linear| l.detached();
        Llama {
            cfg: self.cfg.clone(),
            embed: self.embed.detached(),
            lm_head: self.lm_head.as_ref().map(TokenMatrix::detached),
            layers: self
                .layers
                .iter()
                .map(|b| Block {
                    input_norm: b.input_norm.detached(),
                    attn: Attention {
                        q: lin(&b.attn.q),
                        k: lin(&b.attn.k),
                        v: lin(&b.attn.v),
                        o: lin(&b.attn.o),
                        ..b.attn.clone()
                    },
                    post_norm: b.post_norm.detached(),
                    mlp: Mlp {
                        gate: lin(&b.mlp.gate),
                        up: lin(&b.mlp.up),
                        down: lin(&b.mlp.down),
                    },
                })
                .collect(),
            norm: self.norm.detached(),
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            items: self.items.as_ref().map(|i| ItemInput {
                table: i.table.detach(),
                keys: i.keys.clone(),
            }),
            soft: self.soft.as_ref().map(SoftPrompt::detached),
        }
    }

    /// Logits at every position, `[b, t, vocab]` f32, for training.
    ///
    /// `input_ids` `[b, t]` u32. `attention_mask` `[b, t]` (any dtype; nonzero = token,
    /// 0 = padding) masks padded keys on top of the causal mask. Positions are 0..t for
    /// every row, so padding must be on the right; logits at padded positions are
    /// meaningless and must be excluded by the loss mask.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_train(input_ids, attention_mask, None)
    }

    /// [`Llama::forward`] with [`Dropout`] (none: the same as `forward`).
    pub fn forward_train(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        dropout: Option<Dropout>,
    ) -> Result<Tensor> {
        let h = self.hidden(input_ids, attention_mask, dropout, None)?;
        self.logits(&h, false)
    }

    /// [`Llama::forward_train`] projected on the vocabulary at the flat positions `rows`
    /// only (`i · t + j` for row `i`, position `j`): logits `[rows.len(), vocab]`.
    ///
    /// Why: training scores a fraction of the positions (answers, not prompts or
    /// padding), and for a small model the projection on the vocabulary, the loss over
    /// it and their gradients are most of a step (`vocab` = 4,874 against a width of
    /// 128), so positions no loss reads are never projected.
    pub fn forward_train_rows(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        dropout: Option<Dropout>,
        rows: &[u32],
        soft: Option<&SoftInputs>,
    ) -> Result<Tensor> {
        let h = self.hidden(input_ids, attention_mask, dropout, soft)?;
        let (b, t, hidden) = h.dims3()?;
        if let Some(&row) = rows.iter().find(|&&r| r as usize >= b * t) {
            return Err(ModelError::PositionOutOfRange {
                row,
                positions: b * t,
            });
        }
        let index = Tensor::from_slice(rows, rows.len(), h.device())?;
        let picked = h.reshape((b * t, hidden))?.index_select(&index, 0)?;
        self.head().project(&picked, false)
    }

    /// The final-norm hidden states `[b, t, hidden]` (what [`Llama::forward`] projects on
    /// the vocabulary), e.g. for pooling a user representation.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.hidden(input_ids, attention_mask, None, None)
    }

    fn hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        dropout: Option<Dropout>,
        soft: Option<&SoftInputs>,
    ) -> Result<Tensor> {
        let (b, t) = self.check_ids(input_ids)?;
        self.check_len(t)?;
        let bias = self.training_bias(b, t, attention_mask)?;
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        let mut states = vec![ItemState::default(); b];
        let x = self.add_items(
            self.embed_ids(input_ids, b, t)?,
            input_ids,
            &mut states,
            dropout,
        )?;
        let x = self.add_soft(x, soft)?;
        // Sites: 0 the embeddings, then 2 per layer (attention, MLP).
        let mut x = apply_dropout(&x, dropout.map(|d| (d, 0)))?;
        for (i, layer) in self.layers.iter().enumerate() {
            let drop = dropout.map(|d| (d, i as u64 + 1));
            x = layer.forward(&x, &cos, &sin, bias.as_ref(), drop)?;
        }
        self.norm.forward(&x)
    }

    /// Incremental decoding: logits `[b, t, vocab]` for `input_ids` `[b, t]` placed at
    /// positions `cache.len()..cache.len() + t`, attending to everything cached; the cache
    /// is extended by `t`. All rows share one length (prefill a prompt once, then fork it
    /// with [`KvCache::select`]). On error the cache is left unchanged.
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let h = self.cached_hidden(input_ids, cache, None)?;
        self.logits(&h, true)
    }

    /// [`Llama::forward_cached`] returning only the last position's logits `[b, vocab]`:
    /// what decoding needs, without projecting a whole prompt on the vocabulary.
    pub fn forward_cached_last(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.forward_cached_last_soft(input_ids, cache, None)
    }

    /// [`Llama::forward_cached_last`] with soft-prompt vectors at flat positions of the
    /// new tokens (`row · t + j` for token `j` of row `row` of `input_ids`).
    pub fn forward_cached_last_soft(
        &self,
        input_ids: &Tensor,
        cache: &mut KvCache,
        soft: Option<&SoftInputs>,
    ) -> Result<Tensor> {
        let h = self.cached_hidden(input_ids, cache, soft)?;
        let t = h.dim(1)?;
        let last = h.narrow(1, t - 1, 1)?;
        Ok(self.logits(&last, true)?.squeeze(1)?)
    }

    fn cached_hidden(
        &self,
        input_ids: &Tensor,
        cache: &mut KvCache,
        soft: Option<&SoftInputs>,
    ) -> Result<Tensor> {
        let mut one = [decoding::Part {
            ids: input_ids,
            cache,
            soft,
        }];
        Ok(self.cached_hidden_many(&mut one)?.remove(0))
    }

    /// The cache of a one-row prompt cut back to its first `tokens.len()` positions,
    /// `tokens` being those positions' ids: a prefix of a prompt run before, to start a
    /// later prompt that shares it (see [`crate::decode::prefix`]). Keys and values of
    /// a position depend only on the positions up to it, so the cut cache is the one a
    /// pass over `tokens` alone builds, provided nothing was added at the cut positions'
    /// inputs (soft-prompt vectors go at a prompt's last token, which a cut must drop).
    /// Where the model reads item vectors, its reading state is replayed over `tokens`.
    pub fn cache_prefix(&self, cache: &KvCache, tokens: &[u32]) -> Result<KvCache> {
        let len = tokens.len();
        if cache.rows.is_some() || cache.stored_rows() != Some(1) || len == 0 || len > cache.len {
            return Err(ModelError::Shape {
                what: "KV cache prefix",
                expected: format!("one stored row of at least {len} positions"),
                found: format!("{:?} rows of {}", cache.batch_size(), cache.len),
            });
        }
        let layers = cache
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|(k, v)| -> Result<(Tensor, Tensor)> {
                        Ok((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?))
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let items = match &self.items {
            Some(items) => {
                let mut st = ItemState::default();
                items.keys.annotate(&mut st, tokens);
                vec![st]
            }
            None => Vec::new(),
        };
        Ok(KvCache {
            layers,
            len,
            rows: None,
            items,
        })
    }

    fn check_len(&self, needed: usize) -> Result<()> {
        let max = self.cfg.positions();
        if needed > max {
            return Err(ModelError::TooLong { needed, max });
        }
        Ok(())
    }

    /// Causal mask, plus padded keys when a mask is given: `[1 or b, 1, t, t]`.
    fn training_bias(
        &self,
        b: usize,
        t: usize,
        attention_mask: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let causal = |i: usize, j: usize| j > i;
        let dev = self.device();
        match attention_mask {
            None if t == 1 => Ok(None),
            None => {
                let v: Vec<f32> = (0..t * t)
                    .map(|k| if causal(k / t, k % t) { MASKED } else { 0.0 })
                    .collect();
                Ok(Some(Tensor::from_vec(v, (1, 1, t, t), dev)?))
            }
            Some(mask) => {
                if mask.dims() != [b, t] {
                    return Err(ModelError::Shape {
                        what: "attention_mask",
                        expected: format!("[{b}, {t}]"),
                        found: format!("{:?}", mask.dims()),
                    });
                }
                let m = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                let mut v = Vec::with_capacity(b * t * t);
                for row in &m {
                    for i in 0..t {
                        for (j, &keep) in row.iter().enumerate() {
                            v.push(if causal(i, j) || keep == 0.0 {
                                MASKED
                            } else {
                                0.0
                            });
                        }
                    }
                }
                Ok(Some(Tensor::from_vec(v, (b, 1, t, t), dev)?))
            }
        }
    }

    /// The output projection: `lm_head`, or the embeddings when they are tied.
    fn head(&self) -> &TokenMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// `[b, t, hidden]` → `[b, t, vocab]`; `rowwise` as in [`Linear::forward`].
    fn logits(&self, h: &Tensor, rowwise: bool) -> Result<Tensor> {
        let (b, t, hidden) = h.dims3()?;
        let flat = self.head().project(&h.reshape((b * t, hidden))?, rowwise)?;
        Ok(flat.reshape((b, t, self.cfg.vocab_size))?)
    }

    /// Every weight under its Hugging Face name, adapters and new-row deltas folded in
    /// (`W + (alpha/rank) · B A`), detached copies: what `model.safetensors` holds for
    /// export. `lm_head.weight` is absent when the embeddings are tied.
    pub fn merged_weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        let mut put_tm = |tm: &TokenMatrix| -> Result<()> {
            out.insert(format!("{}.weight", tm.name), tm.merged()?);
            Ok(())
        };
        put_tm(&self.embed)?;
        if let Some(head) = &self.lm_head {
            put_tm(head)?;
        }
        let mut put = |name: &str, t: Tensor| {
            out.insert(format!("{name}.weight"), t);
        };
        put(&self.norm.name, self.norm.weight.detach().copy()?);
        for l in &self.layers {
            for n in [&l.input_norm, &l.post_norm] {
                put(&n.name, n.weight.detach().copy()?);
            }
            for lin in [
                &l.attn.q,
                &l.attn.k,
                &l.attn.v,
                &l.attn.o,
                &l.mlp.gate,
                &l.mlp.up,
                &l.mlp.down,
            ] {
                put(&lin.name, lin.merged()?);
            }
        }
        if let Some(items) = &self.items {
            out.insert(ITEM_TABLE.to_string(), items.table.detach().copy()?);
        }
        if let Some(soft) = &self.soft {
            for slot in SoftSlot::ALL {
                out.insert(
                    slot.weight_name().to_string(),
                    soft.weight(slot).detach().copy()?,
                );
            }
        }
        Ok(out)
    }
}

/// A fresh item table `[items, hidden]` (N(0, 0.02)), a pure function of `seed`, like
/// [`Llama::init_tensors`].
pub fn init_item_table(items: usize, hidden: usize, seed: u64) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x17e4_7ab1e);
    let v: Vec<f32> = (0..items * hidden)
        .map(|_| (gaussian(&mut rng) * INIT_STD) as f32)
        .collect();
    Ok(Tensor::from_vec(v, (items, hidden), &Device::Cpu)?)
}

/// Hugging Face name and shape of every weight of a model with `cfg`.
pub fn weight_shapes(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, hd, i) = (cfg.hidden_size, cfg.head_dim(), cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
    let mut v = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
    )];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        v.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
        ]);
    }
    v.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        v.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
    }
    v
}

/// A `VarMap` holding copies of `tensors` (converted to f32) as trainable variables, for
/// full fine-tuning: `Llama::new(cfg, VarBuilder::from_varmap(&map, F32, &dev))`.
pub fn varmap_from_tensors(tensors: &HashMap<String, Tensor>) -> Result<VarMap> {
    let map = VarMap::new();
    {
        let mut data = map.data().lock().unwrap_or_else(|e| e.into_inner());
        for (name, t) in tensors {
            let var = Var::from_tensor(&t.to_dtype(DType::F32)?.detach())?;
            data.insert(name.clone(), var);
        }
    }
    Ok(map)
}

/// Adapter tensors for `lora_cfg` (A uniform in ±1/√in, B and new-row deltas zero), a pure
/// function of `seed`: load them into the LoRA `VarMap` with [`varmap_from_tensors`] for
/// reproducible runs (the builder's own initialisation is unseeded).
pub fn lora_init_tensors(
    cfg: &LlamaConfig,
    lora_cfg: &LoraConfig,
    seed: u64,
) -> Result<HashMap<String, Tensor>> {
    cfg.validate()?;
    lora_cfg.validate(cfg)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let mut out = HashMap::new();
    for (name, shape) in weight_shapes(cfg) {
        let Some(base) = name.strip_suffix(".weight") else {
            continue;
        };
        let short = base.rsplit('.').next().unwrap_or_default();
        if lora_cfg.targets.iter().any(|t| t == short) {
            let (d_out, d_in) = (shape[0], shape[1]);
            let bound = 1.0 / (d_in as f64).sqrt();
            let a: Vec<f32> = (0..lora_cfg.rank * d_in)
                .map(|_| rng.gen_range(-bound..bound) as f32)
                .collect();
            out.insert(
                format!("{base}.lora_A.weight"),
                Tensor::from_vec(a, (lora_cfg.rank, d_in), &dev)?,
            );
            out.insert(
                format!("{base}.lora_B.weight"),
                Tensor::zeros((d_out, lora_cfg.rank), DType::F32, &dev)?,
            );
        }
        if let Some(n_old) = lora_cfg.train_new_rows_from {
            if base == "model.embed_tokens" || base == "lm_head" {
                out.insert(
                    format!("{base}.new_rows"),
                    Tensor::zeros((cfg.vocab_size - n_old, cfg.hidden_size), DType::F32, &dev)?,
                );
            }
        }
    }
    Ok(out)
}

/// Adds `n_new` rows to the vocabulary of a model's weights (e.g. for SID tokens).
///
/// Each new row of `model.embed_tokens.weight` is the mean of the existing rows plus
/// Gaussian noise with, per dimension, 2% of the rows' standard deviation in that dimension
/// (seeded): starting at the mean keeps the new tokens' logits at the average of the old
/// ones instead of random, so training starts from a sane output distribution, and the
/// noise makes the new tokens distinguishable. An untied `lm_head.weight` is extended the
/// same way from its own statistics; a tied head follows the embeddings (a stored
/// `lm_head.weight` copy of a tied model is replaced by the new embedding matrix).
/// `cfg.vocab_size` is updated. Existing rows are unchanged; dtype is preserved.
pub fn extend_vocab(
    tensors: &mut HashMap<String, Tensor>,
    cfg: &mut LlamaConfig,
    n_new: usize,
    seed: u64,
) -> Result<()> {
    const EMBED: &str = "model.embed_tokens.weight";
    const HEAD: &str = "lm_head.weight";
    if n_new == 0 {
        return Ok(());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let embed = tensors
        .get(EMBED)
        .ok_or_else(|| ModelError::MissingTensor { name: EMBED.into() })?;
    let new_embed = extend_rows(embed, cfg, n_new, &mut rng, EMBED)?;
    let new_head = if cfg.tie_word_embeddings {
        tensors.contains_key(HEAD).then(|| new_embed.clone())
    } else {
        let head = tensors
            .get(HEAD)
            .ok_or_else(|| ModelError::MissingTensor { name: HEAD.into() })?;
        Some(extend_rows(head, cfg, n_new, &mut rng, HEAD)?)
    };
    tensors.insert(EMBED.to_string(), new_embed);
    if let Some(h) = new_head {
        tensors.insert(HEAD.to_string(), h);
    }
    cfg.vocab_size += n_new;
    Ok(())
}

fn extend_rows(
    w: &Tensor,
    cfg: &LlamaConfig,
    n_new: usize,
    rng: &mut ChaCha8Rng,
    name: &'static str,
) -> Result<Tensor> {
    let dims = w.dims();
    if dims != [cfg.vocab_size, cfg.hidden_size] {
        return Err(ModelError::Shape {
            what: name,
            expected: format!("[{}, {}]", cfg.vocab_size, cfg.hidden_size),
            found: format!("{dims:?}"),
        });
    }
    let wf = w.to_dtype(DType::F32)?;
    let mean = wf.mean_keepdim(0)?; // [1, h]
    let std = wf.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)?.sqrt()?;
    let h = cfg.hidden_size;
    let noise: Vec<f32> = (0..n_new * h).map(|_| gaussian(rng) as f32).collect();
    let noise = Tensor::from_vec(noise, (n_new, h), w.device())?;
    let rows = noise
        .broadcast_mul(&(std * 0.02)?)?
        .broadcast_add(&mean)?
        .to_dtype(w.dtype())?;
    Ok(Tensor::cat(&[w, &rows], 0)?)
}

/// Mean negative log-likelihood of `targets` over the positions where `loss_mask` is
/// nonzero (weighted by it): `logits` `[b, t, V]`, `targets` `[b, t]` u32 (every entry a
/// valid id, also where masked: use 0 there), `loss_mask` `[b, t]` f32. Returns a scalar;
/// 0 when the mask is empty. Differentiable (log-softmax from [`ops`]).
pub fn masked_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    loss_mask: &Tensor,
) -> Result<Tensor> {
    let (b, t, v) = logits.dims3().map_err(|_| ModelError::Shape {
        what: "logits",
        expected: "[batch, seq, vocab]".into(),
        found: format!("{:?}", logits.dims()),
    })?;
    for (what, x) in [("targets", targets), ("loss_mask", loss_mask)] {
        if x.dims() != [b, t] {
            return Err(ModelError::Shape {
                what,
                expected: format!("[{b}, {t}]"),
                found: format!("{:?}", x.dims()),
            });
        }
    }
    if targets.dtype() != DType::U32 {
        return Err(ModelError::Shape {
            what: "targets dtype",
            expected: "u32".into(),
            found: format!("{:?}", targets.dtype()),
        });
    }
    let targets = targets.flatten_all()?.to_vec1::<u32>()?;
    if let Some(&id) = targets.iter().find(|&&id| id as usize >= v) {
        return Err(ModelError::TokenOutOfRange { id, vocab_size: v });
    }
    let mask = loss_mask
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let count: f32 = mask.iter().sum();
    let scale = 1.0 / count.max(1.0);
    let weights: Vec<f32> = mask.iter().map(|m| m * scale).collect();
    Ok(ops::weighted_nll(
        &logits.reshape((b * t, v))?,
        &targets,
        &weights,
    )?)
}

/// `[max_position_embeddings, head_dim / 2]` cos and sin tables (f32), frequencies as in
/// `transformers` (`rope_theta`, optional linear or Llama-3 scaling).
fn rope_tables(cfg: &LlamaConfig, dev: &Device) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let half = hd / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / hd as f64))
        .map(|f| match &cfg.rope_scaling {
            None => f,
            Some(RopeScaling::Linear { factor }) => f / factor,
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let orig = *original_max_position_embeddings as f64;
                let low_wavelen = orig / low_freq_factor;
                let high_wavelen = orig / high_freq_factor;
                let wavelen = 2.0 * std::f64::consts::PI / f;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / factor
                } else {
                    let smooth =
                        (orig / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * f / factor + smooth * f
                }
            }
        })
        .collect();
    let n = cfg.positions();
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for f in &inv_freq {
            let a = p as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, half), dev)?,
        Tensor::from_vec(sin, (n, half), dev)?,
    ))
}

/// A standard normal sample (Box–Muller; `rand` 0.8 has no normal distribution).
fn gaussian(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_config_is_checked() {
        let cfg = LlamaConfig::small(50);
        let ok = LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets: vec!["q_proj".into()],
            train_new_rows_from: None,
        };
        ok.validate(&cfg).unwrap();
        assert_eq!(ok.scale(), 2.0);
        let mut bad = ok.clone();
        bad.targets = vec!["qkv".into()];
        assert!(bad.validate(&cfg).is_err());
        bad = ok.clone();
        bad.rank = 0;
        assert!(bad.validate(&cfg).is_err());
        bad = ok.clone();
        bad.train_new_rows_from = Some(50);
        assert!(bad.validate(&cfg).is_err());
        bad.targets.clear();
        bad.train_new_rows_from = None;
        assert!(bad.validate(&cfg).is_err());
    }

    #[test]
    fn init_is_seeded_and_named_like_hugging_face() {
        let cfg = LlamaConfig::small(30);
        let a = Llama::init_tensors(&cfg, 7).unwrap();
        let b = Llama::init_tensors(&cfg, 7).unwrap();
        assert_eq!(a.len(), 1 + 9 * 2 + 1 + 1);
        let w = "model.layers.1.mlp.down_proj.weight";
        assert_eq!(a[w].dims(), [64, 176]);
        let diff = (&a[w] - &b[w]).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        assert!(a.contains_key("lm_head.weight"));
    }

    #[test]
    fn gaussian_has_unit_variance() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let xs: Vec<f64> = (0..20_000).map(|_| gaussian(&mut rng)).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }
}
