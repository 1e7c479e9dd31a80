//! The Hugging Face `config.json` of a Llama-family decoder.
//!
//! [`LlamaConfig`] reads what `transformers` writes for `LlamaForCausalLM` (and for the
//! Llama-shaped models that reuse it, e.g. SmolLM2), and writes back a `config.json` that
//! `transformers`, candle and llama.cpp's converter read: `architectures`, `model_type`,
//! `torch_dtype` (`float32`, which is what sidrec saves) and `hidden_act` are always written.
//! Keys sidrec does not use (`pad_token_id`, `initializer_range`, ...) are kept in
//! [`LlamaConfig::extra`] and written back unchanged, so a fine-tuned model keeps its
//! base model's metadata.
//!
//! `models/tiny.json` is a CPU-sized config for training from scratch. Its `vocab_size` is a
//! placeholder (0): the vocabulary is only known once the tokenizer and the SID tokens are
//! built, so the trainer overrides `vocab_size` (and `bos_token_id`/`eos_token_id`) before
//! building the model; [`LlamaConfig::validate`] rejects a config that still has 0.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::llama::ModelError;

/// The largest model a config may describe (parameters): far beyond what sidrec trains or
/// serves, small enough that a damaged size is an error rather than an abort.
pub const MAX_PARAMETERS: u64 = 1 << 36;

/// Positions the RoPE tables are built for at most. A config may state a longer
/// context (`max_position_embeddings`), but sidrec's prompts are a few hundred tokens,
/// and tables sized by a damaged value (10^9) would abort on a 100+ GB allocation.
pub const MAX_POSITIONS: usize = 32_768;

/// Keys this module writes itself; anything else in `extra` is passed through.
const OWN_KEYS: &[&str] = &[
    "architectures",
    "model_type",
    "torch_dtype",
    "hidden_act",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "attention_bias",
    "mlp_bias",
    "_comment",
];

/// RoPE frequency scaling (`rope_scaling` in `config.json`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// `{"rope_type": "linear", "factor": f}`: positions divided by `f`.
    Linear { factor: f64 },
    /// `{"rope_type": "llama3", ...}`: Llama 3.1's per-frequency smoothing.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// The architecture of a Llama-family decoder, as in its Hugging Face `config.json`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(try_from = "Map<String, Value>", into = "Map<String, Value>")]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: key/value heads (defaults to `num_attention_heads`).
    pub num_key_value_heads: usize,
    /// Explicit per-head size (newer configs); `None` means `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    /// RoPE base (defaults to 10000).
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    /// `lm_head` shares `embed_tokens`' matrix (defaults to false, as in `transformers`).
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// The first id when `config.json` lists several.
    pub eos_token_id: Option<u32>,
    /// Keys sidrec does not interpret, written back as they were read.
    pub extra: Map<String, Value>,
}

impl LlamaConfig {
    /// Parses a `config.json` text; `origin` names it in errors (a path, "tiny.json", ...).
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self, ModelError> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| ModelError::Config {
            origin: origin.to_string(),
            reason: e.to_string(),
        })?;
        Ok(cfg)
    }

    /// Reads a `config.json` file.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// The `config.json` text (pretty-printed, trailing newline).
    pub fn to_json_string(&self) -> String {
        let map: Map<String, Value> = self.clone().into();
        let mut s = serde_json::to_string_pretty(&Value::Object(map))
            .unwrap_or_else(|_| String::from("{}"));
        s.push('\n');
        s
    }

    /// Writes `config.json` to `path`.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        std::fs::write(path, self.to_json_string()).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Positions the model runs: `max_position_embeddings`, at most [`MAX_POSITIONS`].
    pub fn positions(&self) -> usize {
        self.max_position_embeddings.min(MAX_POSITIONS)
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Checks that the sizes describe a model that can be built: called by the model
    /// constructors, because the fields are public and the trainer edits them
    /// (`vocab_size`) after parsing.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |reason: String| Err(ModelError::InvalidConfig(reason));
        if self.vocab_size == 0 {
            return bad("vocab_size is 0: set it to the tokenizer's vocabulary size".into());
        }
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size ({}) is not a multiple of num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        let hd = self.head_dim();
        if hd == 0 || !hd.is_multiple_of(2) {
            return bad(format!(
                "head_dim ({hd}) must be even and positive for RoPE"
            ));
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !positive(self.rms_norm_eps) || !positive(self.rope_theta) {
            return bad("rms_norm_eps and rope_theta must be positive".into());
        }
        // Sizes from a file must not turn into an allocation that aborts the process: a
        // config is checked against what any machine could hold before anything is built.
        let params = self.parameter_bound().filter(|&p| p <= MAX_PARAMETERS);
        if params.is_none() {
            return bad(format!(
                "the sizes describe a model of more than {MAX_PARAMETERS} parameters \
                 (vocab_size {}, hidden_size {}, intermediate_size {}, {} layers): the config \
                 is damaged or not meant for this program",
                self.vocab_size, self.hidden_size, self.intermediate_size, self.num_hidden_layers
            ));
        }
        Ok(())
    }

    /// An upper bound on the parameter count (`None` on overflow): embeddings and head,
    /// and per layer the four attention projections at full width and the three MLP
    /// matrices.
    fn parameter_bound(&self) -> Option<u64> {
        let (v, h, i, l) = (
            self.vocab_size as u64,
            self.hidden_size as u64,
            self.intermediate_size as u64,
            self.num_hidden_layers as u64,
        );
        let heads = (self.num_attention_heads as u64).checked_mul(self.head_dim() as u64)?;
        let embed = v.checked_mul(h)?.checked_mul(2)?;
        let attn = h.checked_mul(heads)?.checked_mul(4)?;
        let mlp = h.checked_mul(i)?.checked_mul(3)?;
        let layer = attn.checked_add(mlp)?.checked_add(h.checked_mul(2)?)?;
        embed.checked_add(layer.checked_mul(l)?)
    }

    /// A compact model config for tests and examples (`vocab_size` as given).
    pub fn small(vocab_size: usize) -> Self {
        LlamaConfig {
            vocab_size,
            hidden_size: 64,
            intermediate_size: 176,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 256,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_id: None,
            extra: Map::new(),
        }
    }
}

fn field_usize(map: &Map<String, Value>, key: &str) -> Result<Option<usize>, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| format!("field \"{key}\": expected a non-negative integer, found {v}")),
    }
}

fn required_usize(map: &Map<String, Value>, key: &str) -> Result<usize, String> {
    field_usize(map, key)?.ok_or_else(|| format!("missing field \"{key}\""))
}

fn field_f64(map: &Map<String, Value>, key: &str) -> Result<Option<f64>, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| format!("field \"{key}\": expected a number, found {v}")),
    }
}

fn field_bool(map: &Map<String, Value>, key: &str) -> Result<Option<bool>, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| format!("field \"{key}\": expected true or false, found {v}")),
    }
}

/// A token id, or the first of a list of them (`eos_token_id: [128001, 128008]`).
fn field_token(map: &Map<String, Value>, key: &str) -> Result<Option<u32>, String> {
    let as_id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => match items.first() {
            None => Ok(None),
            Some(first) => as_id(first)
                .map(Some)
                .ok_or_else(|| format!("field \"{key}\": expected token ids, found {first}")),
        },
        Some(v) => as_id(v)
            .map(Some)
            .ok_or_else(|| format!("field \"{key}\": expected a token id or a list, found {v}")),
    }
}

fn parse_rope_scaling(v: &Value) -> Result<Option<RopeScaling>, String> {
    let map = match v {
        Value::Null => return Ok(None),
        Value::Object(m) => m,
        other => {
            return Err(format!(
                "field \"rope_scaling\": expected an object, found {other}"
            ))
        }
    };
    // `type` is the key older configs use.
    let kind = map
        .get("rope_type")
        .or_else(|| map.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = || {
        field_f64(map, "factor")?
            .ok_or_else(|| "field \"rope_scaling.factor\" is missing".to_string())
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear { factor: factor()? })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: field_f64(map, "low_freq_factor")?.unwrap_or(1.0),
            high_freq_factor: field_f64(map, "high_freq_factor")?.unwrap_or(4.0),
            original_max_position_embeddings: field_usize(map, "original_max_position_embeddings")?
                .unwrap_or(8192),
        })),
        other => Err(format!(
            "rope_scaling type \"{other}\" is not supported (default, linear and llama3 are)"
        )),
    }
}

impl TryFrom<Map<String, Value>> for LlamaConfig {
    type Error = String;

    fn try_from(map: Map<String, Value>) -> Result<Self, String> {
        if let Some(act) = map.get("hidden_act") {
            if act.as_str() != Some("silu") {
                return Err(format!("hidden_act {act} is not supported (only \"silu\")"));
            }
        }
        for key in ["attention_bias", "mlp_bias"] {
            if field_bool(&map, key)? == Some(true) {
                return Err(format!(
                    "{key}: true is not supported (Llama has no biases)"
                ));
            }
        }
        let num_attention_heads = required_usize(&map, "num_attention_heads")?;
        let cfg = LlamaConfig {
            vocab_size: required_usize(&map, "vocab_size")?,
            hidden_size: required_usize(&map, "hidden_size")?,
            intermediate_size: required_usize(&map, "intermediate_size")?,
            num_hidden_layers: required_usize(&map, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: field_usize(&map, "num_key_value_heads")?
                .unwrap_or(num_attention_heads),
            head_dim: field_usize(&map, "head_dim")?,
            rms_norm_eps: field_f64(&map, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: field_f64(&map, "rope_theta")?.unwrap_or(10_000.0),
            rope_scaling: match map.get("rope_scaling") {
                None => None,
                Some(v) => parse_rope_scaling(v)?,
            },
            max_position_embeddings: field_usize(&map, "max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: field_bool(&map, "tie_word_embeddings")?.unwrap_or(false),
            bos_token_id: field_token(&map, "bos_token_id")?,
            eos_token_id: field_token(&map, "eos_token_id")?,
            extra: map
                .into_iter()
                .filter(|(k, _)| !OWN_KEYS.contains(&k.as_str()))
                .collect(),
        };
        Ok(cfg)
    }
}

impl From<LlamaConfig> for Map<String, Value> {
    fn from(cfg: LlamaConfig) -> Self {
        let mut m = Map::new();
        m.insert(
            "architectures".into(),
            Value::from(vec!["LlamaForCausalLM"]),
        );
        m.insert("model_type".into(), "llama".into());
        m.insert("torch_dtype".into(), "float32".into());
        m.insert("hidden_act".into(), "silu".into());
        m.insert("vocab_size".into(), cfg.vocab_size.into());
        m.insert("hidden_size".into(), cfg.hidden_size.into());
        m.insert("intermediate_size".into(), cfg.intermediate_size.into());
        m.insert("num_hidden_layers".into(), cfg.num_hidden_layers.into());
        m.insert("num_attention_heads".into(), cfg.num_attention_heads.into());
        m.insert("num_key_value_heads".into(), cfg.num_key_value_heads.into());
        if let Some(hd) = cfg.head_dim {
            m.insert("head_dim".into(), hd.into());
        }
        m.insert("rms_norm_eps".into(), cfg.rms_norm_eps.into());
        m.insert("rope_theta".into(), cfg.rope_theta.into());
        let scaling = match cfg.rope_scaling {
            None => Value::Null,
            Some(RopeScaling::Linear { factor }) => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        };
        m.insert("rope_scaling".into(), scaling);
        m.insert(
            "max_position_embeddings".into(),
            cfg.max_position_embeddings.into(),
        );
        m.insert("tie_word_embeddings".into(), cfg.tie_word_embeddings.into());
        m.insert("bos_token_id".into(), cfg.bos_token_id.into());
        m.insert("eos_token_id".into(), cfg.eos_token_id.into());
        m.insert("attention_bias".into(), false.into());
        m.insert("mlp_bias".into(), false.into());
        for (k, v) in cfg.extra {
            if !OWN_KEYS.contains(&k.as_str()) {
                m.insert(k, v);
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2_135M: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
      "initializer_range": 0.041666666666666664, "intermediate_size": 1536,
      "max_position_embeddings": 8192, "mlp_bias": false, "model_type": "llama",
      "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
      "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": null,
      "rope_theta": 100000, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
      "transformers_version": "4.42.3", "use_cache": true, "vocab_size": 49152
    }"#;

    #[test]
    fn reads_a_hub_config_and_writes_it_back() {
        let cfg = LlamaConfig::from_json_str(SMOLLM2_135M, "smollm2").unwrap();
        assert_eq!(cfg.head_dim(), 64);
        assert_eq!(cfg.num_key_value_heads, 3);
        assert_eq!(cfg.rope_theta, 100_000.0);
        assert!(cfg.tie_word_embeddings);
        assert_eq!(cfg.eos_token_id, Some(2));
        assert_eq!(cfg.extra.get("pad_token_id"), Some(&Value::from(2)));
        cfg.validate().unwrap();

        let text = cfg.to_json_string();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["architectures"][0], "LlamaForCausalLM");
        assert_eq!(v["model_type"], "llama");
        assert_eq!(v["torch_dtype"], "float32");
        assert_eq!(v["hidden_act"], "silu");
        assert_eq!(v["pad_token_id"], 2);
        let back = LlamaConfig::from_json_str(&text, "round trip").unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn defaults_and_token_lists() {
        let cfg = LlamaConfig::from_json_str(
            r#"{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 1, "num_attention_heads": 2, "rms_norm_eps": 1e-6,
                "max_position_embeddings": 32, "eos_token_id": [7, 8],
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#,
            "inline",
        )
        .unwrap();
        assert_eq!(cfg.num_key_value_heads, 2);
        assert_eq!(cfg.rope_theta, 10_000.0);
        assert!(!cfg.tie_word_embeddings);
        assert_eq!(cfg.eos_token_id, Some(7));
        assert!(matches!(cfg.rope_scaling, Some(RopeScaling::Llama3 { .. })));
    }

    #[test]
    fn rejects_what_the_decoder_cannot_run() {
        let base = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                      "num_hidden_layers": 1, "num_attention_heads": 2"#;
        for extra in [
            r#""hidden_act": "gelu""#,
            r#""attention_bias": true"#,
            r#""rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#,
            r#""num_key_value_heads": "two""#,
        ] {
            let text = format!("{{{base}, {extra}}}");
            let err = LlamaConfig::from_json_str(&text, "bad.json").unwrap_err();
            assert!(err.to_string().starts_with("bad.json"), "{err}");
        }
        let missing = LlamaConfig::from_json_str(r#"{"vocab_size": 3}"#, "m.json").unwrap_err();
        assert!(missing.to_string().contains("missing field"), "{missing}");
        let mut cfg = LlamaConfig::small(10);
        cfg.num_key_value_heads = 3;
        assert!(cfg.validate().is_err());
        cfg = LlamaConfig::small(0);
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn tiny_config_ships_with_a_placeholder_vocabulary() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny.json");
        let mut cfg = LlamaConfig::from_file(&path).unwrap();
        assert_eq!(cfg.vocab_size, 0);
        assert!(cfg.validate().is_err());
        cfg.vocab_size = 1000;
        cfg.validate().unwrap();
        assert_eq!(cfg.head_dim(), 64);
        assert!(!cfg.to_json_string().contains("_comment"));
    }
}
