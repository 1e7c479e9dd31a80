//! `sidrec train` end to end: artifacts + interactions → examples → tokenizer with SID
//! tokens → model (from scratch or pretrained) → stage 1 (alignment) → stage 2
//! (instruction mix) → a Hugging Face model directory with `sidrec.json` and
//! `train_report.json`.
//!
//! With `select_users`, the instruct stage also ranks held-out items while it trains,
//! through a [`Validator`] the caller passes in (`sidrec train` passes the evaluation's,
//! `sidrec::eval::select_validator`), on the weights in memory: a model is selected by
//! the very ranking `sidrec eval` measures, while training never depends on decoding.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use tokenizers::{AddedToken, Tokenizer};

use super::data::{self, DataOptions, Example, Prompts, Task};
use super::soft::{SoftError, SoftTargets, Targets};
use super::trainer::{self, ChatFormat, Checkpointing, Encoded, LoopConfig, LoopReport};
use crate::artifacts::{self, SidMap};
use crate::error::{Error, Result};
use crate::interactions::{sample_users, ReadOptions, Sequences};
use crate::memory::{MemorySettings, TransitionMemory, MEMORY_FILE};
use crate::model::bpe;
use crate::model::config::LlamaConfig;
use crate::model::gguf::GgufModel;
use crate::model::hfdir::{self, HfDir, Sidecar};
use crate::model::items::{ItemKeys, ITEM_TABLE};
use crate::model::llama::{self, Llama, LoraConfig};
use crate::model::soft_prompt::{self, Slot as SoftSlot, SoftVectors};
use crate::progress::Progress;

/// Where the model to train starts from.
#[derive(Clone, Debug)]
pub enum BaseModel {
    /// A config file (e.g. `models/tiny.json`) with fresh weights and a byte-level BPE
    /// of `vocab_size` entries trained on the catalog and prompt texts.
    Scratch { config: PathBuf, vocab_size: usize },
    /// A Hugging Face directory: `config.json`, `tokenizer.json`, `model.safetensors`.
    HfDir(PathBuf),
    /// A GGUF Llama checkpoint (e.g. SmolLM2-135M-Instruct), dequantised to f32.
    Gguf(PathBuf),
}

/// What a stage trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every weight.
    Full,
    /// LoRA adapters on the attention and MLP projections, plus the new (SID) rows.
    Lora,
    /// Only the embedding rows of the new (SID) tokens.
    Rows,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "full" => Ok(Mode::Full),
            "lora" => Ok(Mode::Lora),
            "rows" => Ok(Mode::Rows),
            _ => Err(format!("unknown mode {s:?}: use full, lora or rows")),
        }
    }
}

/// Settings of one stage.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageConfig {
    pub mode: Mode,
    pub epochs: usize,
    /// 0: all epochs.
    pub max_steps: usize,
    pub lr: f64,
}

/// Everything `sidrec train` needs. Its `Serialize` is the recipe `train_report.json`
/// records: paths and bookkeeping are skipped (the base is in the report already).
#[derive(Clone, Debug, Serialize)]
pub struct TrainOptions {
    /// The artifact directory of `sidrec tokenize`.
    #[serde(skip)]
    pub artifacts: PathBuf,
    #[serde(skip)]
    pub interactions: PathBuf,
    #[serde(skip)]
    pub base: BaseModel,
    #[serde(skip)]
    pub out: PathBuf,
    #[serde(skip)]
    pub force: bool,
    #[serde(skip)]
    pub prompts: Option<PathBuf>,
    /// Leave out unreadable interaction lines and unknown items instead of failing
    /// ([`ReadOptions::skip_invalid`]); they are listed in `train_report.json`.
    #[serde(skip)]
    pub skip_invalid: bool,
    /// Stage 1 (alignment: item text ↔ SID); `None` skips it.
    pub stage1: Option<StageConfig>,
    /// Stage 2 (the instruction mix of every task); `None` skips it.
    pub stage2: Option<StageConfig>,
    pub batch_size: usize,
    pub max_len: usize,
    pub warmup: usize,
    pub clip: f64,
    pub weight_decay: f64,
    /// Dropout on embeddings and residual branches while training (0: none); see
    /// [`llama::Dropout`].
    pub dropout: f32,
    /// Give every catalog item a learned input vector ([`crate::model::items`]), trained
    /// in every stage (also beside LoRA adapters) and saved as
    /// [`crate::model::items::ITEM_TABLE`].
    pub item_embeddings: bool,
    /// Share of positions whose item vector is dropped while training (see
    /// [`llama::Dropout::items`]).
    pub item_dropout: f32,
    /// Share of every item target given to the transition memory's distribution for the
    /// items before it ([`super::soft`]; 0: one-hot targets).
    pub soft_targets: f32,
    /// Soft prompts ([`crate::model::soft_prompt`]): the request's sentence vector and
    /// the history's mean item vector, each projected into one input vector.
    pub request_vectors: bool,
    pub taste_vectors: bool,
    /// The sentence encoder of the request vectors (`None`: `assets/minilm`). It must be
    /// the one the SIDs were made with.
    #[serde(skip)]
    pub encoder: Option<PathBuf>,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    #[serde(skip)]
    pub eval_every: usize,
    #[serde(skip)]
    pub checkpoint_every: usize,
    /// At most this many validation examples (one fixed sample for every seed; 0: all).
    #[serde(skip)]
    pub valid_examples: usize,
    #[serde(skip)]
    pub resume: bool,
    pub seed: u64,
    pub data: DataOptions,
    /// Keep the instruct stage's weights from the evaluation (every `eval_every` steps)
    /// with the best validation NDCG@10 over this many sampled users, ranked as `sidrec
    /// eval` ranks them (0: keep the last step's weights).
    pub select_users: usize,
    /// Rank those users by the mixture with their last N items alone (as `--mix-recent`).
    pub select_mix_recent: usize,
    /// How the model ranks best, recorded in `sidrec.json` for inference.
    pub rank: hfdir::Ranking,
    /// The recipe's name, recorded in `sidrec.json`.
    pub recipe_name: String,
    /// Ranks validation users for `select_users` (required when it is above 0).
    #[serde(skip)]
    pub validator: Option<ValidatorHandle>,
}

/// What a [`Validator`] ranks with: the model being trained, as it is now, and everything
/// an inference engine needs beside it.
pub struct ValidationModel<'a> {
    pub model: &'a Llama,
    pub tokenizer: &'a Tokenizer,
    pub catalog: &'a crate::catalog::Catalog,
    pub sids: &'a SidMap,
    pub sidecar: &'a Sidecar,
    pub prompts: &'a Prompts,
    pub dir: &'a std::path::Path,
}

/// Ranks `(history, held-out item)` cases with a model and returns their NDCG@10 ranked
/// with the mixture over the last `mix_recent` items. Supplied from above training (the
/// evaluation module), so that `train` does not depend on `decode` or `eval`.
pub type Validator = dyn Fn(&ValidationModel<'_>, &[(Vec<u32>, u32)], usize) -> std::result::Result<f64, String>
    + Send
    + Sync;

/// A shared [`Validator`] in [`TrainOptions`] (cloned with them).
#[derive(Clone)]
pub struct ValidatorHandle(pub std::sync::Arc<Validator>);

impl std::fmt::Debug for ValidatorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Validator")
    }
}

impl TrainOptions {
    /// What the run reads: an output directory holding one of these is never replaced.
    pub fn inputs(&self) -> Vec<&std::path::Path> {
        let mut v = vec![self.artifacts.as_path(), self.interactions.as_path()];
        match &self.base {
            BaseModel::Scratch { config, .. } => v.push(config),
            BaseModel::HfDir(p) | BaseModel::Gguf(p) => v.push(p),
        }
        v.extend(self.prompts.as_deref());
        v.extend(self.encoder.as_deref());
        v
    }
}

pub const REPORT_FILE: &str = "train_report.json";

/// `train_report.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainReport {
    pub base: String,
    pub params: usize,
    pub vocab_size: usize,
    pub sid_tokens: usize,
    pub users: usize,
    pub examples: BTreeMap<String, usize>,
    pub validation_examples: usize,
    pub stages: Vec<StageReport>,
    pub seconds: f64,
    /// The settings the model was trained with, so that a figure measured on it can be
    /// traced to its recipe (absent in reports written before it was recorded).
    /// [`TrainOptions`] without its paths and bookkeeping: every setting that changes the
    /// weights, recorded by the options' own `Serialize` so a new one is never left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<serde_json::Value>,
    /// Interaction records `--skip-invalid` left out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped_interactions: Vec<crate::skipped::Skipped>,
}

/// One stage of `train_report.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageReport {
    pub name: String,
    pub mode: Mode,
    pub examples: usize,
    pub trainable_params: usize,
    #[serde(flatten)]
    pub report: LoopReport,
}

/// Runs training and writes the model directory.
pub fn run(opts: &TrainOptions, progress: Progress) -> Result<TrainReport> {
    let t0 = Instant::now();
    refuse_existing(opts)?;
    // 1. Catalog, SIDs, interactions, examples.
    let (catalog, sids) = artifacts::read_pair(&opts.artifacts)?;
    let sids_sha = hfdir::sha256_file(opts.artifacts.join(artifacts::SIDS_FILE))?;
    let read = ReadOptions {
        skip_invalid: opts.skip_invalid,
        ..ReadOptions::default()
    };
    let (seqs, read_stats) = Sequences::load(&opts.interactions, &catalog, &read)?;
    if !read_stats.skipped.is_empty() || read_stats.unknown_skipped > 0 {
        crate::progress::warn(&format!(
            "{} ({} unknown items dropped); listed in train_report.json",
            crate::skipped::summary("interaction records", &read_stats.skipped),
            read_stats.unknown_skipped
        ));
    }
    let split = seqs.split();
    let prompts = match &opts.prompts {
        Some(dir) => Prompts::load(dir)?,
        None => Prompts::builtin(),
    };
    let examples = data::build(&catalog, &sids.records, &split, &prompts, &opts.data)?;
    let mut valid = data::build_validation(&catalog, &sids.records, &split, &prompts, &opts.data)?;
    if opts.valid_examples > 0 && valid.len() > opts.valid_examples {
        // A fixed sample, kept in user order: the same examples at every evaluation, and
        // for every seed, so that the held-out losses of seeds and `--members` compare.
        use rand::seq::index::sample;
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5eed_7a11d);
        let mut keep = sample(&mut rng, valid.len(), opts.valid_examples).into_vec();
        keep.sort_unstable();
        valid = keep.into_iter().map(|i| valid[i].clone()).collect();
    }
    let counts: BTreeMap<String, usize> = data::count_by_task(&examples)
        .into_iter()
        .map(|(t, n)| (t.to_string(), n))
        .collect();

    // 2. Tokenizer and base weights.
    let chat = ChatFormat::default();
    let (mut tok, mut cfg, mut tensors, tokenizer_config, base_name) =
        load_base(&opts.base, &examples, &catalog)?;
    let n_old = tok.get_vocab_size(true);
    if n_old != cfg.vocab_size {
        return Err(Error::Invalid(format!(
            "the tokenizer has {n_old} tokens but the model {} embedding rows: SID tokens \
             would not line up with new rows",
            cfg.vocab_size
        )));
    }
    let sid_tokens = sids.vocab.tokens();
    let added: Vec<AddedToken> = sid_tokens
        .iter()
        .map(|t| AddedToken::from(t.as_str(), true))
        .collect();
    tok.add_special_tokens(&added);
    for (i, t) in sid_tokens.iter().enumerate() {
        if tok.token_to_id(t) != Some((n_old + i) as u32) {
            return Err(Error::Invalid(format!(
                "SID token {t} did not get id {} (the tokenizer already knows it?)",
                n_old + i
            )));
        }
    }
    llama::extend_vocab(&mut tensors, &mut cfg, sid_tokens.len(), opts.seed)?;
    let item_keys = opts.item_embeddings.then(|| sids.item_keys(n_old as u32));
    if let Some(keys) = &item_keys {
        let table = llama::init_item_table(keys.len(), cfg.hidden_size, opts.seed)?;
        tensors.insert(ITEM_TABLE.to_string(), table);
    }
    // The training parts' successor counts: the teacher of `--soft-targets`, and the
    // transition memory saved beside the model for `--memory`.
    let memory =
        TransitionMemory::build(catalog.items.len(), &split.train, MemorySettings::default())?;
    let soft = match opts.soft_targets > 0.0 {
        true => Some(
            SoftTargets::new(
                // The item vectors' keys where they exist (built once).
                item_keys
                    .clone()
                    .unwrap_or_else(|| sids.item_keys(n_old as u32)),
                memory.clone(),
                opts.soft_targets,
            )
            .map_err(|e| Error::Invalid(e.to_string()))?,
        ),
        false => None,
    };
    let pad_id = tok
        .token_to_id("<|pad|>")
        .or_else(|| tok.token_to_id("<|endoftext|>"))
        .or(cfg.eos_token_id)
        .unwrap_or(0);

    // Soft prompts: the encoder and item vectors, the projections, every request's
    // vector (computed once: many examples share words).
    let soft_prompts = soft_setup(opts, &sids)?;
    let mut request_table: HashMap<String, std::sync::Arc<[f32]>> = HashMap::new();
    if let Some((vectors, _)) = &soft_prompts {
        for (name, t) in soft_prompt::init_weights(cfg.hidden_size, vectors.dim())? {
            tensors.entry(name).or_insert(t);
        }
        if opts.request_vectors {
            let mut texts: Vec<String> = examples
                .iter()
                .chain(&valid)
                .filter_map(|e| e.request.clone())
                .collect();
            texts.sort_unstable();
            texts.dedup();
            let bar = progress.bar(texts.len() as u64, "request vectors");
            let rows = vectors
                .requests(&texts, &mut |done| bar.set_position(done as u64))
                .map_err(|e| Error::Invalid(e.to_string()))?;
            bar.finish_and_clear();
            request_table = texts
                .into_iter()
                .zip(rows.into_iter().map(Into::into))
                .collect();
        }
    }

    // 3. Tokenize examples once.
    let encode = |exs: &[Example]| -> Result<Vec<Encoded>> {
        exs.iter()
            .map(|e| {
                let mut enc = trainer::encode_pair(
                    &tok,
                    &chat,
                    &e.prompt,
                    &e.context,
                    &e.answer,
                    opts.max_len,
                )?;
                if let Some((vectors, _)) = &soft_prompts {
                    if let Some(v) = e.request.as_ref().and_then(|r| request_table.get(r)) {
                        enc.soft.push((SoftSlot::Request, v.clone()));
                    }
                    if opts.taste_vectors {
                        if let Some(v) = vectors.taste(&e.taste) {
                            enc.soft.push((SoftSlot::Taste, v.into()));
                        }
                    }
                }
                Ok(enc)
            })
            .collect()
    };
    let valid_enc = encode(&valid)?;
    let ckpt_root = opts.out.with_extension("checkpoints");
    let mut report = TrainReport {
        base: base_name.clone(),
        params: tensors.values().map(|t| t.elem_count()).sum(),
        vocab_size: cfg.vocab_size,
        sid_tokens: sid_tokens.len(),
        users: seqs.len(),
        examples: counts,
        validation_examples: valid.len(),
        stages: Vec::new(),
        seconds: 0.0,
        skipped_interactions: read_stats.skipped.clone(),
        recipe: Some(
            serde_json::to_value(opts).map_err(|e| Error::Invalid(format!("recipe: {e}")))?,
        ),
    };

    let sidecar = Sidecar {
        sids_sha256: sids_sha,
        artifacts: opts.artifacts.display().to_string(),
        stage: String::new(),
        prompts_version: prompts.fingerprint().to_string(),
        sid_tokens: sid_tokens.len(),
        sid_token_offset: n_old as u32,
        history_titles: opts.data.history_titles,
        sequence: opts.data.sequence,
        soon: opts.data.sequence && opts.data.sequence_soon > 0,
        recipe: opts.recipe_name.clone(),
        ranking: opts.rank.clone(),
        soft_prompt: soft_prompts.as_ref().map(|(_, card)| card.clone()),
    };
    // Validation users for --select-best: held-out next items, ranked over the catalog.
    let select_cases: Vec<(Vec<u32>, u32)> = match opts.select_users {
        0 => Vec::new(),
        n => sample_users(split.valid.len(), Some(n), opts.seed ^ 0x5e1ec7)
            .into_iter()
            .map(|u| split.valid[u].clone())
            .filter(|(history, _)| !history.is_empty())
            .collect(),
    };

    // 4. Stages.
    let stages: [(&str, &Option<StageConfig>, bool); 2] = [
        ("align", &opts.stage1, true),
        ("instruct", &opts.stage2, false),
    ];
    let mut last_stage = "base".to_string();
    for (name, stage, align_only) in stages {
        let Some(stage) = stage else { continue };
        let exs: Vec<Example> = if align_only {
            examples
                .iter()
                .filter(|e| e.task == Task::Align)
                .cloned()
                .collect()
        } else {
            examples.clone()
        };
        let enc = encode(&exs)?;
        let loop_cfg = LoopConfig {
            epochs: stage.epochs,
            max_steps: stage.max_steps,
            batch_size: opts.batch_size,
            lr: stage.lr,
            warmup: opts.warmup,
            min_lr_ratio: 0.1,
            weight_decay: opts.weight_decay,
            clip: Some(opts.clip),
            eval_every: opts.eval_every,
            seed: opts.seed,
            pad_id,
        };
        let ckpt = Checkpointing {
            dir: ckpt_root.join(name),
            every: opts.checkpoint_every,
            resume: opts.resume && ckpt_root.join(name).join("trainer.json").exists(),
        };
        let (model, params) =
            build_model(&cfg, &tensors, stage.mode, n_old, item_keys.as_ref(), opts)?;
        let trainable: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
        // Only the scored positions (answers) are projected on the vocabulary: the same
        // loss and gradients as projecting every position (`--full-logits`), at a
        // fraction of the cost.
        let loss_with = |m: &Llama,
                         b: &trainer::Batch,
                         dropout: Option<llama::Dropout>,
                         soft: Option<&SoftTargets>|
         -> candle_core::Result<Tensor> {
            let soft_error = |e: SoftError| match e {
                SoftError::Candle(c) => c,
                other => candle_core::Error::Msg(other.to_string()),
            };
            let targets = match soft {
                Some(s) => s.targets(&b.input, &b.targets, &b.loss_mask),
                None => Targets::one_hot(&b.targets, &b.loss_mask),
            }
            .map_err(soft_error)?;
            targets.scored_loss(|rows| {
                m.forward_train_rows(&b.input, Some(&b.attention), dropout, rows, b.soft.as_ref())
                    .map_err(to_candle)
            })
        };
        let loss_fn = |b: &trainer::Batch| {
            let dropout = match opts.dropout > 0.0 || opts.item_dropout > 0.0 {
                true => Some(llama::Dropout {
                    p: opts.dropout,
                    key: batch_key(opts.seed, b)?,
                    items: opts.item_dropout,
                }),
                false => None,
            };
            loss_with(&model, b, dropout, soft.as_ref())
        };
        // Validation runs on a detached view of the same weights: no graph, little memory,
        // and no dropout.
        let inference = model.detached();
        // The held-out loss stays the plain one, comparable across runs.
        let eval_fn = |b: &trainer::Batch| loss_with(&inference, b, None, None);
        // Ranking validation users on the same detached view: it sees every update.
        let validator = match !align_only && !select_cases.is_empty() {
            true => Some(opts.validator.as_ref().ok_or_else(|| {
                Error::Invalid(
                    "select_best ranks validation users, which needs a validator \
                     (the evaluation's select_validator) in the training options"
                        .into(),
                )
            })?),
            false => None,
        };
        let view = ValidationModel {
            model: &inference,
            tokenizer: &tok,
            catalog: &catalog,
            sids: &sids,
            sidecar: &sidecar,
            prompts: &prompts,
            dir: &opts.out,
        };
        let (cases, view) = (&select_cases, &view);
        let mix_recent = opts.select_mix_recent;
        let ndcg = validator.map(|v| {
            move || -> std::result::Result<f64, String> { (v.0)(view, cases, mix_recent) }
        });
        let select = ndcg.as_ref().map(|f| trainer::Selection {
            name: "NDCG@10",
            metric: f,
        });
        if !progress.quiet {
            eprintln!(
                "stage {name}: {} examples, mode {:?}, {trainable} trainable parameters",
                enc.len(),
                stage.mode
            );
        }
        let rep = trainer::run(
            params,
            &enc,
            &valid_enc,
            trainer::Losses {
                train: &loss_fn,
                eval: &eval_fn,
            },
            select,
            &loop_cfg,
            &ckpt,
            progress,
        )?;
        tensors = model.merged_weights()?;
        report.stages.push(StageReport {
            name: name.to_string(),
            mode: stage.mode,
            examples: enc.len(),
            trainable_params: trainable,
            report: rep,
        });
        last_stage = name.to_string();
    }
    report.seconds = t0.elapsed().as_secs_f64();

    // 5. The model directory.
    let sidecar = Sidecar {
        stage: last_stage,
        ..sidecar
    };
    let config = serde_json::from_str(&cfg.to_json_string())
        .map_err(|e| Error::Invalid(format!("config: {e}")))?;
    let dir = HfDir {
        config,
        tensors,
        tokenizer: tok,
        tokenizer_config,
        sidecar: Some(sidecar),
    };
    // The model carries the catalog and SID map it speaks, so it can be used (and moved)
    // without the artifact directory.
    // The transition memory (what followed each item in the same training parts:
    // `--memory` at inference) and the report join the directory before it is swapped in,
    // so a kill can never leave a model without them.
    let side = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    memory.save(&side.path().join(MEMORY_FILE), &catalog)?;
    let report_path = side.path().join(REPORT_FILE);
    let json = serde_json::to_string_pretty(&report).map_err(|e| Error::Invalid(e.to_string()))?;
    std::fs::write(&report_path, json + "\n").map_err(|e| Error::io(&report_path, e))?;
    let mut files: Vec<(&str, PathBuf)> = [
        artifacts::CATALOG_FILE,
        artifacts::SIDS_FILE,
        artifacts::CODEBOOKS_FILE,
    ]
    .into_iter()
    .map(|f| (f, opts.artifacts.join(f)))
    .collect();
    files.push((MEMORY_FILE, side.path().join(MEMORY_FILE)));
    files.push((REPORT_FILE, report_path));
    let extra: Vec<(&str, &std::path::Path)> =
        files.iter().map(|(f, p)| (*f, p.as_path())).collect();
    dir.save_with_files(&opts.out, opts.force || opts.resume, &extra)?;
    let _ = std::fs::remove_dir_all(&ckpt_root);
    Ok(report)
}

/// Trains `members` models that differ only in their seed (`opts.seed`, `+ 1`, …) and
/// writes them as one ensemble: the first as the model directory `opts.out`, the others
/// under its `members/01/`, `members/02/`, …, where the decoding engine finds them
/// and ranks by the mixture of all of them.
///
/// Why: on a small catalog a model's ranking quality depends on its seed as much as on
/// its recipe (docs/lab/decoder.md, "Seeds"), and the mixture of a few seeds is steadier
/// than any one of them. Members train at the same time, each in its own thread pool
/// with an equal share of the worker threads, since a model this small trains faster per
/// core on one thread than on two. Measured: as separate processes two one-thread runs
/// each keep a lone run's speed, but in one process each gets about half of it
/// (docs/training.md, "Ensembles"); the cause is not found yet.
///
/// Nothing is written to `opts.out` unless every member trained; the members are staged
/// beside it (`OUT.members/`) and moved in at the end. Returns the reports in member
/// order. `members <= 1` is [`run`].
pub fn run_members(
    opts: &TrainOptions,
    members: usize,
    progress: Progress,
) -> Result<Vec<TrainReport>> {
    if members <= 1 {
        return Ok(vec![run(opts, progress)?]);
    }
    if opts.resume {
        return Err(Error::Invalid(
            "--resume continues one model: it cannot be combined with --members".into(),
        ));
    }
    refuse_existing(opts)?;
    let staging = opts.out.with_extension("members");
    // Members train beside the output; a leftover staging directory of a killed run is
    // removed, anything else by that name is the user's and stops the run.
    if staging.exists() {
        let ours = std::fs::read_dir(&staging)
            .map_err(|e| Error::io(&staging, e))?
            .filter_map(|e| e.ok())
            .all(|e| crate::atomic::check_target(&e.path(), true, &opts.inputs()).is_ok());
        if !ours {
            return Err(Error::Invalid(format!(
                "{} exists and holds files sidrec did not write there: members train in that \
                 directory; move it away",
                staging.display()
            )));
        }
        std::fs::remove_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    }
    let result = train_members(opts, members, &staging, progress);
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// An existing output directory is an error unless `--force` or `--resume` asks for it.
fn refuse_existing(opts: &TrainOptions) -> Result<()> {
    crate::atomic::check_target(&opts.out, opts.force || opts.resume, &opts.inputs())
        .map_err(|r| Error::Invalid(r.to_string()))
}

fn train_members(
    opts: &TrainOptions,
    members: usize,
    staging: &std::path::Path,
    progress: Progress,
) -> Result<Vec<TrainReport>> {
    let name = |i: usize| format!("{i:02}");
    let member_opts: Vec<TrainOptions> = (0..members)
        .map(|i| {
            let mut o = opts.clone();
            o.seed = opts.seed.wrapping_add(i as u64);
            o.data.seed = opts.data.seed.wrapping_add(i as u64);
            o.out = staging.join(name(i));
            o.force = true;
            o
        })
        .collect();
    let threads = rayon::current_num_threads().max(1);
    let at_once = members.min(threads);
    let per_member = (threads / at_once).max(1);
    let mut reports = Vec::with_capacity(members);
    for wave in member_opts.chunks(at_once) {
        let done: Vec<Result<TrainReport>> = std::thread::scope(|scope| {
            let running: Vec<_> = wave
                .iter()
                .map(|o| {
                    // Bars for the first member only: the others train alongside it.
                    let p = Progress::new(progress.quiet || !std::ptr::eq(o, &member_opts[0]));
                    scope.spawn(move || {
                        let pool = rayon::ThreadPoolBuilder::new()
                            .num_threads(per_member)
                            .build()
                            .map_err(|e| Error::Invalid(format!("thread pool: {e}")))?;
                        pool.install(|| run(o, p))
                    })
                })
                .collect();
            running
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::Invalid("a member's training panicked".into()))
                    })
                })
                .collect()
        });
        for r in done {
            reports.push(r?);
        }
        if !progress.quiet {
            eprintln!("trained {} of {members} members", reports.len());
        }
    }
    // The first member's files become the model directory, the others its members.
    let first = staging.join(name(0));
    crate::atomic::write_dir(
        &opts.out,
        true,
        &opts.inputs(),
        |r| Error::Invalid(r.to_string()),
        |p, e| Error::io(p, e),
        |tmp| {
            for entry in std::fs::read_dir(&first).map_err(|e| Error::io(&first, e))? {
                let from = entry.map_err(|e| Error::io(&first, e))?.path();
                let to = tmp.join(from.file_name().unwrap_or_default());
                std::fs::rename(&from, &to).map_err(|e| Error::io(&from, e))?;
            }
            let dir = tmp.join(hfdir::MEMBERS_DIR);
            std::fs::create_dir(&dir).map_err(|e| Error::io(&dir, e))?;
            for i in 1..members {
                let from = staging.join(name(i));
                std::fs::rename(&from, dir.join(name(i))).map_err(|e| Error::io(&from, e))?;
            }
            Ok(())
        },
    )?;
    Ok(reports)
}

fn to_candle(e: llama::ModelError) -> candle_core::Error {
    match e {
        llama::ModelError::Candle(c) => c,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

/// Tokenizer, config, weights, `tokenizer_config.json` (chat template) and a name.
type Base = (
    Tokenizer,
    LlamaConfig,
    HashMap<String, Tensor>,
    Option<serde_json::Value>,
    String,
);

fn load_base(
    base: &BaseModel,
    examples: &[Example],
    catalog: &crate::catalog::Catalog,
) -> Result<Base> {
    match base {
        BaseModel::Scratch { config, vocab_size } => {
            let mut cfg = LlamaConfig::from_file(config)?;
            // The BPE learns words, not SID tokens: those are added whole afterwards.
            let strip = |s: &str| strip_sid_tokens(s);
            let texts: Vec<String> = catalog
                .items
                .iter()
                .map(|i| format!("{} {}", i.title, i.description))
                .chain(
                    examples
                        .iter()
                        .map(|e| format!("{} {}", strip(&e.prompt), strip(&e.answer))),
                )
                .collect();
            let tok = bpe::train_bpe(texts.iter(), *vocab_size)?;
            cfg.vocab_size = tok.get_vocab_size(true);
            let eos = tok.token_to_id(bpe::SPECIAL_TOKENS[0]);
            cfg.bos_token_id = eos;
            cfg.eos_token_id = tok.token_to_id("<|im_end|>").or(eos);
            let tensors = Llama::init_tensors(&cfg, 0)?;
            let name = format!("scratch:{}", config.display());
            Ok((tok, cfg, tensors, None, name))
        }
        BaseModel::HfDir(dir) => {
            let hf = HfDir::load(dir)?;
            if hf.sidecar.is_some() {
                return Err(Error::Invalid(format!(
                    "{} already speaks a SID map (it has sidrec.json): start from its base model",
                    dir.display()
                )));
            }
            let cfg =
                LlamaConfig::from_json_str(&hf.config.to_string(), &dir.display().to_string())?;
            Ok((
                hf.tokenizer,
                cfg,
                hf.tensors,
                hf.tokenizer_config,
                dir.display().to_string(),
            ))
        }
        BaseModel::Gguf(path) => {
            let g = GgufModel::open(path)?;
            let json =
                serde_json::to_string(&g.hf_config()).map_err(|e| Error::Invalid(e.to_string()))?;
            let cfg = LlamaConfig::from_json_str(&json, &path.display().to_string())?;
            let tok = g.tokenizer()?;
            let tensors = g.dequantize_all()?;
            Ok((tok, cfg, tensors, None, path.display().to_string()))
        }
    }
}

/// Removes `<...>` SID-like tokens (type, level and dedup tokens) from a text.
fn strip_sid_tokens(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('<') {
        out.push_str(&rest[..i]);
        match rest[i..].find('>') {
            Some(j) if !rest[i + 1..i + j].contains(char::is_whitespace) => {
                rest = &rest[i + j + 1..]
            }
            _ => {
                out.push('<');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The soft-prompt vectors of a run and the model card's record of them, when the
/// recipe asks for any: the item vectors from the artifacts' codebooks, and the encoder
/// (hashed, so a model is never asked with another encoder's vectors).
fn soft_setup(
    opts: &TrainOptions,
    sids: &SidMap,
) -> Result<Option<(SoftVectors, hfdir::SoftPromptCard)>> {
    if !opts.request_vectors && !opts.taste_vectors {
        return Ok(None);
    }
    let codebooks = artifacts::read_codebooks(&opts.artifacts)?;
    let (items, dim) = artifacts::item_vectors(&codebooks, &sids.records)?;
    let (encoder, card) = if opts.request_vectors {
        let dir = opts
            .encoder
            .clone()
            .unwrap_or_else(crate::embed::default_encoder_dir);
        let encoder =
            crate::embed::BertEncoder::from_dir(&dir, soft_prompt::REQUEST_TOKENS).map_err(|e| {
                Error::Invalid(format!(
                    "request_vectors needs the sentence encoder the SIDs were made with: {e}                      (run scripts/fetch-assets.sh, or give its directory)"
                ))
            })?;
        let card = hfdir::SoftPromptCard {
            request: true,
            taste: opts.taste_vectors,
            encoder: dir.display().to_string(),
            encoder_sha256: hfdir::sha256_file(dir.join("model.safetensors"))?,
        };
        (Some(encoder), card)
    } else {
        let card = hfdir::SoftPromptCard {
            request: false,
            taste: true,
            ..Default::default()
        };
        (None, card)
    };
    let vectors =
        SoftVectors::new(encoder, items, dim).map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(Some((vectors, card)))
}

type Trainable = (Llama, Vec<(String, candle_core::Var)>);

fn build_model(
    cfg: &LlamaConfig,
    tensors: &HashMap<String, Tensor>,
    mode: Mode,
    n_old: usize,
    item_keys: Option<&ItemKeys>,
    opts: &TrainOptions,
) -> Result<Trainable> {
    let dev = Device::Cpu;
    let (model, map) = match mode {
        Mode::Full => {
            let map = llama::varmap_from_tensors(tensors)?;
            let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
            (Llama::new(cfg, vb)?, map)
        }
        Mode::Lora | Mode::Rows => {
            let lora = LoraConfig {
                rank: opts.lora_rank,
                alpha: opts.lora_alpha,
                targets: if mode == Mode::Lora {
                    llama::LORA_TARGETS.iter().map(|s| s.to_string()).collect()
                } else {
                    Vec::new()
                },
                train_new_rows_from: Some(n_old),
            };
            let mut init = llama::lora_init_tensors(cfg, &lora, opts.seed)?;
            // The item table and the soft-prompt projections are new: they train beside
            // the adapters.
            for name in [
                ITEM_TABLE,
                soft_prompt::REQUEST_WEIGHT,
                soft_prompt::TASTE_WEIGHT,
            ] {
                if let Some(t) = tensors.get(name) {
                    init.insert(name.to_string(), t.copy().map_err(llama::ModelError::from)?);
                }
            }
            let map = llama::varmap_from_tensors(&init)?;
            let base = VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev);
            let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
            (Llama::new_with_lora(cfg, base, vb, &lora)?, map)
        }
    };
    let params: Vec<(String, candle_core::Var)> = map
        .data()
        .lock()
        .map_err(|_| Error::Invalid("parameter map poisoned".into()))?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let model = match item_keys {
        None => model,
        Some(keys) => {
            let table = params
                .iter()
                .find(|(name, _)| name == ITEM_TABLE)
                .map(|(_, v)| v.as_tensor().clone())
                .ok_or_else(|| Error::Invalid(format!("{ITEM_TABLE} is missing")))?;
            model.with_items(table, keys.clone())?
        }
    };
    let param = |name: &str| {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_tensor().clone())
    };
    let model = match (
        param(soft_prompt::REQUEST_WEIGHT),
        param(soft_prompt::TASTE_WEIGHT),
    ) {
        (Some(request), Some(taste)) => model.with_soft_prompt(request, taste)?,
        _ => model,
    };
    Ok((model, params))
}

/// The dropout key of a training batch: the seed and the batch's tokens, hashed (FNV-1a).
/// A batch's masks then depend on nothing else, so a resumed run draws the same masks
/// as an uninterrupted one. (A batch of exactly the same examples in another epoch would
/// draw the same masks again; batches are regrouped every epoch, so that is rare.)
fn batch_key(seed: u64, b: &trainer::Batch) -> candle_core::Result<u64> {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for id in b.input.flatten_all()?.to_vec1::<u32>()? {
        h = (h ^ u64::from(id)).wrapping_mul(0x0100_0000_01b3);
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_sid_tokens_only() {
        assert_eq!(
            strip_sid_tokens("watched <movie><a_1><b_2> Toy Story; a < b > c"),
            "watched  Toy Story; a < b > c"
        );
    }
}
