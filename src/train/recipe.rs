//! Training recipes: every setting of a `sidrec train` run except its paths, in a TOML
//! file (`recipes/amazon.toml`, `recipes/movielens.toml`), as GRID keeps its experiments.
//!
//! Why files: the measured recipes take a dozen settings each, and a table is only as
//! reproducible as the exact set of them. A recipe is named, commented, versioned with
//! the code, recorded whole in `train_report.json`, and overridden one key at a time
//! (`--set dropout=0.1`), so the command line keeps the flags a user needs.
//!
//! Without `--recipe`, [`choose`] picks the built-in recipe the evaluation measured best
//! for data like the user's: `movielens` for long histories (MovieLens: 106 items per
//! user), `amazon` for short ones (Amazon reviews: 9). A recipe also says how its models
//! rank best ([`Ranking`]), which `sidrec.json` records so that `recommend`, `repl`,
//! `serve` and `eval` rank that way without flags.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::data::DataOptions;
use super::pipeline::{BaseModel, Mode, StageConfig, TrainOptions};
use crate::model::hfdir::Ranking;

/// The folder of the built-in recipes in the source tree this binary was built from.
pub const RECIPES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes");

/// The built-in recipes, by name, as files (they are compiled in too, so a binary moved
/// elsewhere still has them; relative paths in them resolve against [`RECIPES_DIR`]).
pub const BUILTIN: &[(&str, &str)] = &[
    ("movielens", include_str!("../../recipes/movielens.toml")),
    ("amazon", include_str!("../../recipes/amazon.toml")),
    ("demo", include_str!("../../recipes/demo.toml")),
];

/// Mean training-history length (items per user) under which data counts as short-history
/// and gets the `amazon` recipe. MovieLens-100k/1M average 106/165 items per user, the
/// Amazon review sets 8-9: the two recipes were measured on those, and 20 sits far from
/// both.
pub const SHORT_HISTORY: f64 = 20.0;

/// Errors of reading and applying recipes.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown or mistyped key.
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    /// A `--set` that is not `KEY=VALUE` or names no setting.
    #[error("--set {expr:?}: {message}")]
    Set { expr: String, message: String },
    /// Settings that contradict each other.
    #[error("recipe {name}: {message}")]
    Invalid { name: String, message: String },
}

/// Every setting of a training run but its paths. Field names are the TOML keys; each
/// default is what a recipe that leaves the key out gets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Recipe {
    /// Short name, printed and recorded.
    pub name: String,
    /// What the recipe is for, in a sentence.
    pub description: String,
    /// The base model: a config JSON (a model from scratch), a Hugging Face directory or
    /// a GGUF file. Relative paths resolve against the recipe file's folder.
    pub base: String,
    /// BPE vocabulary of a from-scratch model.
    pub vocab_size: usize,
    /// Prompt templates folder (relative to the recipe's folder); empty: the built-in
    /// prompts.
    pub prompts: String,
    /// Stage 1 (align) mode: full, lora, rows, none, or auto (full from scratch, rows
    /// for a pretrained base).
    pub stage1_mode: String,
    /// Stage 2 (instruct) mode: full, lora, none, or auto (full from scratch, lora for a
    /// pretrained base).
    pub stage2_mode: String,
    pub stage1_epochs: usize,
    pub stage2_epochs: usize,
    /// Stop each stage after this many steps (0: run its epochs).
    pub max_steps: usize,
    /// Peak learning rate of both stages.
    pub lr: f64,
    pub batch_size: usize,
    /// Tokens per example (longer prompts are cut from the left).
    pub max_len: usize,
    pub warmup: usize,
    /// Gradient clipping (global L2 norm).
    pub clip: f64,
    pub weight_decay: f64,
    /// Dropout on embeddings and every attention and MLP output (0: none).
    pub dropout: f32,
    /// A learned input vector per catalog item, added where the model read its SID.
    pub item_embeddings: bool,
    /// Share of positions that lose their item vector while training.
    pub item_dropout: f32,
    /// Share of every item target given to the transition memory's distribution.
    pub soft_targets: f32,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    /// Validation loss every N steps (0: at the end of each stage).
    pub eval_every: usize,
    /// Validation examples (0: every user).
    pub valid_examples: usize,
    /// Keep the weights with the best validation NDCG@10 over this many users (0: the
    /// last step's).
    pub select_best: usize,
    pub checkpoint_every: usize,
    /// Recommendation examples per user (absent: every position of the training part).
    pub recommend_per_user: Option<usize>,
    /// Share of recommendation examples that also carry a request in words.
    pub recommend_query_share: f64,
    pub search_per_item: usize,
    /// Further search examples per item asking for its genre or decade in the words of
    /// the request lexicon (`prompts/requests/`).
    pub requests_per_item: usize,
    /// Chat examples per item: a request in words answered as items, text or both, as
    /// its phrasing asks (`prompts/chat_*.txt`).
    pub chat_per_item: usize,
    /// Chat examples per user: "something like {title}" answered with what the user
    /// took next, in one of the three formats.
    pub chat_per_user: usize,
    /// Read the request's sentence vector as a soft prompt (needs the encoder the SIDs
    /// were made with, `assets/minilm` by default).
    pub request_vectors: bool,
    /// Read the history's mean item vector as a soft prompt (the user's taste).
    pub taste_vectors: bool,
    /// Histories as SIDs alone, without titles.
    pub sid_only_histories: bool,
    /// Whole histories as one answer, every item a target.
    pub sequence_examples: bool,
    /// Half-overlapping windows of N+1 items cut from longer histories (0: none).
    pub short_windows: usize,
    /// Soon-after pairs up to N positions apart (0: none).
    pub soon_pairs: usize,
    pub describe_per_user: usize,
    pub steer_per_user: usize,
    /// Alignment examples per item and direction (0 also skips stage 1).
    pub align_per_item: usize,
    /// Models trained side by side with seeds seed, seed+1, ..., ranked as one ensemble.
    pub members: usize,
    /// How the models rank best (recorded in `sidrec.json`).
    pub rank: Ranking,
}

impl Default for Recipe {
    fn default() -> Self {
        Recipe {
            name: "custom".into(),
            description: String::new(),
            base: "../models/tiny.json".into(),
            vocab_size: 4096,
            prompts: String::new(),
            stage1_mode: "auto".into(),
            stage2_mode: "auto".into(),
            stage1_epochs: 1,
            stage2_epochs: 1,
            max_steps: 0,
            lr: 1e-3,
            batch_size: 16,
            max_len: 256,
            warmup: 50,
            clip: 1.0,
            weight_decay: 0.01,
            dropout: 0.0,
            item_embeddings: false,
            item_dropout: 0.0,
            soft_targets: 0.0,
            lora_rank: 16,
            lora_alpha: 32.0,
            eval_every: 200,
            valid_examples: 256,
            select_best: 0,
            checkpoint_every: 500,
            recommend_per_user: None,
            recommend_query_share: 0.3,
            search_per_item: 1,
            requests_per_item: 0,
            chat_per_item: 0,
            chat_per_user: 0,
            request_vectors: false,
            taste_vectors: false,
            sid_only_histories: false,
            sequence_examples: false,
            short_windows: 0,
            soon_pairs: 0,
            describe_per_user: 1,
            steer_per_user: 10,
            align_per_item: 1,
            members: 1,
            rank: Ranking::default(),
        }
    }
}

/// A recipe and the folder its relative paths resolve against.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub recipe: Recipe,
    /// Where it came from: a file path, or `built-in NAME`.
    pub origin: String,
    pub dir: PathBuf,
}

impl Loaded {
    /// Reads `spec`: the name of a built-in recipe (`amazon`, `movielens`) or a TOML
    /// file.
    pub fn from_spec(spec: &str) -> Result<Loaded, RecipeError> {
        if let Some((name, text)) = BUILTIN.iter().find(|(n, _)| *n == spec) {
            return Loaded::builtin(name, text);
        }
        let path = Path::new(spec);
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let recipe = parse(&text, &path.display().to_string())?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        Ok(Loaded {
            recipe,
            origin: path.display().to_string(),
            dir,
        })
    }

    fn builtin(name: &str, text: &str) -> Result<Loaded, RecipeError> {
        Ok(Loaded {
            recipe: parse(text, &format!("recipes/{name}.toml"))?,
            origin: format!("recipes/{name}.toml"),
            dir: PathBuf::from(RECIPES_DIR),
        })
    }

    /// Applies `--set KEY=VALUE` overrides, each VALUE read as TOML (`0.1`, `true`,
    /// `"models/small.json"`; a bare word is taken as a string).
    pub fn set(&mut self, exprs: &[String]) -> Result<(), RecipeError> {
        if exprs.is_empty() {
            return Ok(());
        }
        let set_err = |expr: &str, message: String| RecipeError::Set {
            expr: expr.to_string(),
            message,
        };
        let mut table = toml::Table::try_from(&self.recipe)
            .map_err(|e| set_err("", format!("the recipe does not serialise: {e}")))?;
        for expr in exprs {
            let (key, value) = expr
                .split_once('=')
                .ok_or_else(|| set_err(expr, "expected KEY=VALUE, e.g. dropout=0.1".into()))?;
            let key = key.trim();
            let value = value.trim();
            let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(value.to_string()));
            match key.split_once('.') {
                Some((outer, inner)) => {
                    let t = table
                        .entry(outer.to_string())
                        .or_insert_with(|| toml::Value::Table(Default::default()));
                    match t {
                        toml::Value::Table(t) => {
                            t.insert(inner.to_string(), parsed);
                        }
                        _ => return Err(set_err(expr, format!("{outer} is not a table"))),
                    }
                }
                None => {
                    table.insert(key.to_string(), parsed);
                }
            }
        }
        let text = toml::to_string(&table).map_err(|e| set_err("", e.to_string()))?;
        self.recipe = toml::from_str(&text).map_err(|e| RecipeError::Set {
            expr: exprs.join(" "),
            message: first_line(&e.to_string()),
        })?;
        Ok(())
    }

    /// The base model the recipe names, resolved against its folder.
    pub fn base(&self) -> Result<BaseModel, RecipeError> {
        let p = self.resolve(&self.recipe.base);
        let invalid = |message: String| RecipeError::Invalid {
            name: self.recipe.name.clone(),
            message,
        };
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        match ext {
            "json" => Ok(BaseModel::Scratch {
                config: p,
                vocab_size: self.recipe.vocab_size,
            }),
            "gguf" => Ok(BaseModel::Gguf(p)),
            _ if p.is_dir() => Ok(BaseModel::HfDir(p)),
            _ => Err(invalid(format!(
                "base {:?}: expected a config .json (from scratch), a .gguf file or a model \
                 directory",
                self.recipe.base
            ))),
        }
    }

    /// A path from the recipe: absolute as it is, relative against the recipe's folder.
    pub fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    /// The training options for `artifacts` and `interactions` into `out`, the recipe's
    /// settings checked against each other.
    pub fn options(
        &self,
        artifacts: PathBuf,
        interactions: PathBuf,
        out: PathBuf,
        seed: u64,
    ) -> Result<TrainOptions, RecipeError> {
        let r = &self.recipe;
        let invalid = |message: &str| RecipeError::Invalid {
            name: r.name.clone(),
            message: message.to_string(),
        };
        if r.short_windows > 0 && !r.sequence_examples {
            return Err(invalid(
                "short_windows cuts sequence examples: it needs sequence_examples = true",
            ));
        }
        if r.soon_pairs > 0 && !r.sequence_examples {
            return Err(invalid(
                "soon_pairs adds sequence examples: it needs sequence_examples = true",
            ));
        }
        if r.select_best > 0 && (r.request_vectors || r.taste_vectors) {
            return Err(invalid(
                "select_best ranks validation users without soft prompts: it cannot be \
                 combined with request_vectors or taste_vectors yet",
            ));
        }
        if r.item_dropout > 0.0 && !r.item_embeddings {
            return Err(invalid(
                "item_dropout drops item vectors: it needs item_embeddings = true",
            ));
        }
        if r.sequence_examples && !r.sid_only_histories {
            return Err(invalid(
                "sequence_examples needs sid_only_histories = true: with titles a window of \
                 history outgrows max_len and would be cut",
            ));
        }
        for (name, v) in [
            ("dropout", r.dropout),
            ("item_dropout", r.item_dropout),
            ("soft_targets", r.soft_targets),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(invalid(&format!("{name} must be in [0, 1), got {v}")));
            }
        }
        if !(0.0..=1.0).contains(&r.recommend_query_share) {
            return Err(invalid("recommend_query_share must be in [0, 1]"));
        }
        if r.members == 0 || r.members > 16 {
            return Err(invalid("members must be 1 to 16"));
        }
        let base = self.base()?;
        let scratch = matches!(base, BaseModel::Scratch { .. });
        let stage = |mode: &str, scratch_default: Mode, pretrained_default: Mode, epochs| {
            let mode = match mode {
                "none" => return Ok(None),
                "auto" | "" => {
                    if scratch {
                        scratch_default
                    } else {
                        pretrained_default
                    }
                }
                m => m
                    .parse::<Mode>()
                    .map_err(|e| invalid(&format!("stage mode: {e}")))?,
            };
            Ok(Some(StageConfig {
                mode,
                epochs,
                max_steps: r.max_steps,
                lr: r.lr,
            }))
        };
        let stage1 = match r.align_per_item {
            // Stage 1 trains on align examples alone: none, no stage.
            0 => None,
            _ => stage(&r.stage1_mode, Mode::Full, Mode::Rows, r.stage1_epochs)?,
        };
        let stage2 = stage(&r.stage2_mode, Mode::Full, Mode::Lora, r.stage2_epochs)?;
        if stage1.is_none() && stage2.is_none() {
            return Err(invalid("both stages are off: nothing to train"));
        }
        Ok(TrainOptions {
            artifacts,
            interactions,
            base,
            out,
            force: false,
            prompts: (!r.prompts.is_empty()).then(|| self.resolve(&r.prompts)),
            skip_invalid: false,
            stage1,
            stage2,
            batch_size: r.batch_size,
            max_len: r.max_len,
            warmup: r.warmup,
            clip: r.clip,
            weight_decay: r.weight_decay,
            dropout: r.dropout,
            item_embeddings: r.item_embeddings,
            item_dropout: r.item_dropout,
            soft_targets: r.soft_targets,
            request_vectors: r.request_vectors,
            taste_vectors: r.taste_vectors,
            encoder: None,
            lora_rank: r.lora_rank,
            lora_alpha: r.lora_alpha,
            eval_every: r.eval_every,
            checkpoint_every: r.checkpoint_every,
            valid_examples: r.valid_examples,
            resume: false,
            seed,
            select_users: r.select_best,
            select_mix_recent: r.rank.mix_recent,
            rank: r.rank.clone(),
            recipe_name: r.name.clone(),
            validator: None,
            data: DataOptions {
                seed,
                recommend_per_user: r.recommend_per_user,
                recommend_query_share: r.recommend_query_share,
                search_per_item: r.search_per_item,
                requests_per_item: r.requests_per_item,
                chat_per_item: r.chat_per_item,
                chat_per_user: r.chat_per_user,
                history_titles: !r.sid_only_histories,
                sequence: r.sequence_examples,
                sequence_short: r.short_windows,
                sequence_soon: r.soon_pairs,
                describe_per_user: r.describe_per_user,
                steer_per_user: r.steer_per_user,
                align_per_item: r.align_per_item,
                ..Default::default()
            },
        })
    }
}

/// The built-in recipe for data whose users' training histories average `mean_len`
/// items, and why, in words.
pub fn choose(mean_len: f64) -> Result<(Loaded, String), RecipeError> {
    let (name, why) = if mean_len < SHORT_HISTORY {
        ("amazon", "short")
    } else {
        ("movielens", "long")
    };
    let loaded = Loaded::from_spec(name)?;
    Ok((
        loaded,
        format!(
            "histories average {mean_len:.1} items per user ({why}: the {name} recipe was \
             measured best there)"
        ),
    ))
}

fn parse(text: &str, origin: &str) -> Result<Recipe, RecipeError> {
    toml::from_str(text).map_err(|e| RecipeError::Parse {
        path: origin.to_string(),
        message: first_line(&e.to_string()).replace('\n', " "),
    })
}

/// toml's messages draw the offending line under the first one; the first line (with
/// the key or position) is what a one-line error needs, plus the "expected" line.
fn first_line(msg: &str) -> String {
    msg.lines()
        .filter(|l| {
            let t = l.trim_start();
            !(t.is_empty()
                || t.starts_with('|')
                || t.starts_with('-')
                || t.chars().next().is_some_and(|c| c.is_ascii_digit()))
        })
        .collect::<Vec<_>>()
        .join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_recipes_parse_and_build_options() {
        for (name, _) in BUILTIN {
            let l = Loaded::from_spec(name).unwrap();
            assert_eq!(&l.recipe.name, name);
            let o = l
                .options("a".into(), "i".into(), "o".into(), 0)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(o.stage2.is_some());
            assert!(matches!(o.base, BaseModel::Scratch { ref config, .. } if config.is_file()));
        }
    }

    #[test]
    fn set_overrides_and_rejects_unknown_keys() {
        let mut l = Loaded::from_spec("amazon").unwrap();
        l.set(&[
            "dropout=0.1".into(),
            "rank.memory=2".into(),
            "base=../models/tiny.json".into(),
        ])
        .unwrap();
        assert_eq!(l.recipe.dropout, 0.1);
        assert_eq!(l.recipe.rank.memory, Some(2.0));
        assert_eq!(l.recipe.base, "../models/tiny.json");
        let err = l.set(&["dropuot=0.1".into()]).unwrap_err().to_string();
        assert!(err.contains("dropuot"), "{err}");
        let err = l.set(&["dropout".into()]).unwrap_err().to_string();
        assert!(err.contains("KEY=VALUE"), "{err}");
        let err = l.set(&["dropout=\"high\"".into()]).unwrap_err().to_string();
        assert!(err.contains("dropout"), "{err}");
    }

    #[test]
    fn contradictions_are_errors() {
        let mut l = Loaded::from_spec("movielens").unwrap();
        l.set(&["sid_only_histories=false".into()]).unwrap();
        let err = l
            .options("a".into(), "i".into(), "o".into(), 0)
            .unwrap_err();
        assert!(err.to_string().contains("sid_only_histories"), "{err}");
    }

    #[test]
    fn choice_follows_history_length() {
        assert_eq!(choose(8.9).unwrap().0.recipe.name, "amazon");
        assert_eq!(choose(106.0).unwrap().0.recipe.name, "movielens");
    }
}
