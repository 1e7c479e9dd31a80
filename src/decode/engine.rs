//! A trained model with its catalog, ready for requests.
//!
//! [`Engine::load`] reads a model directory written by `sidrec train` (weights, tokenizer
//! with SID tokens, `sidrec.json`) and the catalog and SID map it carries (or, for older
//! directories, the artifact directory its `sidrec.json` names), checks that they belong
//! together (sha256 of `sids.jsonl`), and builds the trie once. Requests are rendered
//! with the same prompt templates and chat format the model was trained with, so it is
//! asked exactly as it was taught.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use tokenizers::Tokenizer;

use super::batch::{BatchStats, Batcher};
use super::beam::{beam_search, BeamConfig, Hit};
use super::filter::Filter;
use super::generate::{generate, GenConfig, Segment};
use super::memory::MemorySource;
use super::mixture::{Component, MixtureSource};
use super::prefix::{self, PrefixCache};
use super::query::{normalize, read_attributes, Reading};
use super::{DecodeError, LogitSource};
use crate::artifacts::{self, SidMap};
use crate::catalog::{Catalog, Item};
use crate::error::{Error, Result};
use crate::memory::{Distribution, TransitionMemory, MEMORY_FILE};
use crate::model::config::LlamaConfig;
use crate::model::hfdir::{self, HfDir, Sidecar};
use crate::model::items::ITEM_TABLE;
use crate::model::llama::{KvCache, Llama};
use crate::model::packed::WeightFormat;
use crate::model::soft_prompt;
use crate::train::data::{self, DataOptions, PromptKind, Prompts, Slot};
use crate::train::trainer::ChatFormat;
use crate::trie::{ItemIdx, Mask};
use std::sync::Arc;

mod soft;
mod source;
mod titles;

pub use soft::load_vectors;

pub use source::ModelSource;

/// What a request asks for; the prompt template follows from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// Recommend from the history when there is one, else search with the query.
    #[default]
    Auto,
    /// Next items after the history (the query, if any, is appended to the prompt).
    Recommend,
    /// Items matching the text query.
    Search,
    /// A text profile of the user from the history.
    Describe,
    /// The query as a free chat message; the answer mixes text and items.
    Chat,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Mode::Auto),
            "recommend" => Ok(Mode::Recommend),
            "search" => Ok(Mode::Search),
            "describe" => Ok(Mode::Describe),
            "chat" => Ok(Mode::Chat),
            other => Err(format!(
                "unknown mode {other:?} (auto, recommend, search, describe, chat)"
            )),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::Recommend => "recommend",
            Mode::Search => "search",
            Mode::Describe => "describe",
            Mode::Chat => "chat",
        })
    }
}

/// What an answer is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Format {
    /// The mode's own: items for recommend and search, text for describe, both for chat.
    #[default]
    Auto,
    /// A ranked list of items (beam search over the trie).
    Items,
    /// Free text only: no SID token may be generated.
    Text,
    /// Free text with items wherever the model names one.
    Both,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Format::Auto),
            "items" => Ok(Format::Items),
            "text" => Ok(Format::Text),
            "both" => Ok(Format::Both),
            other => Err(format!(
                "unknown format {other:?} (auto, items, text, both)"
            )),
        }
    }
}

/// One request.
#[derive(Clone, Debug, Default)]
pub struct Request {
    pub mode: Mode,
    pub format: Format,
    /// Natural-language text: a search query, or an addition to a recommend prompt.
    pub query: String,
    /// The user's items, oldest first (catalog indices).
    pub history: Vec<ItemIdx>,
    /// Allowed entity types (empty: all).
    pub types: Vec<String>,
    /// Ask for `types` in the prompt's words only, without limiting the trie: measures
    /// how well the model steers by language alone (`sidrec eval`).
    pub types_in_prompt_only: bool,
    /// Attribute filter, e.g. `year>=1990, genre=Comedy`.
    pub filter: Option<String>,
    /// Leave the history's items out of the answer.
    pub exclude_seen: bool,
    /// Items to return.
    pub k: usize,
    /// Beam width (default `2k`, at least 10).
    pub beams: Option<usize>,
    /// Also ask for each of the last `mix_recent` history items alone and rank by the
    /// mixture of these conditionals and the whole history's ([`super::mixture`]); the
    /// k-th most recent item weighs `recent_decay`^(k-1) against the whole history's 1.
    /// 0: the whole history alone. Only for ranked items with a history of two or more.
    pub mix_recent: usize,
    /// The decay under `mix_recent` (`None`: [`RECENT_DECAY`]).
    pub recent_decay: Option<f32>,
    /// Also mix in the engine's transition memory ([`crate::memory`]) at this weight,
    /// against the whole history's 1 (per ensemble member). `None` or 0: off. Only for
    /// ranked items; a history whose recent items the memory never saw followed by
    /// anything is ranked without it.
    pub memory: Option<f32>,
}

/// Weight of each further history item asked alone under [`Request::mix_recent`], after
/// the last item's 1: the successors of older items count for less, as in decayed
/// co-occurrence counts.
pub const RECENT_DECAY: f32 = 0.5;

/// A ranked item.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Recommendation {
    pub rank: usize,
    pub id: String,
    pub title: String,
    #[serde(rename = "type")]
    pub item_type: String,
    /// `log p(SID | prompt)`.
    pub score: f32,
    pub sid: String,
}

/// A piece of a generated answer.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Output {
    Text { text: String },
    Item(Recommendation),
}

/// A generated answer as one line of text, each item as `[Title (id)]`: how the CLI and
/// the eval report show it.
pub fn render_outputs(segs: &[Output]) -> String {
    segs.iter()
        .map(|s| match s {
            Output::Text { text } => text.clone(),
            Output::Item(r) => format!("[{} ({})]", r.title, r.id),
        })
        .collect()
}

/// A model, its tokenizer, its catalog and SID trie.
pub struct Engine {
    model: Llama,
    /// Further decoders trained on the same catalog and prompts (`MODEL/members/*`),
    /// each with its own tokenizer (a BPE trained from scratch differs by seed; SID
    /// tokens have the same ids in all): ranked items come from the mixture of all of
    /// them ([`Engine::rank`]).
    members: Vec<(Llama, Tokenizer)>,
    tokenizer: Tokenizer,
    catalog: Catalog,
    sids: SidMap,
    sidecar: Sidecar,
    prompts: Prompts,
    chat: ChatFormat,
    data: DataOptions,
    stop: Vec<u32>,
    dir: PathBuf,
    /// What followed each item in the training sequences (`MODEL/transitions.json`, or
    /// set by `sidrec eval` from the training parts): asked under [`Request::memory`].
    memory: Option<TransitionMemory>,
    /// The texts of the tokenizer's special tokens, for [`Engine::escape`].
    specials: Vec<String>,
    /// Where soft-prompt vectors come from, for a model that reads them.
    soft: Option<crate::model::soft_prompt::SoftVectors>,
    /// Prompts already run by the first decoder, for later prompts that share a prefix.
    /// Off for an engine over weights that training still updates ([`Engine::from_model`]).
    prefix: Option<Arc<PrefixCache>>,
    /// Where concurrent requests share the first decoder's passes (`sidrec serve`).
    batcher: Option<Arc<Batcher>>,
}

impl Engine {
    /// Loads a model directory written by `sidrec train`.
    pub fn load(dir: impl AsRef<Path>) -> Result<Engine> {
        Self::load_with(dir, None)
    }

    /// [`Engine::load`] with the sentence encoder of a model that reads request vectors
    /// at `encoder` instead of where its card says.
    pub fn load_with(dir: impl AsRef<Path>, encoder: Option<&Path>) -> Result<Engine> {
        Self::load_weights(dir, encoder, WeightFormat::F32)
    }

    /// [`Engine::load_with`] with the decoder's matrices stored as `weights`, packed
    /// while they are read (the f32 model is never whole in memory); the same model as
    /// [`Engine::with_weights`] makes.
    pub fn load_weights(
        dir: impl AsRef<Path>,
        encoder: Option<&Path>,
        weights: WeightFormat,
    ) -> Result<Engine> {
        let dir = dir.as_ref();
        hfdir::verify_checksums(dir)?;
        let (hf, packed) = HfDir::load_packed(dir, weights)?;
        let sidecar = hf.sidecar.clone().ok_or_else(|| {
            Error::Invalid(format!(
                "{}: no sidrec.json: not a model trained by `sidrec train`",
                dir.display()
            ))
        })?;
        let artifacts_dir = artifacts_of(dir, &sidecar.artifacts)?;
        hfdir::check_sid_map(dir, artifacts_dir.join(artifacts::SIDS_FILE))?;
        let (catalog, sids) = artifacts::read_pair(&artifacts_dir)?;
        if sidecar.sid_tokens != sids.vocab.len() {
            return Err(Error::Invalid(format!(
                "{}: the model has {} SID tokens, the SID map {}",
                dir.display(),
                sidecar.sid_tokens,
                sids.vocab.len()
            )));
        }
        let model = decoder(dir, &hf.config, hf.tensors, packed, &sids, &sidecar)?;
        let soft = match &sidecar.soft_prompt {
            Some(card) => Some(load_vectors(&artifacts_dir, card, &sids, encoder)?),
            None => None,
        };
        let members = load_members(dir, &artifacts_dir, &sids, &sidecar)?;
        if let Some((m, _)) = members
            .iter()
            .find(|(m, _)| m.config().vocab_size != model.config().vocab_size)
        {
            return Err(Error::Invalid(format!(
                "{}: a member has {} tokens, the model {}: members must be trained with the same --vocab-size",
                dir.display(),
                m.config().vocab_size,
                model.config().vocab_size
            )));
        }
        let mut engine = Engine::from_model(
            model,
            hf.tokenizer,
            catalog,
            sids,
            sidecar,
            Prompts::builtin(),
            dir,
        );
        engine.members = members;
        engine.soft = soft;
        if weights != WeightFormat::F32 {
            // Members are read in f32 and packed after (the first decoder was packed
            // while read); `with_weights` leaves packed matrices as they are.
            engine = engine.with_weights(weights)?;
        }
        engine.prefix = Some(Arc::new(PrefixCache::new(prefix::DEFAULT_BYTES)));
        let memory = dir.join(MEMORY_FILE);
        if memory.is_file() {
            engine.memory = Some(TransitionMemory::load(&memory, &engine.catalog)?);
        }
        Ok(engine)
    }

    /// The same engine with its decoders' matrices stored as `format` (bf16 or int8
    /// weights stream faster in decoding; see [`crate::model::packed`]). The f32 weights
    /// are released, so training cannot continue from such an engine's model.
    pub fn with_weights(mut self, format: WeightFormat) -> Result<Engine> {
        self.model = self.model.with_weights(format)?;
        // Keys and values computed with the old weights.
        self.prefix = self
            .prefix
            .map(|p| Arc::new(PrefixCache::new(p.capacity())));
        self.members = self
            .members
            .into_iter()
            .map(|(m, t)| Ok((m.with_weights(format)?, t)))
            .collect::<Result<_>>()?;
        Ok(self)
    }

    /// The same engine with a prefix cache of at most `bytes` of keys and values (0:
    /// none). [`Engine::load`] gives one of [`prefix::DEFAULT_BYTES`]; answers are the
    /// same with or without it.
    pub fn with_prefix_cache(mut self, bytes: usize) -> Engine {
        self.prefix = (bytes > 0).then(|| Arc::new(PrefixCache::new(bytes)));
        self
    }

    /// The same engine with requests that decode at the same time (from several threads)
    /// sharing forward passes ([`super::batch`]); answers are the same either way. For a
    /// server: a lone caller gains nothing and pays a lock per step.
    pub fn with_batching(mut self, on: bool) -> Engine {
        self.batcher = on.then(|| Arc::new(Batcher::new(rayon::current_num_threads())));
        self
    }

    /// Passes shared so far (`None`: batching is off).
    pub fn batch_stats(&self) -> Option<BatchStats> {
        self.batcher.as_ref().map(|b| b.stats())
    }

    /// What the prefix cache saved so far (`None`: the engine has none).
    pub fn prefix_stats(&self) -> Option<prefix::Stats> {
        self.prefix.as_ref().map(|p| p.stats())
    }

    /// An engine over a decoder in memory, with the tokenizer (SID tokens included),
    /// catalog, SID map, sidecar and prompts it was trained with: what training ranks
    /// its validation users with, on the very weights it is updating (a detached view
    /// shares their storage), without writing a model directory. `dir` is only named in
    /// messages.
    pub fn from_model(
        model: Llama,
        tokenizer: Tokenizer,
        catalog: Catalog,
        sids: SidMap,
        sidecar: Sidecar,
        prompts: Prompts,
        dir: &Path,
    ) -> Engine {
        let chat = ChatFormat::default();
        let stop: Vec<u32> = [chat.end.as_str(), "<|endoftext|>"]
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .chain(model.config().eos_token_id)
            .collect();
        // Every special token's text, once: user words are escaped against them per
        // request (thousands of SID tokens, so not rebuilt each time).
        let mut specials: Vec<String> = tokenizer
            .get_added_tokens_decoder()
            .values()
            .map(|t| t.content.clone())
            .filter(|s| s.chars().count() > 1)
            .collect();
        specials.sort();
        // Histories are written as training wrote them.
        let data = DataOptions {
            history_titles: sidecar.history_titles,
            sequence: sidecar.sequence,
            ..DataOptions::default()
        };
        Engine {
            model,
            members: Vec::new(),
            tokenizer,
            catalog,
            sids,
            sidecar,
            prompts,
            chat,
            data,
            stop,
            dir: dir.to_path_buf(),
            memory: None,
            specials,
            soft: None,
            prefix: None,
            batcher: None,
        }
    }

    /// Replaces the transition memory (`None`: none), e.g. with one built from the
    /// training parts of an evaluation's interactions.
    pub fn set_memory(&mut self, memory: Option<TransitionMemory>) {
        self.memory = memory;
    }

    pub fn memory(&self) -> Option<&TransitionMemory> {
        self.memory.as_ref()
    }

    /// How the model ranks best, from its recipe (`sidrec.json`).
    pub fn ranking(&self) -> &crate::model::hfdir::Ranking {
        &self.sidecar.ranking
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn sids(&self) -> &SidMap {
        &self.sids
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// How many decoders rank items: the model and its members.
    pub fn ensemble_size(&self) -> usize {
        1 + self.members.len()
    }

    /// Catalog index of an item id.
    pub fn index_of(&self, id: &str) -> Option<ItemIdx> {
        self.sids.index_of(id).map(|i| i as ItemIdx)
    }

    /// Whether a request is asked as a continuation of its history: a plain history
    /// recommendation (no words, no type steering) to a model trained on whole
    /// histories.
    fn continues_history(&self, req: &Request) -> std::result::Result<bool, DecodeError> {
        let steer = req.types.len() == 1 && self.catalog.types().len() > 1;
        Ok(self.data.sequence
            && self.resolve_mode(req)? == Mode::Recommend
            && req.query.trim().is_empty()
            && !steer)
    }

    /// The prompt text a request renders to: the instruction before the chat wrapping,
    /// and for a history continuation also the history the answer continues (after a
    /// newline, as shown to users; the model reads it after the wrapping).
    pub fn prompt_text(&self, req: &Request) -> std::result::Result<String, DecodeError> {
        let (prompt, context) = self.prompt_parts(req)?;
        Ok(if context.is_empty() {
            prompt
        } else {
            format!("{prompt}\n{}", context.trim_end())
        })
    }

    /// (instruction, unscored context) of a request; the context is empty unless the
    /// request continues a history.
    fn prompt_parts(&self, req: &Request) -> std::result::Result<(String, String), DecodeError> {
        if self.continues_history(req)? {
            return self.continuation_parts(PromptKind::Sequence, &req.history);
        }
        Ok((self.instruction(req)?, String::new()))
    }

    /// (instruction of `kind`, the history it continues) for a continuation prompt.
    fn continuation_parts(
        &self,
        kind: PromptKind,
        history: &[ItemIdx],
    ) -> std::result::Result<(String, String), DecodeError> {
        let prompt = data::continuation_prompt(&self.catalog, &self.prompts, kind, 0)
            .map_err(|e| DecodeError::Invalid(e.to_string()))?;
        let context =
            data::sequence_context(&self.catalog, &self.sids.records, history, &self.data);
        Ok((prompt, context))
    }

    /// The instruction a request renders to (before the chat wrapping).
    fn instruction(&self, req: &Request) -> std::result::Result<String, DecodeError> {
        let mode = self.resolve_mode(req)?;
        let noun = match req.types.as_slice() {
            [one] => one.replace('_', " "),
            _ => data::catalog_noun(&self.catalog),
        };
        let history =
            || data::format_history(&self.catalog, &self.sids.records, &req.history, &self.data);
        let render = |kind, values: &[(Slot, &str)]| {
            self.prompts
                .render(kind, 0, values)
                .map_err(|e| DecodeError::Invalid(e.to_string()))
        };
        let text = match mode {
            Mode::Recommend => {
                let h = history();
                let steer = req.types.len() == 1 && self.catalog.types().len() > 1;
                let kind = if steer {
                    PromptKind::Steer
                } else {
                    PromptKind::Recommend
                };
                let query = self.escape(req.query.trim());
                let query = query.as_str();
                let values = [
                    (Slot::History, h.as_str()),
                    (Slot::Type, noun.as_str()),
                    (Slot::Query, query),
                ];
                // A request in words goes where training put it (the first recommend
                // phrasing with {query}); steer prompts and prompt sets without such a
                // phrasing get it appended.
                match self.prompts.render_first_fitting(kind, &values) {
                    Some(p) => p.map_err(|e| DecodeError::Invalid(e.to_string()))?,
                    None => {
                        let mut p = render(kind, &[(Slot::History, &h), (Slot::Type, &noun)])?;
                        if !query.is_empty() {
                            p.push(' ');
                            p.push_str(query);
                        }
                        p
                    }
                }
            }
            Mode::Search => render(
                PromptKind::Search,
                &[
                    (Slot::Query, &self.escape(req.query.trim())),
                    (Slot::Type, &noun),
                ],
            )?,
            Mode::Describe => render(PromptKind::Describe, &[(Slot::History, &history())])?,
            Mode::Chat | Mode::Auto => self.escape(req.query.trim()),
        };
        Ok(text)
    }

    /// The user's words with every special token of the vocabulary (chat markers such
    /// as `<|im_end|>`, SID and type tokens such as `<a_17>`) broken up by a space after
    /// its first character, so the tokenizer reads them as plain text: a request cannot
    /// close the user turn, forge an answer or name an item by its SID.
    pub fn escape(&self, text: &str) -> String {
        escape_special(text, self.specials.iter().map(String::as_str))
    }

    /// The answer format a request gets (its own, or its mode's).
    pub fn resolve_format(&self, req: &Request) -> Format {
        match req.format {
            Format::Auto => match req.mode {
                Mode::Describe => Format::Text,
                Mode::Chat => Format::Both,
                _ => Format::Items,
            },
            f => f,
        }
    }

    fn resolve_mode(&self, req: &Request) -> std::result::Result<Mode, DecodeError> {
        let has_query = !req.query.trim().is_empty();
        let has_history = !req.history.is_empty();
        let mode = match req.mode {
            Mode::Auto if has_history => Mode::Recommend,
            Mode::Auto => Mode::Search,
            m => m,
        };
        match mode {
            Mode::Recommend | Mode::Describe if !has_history => Err(DecodeError::Invalid(format!(
                "{mode} needs a history (item ids or titles)"
            ))),
            Mode::Search | Mode::Chat if !has_query => {
                Err(DecodeError::Invalid(format!("{mode} needs a text query")))
            }
            m => Ok(m),
        }
    }

    /// The text the model reads before its answer: the chat-wrapped instruction, then
    /// the history it continues if any (what [`Engine::prompt_text`] shows, as tokens
    /// will see it).
    pub fn model_input(&self, req: &Request) -> std::result::Result<String, DecodeError> {
        let (prompt, context) = self.prompt_parts(req)?;
        Ok(self.chat.prompt(&prompt) + &context)
    }

    /// The model input that asks about one recent history item alone under
    /// [`Request::mix_recent`]: what was taken soon after it, for a model that learned
    /// soon-after pairs (`soon.txt`), else the request with that item as its history.
    pub fn recent_input(
        &self,
        req: &Request,
        item: ItemIdx,
    ) -> std::result::Result<String, DecodeError> {
        let alone = Request {
            history: vec![item],
            ..req.clone()
        };
        if !(self.sidecar.soon && self.continues_history(&alone)?) {
            return self.model_input(&alone);
        }
        let (prompt, context) = self.continuation_parts(PromptKind::Soon, &alone.history)?;
        Ok(self.chat.prompt(&prompt) + &context)
    }

    /// Token ids of [`Engine::model_input`], as the model was trained to see them.
    pub fn prompt_ids(&self, req: &Request) -> std::result::Result<Vec<u32>, DecodeError> {
        self.encode_prompt(&self.tokenizer, self.model_input(req)?)
    }

    /// A model input as token ids of one decoder's tokenizer, checked against its
    /// context length (all decoders of an engine share one config).
    fn encode_prompt(
        &self,
        tokenizer: &Tokenizer,
        text: String,
    ) -> std::result::Result<Vec<u32>, DecodeError> {
        let enc = tokenizer
            .encode(text, false)
            .map_err(|e| DecodeError::Tokenizer(e.to_string()))?;
        let ids = enc.get_ids().to_vec();
        let max = self.model.config().positions();
        if ids.len() + 16 > max {
            return Err(DecodeError::Invalid(format!(
                "the prompt has {} tokens; this model reads at most {max}",
                ids.len()
            )));
        }
        Ok(ids)
    }

    /// The request's limits as a trie mask: types, attribute filter, seen items.
    pub fn mask(&self, req: &Request) -> std::result::Result<Mask, DecodeError> {
        let trie = &self.sids.trie;
        let mut mask = if req.types.is_empty() || req.types_in_prompt_only {
            Mask::all(trie)
        } else {
            let mut toks = Vec::new();
            for t in &req.types {
                let id = self.sids.vocab.type_id(t).ok_or_else(|| {
                    DecodeError::Invalid(format!(
                        "unknown type {t:?} (the catalog has: {})",
                        self.catalog.types().join(", ")
                    ))
                })?;
                toks.push(id);
            }
            Mask::from_types(trie, &toks)
        };
        if let Some(expr) = req.filter.as_deref().filter(|e| !e.trim().is_empty()) {
            let f = Filter::parse(expr, &self.catalog)?;
            mask = mask.intersect(trie, &f.mask(trie, &self.catalog));
        }
        if req.exclude_seen {
            mask = mask.exclude(trie, &req.history);
        }
        if mask.allowed_items() == 0 {
            return Err(DecodeError::NothingAllowed(describe_limits(req)));
        }
        Ok(mask)
    }

    /// The top `req.k` items for a request, best first.
    pub fn recommend(
        &self,
        req: &Request,
    ) -> std::result::Result<Vec<Recommendation>, DecodeError> {
        Ok(self
            .rank(req)?
            .iter()
            .enumerate()
            .map(|(r, h)| self.item_output(r + 1, h.item, h.score))
            .collect())
    }

    /// [`Engine::recommend`] as search hits (catalog indices, scores, SID paths).
    pub fn rank(&self, req: &Request) -> std::result::Result<Vec<Hit>, DecodeError> {
        let mask = self.mask(req)?;
        let k = req.k.max(1);
        let beams = req.beams.unwrap_or((2 * k).max(10));
        let plan = self.rank_plan(req)?;
        let (mut src, prompt) = self.plan_source(&plan)?;
        let offset = self.sidecar.sid_token_offset;
        beam_search(
            &mut *src,
            &self.sids.trie,
            &mask,
            offset,
            &prompt,
            BeamConfig { k, beams },
        )
    }

    /// What a ranking of `req` decodes: every decoder under the whole history and under
    /// each recent item alone (`mix_recent`), and the memory's distribution.
    fn rank_plan(&self, req: &Request) -> std::result::Result<RankPlan, DecodeError> {
        // (model input, prior weight) per conditional: the whole history, then each
        // recent item alone.
        let words = self.request_vector(req)?;
        let mut inputs = vec![(
            self.model_input(req)?,
            1.0,
            self.input_vectors(req, &req.history, words.as_ref())?,
        )];
        let decay = req.recent_decay.unwrap_or(RECENT_DECAY);
        if !(decay.is_finite() && decay > 0.0) {
            return Err(DecodeError::Invalid(format!(
                "the recent-item decay must be a positive number, got {decay}"
            )));
        }
        if req.history.len() >= 2 {
            let mut weight = 1.0;
            for &item in req.history.iter().rev().take(req.mix_recent) {
                inputs.push((
                    self.recent_input(req, item)?,
                    weight,
                    self.input_vectors(req, &[item], words.as_ref())?,
                ));
                weight *= decay;
            }
        }
        // Every decoder asks every input with the same weights: an equal-weight ensemble
        // of the models' mixtures. Rows mix by token id, which only SID tokens (the ones
        // the trie lets through) share across tokenizers.
        let tokenizers =
            std::iter::once(&self.tokenizer).chain(self.members.iter().map(|(_, t)| t));
        let mut prompts = Vec::with_capacity(inputs.len() * self.ensemble_size());
        let mut vectors = Vec::with_capacity(prompts.capacity());
        for (decoder, tokenizer) in tokenizers.enumerate() {
            for (text, weight, v) in &inputs {
                prompts.push((
                    decoder,
                    self.encode_prompt(tokenizer, text.clone())?,
                    *weight,
                ));
                vectors.push(v.clone());
            }
        }
        let memory = self.memory_distribution(req)?;
        Ok(RankPlan {
            prompts,
            vectors,
            memory,
        })
    }

    /// The source a plan decodes, with the prompt to prefill: one decoder under one
    /// prompt as itself, anything more as their exact mixture (empty prompt: each
    /// component carries its own).
    fn plan_source<'s>(
        &'s self,
        plan: &RankPlan,
    ) -> std::result::Result<(Box<dyn LogitSource + 's>, Vec<u32>), DecodeError> {
        let decoder = |i: usize| {
            if i == 0 {
                &self.model
            } else {
                &self.members[i - 1].0
            }
        };
        let source = |i: usize, v: &soft::InputVectors| {
            // Members trained without soft prompts are asked without them.
            let m = decoder(i);
            let v = if m.soft_dim().is_some() {
                v.clone()
            } else {
                Vec::new()
            };
            let (cache, batcher) = match i {
                0 => (self.prefix.as_deref(), self.batcher.as_deref()),
                _ => (None, None),
            };
            ModelSource::with_vectors(m, v)
                .with_prefix_cache(cache)
                .with_batcher(batcher)
        };
        if let ([(i, prompt, _)], None) = (plan.prompts.as_slice(), &plan.memory) {
            return Ok((Box::new(source(*i, &plan.vectors[0])), prompt.clone()));
        }
        let mut parts: Vec<Component<'s>> = plan
            .prompts
            .iter()
            .zip(&plan.vectors)
            .map(|((i, prompt, weight), v)| Component {
                source: Box::new(source(*i, v)),
                prompt: prompt.clone(),
                weight: *weight,
            })
            .collect();
        if let Some((dist, weight)) = &plan.memory {
            let vocab = self.model.config().vocab_size;
            let offset = self.sidecar.sid_token_offset;
            parts.push(Component {
                source: Box::new(MemorySource::new(&self.sids.trie, offset, vocab, dist)?),
                prompt: Vec::new(),
                // Against every decoder's whole-history prompt, not the first one's only.
                weight: weight * self.ensemble_size() as f32,
            });
        }
        Ok((Box::new(MixtureSource::new(parts)?), Vec::new()))
    }

    /// The memory's distribution for a request that asks for it, with its weight; `None`
    /// when the request does not, or the memory has nothing to say about this history.
    fn memory_distribution(
        &self,
        req: &Request,
    ) -> std::result::Result<Option<(Distribution, f32)>, DecodeError> {
        let Some(weight) = req.memory else {
            return Ok(None);
        };
        if !(weight.is_finite() && weight >= 0.0) {
            return Err(DecodeError::Invalid(format!(
                "the memory weight must be a number 0 or above, got {weight}"
            )));
        }
        if weight == 0.0 {
            return Ok(None);
        }
        let Some(memory) = &self.memory else {
            // No path in the message: `sidrec serve` sends it to clients.
            return Err(DecodeError::Invalid(format!(
                "this model has no transition memory ({MEMORY_FILE}; `sidrec train` writes one)"
            )));
        };
        let dist = memory.distribution(&req.history);
        Ok((!dist.is_empty()).then_some((dist, weight)))
    }

    /// Every item the request allows, scored by its exact SID log-probability and sorted
    /// best first: the ranking beam search approximates. The same model as
    /// [`Engine::rank`]'s: ensemble members, recent items asked alone and the memory
    /// are mixed in exactly as there.
    ///
    /// The items are taken in groups that share a first code, about `group_items` at a
    /// time; within a group a beam as wide as the group is exact (the property tests
    /// check it), and the groups' scores are merged. Memory is bounded by the group
    /// (its rows of KV cache), time by the catalog: one prompt pass per group and one
    /// decoder row per trie node.
    pub fn rank_exact(
        &self,
        req: &Request,
        group_items: usize,
    ) -> std::result::Result<Vec<Hit>, DecodeError> {
        let mask = self.mask(req)?;
        let plan = self.rank_plan(req)?;
        let trie = &self.sids.trie;
        // Items by their first two trie tokens (type and first code), in trie order.
        let mut groups: Vec<Vec<ItemIdx>> = Vec::new();
        let mut last: Option<Vec<u32>> = None;
        for &item in trie.items() {
            if !mask.allows_item(trie, item) {
                continue;
            }
            let path = trie.path(item).unwrap_or_default();
            let key = path[..path.len().min(2)].to_vec();
            let same = last.as_ref() == Some(&key);
            match groups.last_mut() {
                Some(g) if same || g.len() < group_items.max(1) => g.push(item),
                _ => groups.push(vec![item]),
            }
            last = Some(key);
        }
        let mut hits = Vec::with_capacity(mask.allowed_items());
        for group in groups {
            let gmask = Mask::from_items(trie, &group);
            let (mut src, prompt) = self.plan_source(&plan)?;
            let n = group.len();
            hits.extend(beam_search(
                &mut *src,
                trie,
                &gmask,
                self.sidecar.sid_token_offset,
                &prompt,
                BeamConfig { k: n, beams: n },
            )?);
        }
        hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.item.cmp(&b.item)));
        Ok(hits)
    }

    fn item_output(&self, rank: usize, item: ItemIdx, score: f32) -> Recommendation {
        let it: &Item = &self.catalog.items[item as usize];
        Recommendation {
            rank,
            id: it.id.clone(),
            title: it.title.clone(),
            item_type: it.item_type.clone(),
            score,
            sid: self.sids.records[item as usize].sid.clone(),
        }
    }

    /// A free answer mixing text and items (describe and chat modes, or any request).
    pub fn generate(
        &self,
        req: &Request,
        cfg: &GenConfig,
    ) -> std::result::Result<Vec<Output>, DecodeError> {
        let mask = self.mask(req)?;
        let prompt = self.prompt_ids(req)?;
        let mut cfg = cfg.clone();
        if cfg.stop.is_empty() {
            cfg.stop = self.stop.clone();
        }
        cfg.items = self.resolve_format(req) != Format::Text;
        let words = self.request_vector(req)?;
        let vectors = self.input_vectors(req, &req.history, words.as_ref())?;
        let mut src = ModelSource::with_vectors(&self.model, vectors)
            .with_prefix_cache(self.prefix.as_deref())
            .with_batcher(self.batcher.as_deref());
        let segs = generate(
            &mut src,
            &self.sids.trie,
            &mask,
            self.sidecar.sid_token_offset,
            self.sidecar.sid_tokens as u32,
            &prompt,
            &cfg,
        )?;
        let mut out = Vec::new();
        let mut rank = 0;
        for s in segs {
            match s {
                Segment::Text(ids) => {
                    let text = self
                        .tokenizer
                        .decode(&ids, true)
                        .map_err(|e| DecodeError::Tokenizer(e.to_string()))?;
                    if !text.is_empty() {
                        out.push(Output::Text { text });
                    }
                }
                Segment::Item { item, score } => {
                    rank += 1;
                    out.push(Output::Item(self.item_output(rank, item, score)));
                }
            }
        }
        Ok(out)
    }
}

fn describe_limits(req: &Request) -> String {
    let mut parts = Vec::new();
    if !req.types.is_empty() {
        parts.push(format!("types {}", req.types.join(",")));
    }
    if let Some(f) = &req.filter {
        parts.push(format!("filter {f:?}"));
    }
    if req.exclude_seen {
        parts.push(format!("{} seen items excluded", req.history.len()));
    }
    parts.join("; ")
}

/// The decoder of a model directory: its config and weights, with the item table when
/// it was trained with item vectors.
fn decoder(
    dir: &Path,
    config: &serde_json::Value,
    mut tensors: std::collections::HashMap<String, Tensor>,
    packed: std::collections::HashMap<String, crate::model::packed::Packed>,
    sids: &SidMap,
    sidecar: &Sidecar,
) -> Result<Llama> {
    let cfg = LlamaConfig::from_json_str(&config.to_string(), &dir.display().to_string())?;
    if sidecar.sid_token_offset as usize + sidecar.sid_tokens > cfg.vocab_size {
        return Err(Error::Invalid(format!(
            "{}: SID tokens end past the vocabulary ({} + {} > {})",
            dir.display(),
            sidecar.sid_token_offset,
            sidecar.sid_tokens,
            cfg.vocab_size
        )));
    }
    let item_table = tensors.remove(ITEM_TABLE);
    let soft = (
        tensors.remove(soft_prompt::REQUEST_WEIGHT),
        tensors.remove(soft_prompt::TASTE_WEIGHT),
    );
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let mut model = Llama::new_packed(&cfg, vb, packed)?;
    if let Some(table) = item_table {
        model = model.with_items(table, sids.item_keys(sidecar.sid_token_offset))?;
    }
    match (soft, sidecar.soft_prompt.is_some()) {
        ((Some(request), Some(taste)), true) => {
            model = model.with_soft_prompt(request, taste)?;
        }
        ((None, None), false) => {}
        _ => {
            return Err(Error::Invalid(format!(
                "{}: sidrec.json and model.safetensors disagree on soft prompts (the card \
                 names them exactly when the weights hold {} and {})",
                dir.display(),
                soft_prompt::REQUEST_WEIGHT,
                soft_prompt::TASTE_WEIGHT
            )))
        }
    }
    Ok(model)
}

/// The decoders under `dir/members/`, in name order, with their tokenizers. Each must
/// have been trained on the same SID map, with its SID tokens at the same ids, and with
/// the same way of writing histories, so that one prompt means the same to all of them.
fn load_members(
    dir: &Path,
    artifacts_dir: &Path,
    sids: &SidMap,
    sidecar: &Sidecar,
) -> Result<Vec<(Llama, Tokenizer)>> {
    let root = dir.join(hfdir::MEMBERS_DIR);
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(&root).map_err(|e| Error::io(&root, e))? {
        let path = entry.map_err(|e| Error::io(&root, e))?.path();
        if path.is_dir() {
            dirs.push(path);
        }
    }
    dirs.sort();
    let mut members = Vec::with_capacity(dirs.len());
    for m in dirs {
        let hf = HfDir::load(&m)?;
        let Some(side) = hf.sidecar.as_ref() else {
            return Err(Error::Invalid(format!(
                "{}: no sidrec.json: an ensemble member must be a model trained by `sidrec train`",
                m.display()
            )));
        };
        hfdir::check_sid_map(&m, artifacts_dir.join(artifacts::SIDS_FILE))?;
        let differs = if side.sid_token_offset != sidecar.sid_token_offset
            || side.sid_tokens != sidecar.sid_tokens
        {
            Some("SID tokens")
        } else if side.history_titles != sidecar.history_titles
            || side.sequence != sidecar.sequence
            || side.soon != sidecar.soon
        {
            Some("way of writing histories")
        } else {
            None
        };
        if let Some(what) = differs {
            return Err(Error::Invalid(format!(
                "{}: this member's {what} differ from {}'s; members must be trained on the same artifacts with the same options",
                m.display(),
                dir.display()
            )));
        }
        let model = decoder(&m, &hf.config, hf.tensors, Default::default(), sids, side)?;
        members.push((model, hf.tokenizer));
    }
    Ok(members)
}

/// What one ranking decodes, built once per request so that exact ranking, which decodes
/// it group by group, asks the same mixture as beam search.
struct RankPlan {
    /// `(decoder, prompt ids, prior weight)`: decoder 0 is the engine's model, `i` its
    /// member `i - 1`.
    prompts: Vec<(usize, Vec<u32>, f32)>,
    /// The soft-prompt vectors of each prompt (same order).
    vectors: Vec<soft::InputVectors>,
    /// The memory's distribution and weight, when asked for and it has an answer.
    memory: Option<(Distribution, f32)>,
}

/// Where a model's catalog and SID map are: the model directory itself (`sidrec train`
/// copies them there). A model directory without them (written by an old sidrec) falls
/// back to the artifact directory recorded at training only when that path is absolute:
/// a relative one was relative to wherever training ran, and reading it from here could
/// silently pair the model with another catalog.
fn artifacts_of(dir: &Path, recorded: &str) -> Result<PathBuf> {
    if dir.join(artifacts::SIDS_FILE).is_file() {
        return Ok(dir.to_path_buf());
    }
    let recorded_path = PathBuf::from(recorded);
    if recorded_path.is_absolute() && recorded_path.join(artifacts::SIDS_FILE).is_file() {
        crate::progress::warn(&format!(
            "{} has no {}: reading the catalog and SID map from {}, recorded at training",
            dir.display(),
            artifacts::SIDS_FILE,
            recorded_path.display()
        ));
        return Ok(recorded_path);
    }
    Err(Error::Invalid(format!(
        "{}: no {} (a model directory carries its catalog and SID map); it was trained on \
         the artifacts in {recorded:?}: copy {}, {} and {} from there into the model directory",
        dir.display(),
        artifacts::SIDS_FILE,
        artifacts::CATALOG_FILE,
        artifacts::SIDS_FILE,
        artifacts::CODEBOOKS_FILE
    )))
}

/// `text` with each occurrence of a `specials` string broken up by a space after its
/// first character (see [`Engine::escape`]). Repeats until none is left, so a nested
/// attempt (`<|im_<|im_end|>end|>`) cannot reassemble one; a vocabulary whose specials
/// rebuild each other (none does) stops after a few rounds.
pub fn escape_special<'a>(text: &str, specials: impl Iterator<Item = &'a str>) -> String {
    let specials: Vec<&str> = specials.filter(|s| s.chars().count() > 1).collect();
    let mut out = text.to_string();
    for _ in 0..16 {
        let mut changed = false;
        for s in &specials {
            if out.contains(s) {
                let first = s.chars().next().map_or(0, char::len_utf8);
                let broken = format!("{} {}", &s[..first], &s[first..]);
                out = out.replace(s, &broken);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    out
}
