//! Hugging Face model directories: `config.json`, `model.safetensors` (or shards with
//! `model.safetensors.index.json`), `tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json`, plus sidrec's own `sidrec.json` sidecar.
//!
//! Directories are the exchange format between sidrec's stages and other tools
//! (`transformers`, candle's loaders), so they are written in the standard layout, in
//! f32, and atomically: files go to a temporary sibling directory that is renamed into
//! place only when complete, so a failed run never leaves half a model behind.
//!
//! The sidecar records which SID map a model was trained on (the sha256 of
//! `sids.jsonl`): a model decodes SIDs as token ids, so pairing it with another map
//! would recommend the wrong items without any visible error. [`check_sid_map`] turns
//! that into a clear error.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use super::gguf::{GgufModel, HfLlamaConfig};
pub use super::gguf::{ModelIoError, Result};
use super::packed::{Packed, WeightFormat};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
pub const SIDECAR_FILE: &str = "sidrec.json";

/// The weight name that tied models leave out (it is `model.embed_tokens.weight`).
const LM_HEAD: &str = "lm_head.weight";

/// Subdirectory of a sidrec model directory holding its ensemble members, one model
/// directory each (`sidrec train --members`).
pub const MEMBERS_DIR: &str = "members";

/// A model directory in memory. `tensors` are f32 on the CPU, keyed by their Hugging
/// Face names.
pub struct HfDir {
    /// `config.json`, kept as JSON so fields this crate does not model survive a round
    /// trip.
    pub config: serde_json::Value,
    pub tensors: HashMap<String, Tensor>,
    pub tokenizer: Tokenizer,
    /// `tokenizer_config.json` (chat template, special token strings), when present.
    pub tokenizer_config: Option<serde_json::Value>,
    /// `sidrec.json`, when present.
    pub sidecar: Option<Sidecar>,
}

impl std::fmt::Debug for HfDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfDir")
            .field("config", &self.config)
            .field("tensors", &self.tensors.len())
            .field("sidecar", &self.sidecar)
            .finish()
    }
}

impl HfDir {
    /// Reads a model directory: `config.json`, `tokenizer.json` and either
    /// `model.safetensors` or the shards listed in `model.safetensors.index.json`;
    /// `tokenizer_config.json` and `sidrec.json` when present. Weights are converted to
    /// f32.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        Ok(Self::load_packed(dir, WeightFormat::F32)?.0)
    }

    /// [`HfDir::load`] with the decoder's matrices (every `*_proj.weight`, the embeddings
    /// and `lm_head.weight`) packed as `pack` while they are read, one at a time, so that
    /// the f32 model is never in memory at once: a SmolLM2 model in int8 peaks at the
    /// packed weights plus one f32 matrix instead of all 538 MB of f32. The packed
    /// matrices come apart from the f32 tensors, by name (for [`super::llama::Llama::new_packed`]).
    pub fn load_packed(
        dir: impl AsRef<Path>,
        pack: WeightFormat,
    ) -> Result<(Self, HashMap<String, Packed>)> {
        let dir = dir.as_ref();
        let single = dir.join(WEIGHTS_FILE);
        let index = dir.join(WEIGHTS_INDEX_FILE);
        let weights = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            shard_names(&index)?
                .into_iter()
                .map(|s| dir.join(s))
                .collect()
        } else {
            return Err(ModelIoError::MissingFile {
                path: single,
                what: "model weights (model.safetensors or model.safetensors.index.json)",
            });
        };
        let tokenizer_config = dir.join(TOKENIZER_CONFIG_FILE);
        let sidecar = dir.join(SIDECAR_FILE);
        Self::from_files(
            &dir.join(CONFIG_FILE),
            &dir.join(TOKENIZER_FILE),
            &weights,
            Some(tokenizer_config.as_path()).filter(|p| p.is_file()),
            Some(sidecar.as_path()).filter(|p| p.is_file()),
            pack,
        )
    }

    /// Downloads (or finds in the local Hugging Face cache) a model repository at
    /// `revision` (default `main`) and reads it like [`HfDir::load`].
    pub fn from_hub(repo_id: &str, revision: Option<&str>) -> Result<Self> {
        let hub_err = |file: &str, reason: String| ModelIoError::Hub {
            repo: repo_id.to_string(),
            file: file.to_string(),
            reason,
        };
        let repo = crate::hub::model_repo(repo_id, revision)
            .map_err(|e| hub_err("(api)", e.to_string()))?;
        let get = |file: &str| repo.get(file).map_err(|e| hub_err(file, e.to_string()));
        let config = get(CONFIG_FILE)?;
        let tokenizer = get(TOKENIZER_FILE)?;
        let weights = match repo.get(WEIGHTS_FILE) {
            Ok(p) => vec![p],
            Err(single_err) => {
                // Large models are sharded; only then is the index present.
                let index = repo.get(WEIGHTS_INDEX_FILE).map_err(|e| {
                    hub_err(
                        WEIGHTS_FILE,
                        format!("{single_err}; and {WEIGHTS_INDEX_FILE}: {e}"),
                    )
                })?;
                shard_names(&index)?
                    .iter()
                    .map(|s| get(s))
                    .collect::<Result<Vec<_>>>()?
            }
        };
        // Optional files: absent from many repositories, so a failure is not an error.
        let tokenizer_config = repo.get(TOKENIZER_CONFIG_FILE).ok();
        let sidecar = repo.get(SIDECAR_FILE).ok();
        Self::from_files(
            &config,
            &tokenizer,
            &weights,
            tokenizer_config.as_deref(),
            sidecar.as_deref(),
            WeightFormat::F32,
        )
        .map(|(dir, _)| dir)
    }

    fn from_files(
        config_path: &Path,
        tokenizer_path: &Path,
        weights: &[PathBuf],
        tokenizer_config: Option<&Path>,
        sidecar: Option<&Path>,
        pack: WeightFormat,
    ) -> Result<(Self, HashMap<String, Packed>)> {
        let config = read_json(config_path, "model config")?;
        if !config.is_object() {
            return Err(ModelIoError::Config {
                path: config_path.to_path_buf(),
                reason: "not a JSON object".to_string(),
            });
        }
        if !tokenizer_path.is_file() {
            return Err(ModelIoError::MissingFile {
                path: tokenizer_path.to_path_buf(),
                what: "Hugging Face tokenizer",
            });
        }
        let tokenizer =
            Tokenizer::from_file(tokenizer_path).map_err(|e| ModelIoError::Tokenizer {
                path: tokenizer_path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let mut tensors = HashMap::new();
        let mut packed = HashMap::new();
        for path in weights {
            if !path.is_file() {
                return Err(ModelIoError::MissingFile {
                    path: path.clone(),
                    what: "model weights",
                });
            }
            let weights_err = |reason: String| ModelIoError::Weights {
                path: path.clone(),
                reason,
            };
            let mut sink = |name: String, t: Tensor| -> std::result::Result<(), String> {
                let twice = || format!("tensor {name:?} appears in two shards");
                if packed.contains_key(&name) || tensors.contains_key(&name) {
                    return Err(twice());
                }
                if pack != WeightFormat::F32 && is_packable(&name) {
                    match Packed::new(&t, pack).map_err(|e| format!("{name}: {e}"))? {
                        Some(p) => {
                            packed.insert(name, p);
                        }
                        None => {
                            tensors.insert(name, t);
                        }
                    }
                } else {
                    tensors.insert(name, t);
                }
                Ok(())
            };
            read_safetensors(path, &mut sink).map_err(weights_err)?;
        }
        let tokenizer_config = match tokenizer_config {
            Some(p) => Some(read_json(p, "tokenizer config")?),
            None => None,
        };
        let sidecar = match sidecar {
            Some(p) => Some(Sidecar::read_file(p)?),
            None => None,
        };
        let dir = HfDir {
            config,
            tensors,
            tokenizer,
            tokenizer_config,
            sidecar,
        };
        Ok((dir, packed))
    }

    /// Whether `config.json` says the LM head shares the embedding matrix.
    pub fn tie_word_embeddings(&self) -> bool {
        self.config
            .get("tie_word_embeddings")
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    }

    /// `generation_config.json`, derived from the token ids of `config.json`.
    pub fn generation_config(&self) -> serde_json::Value {
        let mut g = serde_json::Map::new();
        for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
            if let Some(v) = self.config.get(key).filter(|v| !v.is_null()) {
                g.insert(key.to_string(), v.clone());
            }
        }
        serde_json::Value::Object(g)
    }

    /// Writes the directory atomically to `out` (see the module docs). An existing
    /// `out` is an error unless `overwrite`, in which case it is replaced only once the
    /// new directory is complete. Weights are written in f32; a tied model's
    /// `lm_head.weight` is left out.
    pub fn save(&self, out: impl AsRef<Path>, overwrite: bool) -> Result<()> {
        self.save_with_files(out, overwrite, &[])
    }

    /// [`HfDir::save`], also copying `extra` files (`name`, source path) into the
    /// directory before it is renamed into place: a fine-tuned model carries its catalog
    /// and SID map this way, all or nothing.
    pub fn save_with_files(
        &self,
        out: impl AsRef<Path>,
        overwrite: bool,
        extra: &[(&str, &Path)],
    ) -> Result<()> {
        let out = out.as_ref();
        write_atomically(out, overwrite, |dir| {
            self.write_files(dir)?;
            for (name, src) in extra {
                fs::copy(src, dir.join(name)).map_err(|e| ModelIoError::io(src, e))?;
            }
            Ok(())
        })
    }

    fn write_files(&self, dir: &Path) -> Result<()> {
        write_json(&dir.join(CONFIG_FILE), &self.config)?;
        write_json(&dir.join(GENERATION_CONFIG_FILE), &self.generation_config())?;
        if let Some(tc) = &self.tokenizer_config {
            write_json(&dir.join(TOKENIZER_CONFIG_FILE), tc)?;
        }
        let tok_path = dir.join(TOKENIZER_FILE);
        self.tokenizer
            .save(&tok_path, true)
            .map_err(|e| ModelIoError::Tokenizer {
                path: tok_path.clone(),
                reason: e.to_string(),
            })?;
        let weights = dir.join(WEIGHTS_FILE);
        let weights_err = |reason: String| ModelIoError::Weights {
            path: weights.clone(),
            reason,
        };
        let tie = self.tie_word_embeddings();
        let mut f32s = Vec::with_capacity(self.tensors.len());
        for (name, t) in &self.tensors {
            if tie && name == LM_HEAD {
                continue;
            }
            let t = t
                .to_dtype(DType::F32)
                .and_then(|t| t.contiguous())
                .map_err(|e| weights_err(format!("{name}: {e}")))?;
            f32s.push((name.clone(), t));
        }
        f32s.sort_by(|a, b| a.0.cmp(&b.0));
        // transformers refuses safetensors files without a "format" entry.
        let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        safetensors::serialize_to_file(f32s.iter().map(|(n, t)| (n, t)), Some(meta), &weights)
            .map_err(|e| weights_err(e.to_string()))?;
        crate::atomic::default_file_mode(&weights).map_err(|e| ModelIoError::io(&weights, e))?;
        if let Some(s) = &self.sidecar {
            s.write_file(&dir.join(SIDECAR_FILE))?;
        }
        Ok(())
    }
}

/// Converts a GGUF Llama checkpoint into a Hugging Face model directory at `out`:
/// weights dequantised to f32 with the q/k permutation undone, the tokenizer rebuilt
/// from the GGUF metadata, `config.json`, `generation_config.json` and
/// `tokenizer_config.json` (with the chat template). Atomic like [`HfDir::save`].
pub fn convert(
    gguf_path: impl AsRef<Path>,
    out: impl AsRef<Path>,
    overwrite: bool,
) -> Result<HfLlamaConfig> {
    let out = out.as_ref();
    // Checked before the expensive part too, so a forgotten --force fails at once.
    crate::atomic::check_target(out, overwrite, &[gguf_path.as_ref()])?;
    let gguf = GgufModel::open(gguf_path)?;
    let hf = gguf.hf_config();
    let config = serde_json::to_value(&hf).map_err(|e| ModelIoError::Config {
        path: gguf.path().to_path_buf(),
        reason: e.to_string(),
    })?;
    let tokenizer = gguf.tokenizer()?;
    let tokenizer_config = tokenizer_config(&gguf, &tokenizer);
    let tensors = gguf.dequantize_all()?;
    let dir = HfDir {
        config,
        tensors,
        tokenizer,
        tokenizer_config: Some(tokenizer_config),
        sidecar: None,
    };
    dir.save(out, overwrite)?;
    Ok(hf)
}

/// The `tokenizer_config.json` of a converted GGUF: special token strings and the chat
/// template, which `transformers`' `apply_chat_template` reads from here.
fn tokenizer_config(gguf: &GgufModel, tokenizer: &Tokenizer) -> serde_json::Value {
    let m = gguf.metadata();
    let name = |id: Option<u32>| id.and_then(|id| tokenizer.id_to_token(id));
    let mut c = serde_json::Map::new();
    c.insert("tokenizer_class".into(), "GPT2Tokenizer".into());
    c.insert("add_prefix_space".into(), false.into());
    c.insert("clean_up_tokenization_spaces".into(), false.into());
    c.insert("model_max_length".into(), m.context_length.into());
    for (key, id) in [
        ("bos_token", m.bos_token_id),
        ("eos_token", m.eos_token_id),
        ("pad_token", m.padding_token_id),
    ] {
        if let Some(t) = name(id) {
            c.insert(key.into(), t.into());
        }
    }
    if let Some(t) = &m.chat_template {
        c.insert("chat_template".into(), t.clone().into());
    }
    serde_json::Value::Object(c)
}

/// How a model ranks best, from its recipe: the mixture with recent items asked alone
/// and the transition memory's weight. `sidrec.json` records it, and `recommend`,
/// `repl`, `serve` and `eval` rank this way unless a request or flag says otherwise.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ranking {
    /// Also ask each of the last N history items alone, and rank by the mixture (0:
    /// the whole history alone).
    pub mix_recent: usize,
    /// Weight ratio of each further recent item under `mix_recent` (absent: 0.5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recent_decay: Option<f32>,
    /// Weight of the transition memory against the whole history's 1 (absent: off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<f32>,
}

impl Ranking {
    fn is_plain(&self) -> bool {
        *self == Ranking::default()
    }

    /// This ranking with what a request or flag states in its place (a memory weight of
    /// 0 turns the memory off; other stated values pass as they are, for the decoder to
    /// check).
    pub fn with(
        &self,
        mix_recent: Option<usize>,
        recent_decay: Option<f32>,
        memory: Option<f32>,
    ) -> Ranking {
        Ranking {
            mix_recent: mix_recent.unwrap_or(self.mix_recent),
            recent_decay: recent_decay.or(self.recent_decay),
            memory: match memory {
                Some(0.0) => None,
                Some(w) => Some(w),
                None => self.memory,
            },
        }
    }
}

/// `sidrec.json`: what a fine-tuned model was trained on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sidecar {
    /// sha256 (lower-case hex) of the `sids.jsonl` the SID tokens were taken from.
    pub sids_sha256: String,
    /// The artifact directory it came from, for error messages.
    pub artifacts: String,
    /// Training stage that produced the model (e.g. `"sft"`).
    pub stage: String,
    /// Version of the prompt templates used in training.
    pub prompts_version: String,
    /// How many SID tokens were added to the vocabulary.
    pub sid_tokens: usize,
    /// Id of the first SID token; they are contiguous.
    pub sid_token_offset: u32,
    /// Whether training histories wrote each item as `SID Title (year)` (true) or the
    /// SID alone: inference must write them the same way. Written only when false, so
    /// the files of models trained with titles are unchanged.
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub history_titles: bool,
    /// Whether training wrote whole histories as answers ([`Task::Sequence`]): plain
    /// history requests are then asked as a continuation of the history. Written only
    /// when true.
    ///
    /// [`Task::Sequence`]: crate::train::data::Task::Sequence
    #[serde(default, skip_serializing_if = "is_no")]
    pub sequence: bool,
    /// Whether training taught soon-after pairs (`soon.txt`): `mix_recent` then asks
    /// each recent item alone with that instruction. Written only when true.
    #[serde(default, skip_serializing_if = "is_no")]
    pub soon: bool,
    /// The recipe the model was trained with (absent in models written before recipes).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub recipe: String,
    /// How it ranks best. Written only when it is not the plain whole-history ranking.
    #[serde(default, skip_serializing_if = "Ranking::is_plain")]
    pub ranking: Ranking,
    /// The soft prompts the model reads and the sentence encoder of its request vectors
    /// ([`super::soft_prompt`]); absent for a model without them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_prompt: Option<SoftPromptCard>,
}

/// What a model with soft prompts needs at inference: which vectors it was trained with
/// and the encoder that wrote the request vectors, bound by the sha256 of its weights (a
/// different encoder's vectors point elsewhere, and the model would read them silently
/// wrong, so it is refused as a changed `sids.jsonl` is).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SoftPromptCard {
    pub request: bool,
    pub taste: bool,
    /// The encoder directory as training was given it (relative paths resolve against
    /// the working directory, then the sidrec checkout: `assets/minilm`).
    pub encoder: String,
    /// sha256 of the encoder's `model.safetensors`.
    pub encoder_sha256: String,
}

fn is_no(b: &bool) -> bool {
    !*b
}

fn yes() -> bool {
    true
}

fn is_yes(b: &bool) -> bool {
    *b
}

impl Sidecar {
    /// Reads `sidrec.json` from a model directory.
    pub fn read(model_dir: impl AsRef<Path>) -> Result<Self> {
        let path = model_dir.as_ref().join(SIDECAR_FILE);
        if !path.is_file() {
            return Err(ModelIoError::MissingFile {
                path,
                what: "sidrec.json: the model was not fine-tuned by sidrec",
            });
        }
        Self::read_file(&path)
    }

    fn read_file(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path).map_err(|e| ModelIoError::io(path, e))?;
        let s: Sidecar = serde_json::from_str(&text).map_err(|e| ModelIoError::Sidecar {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if s.sids_sha256.len() != 64 || hex::decode(&s.sids_sha256).is_err() {
            return Err(ModelIoError::Sidecar {
                path: path.to_path_buf(),
                reason: format!("sids_sha256 {:?} is not a sha256 hex digest", s.sids_sha256),
            });
        }
        Ok(s)
    }

    /// Writes `sidrec.json` into an existing model directory (atomically: a temporary
    /// file renamed over the old one).
    pub fn write(&self, model_dir: impl AsRef<Path>) -> Result<()> {
        self.write_file(&model_dir.as_ref().join(SIDECAR_FILE))
    }

    fn write_file(&self, path: &Path) -> Result<()> {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut tmp =
            tempfile::NamedTempFile::new_in(parent).map_err(|e| ModelIoError::io(parent, e))?;
        serde_json::to_writer_pretty(&mut tmp, self)
            .map_err(std::io::Error::from)
            .and_then(|_| tmp.write_all(b"\n"))
            .map_err(|e| ModelIoError::io(path, e))?;
        tmp.persist(path)
            .map_err(|e| ModelIoError::io(path, e.error))?;
        crate::atomic::default_file_mode(path).map_err(|e| ModelIoError::io(path, e))?;
        Ok(())
    }
}

/// sha256 of a file's bytes, as lower-case hex.
pub fn sha256_file(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    let mut file = fs::File::open(path).map_err(|e| ModelIoError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(|e| ModelIoError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Checks that the model in `model_dir` was trained on the SID map `sids_jsonl`
/// (same sha256 as recorded in its `sidrec.json`).
pub fn check_sid_map(model_dir: impl AsRef<Path>, sids_jsonl: impl AsRef<Path>) -> Result<()> {
    let (model_dir, sids) = (model_dir.as_ref(), sids_jsonl.as_ref());
    let sidecar = Sidecar::read(model_dir)?;
    let found = sha256_file(sids)?;
    if !found.eq_ignore_ascii_case(&sidecar.sids_sha256) {
        return Err(ModelIoError::SidMapMismatch {
            model_dir: model_dir.to_path_buf(),
            sids: sids.to_path_buf(),
            trained_on: sidecar.artifacts,
            expected: sidecar.sids_sha256,
            found,
        });
    }
    Ok(())
}

/// The checksum list a published model directory may carry (`sha256sum` format).
pub const CHECKSUMS_FILE: &str = "SHA256SUMS";

/// Checks every file listed in `dir/SHA256SUMS` (when the directory has one) against its
/// sha256: a model copied or downloaded incompletely fails here, naming the file, rather
/// than answering with damaged weights. A directory without the list passes.
pub fn verify_checksums(dir: &Path) -> Result<()> {
    let list = dir.join(CHECKSUMS_FILE);
    let text = match fs::read_to_string(&list) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ModelIoError::io(&list, e)),
    };
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| ModelIoError::Checksum {
            path: list.clone(),
            line: i + 1,
            reason,
        };
        let (want, name) = line
            .split_once(char::is_whitespace)
            .map(|(h, n)| (h, n.trim_start().trim_start_matches('*')))
            .ok_or_else(|| bad("expected \"SHA256  FILE\"".into()))?;
        if want.len() != 64 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(format!("{want:?} is not a sha256")));
        }
        let rel = Path::new(name);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(bad(format!("{name:?} is not a file of the directory")));
        }
        let file = dir.join(rel);
        if !file.is_file() {
            return Err(bad(format!("{name} is listed but missing")));
        }
        let found = sha256_file(&file)?;
        if !found.eq_ignore_ascii_case(want) {
            return Err(bad(format!(
                "{name} has sha256 {found}, the list says {want}: the file is damaged or \
                 was replaced; copy the model directory again"
            )));
        }
    }
    Ok(())
}

/// The distinct shard file names of a `model.safetensors.index.json`, sorted.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    let v = read_json(index, "weights index")?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelIoError::Weights {
            path: index.to_path_buf(),
            reason: "no \"weight_map\" object".to_string(),
        })?;
    let mut shards = BTreeSet::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| ModelIoError::Weights {
            path: index.to_path_buf(),
            reason: format!("weight_map[{name:?}] is not a file name"),
        })?;
        // Shards must sit in the model directory itself.
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(ModelIoError::Weights {
                path: index.to_path_buf(),
                reason: format!("shard name {file:?} is not a plain file name"),
            });
        }
        shards.insert(file.to_string());
    }
    Ok(shards.into_iter().collect())
}

fn read_json(path: &Path, what: &'static str) -> Result<serde_json::Value> {
    if !path.is_file() {
        return Err(ModelIoError::MissingFile {
            path: path.to_path_buf(),
            what,
        });
    }
    let text = fs::read_to_string(path).map_err(|e| ModelIoError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelIoError::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let file = fs::File::create(path).map_err(|e| ModelIoError::io(path, e))?;
    let mut w = BufWriter::new(file);
    serde_json::to_writer_pretty(&mut w, v)
        .map_err(std::io::Error::from)
        .and_then(|_| w.write_all(b"\n"))
        .and_then(|_| w.flush())
        .map_err(|e| ModelIoError::io(path, e))
}

/// [`crate::atomic::write_dir`] with this module's errors.
fn write_atomically(
    out: &Path,
    overwrite: bool,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    crate::atomic::write_dir(
        out,
        overwrite,
        &[],
        ModelIoError::Refused,
        |p: &Path, e| ModelIoError::io(p, e),
        fill,
    )
}

/// Whether `name` is one of a Llama's matrices that decoding packs (see
/// [`super::llama::Llama::with_weights`]).
fn is_packable(name: &str) -> bool {
    name.ends_with("_proj.weight")
        || name == "model.embed_tokens.weight"
        || name == "lm_head.weight"
}

/// The tensors of a safetensors file as f32, read one at a time: the peak memory is the
/// tensors plus one tensor's bytes, where reading the whole file first (candle's `load`)
/// held the file and the tensors at once (a SmolLM2 model: 1.08 GB for 538 MB of weights).
fn read_safetensors(
    path: &Path,
    sink: &mut dyn FnMut(String, Tensor) -> std::result::Result<(), String>,
) -> std::result::Result<(), String> {
    use std::io::{Read, Seek, SeekFrom};
    #[derive(serde::Deserialize)]
    struct Entry {
        dtype: String,
        shape: Vec<usize>,
        data_offsets: (u64, u64),
    }
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let size = f.metadata().map_err(|e| e.to_string())?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| format!("no safetensors header: {e}"))?;
    let n = u64::from_le_bytes(len);
    if n > size.saturating_sub(8) || n > 100 << 20 {
        return Err(format!("header of {n} bytes in a file of {size}"));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| e.to_string())?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format!("bad header: {e}"))?;
    let data = 8 + n;
    let mut entries: Vec<(String, Entry)> = header
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .map(|(name, v)| {
            serde_json::from_value(v)
                .map(|e| (name.clone(), e))
                .map_err(|e| format!("{name}: {e}"))
        })
        .collect::<std::result::Result<_, _>>()?;
    entries.sort_by_key(|(_, e)| e.data_offsets.0);
    let mut buf = Vec::new();
    for (name, e) in entries {
        let dtype = match e.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F64" => DType::F64,
            other => return Err(format!("{name}: dtype {other} is not a float type")),
        };
        let (start, end) = e.data_offsets;
        let bytes = e.shape.iter().product::<usize>() * dtype.size_in_bytes();
        if end < start || (end - start) as usize != bytes {
            return Err(format!(
                "{name}: offsets {start}..{end} do not hold {:?} {dtype:?}",
                e.shape
            ));
        }
        if data + end > size {
            return Err(format!(
                "{name} ends at byte {} of a {size}-byte file: the file is truncated",
                data + end
            ));
        }
        f.seek(SeekFrom::Start(data + start))
            .map_err(|err| format!("{name}: {err}"))?;
        let t = if dtype == DType::F32 && cfg!(target_endian = "little") {
            // Straight into the tensor's own buffer: no second copy of a large matrix.
            let mut v = vec![0f32; bytes / 4];
            // SAFETY: `v` owns `bytes` bytes, and any bit pattern is an f32.
            let raw = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, bytes) };
            f.read_exact(raw).map_err(|err| format!("{name}: {err}"))?;
            Tensor::from_vec(v, e.shape.as_slice(), &Device::Cpu)
        } else {
            buf.resize(bytes, 0);
            f.read_exact(&mut buf)
                .map_err(|err| format!("{name}: {err}"))?;
            Tensor::from_raw_buffer(&buf, dtype, &e.shape, &Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
        }
        .map_err(|err| format!("{name}: {err}"))?;
        sink(name, t)?;
    }
    Ok(())
}
