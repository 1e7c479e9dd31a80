//! User interaction sequences and the leave-one-out split.
//!
//! Three layouts are read, each giving every user's items in chronological order:
//!
//! * **RecBole atomic `.inter`** ([`InterFormat::Recbole`]): tab-separated with a header of
//!   `name:type` fields; `user_id` and `item_id` are required, `timestamp` optional. Each
//!   user's items are sorted by timestamp; the sort is stable, so ties keep file order
//!   (and a file without timestamps is taken in file order). Other columns (`rating`, …)
//!   are ignored: every interaction counts, as in the TIGER protocol. Lines that are not
//!   valid UTF-8 are decoded as Latin-1, exactly as the catalog reader does for `.item`
//!   files, so ids with accents still match the catalog.
//! * **Amazon layout** ([`InterFormat::Amazon`], `.json`): one JSON object
//!   `{user: [item ids in chronological order]}`; ids may be strings or integers.
//! * **JSONL** ([`InterFormat::Jsonl`], `.jsonl`/`.ndjson`): one object per line,
//!   `{"user": "...", "items": ["id1", "id2", ...]}`, items chronological.
//!
//! Item ids are mapped to catalog indices, so everything downstream (training data,
//! evaluation) speaks the same numbering as the SID map. An id the catalog lacks is an
//! error naming the file, the line and the id, unless [`ReadOptions::skip_unknown`] is set,
//! in which case it is dropped and counted in [`ReadStats`]. Users with fewer than
//! [`ReadOptions::min_len`] interactions (default 3) are dropped and counted too: the
//! leave-one-out split needs a training item, a validation target and a test target.
//!
//! # The split
//!
//! [`Sequences::split`] is the leave-one-out protocol of TIGER, which our evaluation
//! follows: per user the last item is the test target, the one before it the validation
//! target, the rest the training part. Validation history = training part; test history
//! = training part + validation target. Training data must only ever be built from the
//! training parts, or the model sees the answers it is evaluated on.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::Value;

use crate::skipped::Skips;

/// The smallest sequence the leave-one-out split can use: one training item, the
/// validation target and the test target.
pub const MIN_SPLIT_LEN: usize = 3;

/// Interaction file layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InterFormat {
    /// RecBole atomic `.inter` file.
    Recbole,
    /// `{user: [item ids]}` in one JSON object (Amazon `interactions.json`).
    Amazon,
    /// One `{"user": ..., "items": [...]}` object per line.
    Jsonl,
}

impl InterFormat {
    /// The format a file name suggests: `.inter`, `.json`, `.jsonl`/`.ndjson`.
    pub fn detect(path: &Path) -> Option<InterFormat> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "inter" => Some(InterFormat::Recbole),
            "json" => Some(InterFormat::Amazon),
            "jsonl" | "ndjson" => Some(InterFormat::Jsonl),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            InterFormat::Recbole => "recbole",
            InterFormat::Amazon => "amazon",
            InterFormat::Jsonl => "jsonl",
        }
    }
}

impl fmt::Display for InterFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for InterFormat {
    type Err = InteractionsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "recbole" | "inter" => Ok(InterFormat::Recbole),
            "amazon" | "json" => Ok(InterFormat::Amazon),
            "jsonl" | "ndjson" => Ok(InterFormat::Jsonl),
            _ => Err(InteractionsError::UnknownFormat {
                name: s.to_string(),
            }),
        }
    }
}

/// How to read an interaction file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOptions {
    /// The layout; detected from the file extension when `None`.
    pub format: Option<InterFormat>,
    /// Users with fewer interactions (after unknown items are skipped) are dropped. At
    /// least [`MIN_SPLIT_LEN`].
    pub min_len: usize,
    /// Drop (and count) items the catalog lacks instead of failing. Off by default: an
    /// unknown id usually means the interactions belong to another catalog.
    pub skip_unknown: bool,
    /// Leave out (and list in [`ReadStats::skipped`]) lines or users that cannot be read,
    /// and items the catalog lacks, instead of failing on the first. Off by default.
    pub skip_invalid: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            format: None,
            min_len: MIN_SPLIT_LEN,
            skip_unknown: false,
            skip_invalid: false,
        }
    }
}

/// What reading kept and dropped, so a caller can report it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReadStats {
    /// Distinct users in the file.
    pub users_read: usize,
    /// Interactions in the file.
    pub interactions_read: usize,
    /// Interactions whose item the catalog lacks (only with `skip_unknown`).
    pub unknown_skipped: usize,
    /// Users dropped for having fewer than `min_len` interactions.
    pub users_dropped: usize,
    /// Interactions of those users.
    pub interactions_dropped: usize,
    /// Users kept.
    pub users: usize,
    /// Interactions kept.
    pub interactions: usize,
    /// Lines or users left out under [`ReadOptions::skip_invalid`].
    pub skipped: Vec<crate::skipped::Skipped>,
}

/// Errors of this module. Each names the file and, where it is about one place in it,
/// the 1-based line.
#[derive(Debug, thiserror::Error)]
pub enum InteractionsError {
    /// The file could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A format name that is not one of `recbole`, `amazon`, `jsonl`.
    #[error("unknown interactions format {name:?}: expected one of recbole, amazon, jsonl")]
    UnknownFormat { name: String },
    /// No format was given and the file name does not tell it.
    #[error(
        "{}: cannot tell the interactions format from the file name; use a .inter \
         (RecBole), .json (Amazon) or .jsonl extension, or name the format",
        .path.display()
    )]
    CannotDetect { path: PathBuf },
    /// A line (or record) that cannot be parsed.
    #[error("{}:{line}: {message}", .path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// An item id the catalog does not have.
    #[error(
        "{}:{line}: user {user:?}: item {id:?} is not in the catalog (is this the catalog \
         the interactions belong to? skipping unknown items is an option)",
        .path.display()
    )]
    UnknownItem {
        path: PathBuf,
        line: usize,
        user: String,
        id: String,
    },
    /// The same user on two lines of a JSONL file.
    #[error("{}:{line}: user {user:?} already appears on line {first_line}", .path.display())]
    DuplicateUser {
        path: PathBuf,
        line: usize,
        first_line: usize,
        user: String,
    },
    /// `min_len` below what the split needs.
    #[error(
        "minimum sequence length {min_len} is too small: the leave-one-out split needs at \
         least {MIN_SPLIT_LEN} (a training item, a validation and a test target)"
    )]
    MinLen { min_len: usize },
    /// No user is left after filtering.
    #[error(
        "{}: no user has at least {min_len} interactions ({users_read} users read)",
        .path.display()
    )]
    Empty {
        path: PathBuf,
        min_len: usize,
        users_read: usize,
    },
}

impl InteractionsError {
    /// The 1-based line the error is about, if any.
    pub fn line(&self) -> Option<usize> {
        match self {
            InteractionsError::Syntax { line, .. }
            | InteractionsError::UnknownItem { line, .. }
            | InteractionsError::DuplicateUser { line, .. } => Some(*line),
            _ => None,
        }
    }
}

/// Users and their chronological item sequences, as catalog indices. `users[u]` owns
/// `seqs[u]`; users come in order of first appearance in the file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sequences {
    pub users: Vec<String>,
    pub seqs: Vec<Vec<u32>>,
}

/// The leave-one-out split: one entry per user, in [`Sequences`] order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Split {
    /// Training part per user: every item but the last two.
    pub train: Vec<Vec<u32>>,
    /// `(history, target)`: history = training part, target = second-to-last item.
    pub valid: Vec<(Vec<u32>, u32)>,
    /// `(history, target)`: history = training part + validation target, target = last.
    pub test: Vec<(Vec<u32>, u32)>,
}

/// One user's interactions before mapping: raw item ids with the line each came from and
/// the key to sort by.
struct RawUser {
    name: String,
    items: Vec<RawItem>,
}

struct RawItem {
    id: String,
    line: usize,
    time: f64,
}

impl Sequences {
    /// Reads an interaction file and maps its item ids to indices of `catalog`.
    pub fn load(
        path: &Path,
        catalog: &crate::catalog::Catalog,
        opts: &ReadOptions,
    ) -> Result<(Sequences, ReadStats), InteractionsError> {
        if opts.min_len < MIN_SPLIT_LEN {
            return Err(InteractionsError::MinLen {
                min_len: opts.min_len,
            });
        }
        let format = match opts.format {
            Some(f) => f,
            None => InterFormat::detect(path).ok_or_else(|| InteractionsError::CannotDetect {
                path: path.to_path_buf(),
            })?,
        };
        let bytes = std::fs::read(path).map_err(|source| InteractionsError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
        let mut skips = Skips::new(opts.skip_invalid);
        let raw = match format {
            InterFormat::Recbole => read_recbole(path, bytes, &mut skips)?,
            InterFormat::Amazon => read_amazon(path, bytes, &mut skips)?,
            InterFormat::Jsonl => read_jsonl(path, bytes, &mut skips)?,
        };
        let (seqs, mut stats) = finish(path, raw, catalog, opts)?;
        stats.skipped = skips.list;
        Ok((seqs, stats))
    }

    /// Sequences from users' item indices in memory, keeping users with at least
    /// `min_len` items (and never an empty one) (for tests and for callers that build sequences themselves).
    pub fn from_seqs(users: Vec<String>, seqs: Vec<Vec<u32>>, min_len: usize) -> Sequences {
        let (users, seqs) = users
            .into_iter()
            .zip(seqs)
            .filter(|(_, s)| s.len() >= min_len.max(1))
            .unzip();
        Sequences { users, seqs }
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Total number of interactions.
    pub fn interactions(&self) -> usize {
        self.seqs.iter().map(Vec::len).sum()
    }

    /// The leave-one-out split (see the module documentation). [`Sequences::load`] only
    /// keeps users with at least [`MIN_SPLIT_LEN`] items; a hand-made shorter sequence
    /// gets an empty training part (two items: validation and test target; one item: it
    /// is both targets), and an empty one only an empty training part and no targets, so
    /// `valid`/`test` stay aligned with `users` whenever every sequence is non-empty
    /// (as [`Sequences::from_seqs`] guarantees).
    pub fn split(&self) -> Split {
        let mut split = Split {
            train: Vec::with_capacity(self.seqs.len()),
            valid: Vec::with_capacity(self.seqs.len()),
            test: Vec::with_capacity(self.seqs.len()),
        };
        for seq in &self.seqs {
            let n = seq.len();
            if n == 0 {
                split.train.push(Vec::new());
                continue;
            }
            let test_target = seq[n - 1];
            let valid_at = n.saturating_sub(2);
            let valid_target = seq[valid_at];
            let train = seq[..valid_at].to_vec();
            let mut test_history = train.clone();
            if n >= 2 {
                test_history.push(valid_target);
            }
            split.valid.push((train.clone(), valid_target));
            split.test.push((test_history, test_target));
            split.train.push(train);
        }
        split
    }

    /// The sequences in the peers' layout, `{"0": [item indices...], "1": ...}`, keyed
    /// by user index: the format of Amazon `interactions.json`, so the Python baselines
    /// apply the same leave-one-out split to exactly the same sequences.
    pub fn to_json_object(&self) -> Value {
        let map = self
            .seqs
            .iter()
            .enumerate()
            .map(|(u, s)| (u.to_string(), Value::from(s.clone())))
            .collect::<serde_json::Map<_, _>>();
        Value::Object(map)
    }

    /// Writes [`Sequences::to_json_object`] to a file.
    pub fn write_json(&self, path: &Path) -> Result<(), InteractionsError> {
        let io = |source| InteractionsError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::create(path).map_err(io)?;
        let mut w = std::io::BufWriter::new(file);
        serde_json::to_writer(&mut w, &self.to_json_object()).map_err(|e| io(e.into()))?;
        w.write_all(b"\n").and_then(|_| w.flush()).map_err(io)
    }
}

/// Maps ids, sorts, filters.
fn finish(
    path: &Path,
    raw: Vec<RawUser>,
    catalog: &crate::catalog::Catalog,
    opts: &ReadOptions,
) -> Result<(Sequences, ReadStats), InteractionsError> {
    let mut stats = ReadStats {
        users_read: raw.len(),
        ..ReadStats::default()
    };
    let mut out = Sequences::default();
    for mut user in raw {
        stats.interactions_read += user.items.len();
        // Stable: equal timestamps keep file order.
        user.items.sort_by(|a, b| a.time.total_cmp(&b.time));
        let mut seq = Vec::with_capacity(user.items.len());
        for item in &user.items {
            match catalog.index_of(&item.id) {
                Some(i) => seq.push(i as u32),
                None if opts.skip_unknown || opts.skip_invalid => stats.unknown_skipped += 1,
                None => {
                    return Err(InteractionsError::UnknownItem {
                        path: path.to_path_buf(),
                        line: item.line,
                        user: user.name.clone(),
                        id: item.id.clone(),
                    })
                }
            }
        }
        if seq.len() < opts.min_len {
            stats.users_dropped += 1;
            stats.interactions_dropped += seq.len();
            continue;
        }
        stats.users += 1;
        stats.interactions += seq.len();
        out.users.push(user.name);
        out.seqs.push(seq);
    }
    if out.is_empty() {
        return Err(InteractionsError::Empty {
            path: path.to_path_buf(),
            min_len: opts.min_len,
            users_read: stats.users_read,
        });
    }
    Ok((out, stats))
}

fn syntax(path: &Path, line: usize, message: impl Into<String>) -> InteractionsError {
    InteractionsError::Syntax {
        path: path.to_path_buf(),
        line,
        message: message.into(),
    }
}

/// Decodes one line: UTF-8, or Latin-1 when it is not valid UTF-8 (as the catalog's
/// RecBole reader does, so ids match).
fn utf8_or_latin1(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => bytes.iter().map(|&b| b as char).collect(),
    }
}

fn read_recbole(
    path: &Path,
    bytes: &[u8],
    skips: &mut Skips,
) -> Result<Vec<RawUser>, InteractionsError> {
    let mut lines = bytes
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .enumerate();
    let header = loop {
        match lines.next() {
            Some((_, l)) if l.iter().all(u8::is_ascii_whitespace) => continue,
            Some((i, l)) => break (i + 1, utf8_or_latin1(l)),
            None => return Ok(Vec::new()),
        }
    };
    let (header_line, header) = header;
    let (mut user_col, mut item_col, mut time_col) = (None, None, None);
    let names: Vec<&str> = header.split('\t').collect();
    for (c, spec) in names.iter().enumerate() {
        let name = spec.rsplit_once(':').map_or(*spec, |(n, _)| n).trim();
        match name {
            "user_id" => user_col = Some(c),
            "item_id" => item_col = Some(c),
            "timestamp" => time_col = Some(c),
            _ => {}
        }
    }
    let missing = |what: &str| {
        syntax(
            path,
            header_line,
            format!(
                "header has no {what} column (expected RecBole fields such as \
                 user_id:token, item_id:token, timestamp:float)"
            ),
        )
    };
    let user_col = user_col.ok_or_else(|| missing("user_id"))?;
    let item_col = item_col.ok_or_else(|| missing("item_id"))?;

    let mut users: Vec<RawUser> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (i, raw) in lines {
        let line = i + 1;
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let text = utf8_or_latin1(raw);
        let fields: Vec<&str> = text.split('\t').collect();
        let cols = (user_col, item_col, time_col, names.len());
        let (user, item, time) = match recbole_fields(path, line, &fields, cols) {
            Ok(f) => f,
            Err(e) => {
                skips.take(e, line, None)?;
                continue;
            }
        };
        let u = *index.entry(user.to_string()).or_insert_with(|| {
            users.push(RawUser {
                name: user.to_string(),
                items: Vec::new(),
            });
            users.len() - 1
        });
        users[u].items.push(RawItem {
            id: item.to_string(),
            line,
            time,
        });
    }
    Ok(users)
}

/// One record's user, item and time; `cols` are the user, item and timestamp columns
/// and the header's field count.
fn recbole_fields<'a>(
    path: &Path,
    line: usize,
    fields: &[&'a str],
    (user_col, item_col, time_col, n_cols): (usize, usize, Option<usize>, usize),
) -> Result<(&'a str, &'a str, f64), InteractionsError> {
    {
        if fields.len() != n_cols {
            return Err(syntax(
                path,
                line,
                format!(
                    "{} tab-separated fields, the header has {}",
                    fields.len(),
                    n_cols
                ),
            ));
        }
        let user = fields[user_col].trim();
        let item = fields[item_col].trim();
        if user.is_empty() {
            return Err(syntax(path, line, "field \"user_id\" is empty"));
        }
        if item.is_empty() {
            return Err(syntax(path, line, "field \"item_id\" is empty"));
        }
        let time = match time_col {
            Some(c) => {
                let t = fields[c].trim();
                t.parse::<f64>()
                    .ok()
                    .filter(|t| t.is_finite())
                    .ok_or_else(|| {
                        syntax(
                            path,
                            line,
                            format!("field \"timestamp\": expected a number, found {t:?}"),
                        )
                    })?
            }
            None => 0.0,
        };
        Ok((user, item, time))
    }
}

fn utf8_text<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str, InteractionsError> {
    std::str::from_utf8(bytes).map_err(|e| {
        let line = 1 + bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        syntax(path, line, "invalid UTF-8")
    })
}

/// An item id from JSON: a string or an integer.
fn json_id(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 40 {
        format!("{}…", s.chars().take(40).collect::<String>())
    } else {
        s
    }
}

fn read_amazon(
    path: &Path,
    bytes: &[u8],
    skips: &mut Skips,
) -> Result<Vec<RawUser>, InteractionsError> {
    let text = utf8_text(path, bytes)?;
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| syntax(path, e.line(), format!("invalid JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(syntax(
            path,
            1,
            format!(
                "expected a JSON object {{user: [item ids]}}, found {}",
                show(&value)
            ),
        ));
    };
    // Item lists hold only scalars, so a quoted string followed by ':' can only be a
    // top-level key: that finds the line each user starts on, for error messages.
    let mut key_lines = KeyLines::new(text);
    let mut users = Vec::with_capacity(map.len());
    for (name, items) in map {
        let line = key_lines.line_of(&name);
        let raw = match items {
            Value::Array(items) => raw_items(&items, path, line, &format!("user {name:?}")),
            other => Err(syntax(
                path,
                line,
                format!(
                    "user {name:?}: expected an array of item ids, found {}",
                    show(&other)
                ),
            )),
        };
        match raw {
            Ok(raw) => users.push(RawUser { name, items: raw }),
            Err(e) => skips.take(e, line, Some(name))?,
        }
    }
    Ok(users)
}

/// Finds, front to back, the line on which each top-level key of a JSON object appears.
struct KeyLines<'a> {
    text: &'a str,
    pos: usize,
    line: usize,
}

impl<'a> KeyLines<'a> {
    fn new(text: &'a str) -> Self {
        KeyLines {
            text,
            pos: 0,
            line: 1,
        }
    }

    /// Line of `key`, searching from the previous key on (keys come in file order);
    /// the last known line when it cannot be found.
    fn line_of(&mut self, key: &str) -> usize {
        let quoted = serde_json::to_string(key).unwrap_or_default();
        let mut from = self.pos;
        while let Some(off) = self.text[from..].find(&quoted) {
            let at = from + off;
            let after = &self.text[at + quoted.len()..];
            if after.trim_start().starts_with(':') {
                self.line += self.text[self.pos..at].matches('\n').count();
                self.pos = at;
                return self.line;
            }
            from = at + quoted.len();
        }
        self.line
    }
}

fn read_jsonl(
    path: &Path,
    bytes: &[u8],
    skips: &mut Skips,
) -> Result<Vec<RawUser>, InteractionsError> {
    let text = utf8_text(path, bytes)?;
    let mut users: Vec<RawUser> = Vec::new();
    let mut first_line: HashMap<String, usize> = HashMap::new();
    for (i, l) in text.lines().enumerate() {
        let line = i + 1;
        if l.trim().is_empty() {
            continue;
        }
        match jsonl_user(path, line, l, &first_line) {
            Ok(user) => {
                first_line.insert(user.name.clone(), line);
                users.push(user);
            }
            Err(e) => skips.take(e, line, None)?,
        }
    }
    Ok(users)
}

/// One JSONL line's user; `first_line` holds the users read so far.
fn jsonl_user(
    path: &Path,
    line: usize,
    l: &str,
    first_line: &HashMap<String, usize>,
) -> Result<RawUser, InteractionsError> {
    {
        let v: Value = serde_json::from_str(l)
            .map_err(|e| syntax(path, line, format!("invalid JSON: {e}")))?;
        let Value::Object(obj) = v else {
            return Err(syntax(
                path,
                line,
                format!(
                    "expected an object {{\"user\": ..., \"items\": [...]}}, found {}",
                    show(&v)
                ),
            ));
        };
        let name = obj.get("user").and_then(json_id).ok_or_else(|| {
            syntax(
                path,
                line,
                "field \"user\": expected a user id (string or integer)",
            )
        })?;
        let items = match obj.get("items") {
            Some(Value::Array(a)) => a,
            other => {
                return Err(syntax(
                    path,
                    line,
                    format!(
                        "field \"items\": expected an array of item ids, found {}",
                        other.map_or("nothing".to_string(), show)
                    ),
                ))
            }
        };
        if let Some(&first) = first_line.get(&name) {
            return Err(InteractionsError::DuplicateUser {
                path: path.to_path_buf(),
                line,
                first_line: first,
                user: name,
            });
        }
        let raw = raw_items(items, path, line, "field \"items\"")?;
        Ok(RawUser { name, items: raw })
    }
}

/// The items of one user's JSON array, in list order (the list is chronological), all on
/// the user's `line`; `context` names the array in error messages.
fn raw_items(
    items: &[Value],
    path: &Path,
    line: usize,
    context: &str,
) -> Result<Vec<RawItem>, InteractionsError> {
    items
        .iter()
        .enumerate()
        .map(|(k, v)| {
            let id = json_id(v).ok_or_else(|| {
                syntax(
                    path,
                    line,
                    format!(
                        "{context}, item {}: expected an item id (string or integer), found {}",
                        k + 1,
                        show(v)
                    ),
                )
            })?;
            Ok(RawItem {
                id,
                line,
                time: k as f64,
            })
        })
        .collect()
}

/// What followed each item within `window` positions in `sequences` (catalog indices
/// below `n_items`, oldest first): `counts[a][b]` adds `1 / d` for every `b` that came
/// `d ≤ window` positions after `a`. Ordered maps, so sums over a row are the same on
/// every run. The transition memory and the collaborative vectors both start here.
/// `Err` carries the first index outside the catalog.
pub fn windowed_successors(
    sequences: &[Vec<u32>],
    n_items: usize,
    window: usize,
) -> Result<Vec<BTreeMap<u32, f64>>, u32> {
    let mut counts: Vec<BTreeMap<u32, f64>> = vec![BTreeMap::new(); n_items];
    for seq in sequences {
        if let Some(&bad) = seq.iter().find(|&&i| i as usize >= n_items) {
            return Err(bad);
        }
        for (i, &a) in seq.iter().enumerate() {
            for (d, &b) in seq[i + 1..].iter().take(window).enumerate() {
                *counts[a as usize].entry(b).or_default() += 1.0 / (d + 1) as f64;
            }
        }
    }
    Ok(counts)
}

/// The users to evaluate: all, or a seeded sample of `max` of them (in user order).
/// Evaluation and training's model selection draw their users the same way.
pub fn sample_users(n: usize, max: Option<usize>, seed: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut users: Vec<usize> = (0..n).collect();
    if let Some(m) = max.filter(|&m| m < n) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        users.shuffle(&mut rng);
        users.truncate(m);
        users.sort_unstable();
    }
    users
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_lines_follow_keys() {
        let text = "{\n \"a\": [1, 2],\n \"b\":\n [\"a\"],\n \"c\": []\n}";
        let mut k = KeyLines::new(text);
        assert_eq!(k.line_of("a"), 2);
        assert_eq!(k.line_of("b"), 3);
        assert_eq!(k.line_of("c"), 5);
    }

    #[test]
    fn split_of_short_hand_made_sequences_does_not_panic() {
        let s = Sequences {
            users: vec!["u".into(), "v".into()],
            seqs: vec![vec![], vec![7]],
        };
        let split = s.split();
        assert_eq!(split.train.len(), 2);
        assert_eq!(split.test, vec![(vec![], 7)]);
    }
}
