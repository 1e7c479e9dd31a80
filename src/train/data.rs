//! Training examples per task, rendered from the templates in `prompts/`.
//!
//! Every [`Example`] is a prompt and an answer (and, for validation continuations, an
//! unscored context between them); the trainer tokenizes them separately and puts the
//! loss on the answer only. Items appear in text exactly as their SID token
//! strings (`<movie><a_17><b_203><c_5>`), so the model learns the same tokens the trie
//! constrains at decoding time.
//!
//! | task | prompt | answer |
//! |---|---|---|
//! | [`Task::Align`] | item text (`align_item.txt`) / SID (`align_sid.txt`) | SID / item text |
//! | [`Task::Recommend`] | history, last ≤ `max_history` items | next item's SID |
//! | [`Task::Search`] | query from the item's attributes | SID |
//! | [`Task::Steer`] | history + requested type | next item of that type |
//! | [`Task::Describe`] | history | profile: top genres/categories, decade |
//! | [`Task::Sequence`] | instruction (`sequence.txt`) | a whole history, ≤ `max_history + 1` items (and windows of `sequence_short + 1`) |
//! | [`Task::Sequence`] | instruction (`soon.txt`) | an item and one 1..=`sequence_soon` positions later |
//!
//! **No leakage.** The user tasks (recommend, steer, describe, sequence) read only
//! [`Split::train`], the training parts: a user's validation and test targets never
//! appear in that user's training examples, in prompts or answers (tested). Align and
//! search cover every catalog item, which is catalog knowledge, not user behaviour.
//!
//! **Determinism.** Phrasing choice and sampling use a ChaCha8 generator seeded with
//! [`DataOptions::seed`], one stream per task, so the same inputs and seed give the same
//! examples, and switching one task off does not change the others. Examples come task
//! by task, users and items in order; the trainer shuffles.
//!
//! # Prompt files
//!
//! `prompts/` holds one file per [`PromptKind`]: one phrasing per line, `#` lines and
//! blank lines skipped, `\n` for a newline inside a phrasing, `{slot}` placeholders and
//! `{{`/`}}` for literal braces. Training and inference read the same files
//! ([`Prompts::load`], or the copies compiled in, [`Prompts::builtin`]), and inference
//! renders with [`Phrasing::render`] or [`recommend_prompt`], so a model is asked at
//! inference exactly as it was taught. A phrasing is used only when every slot it names
//! has a non-empty value, so one file serves catalogs with and without descriptions.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::artifacts::SidRecord;
use crate::catalog::{Catalog, Item};
use crate::interactions::Split;

use super::language::Lexicon;

/// Training tasks.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Item text ↔ SID.
    Align,
    /// History → next item.
    Recommend,
    /// Text query → item.
    Search,
    /// History + entity type → next item of that type.
    Steer,
    /// History → text profile of the user.
    Describe,
    /// A user's whole history as one answer: every item is a prediction target given
    /// the items before it (next-item training at every position in one pass).
    Sequence,
    /// A request in words → an answer in the format the prompt asks for: items, text,
    /// or text with items inside ([`super::chat`]).
    Chat,
}

impl Task {
    pub const ALL: [Task; 7] = [
        Task::Align,
        Task::Recommend,
        Task::Search,
        Task::Steer,
        Task::Describe,
        Task::Sequence,
        Task::Chat,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Task::Align => "align",
            Task::Recommend => "recommend",
            Task::Search => "search",
            Task::Steer => "steer",
            Task::Describe => "describe",
            Task::Sequence => "sequence",
            Task::Chat => "chat",
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Task {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        Task::ALL
            .into_iter()
            .find(|k| k.name() == t)
            .ok_or_else(|| DataError::UnknownTask {
                name: s.to_string(),
            })
    }
}

/// A placeholder of a prompt phrasing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Slot {
    /// The user's items, oldest first ([`format_history`]).
    History,
    /// A search query.
    Query,
    /// An entity type (`movie`), or `item` for a mixed catalog's recommend prompt.
    Type,
    /// The item's title.
    Title,
    /// The item's SID token string.
    Sid,
    /// The start of the item's description.
    Description,
    /// The item's short text ([`item_text`]).
    Item,
}

impl Slot {
    pub const ALL: [Slot; 7] = [
        Slot::History,
        Slot::Query,
        Slot::Type,
        Slot::Title,
        Slot::Sid,
        Slot::Description,
        Slot::Item,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Slot::History => "history",
            Slot::Query => "query",
            Slot::Type => "type",
            Slot::Title => "title",
            Slot::Sid => "sid",
            Slot::Description => "description",
            Slot::Item => "item",
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{}}}", self.name())
    }
}

/// The prompt files: one per kind of prompt (align has two directions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PromptKind {
    /// Item text → SID.
    AlignItem,
    /// SID → item text.
    AlignSid,
    Recommend,
    Search,
    Steer,
    Describe,
    /// The instruction before a whole history written as the answer.
    Sequence,
    /// The instruction before an item and one taken soon after it
    /// ([`DataOptions::sequence_soon`]).
    Soon,
    /// A chat request answered with items only.
    ChatItems,
    /// A chat request answered in words only.
    ChatText,
    /// A chat request answered with a sentence and items.
    ChatBoth,
}

impl PromptKind {
    pub const ALL: [PromptKind; 11] = [
        PromptKind::AlignItem,
        PromptKind::AlignSid,
        PromptKind::Recommend,
        PromptKind::Search,
        PromptKind::Steer,
        PromptKind::Describe,
        PromptKind::Sequence,
        PromptKind::Soon,
        PromptKind::ChatItems,
        PromptKind::ChatText,
        PromptKind::ChatBoth,
    ];

    /// The file under `prompts/`.
    pub fn file_name(self) -> &'static str {
        match self {
            PromptKind::AlignItem => "align_item.txt",
            PromptKind::AlignSid => "align_sid.txt",
            PromptKind::Recommend => "recommend.txt",
            PromptKind::Search => "search.txt",
            PromptKind::Steer => "steer.txt",
            PromptKind::Describe => "describe.txt",
            PromptKind::Sequence => "sequence.txt",
            PromptKind::Soon => "soon.txt",
            PromptKind::ChatItems => "chat_items.txt",
            PromptKind::ChatText => "chat_text.txt",
            PromptKind::ChatBoth => "chat_both.txt",
        }
    }

    /// The task its examples belong to.
    pub fn task(self) -> Task {
        match self {
            PromptKind::AlignItem | PromptKind::AlignSid => Task::Align,
            PromptKind::Recommend => Task::Recommend,
            PromptKind::Search => Task::Search,
            PromptKind::Steer => Task::Steer,
            PromptKind::Describe => Task::Describe,
            PromptKind::Sequence | PromptKind::Soon => Task::Sequence,
            PromptKind::ChatItems | PromptKind::ChatText | PromptKind::ChatBoth => Task::Chat,
        }
    }

    /// The slots its phrasings may use: the builder has values for exactly these.
    pub fn allowed(self) -> &'static [Slot] {
        match self {
            PromptKind::AlignItem => &[Slot::Item, Slot::Title, Slot::Description, Slot::Type],
            PromptKind::AlignSid => &[Slot::Sid, Slot::Type],
            PromptKind::Recommend => &[Slot::History, Slot::Type, Slot::Query],
            PromptKind::Search => &[Slot::Query, Slot::Type],
            PromptKind::Steer => &[Slot::History, Slot::Type],
            PromptKind::Describe => &[Slot::History],
            PromptKind::Sequence | PromptKind::Soon => &[Slot::Type],
            PromptKind::ChatItems | PromptKind::ChatText | PromptKind::ChatBoth => {
                &[Slot::Query, Slot::Type]
            }
        }
    }

    /// Slots every phrasing must use, one of each group: without them the prompt does
    /// not carry what the answer depends on.
    pub fn required(self) -> &'static [&'static [Slot]] {
        match self {
            PromptKind::AlignItem => &[&[Slot::Item, Slot::Title, Slot::Description]],
            PromptKind::AlignSid => &[&[Slot::Sid]],
            PromptKind::Recommend => &[&[Slot::History]],
            PromptKind::Search => &[&[Slot::Query]],
            PromptKind::Steer => &[&[Slot::History], &[Slot::Type]],
            PromptKind::Describe => &[&[Slot::History]],
            PromptKind::Sequence | PromptKind::Soon => &[],
            PromptKind::ChatItems | PromptKind::ChatText | PromptKind::ChatBoth => {
                &[&[Slot::Query]]
            }
        }
    }

    fn builtin_source(self) -> &'static str {
        match self {
            PromptKind::AlignItem => include_str!("../../prompts/align_item.txt"),
            PromptKind::AlignSid => include_str!("../../prompts/align_sid.txt"),
            PromptKind::Recommend => include_str!("../../prompts/recommend.txt"),
            PromptKind::Search => include_str!("../../prompts/search.txt"),
            PromptKind::Steer => include_str!("../../prompts/steer.txt"),
            PromptKind::Describe => include_str!("../../prompts/describe.txt"),
            PromptKind::Sequence => include_str!("../../prompts/sequence.txt"),
            PromptKind::Soon => include_str!("../../prompts/soon.txt"),
            PromptKind::ChatItems => include_str!("../../prompts/chat_items.txt"),
            PromptKind::ChatText => include_str!("../../prompts/chat_text.txt"),
            PromptKind::ChatBoth => include_str!("../../prompts/chat_both.txt"),
        }
    }
}

impl fmt::Display for PromptKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.file_name())
    }
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A prompt file could not be read.
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A phrasing that does not parse or uses a slot its file does not allow. `line` and
    /// `column` are 1-based.
    #[error("{}:{line}:{column}: {message}", .path.display())]
    Prompt {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A prompt file without any phrasing.
    #[error("{}: no phrasing (every line is blank or a # comment)", .path.display())]
    NoPhrasing { path: PathBuf },
    /// Rendering a phrasing without a value for one of its slots.
    #[error("no value for slot {slot} of the phrasing {phrasing:?}")]
    MissingSlot { slot: Slot, phrasing: String },
    /// A phrasing index past the end of its file.
    #[error("{kind} has {count} phrasings, there is no phrasing {index}")]
    NoSuchPhrasing {
        kind: PromptKind,
        index: usize,
        count: usize,
    },
    /// The SID records do not describe the catalog (another artifact directory?).
    #[error("the SID map has {sids} items, the catalog {catalog}: they come from different artifact directories")]
    SidCount { catalog: usize, sids: usize },
    /// The SID record at `index` names another item than the catalog's.
    #[error("item {index}: the catalog has id {catalog_id:?}, the SID map {sid_id:?}: they come from different artifact directories")]
    SidMismatch {
        index: usize,
        catalog_id: String,
        sid_id: String,
    },
    /// A sequence names an item index the catalog does not have.
    #[error("user {user}: item index {item} is out of range (the catalog has {len} items)")]
    ItemOutOfRange { user: usize, item: u32, len: usize },
    /// A task name that is not one of align, recommend, search, steer, describe,
    /// sequence, chat.
    #[error(
        "unknown task {name:?}: expected one of align, recommend, search, steer, describe, sequence, chat"
    )]
    UnknownTask { name: String },
}

/// One training (or validation) example.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    pub task: Task,
    pub prompt: String,
    /// Text after the chat wrapping and before the answer that the model reads but is not
    /// scored on: the history so far when the answer continues it (sequence validation,
    /// and inference for models trained with [`Task::Sequence`]). Empty for every other
    /// task.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub context: String,
    /// What the loss is on.
    pub answer: String,
    /// The user (index into the split) whose sequence the example comes from; `None` for
    /// catalog tasks (align, search). Lets tests and reports check leakage per user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<u32>,
    /// The request's words, which a model with soft prompts also reads as one sentence
    /// vector ([`crate::model::soft_prompt`]): search queries and recommend requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// The items whose mean vector is the taste soft prompt: the whole history before
    /// the answer (not only the `max_history` items the prompt writes out). Empty for
    /// catalog tasks and for whole-history answers, whose mean would hold the answers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taste: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Slot(Slot),
}

/// One parsed phrasing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phrasing {
    source: String,
    parts: Vec<Part>,
}

impl Phrasing {
    /// Parses one phrasing line: `{slot}` placeholders, `{{`/`}}` braces, `\n` newline.
    /// The error is `(column, message)`, column 1-based in characters.
    fn parse(line: &str) -> Result<Phrasing, (usize, String)> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = line.char_indices().enumerate().peekable();
        while let Some((col, (_, c))) = chars.next() {
            let next = chars.peek().map(|&(_, (_, c))| c);
            match c {
                '{' if next == Some('{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if next == Some('}') => {
                    chars.next();
                    lit.push('}');
                }
                '}' => {
                    return Err((
                        col + 1,
                        "unmatched '}' (write '}}' for a literal brace)".into(),
                    ))
                }
                '\\' if next == Some('n') => {
                    chars.next();
                    lit.push('\n');
                }
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for (_, (_, c)) in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        name.push(c);
                    }
                    if !closed {
                        return Err((
                            col + 1,
                            "unclosed '{' (write '{{' for a literal brace)".into(),
                        ));
                    }
                    let slot = Slot::ALL
                        .into_iter()
                        .find(|s| s.name() == name.trim())
                        .ok_or_else(|| {
                            let known: Vec<String> =
                                Slot::ALL.iter().map(|s| s.to_string()).collect();
                            (
                                col + 1,
                                format!(
                                    "unknown slot {{{name}}}: known slots are {}",
                                    known.join(", ")
                                ),
                            )
                        })?;
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Slot(slot));
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Ok(Phrasing {
            source: line.to_string(),
            parts,
        })
    }

    /// The line as written in the file.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The slots it uses, in order of first use.
    pub fn slots(&self) -> Vec<Slot> {
        let mut out = Vec::new();
        for p in &self.parts {
            if let Part::Slot(s) = p {
                if !out.contains(s) {
                    out.push(*s);
                }
            }
        }
        out
    }

    /// Whether every slot it uses has a non-empty value.
    pub fn fits(&self, values: &[(Slot, &str)]) -> bool {
        self.slots()
            .iter()
            .all(|s| values.iter().any(|(k, v)| k == s && !v.trim().is_empty()))
    }

    /// Whether it fits and, for an optional request slot (`{query}` in a recommend
    /// phrasing), uses it exactly when a value is given: a request must not be dropped
    /// from a prompt, nor a phrasing that asks for one be left with a hole.
    pub fn fits_exactly(&self, values: &[(Slot, &str)]) -> bool {
        let has_query = values
            .iter()
            .any(|(k, v)| *k == Slot::Query && !v.trim().is_empty());
        self.fits(values) && self.slots().contains(&Slot::Query) == has_query
    }

    /// The text with each slot replaced by its value (the first pair naming it).
    pub fn render(&self, values: &[(Slot, &str)]) -> Result<String, DataError> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Slot(slot) => {
                    let v = values.iter().find(|(k, _)| k == slot).ok_or_else(|| {
                        DataError::MissingSlot {
                            slot: *slot,
                            phrasing: self.source.clone(),
                        }
                    })?;
                    out.push_str(v.1);
                }
            }
        }
        Ok(out)
    }
}

/// The phrasings of every prompt kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompts {
    sets: BTreeMap<PromptKind, Vec<Phrasing>>,
    fingerprint: String,
}

impl Prompts {
    /// The prompt files compiled into the binary (the repository's `prompts/`).
    pub fn builtin() -> Prompts {
        let files: Vec<(PromptKind, PathBuf, String)> = PromptKind::ALL
            .into_iter()
            .map(|k| {
                (
                    k,
                    Path::new("<builtin>/prompts").join(k.file_name()),
                    k.builtin_source().to_string(),
                )
            })
            .collect();
        Prompts::from_sources(files).expect("the builtin prompt files are valid (tested)")
    }

    /// Reads every prompt file from a directory (`align_item.txt`, `align_sid.txt`,
    /// `recommend.txt`, `search.txt`, `steer.txt`, `describe.txt`, `sequence.txt`,
    /// `soon.txt`). All
    /// must exist: a model is taught every task, and its prompts must be the ones
    /// inference reads.
    pub fn load(dir: &Path) -> Result<Prompts, DataError> {
        let mut files = Vec::new();
        for k in PromptKind::ALL {
            let path = dir.join(k.file_name());
            let text = std::fs::read_to_string(&path).map_err(|source| DataError::Io {
                path: path.clone(),
                source,
            })?;
            files.push((k, path, text));
        }
        Prompts::from_sources(files)
    }

    /// Parses prompt files given as text; `path` only names them in errors.
    pub fn from_sources(files: Vec<(PromptKind, PathBuf, String)>) -> Result<Prompts, DataError> {
        use sha2::Digest;
        let mut sets = BTreeMap::new();
        let mut hash = sha2::Sha256::new();
        for (kind, path, text) in files {
            hash.update(kind.file_name().as_bytes());
            hash.update([0]);
            let phrasings = parse_file(kind, &path, &text)?;
            for p in &phrasings {
                hash.update(p.source.as_bytes());
                hash.update([b'\n']);
            }
            sets.insert(kind, phrasings);
        }
        Ok(Prompts {
            sets,
            fingerprint: hex::encode(hash.finalize()),
        })
    }

    /// The phrasings of one kind (empty if the set was built without that file).
    pub fn phrasings(&self, kind: PromptKind) -> &[Phrasing] {
        self.sets.get(&kind).map_or(&[], Vec::as_slice)
    }

    /// Renders phrasing `index` of `kind` (index 0 is the one inference uses).
    pub fn render(
        &self,
        kind: PromptKind,
        index: usize,
        values: &[(Slot, &str)],
    ) -> Result<String, DataError> {
        let set = self.phrasings(kind);
        set.get(index)
            .ok_or(DataError::NoSuchPhrasing {
                kind,
                index,
                count: set.len(),
            })?
            .render(values)
    }

    /// Renders the first phrasing of `kind` that [`Phrasing::fits_exactly`] `values`: the
    /// one inference uses when a request may or may not carry a query. `None` when no
    /// phrasing fits (e.g. a custom recommend.txt without a `{query}` line).
    pub fn render_first_fitting(
        &self,
        kind: PromptKind,
        values: &[(Slot, &str)],
    ) -> Option<Result<String, DataError>> {
        self.phrasings(kind)
            .iter()
            .find(|p| p.fits_exactly(values))
            .map(|p| p.render(values))
    }

    /// SHA-256 over the phrasings (comments excluded): the "prompts version" a model
    /// records, so inference can tell whether it reads the prompts it was trained on.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

fn parse_file(kind: PromptKind, path: &Path, text: &str) -> Result<Vec<Phrasing>, DataError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim_end_matches('\r');
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let err = |column: usize, message: String| DataError::Prompt {
            path: path.to_path_buf(),
            line: i + 1,
            column,
            message,
        };
        let p = Phrasing::parse(line.trim()).map_err(|(c, m)| err(c, m))?;
        let slots = p.slots();
        if let Some(bad) = slots.iter().find(|s| !kind.allowed().contains(s)) {
            let allowed: Vec<String> = kind.allowed().iter().map(|s| s.to_string()).collect();
            return Err(err(
                1,
                format!(
                    "slot {bad} is not available in {}: use {}",
                    kind.file_name(),
                    allowed.join(", ")
                ),
            ));
        }
        for group in kind.required() {
            if !group.iter().any(|s| slots.contains(s)) {
                let names: Vec<String> = group.iter().map(|s| s.to_string()).collect();
                return Err(err(
                    1,
                    format!(
                        "the phrasing must use {}{}",
                        if group.len() > 1 { "one of " } else { "" },
                        names.join(", ")
                    ),
                ));
            }
        }
        out.push(p);
    }
    if out.is_empty() {
        return Err(DataError::NoPhrasing {
            path: path.to_path_buf(),
        });
    }
    Ok(out)
}

/// What to build, and how much.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DataOptions {
    pub seed: u64,
    /// Histories keep only their last `max_history` items: long prompts cost memory
    /// quadratically and the recent past predicts best.
    pub max_history: usize,
    /// Write each history item as `SID Title (year)` rather than the SID alone: the
    /// titles tie the new tokens to words the base model knows.
    pub history_titles: bool,
    /// Titles in histories and item texts are cut to this many words (product titles run
    /// to dozens).
    pub max_title_words: usize,
    /// Descriptions in align examples are cut to this many words.
    pub max_description_words: usize,
    pub align: bool,
    /// Examples per item and direction.
    pub align_per_item: usize,
    pub recommend: bool,
    /// At most this many positions per user (sampled), `None` for every position.
    pub recommend_per_user: Option<usize>,
    /// Share of recommend examples whose prompt also carries a request the target
    /// satisfies (`... They ask for a 1990s comedy movie.`), written with the recommend
    /// phrasings that use `{query}`. Without them a model never sees words next to a
    /// history, and words added at inference do not steer it.
    pub recommend_query_share: f64,
    pub search: bool,
    pub search_per_item: usize,
    /// Further search examples per item whose query is a request in words from the
    /// lexicon ([`super::language`]): a genre or decade of the item, phrased many ways.
    pub requests_per_item: usize,
    /// Only takes effect for catalogs with several entity types.
    pub steer: bool,
    pub steer_per_user: usize,
    pub describe: bool,
    pub describe_per_user: usize,
    /// Whole-history examples ([`Task::Sequence`]): each user's training part in windows
    /// of `max_history + 1` items, every item a target. Off by default; a model trained
    /// with them continues histories at inference (recorded in `sidrec.json`). Meant for
    /// SID-only histories: with titles a full window outgrows a 256-token example.
    pub sequence: bool,
    /// With `sequence`, also cut each history longer than `sequence_short + 1` items into
    /// half-overlapping windows of that many (0: none). Their targets follow only a few
    /// items, as a first-order transition's does: whole histories alone show each
    /// transition in one fixed long context, and a model trained on them recognises a
    /// transition seen in training far less often than transition counts do.
    pub sequence_short: usize,
    /// With `sequence`, also write soon-after pairs: an item and one `d` positions after
    /// it, for `d` in `1..=sequence_soon`, each kept with probability `1/d`, under their
    /// own instruction (`soon.txt`; 0: none). The model then learns, apart from the
    /// next item, what a user takes within a few items of another, weighted by
    /// closeness as decayed co-occurrence counts are: most test transitions were never
    /// seen in training (docs/lab/amazon-recipes.md), and an item a few steps on is often the
    /// one that follows. The same pairs under the sequence instruction blurred the
    /// next-item transitions and ranked worse (docs/lab/transition-memory.md).
    pub sequence_soon: usize,
    /// Chat examples per item: a request in words from the item's genres or decade,
    /// answered in the format its phrasing asks for ([`super::chat`]).
    pub chat_per_item: usize,
    /// Chat examples per user: "something like {title}" for an item of the user's
    /// training part, answered with the items the user took next.
    pub chat_per_user: usize,
}

impl Default for DataOptions {
    fn default() -> Self {
        DataOptions {
            seed: 0,
            max_history: 20,
            history_titles: true,
            max_title_words: 10,
            max_description_words: 32,
            align: true,
            align_per_item: 1,
            recommend: true,
            recommend_per_user: None,
            recommend_query_share: 0.3,
            search: true,
            search_per_item: 1,
            requests_per_item: 0,
            steer: true,
            steer_per_user: 10,
            describe: true,
            describe_per_user: 1,
            sequence: false,
            sequence_short: 0,
            sequence_soon: 0,
            chat_per_item: 0,
            chat_per_user: 0,
        }
    }
}

/// Number of examples per task.
pub fn count_by_task(examples: &[Example]) -> BTreeMap<Task, usize> {
    let mut m = BTreeMap::new();
    for e in examples {
        *m.entry(e.task).or_insert(0) += 1;
    }
    m
}

/// Checks that `sids[i]` is the SID of `catalog.items[i]`.
pub fn check_sids(catalog: &Catalog, sids: &[SidRecord]) -> Result<(), DataError> {
    if catalog.len() != sids.len() {
        return Err(DataError::SidCount {
            catalog: catalog.len(),
            sids: sids.len(),
        });
    }
    for (index, (item, rec)) in catalog.items.iter().zip(sids).enumerate() {
        if item.id != rec.id {
            return Err(DataError::SidMismatch {
                index,
                catalog_id: item.id.clone(),
                sid_id: rec.id.clone(),
            });
        }
    }
    Ok(())
}

fn check_split(catalog: &Catalog, split: &Split) -> Result<(), DataError> {
    let len = catalog.len();
    let bad = |user: usize, item: u32| DataError::ItemOutOfRange { user, item, len };
    for (u, seq) in split.train.iter().enumerate() {
        if let Some(&i) = seq.iter().find(|&&i| i as usize >= len) {
            return Err(bad(u, i));
        }
    }
    for part in [&split.valid, &split.test] {
        for (u, (h, t)) in part.iter().enumerate() {
            if let Some(&i) = h
                .iter()
                .chain(std::iter::once(t))
                .find(|&&i| i as usize >= len)
            {
                return Err(bad(u, i));
            }
        }
    }
    Ok(())
}

fn words(s: &str, max: usize) -> String {
    let w: Vec<&str> = s.split_whitespace().collect();
    if w.len() <= max {
        w.join(" ")
    } else {
        format!("{}…", w[..max].join(" "))
    }
}

pub(crate) fn year(item: &Item) -> Option<i64> {
    match item.attrs.get("year")? {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        Some(Value::String(s)) if !s.trim().is_empty() => vec![s.trim().to_string()],
        _ => Vec::new(),
    }
}

pub(crate) fn genres(item: &Item) -> Vec<String> {
    let mut g = strings(item.attrs.get("genre"));
    g.retain(|s| !s.eq_ignore_ascii_case("unknown"));
    g
}

pub(crate) fn categories(item: &Item) -> Vec<String> {
    strings(item.attrs.get("categories"))
}

pub(crate) fn brand(item: &Item) -> Option<String> {
    strings(item.attrs.get("brand")).into_iter().next()
}

/// The word for an item, `Toy Story (1995)`: title (cut to `max_words`) and year.
pub fn item_label(item: &Item, max_words: usize) -> String {
    let title = if item.title.trim().is_empty() {
        words(&item.description, max_words)
    } else {
        words(&item.title, max_words)
    };
    // Product titles often end in '.', which reads badly before "; " or ". Next".
    let title = title.trim_end_matches('.').to_string();
    match year(item) {
        Some(y) if !title.ends_with(&format!("({y})")) => format!("{title} ({y})"),
        _ => title,
    }
}

/// An item's short text, `Toy Story (1995), Animation, Children's, Comedy`: label, then
/// genres, or brand and most specific category for products.
pub fn item_text(item: &Item, max_words: usize) -> String {
    let mut parts = vec![item_label(item, max_words)];
    let g = genres(item);
    if !g.is_empty() {
        parts.push(g.join(", "));
    } else {
        if let Some(b) = brand(item) {
            parts.push(format!("by {b}"));
        }
        if let Some(c) = categories(item).last() {
            parts.push(c.clone());
        }
    }
    parts.join(", ")
}

/// A history as prompt text, oldest first, only the last `opts.max_history` items:
/// `<movie><a_1><b_2><c_3> Toy Story (1995); <movie>…`.
pub fn format_history(
    catalog: &Catalog,
    sids: &[SidRecord],
    history: &[u32],
    opts: &DataOptions,
) -> String {
    let start = history.len().saturating_sub(opts.max_history.max(1));
    history[start..]
        .iter()
        .map(|&i| {
            let sid = &sids[i as usize].sid;
            if opts.history_titles {
                format!(
                    "{sid} {}",
                    item_label(&catalog.items[i as usize], opts.max_title_words)
                )
            } else {
                sid.clone()
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The word a recommend prompt uses for what comes next: the catalog's only type, or
/// `item` for a mixed catalog.
pub fn catalog_noun(catalog: &Catalog) -> String {
    let types = catalog.types();
    if types.len() == 1 {
        types[0].replace('_', " ")
    } else {
        "item".to_string()
    }
}

/// The recommend prompt for a history, with phrasing `phrasing` (0 at inference).
pub fn recommend_prompt(
    catalog: &Catalog,
    sids: &[SidRecord],
    prompts: &Prompts,
    history: &[u32],
    opts: &DataOptions,
    phrasing: usize,
) -> Result<String, DataError> {
    let h = format_history(catalog, sids, history, opts);
    let noun = catalog_noun(catalog);
    prompts.render(
        PromptKind::Recommend,
        phrasing,
        &[(Slot::History, &h), (Slot::Type, &noun)],
    )
}

/// The instruction of a sequence example or request (phrasing `phrasing`; 0 at inference).
pub fn sequence_prompt(
    catalog: &Catalog,
    prompts: &Prompts,
    phrasing: usize,
) -> Result<String, DataError> {
    continuation_prompt(catalog, prompts, PromptKind::Sequence, phrasing)
}

/// The soon-after instruction ([`PromptKind::Soon`]) in phrasing `phrasing`.
pub fn soon_prompt(
    catalog: &Catalog,
    prompts: &Prompts,
    phrasing: usize,
) -> Result<String, DataError> {
    continuation_prompt(catalog, prompts, PromptKind::Soon, phrasing)
}

/// The instruction before a list of items written as the answer ([`PromptKind::Sequence`]
/// or [`PromptKind::Soon`]): its only slot is the catalog's noun.
pub fn continuation_prompt(
    catalog: &Catalog,
    prompts: &Prompts,
    kind: PromptKind,
    phrasing: usize,
) -> Result<String, DataError> {
    let noun = catalog_noun(catalog);
    prompts.render(kind, phrasing, &[(Slot::Type, &noun)])
}

/// What follows a sequence instruction when the model is to name the next item: the
/// history as a sequence answer writes it, and the separator after its last item.
pub fn sequence_context(
    catalog: &Catalog,
    sids: &[SidRecord],
    history: &[u32],
    opts: &DataOptions,
) -> String {
    format!("{}; ", format_history(catalog, sids, history, opts))
}

/// The windows a sequence example is cut into: `max_history + 1` items each (so the last
/// item of a full window is predicted from `max_history` items, as at inference), the
/// last window ending at the end of the history and earlier ones every half window.
pub fn sequence_windows(len: usize, max_history: usize) -> Vec<std::ops::Range<usize>> {
    let w = max_history.max(1) + 1;
    let stride = (w / 2).max(1);
    let mut out = Vec::new();
    let mut end = len;
    loop {
        if end <= w {
            // The first window starts at the beginning and is as long as it may be.
            out.push(0..w.min(len));
            break;
        }
        out.push(end - w..end);
        end -= stride;
    }
    out.reverse();
    out
}

pub(crate) fn plural(noun: &str) -> String {
    let n = noun.replace('_', " ");
    if n.ends_with('s') || n.ends_with('x') || n.ends_with("ch") || n.ends_with("sh") {
        format!("{n}es")
    } else if n.ends_with('y') && !n.ends_with("ay") && !n.ends_with("ey") && !n.ends_with("oy") {
        format!("{}ies", &n[..n.len() - 1])
    } else {
        format!("{n}s")
    }
}

fn decade_name(year: i64) -> String {
    format!("{}s", decade_of(year))
}

/// The decade a year falls in, as its first year: 1984 -> 1980.
pub(crate) fn decade_of(year: i64) -> i64 {
    year.div_euclid(10) * 10
}

/// Whether `item` has the genre (if one is asked; any case) and is from the decade (if
/// one is asked): what a request by genre and decade asks of its answers, in training
/// data and in the eval alike.
pub(crate) fn has_genre_and_decade(item: &Item, genre: Option<&str>, decade: Option<i64>) -> bool {
    let genre_ok = genre.is_none_or(|g| genres(item).iter().any(|x| x.eq_ignore_ascii_case(g)));
    let decade_ok = decade.is_none_or(|d| year(item).is_some_and(|y| decade_of(y) == d));
    genre_ok && decade_ok
}

/// Top entries of a count map, most frequent first, ties by first appearance.
fn top(counts: &[(String, usize)], k: usize) -> Vec<(String, usize)> {
    let mut v = counts.to_vec();
    v.sort_by_key(|e| std::cmp::Reverse(e.1)); // stable: ties keep first-seen order
    v.truncate(k);
    v
}

fn bump(counts: &mut Vec<(String, usize)>, key: &str) {
    match counts.iter_mut().find(|(k, _)| k == key) {
        Some(e) => e.1 += 1,
        None => counts.push((key.to_string(), 1)),
    }
}

fn and_list(parts: &[String]) -> String {
    match parts {
        [] => String::new(),
        [a] => a.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// The `k` genres most frequent in a history, most frequent first (ties: first seen), as
/// [`profile`] ranks them: what a profile's genres are checked against.
pub fn top_genres(catalog: &Catalog, history: &[u32], k: usize) -> Vec<String> {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for &i in history {
        for g in genres(&catalog.items[i as usize]) {
            bump(&mut counts, &g);
        }
    }
    top(&counts, k).into_iter().map(|(g, _)| g).collect()
}

/// A short text profile of a history: its three most frequent genres (or product
/// categories), most frequent first, the most frequent decade, the entity types. E.g.
/// `Mostly Drama, Comedy and Thriller; mostly 1990s movies.`, or for a mixed history
/// `Podcasts and movies: mostly Science, …; mostly from the 1990s.`
///
/// No counts: a decoder that writes the profile reads the history (and its taste
/// vector, which says proportions, not numbers), and a count it cannot know is text
/// that would be false; the genres' order carries the ranking.
pub fn profile(catalog: &Catalog, history: &[u32]) -> String {
    let mut topics: Vec<(String, usize)> = Vec::new();
    let mut decades: Vec<(String, usize)> = Vec::new();
    let mut types: Vec<(String, usize)> = Vec::new();
    for &i in history {
        let item = &catalog.items[i as usize];
        bump(&mut types, &item.item_type);
        let g = genres(item);
        if !g.is_empty() {
            for x in &g {
                bump(&mut topics, x);
            }
        } else {
            // Below the root: Amazon paths all start with the store's top category.
            let c = categories(item);
            if let Some(x) = c.get(1).or(c.first()) {
                bump(&mut topics, x);
            }
        }
        if let Some(y) = year(item) {
            bump(&mut decades, &decade_name(y));
        }
    }
    let topic_text = and_list(
        &top(&topics, 3)
            .into_iter()
            .map(|(t, _)| t)
            .collect::<Vec<_>>(),
    );
    let decade = top(&decades, 1).into_iter().next().map(|d| d.0);
    if types.len() == 1 {
        let noun = plural(&types[0].0);
        return match (topic_text.is_empty(), decade) {
            (false, Some(d)) => format!("Mostly {topic_text}; mostly {d} {noun}."),
            (false, None) => format!("Mostly {topic_text}."),
            (true, Some(d)) => format!("Mostly {d} {noun}."),
            (true, None) => format!("Mostly {noun}."),
        };
    }
    // Mixed types: say the mix first, and the decade only of the items that have one.
    let mix = and_list(
        &top(&types, 3)
            .into_iter()
            .map(|(t, _)| plural(&t))
            .collect::<Vec<_>>(),
    );
    let mut mix_chars = mix.chars();
    let mix = match mix_chars.next() {
        Some(c) => c.to_uppercase().chain(mix_chars).collect::<String>(),
        None => mix,
    };
    match (topic_text.is_empty(), decade) {
        (false, Some(d)) => format!("{mix}: mostly {topic_text}; mostly from the {d}."),
        (false, None) => format!("{mix}: mostly {topic_text}."),
        (true, Some(d)) => format!("{mix}; mostly from the {d}."),
        (true, None) => format!("{mix}."),
    }
}

const STOPWORDS: &[&str] = &[
    "a", "an", "the", "of", "and", "or", "to", "in", "on", "for", "with", "by", "at", "from", "is",
    "&", "-", "le", "la", "les", "el", "il", "der", "die", "das",
];

pub(crate) fn article(word: &str) -> &'static str {
    match word.chars().next().map(|c| c.to_ascii_lowercase()) {
        Some('a' | 'e' | 'i' | 'o' | 'u') => "an",
        Some('8') => "an",
        _ => "a",
    }
}

/// A search query for an item from its attributes; which kind of query is drawn at
/// random among those the item has attributes for.
pub fn search_query(item: &Item, rng: &mut impl Rng, max_words: usize) -> String {
    let noun = item.item_type.replace('_', " ");
    let title_words: Vec<String> = item
        .title
        .split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric() && c != '\'')
                .to_lowercase()
        })
        .filter(|w| !w.is_empty() && !STOPWORDS.contains(&w.as_str()))
        .take(max_words.clamp(1, 6))
        .collect();
    let g = genres(item);
    let y = year(item);
    let cats = categories(item);
    let b = brand(item);

    let mut kinds: Vec<u8> = Vec::new();
    if !g.is_empty() || y.is_some() {
        kinds.push(0); // genre/decade
    }
    if !title_words.is_empty() {
        kinds.push(1); // title words
    }
    if !cats.is_empty() || b.is_some() {
        kinds.push(2); // category/brand
    }
    if !title_words.is_empty() && (!g.is_empty() || !cats.is_empty()) {
        kinds.push(3); // title words + attribute
    }
    let Some(&kind) = kinds.choose(rng) else {
        return format!("{} {noun}", article(&noun));
    };
    match kind {
        0 => genre_decade_query(&g, y, &noun, rng),
        1 => {
            let t = title_words.join(" ");
            if rng.gen_bool(0.5) {
                t
            } else {
                format!("the {noun} {t}")
            }
        }
        2 => category_brand_query(&cats, b, &noun, rng),
        _ => {
            let t = title_words.join(" ");
            let attr = g
                .choose(rng)
                .cloned()
                .or_else(|| cats.last().cloned())
                .unwrap_or_default()
                .to_lowercase();
            format!("{t}, {} {attr} {noun}", article(&attr))
        }
    }
}

/// `a 90s comedy movie`, `a comedy movie from the 1990s`: a genre and/or decade request.
fn genre_decade_query(g: &[String], y: Option<i64>, noun: &str, rng: &mut impl Rng) -> String {
    let genre = g.choose(rng).map(|s| s.to_lowercase());
    let decade = y.map(|y| {
        if (1900..2000).contains(&y) && rng.gen_bool(0.5) {
            format!("{}s", y.rem_euclid(100) / 10 * 10)
        } else {
            decade_name(y)
        }
    });
    match (genre, decade) {
        (Some(g), Some(d)) => {
            if rng.gen_bool(0.5) {
                format!("{} {d} {g} {noun}", article(&d))
            } else {
                format!("{} {g} {noun} from the {d}", article(&g))
            }
        }
        (Some(g), None) => format!("{} {g} {noun}", article(&g)),
        (None, Some(d)) => format!("{} {noun} from the {d}", article(noun)),
        (None, None) => format!("{} {noun}", article(noun)),
    }
}

/// `lab tape by 3M`, `a product by 3M`, `lab tape`: a category and/or brand request.
fn category_brand_query(
    cats: &[String],
    b: Option<String>,
    noun: &str,
    rng: &mut impl Rng,
) -> String {
    let cat = cats.last().map(|c| c.to_lowercase());
    match (cat, b) {
        (Some(c), Some(b)) if rng.gen_bool(0.5) => format!("{c} by {b}"),
        (Some(c), _) => c,
        (None, Some(b)) => format!("{} {noun} by {b}", article(noun)),
        (None, None) => noun.to_string(),
    }
}

/// What a user might add to a recommend request that this item satisfies: its genre or
/// decade, or its category or brand (never its title: the request steers, it does not
/// name the answer). `None` for items without such attributes.
pub fn request_query(item: &Item, rng: &mut impl Rng) -> Option<String> {
    let noun = item.item_type.replace('_', " ");
    let g = genres(item);
    let y = year(item);
    let cats = categories(item);
    let b = brand(item);
    let has_gd = !g.is_empty() || y.is_some();
    let has_cb = !cats.is_empty() || b.is_some();
    match (has_gd, has_cb) {
        (false, false) => None,
        (true, false) => Some(genre_decade_query(&g, y, &noun, rng)),
        (false, true) => Some(category_brand_query(&cats, b, &noun, rng)),
        (true, true) => Some(if rng.gen_bool(0.5) {
            genre_decade_query(&g, y, &noun, rng)
        } else {
            category_brand_query(&cats, b, &noun, rng)
        }),
    }
}

/// Picks a phrasing among those whose slots all have values, and renders it; `None`
/// when none fits.
pub(crate) fn render_random(
    prompts: &Prompts,
    kind: PromptKind,
    values: &[(Slot, &str)],
    rng: &mut ChaCha8Rng,
) -> Result<Option<String>, DataError> {
    let fitting: Vec<&Phrasing> = prompts
        .phrasings(kind)
        .iter()
        .filter(|p| p.fits_exactly(values))
        .collect();
    match fitting.choose(rng) {
        Some(p) => p.render(values).map(Some),
        None => Ok(None),
    }
}

/// Random stream of the soon-after pairs ([`DataOptions::sequence_soon`]), apart from
/// the tasks'.
const SOON_STREAM: u64 = 0x5007;
/// Random stream of the requests in words ([`DataOptions::requests_per_item`]).
const WORDS_STREAM: u64 = 0x3023;

fn task_rng(seed: u64, task: Task) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(task as u64 + 1);
    rng
}

/// Builds the training examples of every enabled task (see the module documentation).
/// `sids[i]` must be the SID of `catalog.items[i]` (catalog order, as in `sids.jsonl`);
/// the user tasks read only `split.train`.
pub fn build(
    catalog: &Catalog,
    sids: &[SidRecord],
    split: &Split,
    prompts: &Prompts,
    opts: &DataOptions,
) -> Result<Vec<Example>, DataError> {
    check_sids(catalog, sids)?;
    check_split(catalog, split)?;
    let mut out = Vec::new();
    if opts.align {
        build_align(catalog, sids, prompts, opts, &mut out)?;
    }
    if opts.recommend {
        build_recommend(catalog, sids, split, prompts, opts, &mut out)?;
    }
    if opts.search {
        let mut rng = task_rng(opts.seed, Task::Search);
        // Requests in words draw from their own stream: adding them leaves the plain
        // search examples as they were.
        let mut words_rng = task_rng(opts.seed, Task::Search);
        words_rng.set_stream(WORDS_STREAM);
        let lexicon = Lexicon::builtin();
        for (i, item) in catalog.items.iter().enumerate() {
            let plain = (0..opts.search_per_item)
                .map(|_| Some(search_query(item, &mut rng, opts.max_title_words)))
                .collect::<Vec<_>>();
            let words = (0..opts.requests_per_item)
                .map(|_| lexicon.request(item, &mut words_rng))
                .collect::<Vec<_>>();
            for q in plain.into_iter().chain(words).flatten() {
                let noun = item.item_type.replace('_', " ");
                let values = [(Slot::Query, q.as_str()), (Slot::Type, noun.as_str())];
                if let Some(prompt) = render_random(prompts, PromptKind::Search, &values, &mut rng)?
                {
                    out.push(Example {
                        task: Task::Search,
                        prompt,
                        context: String::new(),
                        answer: sids[i].sid.clone(),
                        user: None,
                        request: Some(q),
                        taste: Vec::new(),
                    });
                }
            }
        }
    }
    if opts.sequence {
        let mut rng = task_rng(opts.seed, Task::Sequence);
        // Soon-after pairs draw from their own stream: with them or without, the
        // windows stay as they were. A user's pairs follow its windows.
        let mut soon_rng = task_rng(opts.seed, Task::Sequence);
        soon_rng.set_stream(SOON_STREAM);
        let count = prompts.phrasings(PromptKind::Sequence).len();
        let soon_count = prompts.phrasings(PromptKind::Soon).len();
        // A phrasing index, drawn only when there is a choice.
        let pick = |rng: &mut ChaCha8Rng, n: usize| if n > 0 { rng.gen_range(0..n) } else { 0 };
        // Windows are already cut to size: write each out whole.
        let whole = DataOptions {
            max_history: usize::MAX,
            ..opts.clone()
        };
        for (u, train) in split.train.iter().enumerate() {
            if train.len() < 2 {
                continue;
            }
            let mut windows = sequence_windows(train.len(), opts.max_history);
            if opts.sequence_short > 0 && train.len() > opts.sequence_short + 1 {
                windows.extend(sequence_windows(train.len(), opts.sequence_short));
            }
            for r in windows {
                let answer = format_history(catalog, sids, &train[r], &whole);
                out.push(Example {
                    task: Task::Sequence,
                    prompt: sequence_prompt(catalog, prompts, pick(&mut rng, count))?,
                    context: String::new(),
                    answer,
                    user: Some(u as u32),
                    request: None,
                    taste: Vec::new(),
                });
            }
            for d in 1..=opts.sequence_soon {
                for i in 0..train.len().saturating_sub(d) {
                    if !soon_rng.gen_bool(1.0 / d as f64) {
                        continue;
                    }
                    let phrasing = pick(&mut soon_rng, soon_count);
                    out.push(Example {
                        task: Task::Sequence,
                        prompt: soon_prompt(catalog, prompts, phrasing)?,
                        context: String::new(),
                        answer: format_history(catalog, sids, &[train[i], train[i + d]], &whole),
                        user: Some(u as u32),
                        request: None,
                        taste: Vec::new(),
                    });
                }
            }
        }
    }
    if opts.steer && catalog.types().len() > 1 {
        build_steer(catalog, sids, split, prompts, opts, &mut out)?;
    }
    if opts.chat_per_item > 0 || opts.chat_per_user > 0 {
        let mut rng = task_rng(opts.seed, Task::Chat);
        super::chat::build(catalog, sids, split, prompts, opts, &mut rng, &mut out)?;
    }
    if opts.describe {
        let mut rng = task_rng(opts.seed, Task::Describe);
        for (u, train) in split.train.iter().enumerate() {
            if train.is_empty() {
                continue;
            }
            for k in 0..opts.describe_per_user {
                // The first window ends at the end of the training part; further ones at
                // random earlier points.
                let end = if k == 0 {
                    train.len()
                } else {
                    rng.gen_range(1..=train.len())
                };
                let start = end.saturating_sub(opts.max_history.max(1));
                let window = &train[start..end];
                let h = format_history(catalog, sids, window, opts);
                let values = [(Slot::History, h.as_str())];
                if let Some(prompt) =
                    render_random(prompts, PromptKind::Describe, &values, &mut rng)?
                {
                    out.push(Example {
                        task: Task::Describe,
                        prompt,
                        context: String::new(),
                        answer: profile(catalog, window),
                        user: Some(u as u32),
                        request: None,
                        taste: train[..end].to_vec(),
                    });
                }
            }
        }
    }
    Ok(out)
}

fn build_align(
    catalog: &Catalog,
    sids: &[SidRecord],
    prompts: &Prompts,
    opts: &DataOptions,
    out: &mut Vec<Example>,
) -> Result<(), DataError> {
    let mut rng = task_rng(opts.seed, Task::Align);
    for (i, item) in catalog.items.iter().enumerate() {
        let sid = sids[i].sid.as_str();
        let noun = item.item_type.replace('_', " ");
        let text = item_text(item, opts.max_title_words);
        let title = words(&item.title, opts.max_title_words);
        let description = words(&item.description, opts.max_description_words);
        let long_text = if description.is_empty() {
            text.clone()
        } else {
            format!("{text}. {description}")
        };
        for _ in 0..opts.align_per_item {
            let values = [
                (Slot::Item, text.as_str()),
                (Slot::Title, title.as_str()),
                (Slot::Description, description.as_str()),
                (Slot::Type, noun.as_str()),
            ];
            if let Some(prompt) = render_random(prompts, PromptKind::AlignItem, &values, &mut rng)?
            {
                out.push(Example {
                    task: Task::Align,
                    prompt,
                    context: String::new(),
                    answer: sid.to_string(),
                    user: None,
                    // The item's own text as the request: the projection learns where
                    // every item's vector points, which is what reads requests later.
                    request: Some(long_text.clone()),
                    taste: Vec::new(),
                });
            }
            let values = [(Slot::Sid, sid), (Slot::Type, noun.as_str())];
            if let Some(prompt) = render_random(prompts, PromptKind::AlignSid, &values, &mut rng)? {
                out.push(Example {
                    task: Task::Align,
                    prompt,
                    context: String::new(),
                    answer: long_text.clone(),
                    user: None,
                    request: None,
                    taste: Vec::new(),
                });
            }
        }
    }
    Ok(())
}

fn build_recommend(
    catalog: &Catalog,
    sids: &[SidRecord],
    split: &Split,
    prompts: &Prompts,
    opts: &DataOptions,
    out: &mut Vec<Example>,
) -> Result<(), DataError> {
    let mut rng = task_rng(opts.seed, Task::Recommend);
    let noun = catalog_noun(catalog);
    let lexicon = Lexicon::builtin();
    for (u, train) in split.train.iter().enumerate() {
        // Predict item t from the items before it: positions 1..len.
        let mut positions: Vec<usize> = (1..train.len()).collect();
        if let Some(cap) = opts.recommend_per_user {
            if positions.len() > cap {
                positions.shuffle(&mut rng);
                positions.truncate(cap);
                positions.sort_unstable();
            }
        }
        for t in positions {
            let h = format_history(catalog, sids, &train[..t], opts);
            let target = &catalog.items[train[t] as usize];
            let query = if opts.recommend_query_share > 0.0
                && rng.gen_bool(opts.recommend_query_share.min(1.0))
            {
                // Half in the lexicon's words, half as the attributes say it.
                let words = match rng.gen_bool(0.5) {
                    true => lexicon.request(target, &mut rng),
                    false => None,
                };
                words
                    .or_else(|| request_query(target, &mut rng))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            let values = [
                (Slot::History, h.as_str()),
                (Slot::Type, noun.as_str()),
                (Slot::Query, query.as_str()),
            ];
            if let Some(prompt) = render_random(prompts, PromptKind::Recommend, &values, &mut rng)?
            {
                out.push(Example {
                    task: Task::Recommend,
                    prompt,
                    context: String::new(),
                    answer: sids[train[t] as usize].sid.clone(),
                    user: Some(u as u32),
                    request: (!query.is_empty()).then(|| query.clone()),
                    taste: train[..t].to_vec(),
                });
            }
        }
    }
    Ok(())
}

fn build_steer(
    catalog: &Catalog,
    sids: &[SidRecord],
    split: &Split,
    prompts: &Prompts,
    opts: &DataOptions,
    out: &mut Vec<Example>,
) -> Result<(), DataError> {
    let mut rng = task_rng(opts.seed, Task::Steer);
    let types = catalog.types();
    for (u, train) in split.train.iter().enumerate() {
        // Every (position, type) whose type occurs at or after the position: the
        // target is the first item of that type from there on.
        let mut cands: Vec<(usize, usize)> = Vec::new();
        for t in 1..train.len() {
            for ty in &types {
                if let Some(j) =
                    (t..train.len()).find(|&j| &catalog.items[train[j] as usize].item_type == ty)
                {
                    cands.push((t, j));
                }
            }
        }
        if cands.len() > opts.steer_per_user {
            cands.shuffle(&mut rng);
            cands.truncate(opts.steer_per_user);
            cands.sort_unstable();
        }
        for (t, j) in cands {
            let target = train[j] as usize;
            let noun = catalog.items[target].item_type.replace('_', " ");
            let h = format_history(catalog, sids, &train[..t], opts);
            let values = [(Slot::History, h.as_str()), (Slot::Type, noun.as_str())];
            if let Some(prompt) = render_random(prompts, PromptKind::Steer, &values, &mut rng)? {
                out.push(Example {
                    task: Task::Steer,
                    prompt,
                    context: String::new(),
                    answer: sids[target].sid.clone(),
                    user: Some(u as u32),
                    request: None,
                    taste: train[..t].to_vec(),
                });
            }
        }
    }
    Ok(())
}

/// Validation examples: per user, the recommend prompt (phrasing 0, as at inference) for
/// the validation history, answered by the validation target. The trainer reports the
/// loss on these; they are never trained on.
pub fn build_validation(
    catalog: &Catalog,
    sids: &[SidRecord],
    split: &Split,
    prompts: &Prompts,
    opts: &DataOptions,
) -> Result<Vec<Example>, DataError> {
    check_sids(catalog, sids)?;
    check_split(catalog, split)?;
    let mut out = Vec::with_capacity(split.valid.len());
    for (u, (history, target)) in split.valid.iter().enumerate() {
        if history.is_empty() {
            continue;
        }
        // Asked as inference will ask: the sequence continuation when the model learns
        // whole histories, the recommend prompt otherwise.
        let (task, prompt, context) = if opts.sequence {
            (
                Task::Sequence,
                sequence_prompt(catalog, prompts, 0)?,
                sequence_context(catalog, sids, history, opts),
            )
        } else {
            (
                Task::Recommend,
                recommend_prompt(catalog, sids, prompts, history, opts, 0)?,
                String::new(),
            )
        };
        out.push(Example {
            task,
            prompt,
            context,
            answer: sids[*target as usize].sid.clone(),
            user: Some(u as u32),
            request: None,
            // A continuation prompt's history is its answer's context, not its prompt:
            // as in training, no taste vector there.
            taste: match task {
                Task::Sequence => Vec::new(),
                _ => history.clone(),
            },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phrasing_parse_and_render() {
        let p = Phrasing::parse("Find {query} {{x}}\\nnow ({ type })").unwrap();
        assert_eq!(p.slots(), vec![Slot::Query, Slot::Type]);
        let s = p
            .render(&[(Slot::Query, "a comedy"), (Slot::Type, "movie")])
            .unwrap();
        assert_eq!(s, "Find a comedy {x}\nnow (movie)");
        assert!(p.render(&[(Slot::Query, "x")]).is_err());
        assert!(!p.fits(&[(Slot::Query, "x"), (Slot::Type, " ")]));
    }

    #[test]
    fn phrasing_errors_have_columns() {
        assert_eq!(Phrasing::parse("ab {nope}").unwrap_err().0, 4);
        assert!(Phrasing::parse("ab {query").is_err());
        assert!(Phrasing::parse("ab }").is_err());
    }

    #[test]
    fn profile_text() {
        let item = |id: &str, y: i64, g: &[&str]| Item {
            id: id.into(),
            item_type: "movie".into(),
            title: id.into(),
            description: String::new(),
            attrs: serde_json::json!({"year": y, "genre": g})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        };
        let c = Catalog::from_items(vec![
            item("a", 1995, &["Drama", "Comedy"]),
            item("b", 1994, &["Drama"]),
            item("c", 1977, &["Comedy", "Drama", "War"]),
        ])
        .unwrap();
        assert_eq!(
            profile(&c, &[0, 1, 2]),
            "Mostly Drama, Comedy and War; mostly 1990s movies."
        );
    }

    #[test]
    fn plurals() {
        assert_eq!(plural("movie"), "movies");
        assert_eq!(plural("podcast_episode"), "podcast episodes");
        assert_eq!(plural("story"), "stories");
        assert_eq!(plural("box"), "boxes");
    }
}
