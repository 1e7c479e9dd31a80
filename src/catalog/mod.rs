//! Catalogs: reading item files in the formats sidrec understands, validating them, and
//! normalising every item to one shape ([`Item`]). One reader per format in this folder
//! (`jsonl`, `delimited`, `recbole`, `amazon`), each turning a file into raw items with
//! their lines; the validation every format shares is here.
//!
//! Supported formats ([`Format`]):
//!
//! * **JSONL** (`.jsonl`, `.ndjson`): one JSON object per line with `id` (string or
//!   integer), optional `type`, `title`, optional `description`, optional `attrs` (an
//!   object). Any other top-level key goes into `attrs`. Blank lines are skipped. This is
//!   also the format of the normalised `catalog.jsonl` that [`Catalog::write_jsonl`]
//!   writes, and reading it back gives the same catalog.
//! * **CSV / TSV** (`.csv`, `.tsv`) with a header row: `id` and `title` columns are
//!   required, `type` and `description` are optional, every other column becomes a string
//!   attribute (empty cells are left out). Quoted fields may span lines.
//! * **RecBole atomic item files** (`.item`): tab-separated, header of `name:type` fields.
//!   See [`Format::Recbole`] for the mapping.
//! * **Amazon layout** (`.json`): one JSON object keyed by item index, each value
//!   `{title, description, brand, categories}`. See [`Format::Amazon`].
//!
//! Every item ends up with a type (the file's, or [`LoadOptions::default_type`]), a
//! non-empty id unique in the catalog, and some text (a title or a description).
//! Every error names the file and the 1-based line it is about, and the field where
//! there is one, e.g. `catalog.jsonl:17: field "title": expected a string, found 42`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{Map, Value};

pub use crate::skipped::Skipped;
use crate::skipped::Skips;

mod amazon;
mod delimited;
mod jsonl;
mod recbole;

use amazon::read_amazon;
use delimited::read_delimited;
use jsonl::read_jsonl;
use recbole::read_recbole;

/// One catalog item, normalised.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Item {
    /// Identifier, unique within the catalog.
    pub id: String,
    /// Entity type (`movie`, `track`, ...), a valid [`normalize_type`] name.
    #[serde(rename = "type")]
    pub item_type: String,
    /// Title; may be empty only when the description is not.
    pub title: String,
    /// Free text description; empty when the source has none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Free-form attributes (year, genre, brand, categories, ...), in source order.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub attrs: Map<String, Value>,
}

/// Catalog file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated values with a header row.
    Csv,
    /// Tab-separated values with a header row (same rules as CSV).
    Tsv,
    /// RecBole atomic `.item` file: tab-separated, header fields `name:type` with type one
    /// of `token`, `token_seq`, `float`, `float_seq`.
    ///
    /// Field mapping: `item_id` → id; `movie_title` / `title` / `name` → title;
    /// `description` → description; `type` → type; `release_year` / `year` →
    /// `attrs.year`, an integer when the value parses as a whole number (`1995`,
    /// `1995.0`), any other number as is, and left out when it is not a number at all
    /// (MovieLens-100k has `unkonwn` and `V` in two rows); `class` / `genre` / `genres` →
    /// `attrs.genre`, an array of words split on whitespace and `|` (so both ml-100k's
    /// `token_seq` and ml-1m's space-separated `token` give
    /// `["Animation", "Children's", "Comedy"]`). Other fields go to `attrs` under their
    /// bare name: `token_seq` → array of strings, `float` → number, `float_seq` → array
    /// of numbers, `token` → string; empty values are left out.
    ///
    /// Encoding: lines are UTF-8. Because RecBole files are a third-party format and some
    /// MovieLens releases are Latin-1 in places, a line of a RecBole file that is not
    /// valid UTF-8 is decoded as Latin-1 (ISO 8859-1) instead of being rejected. (Every
    /// other format rejects invalid UTF-8 with an error naming the line.) Windows line
    /// endings (ml-1m uses them) are accepted.
    Recbole,
    /// The Amazon-reviews item layout: one JSON object keyed by item index (`"0"`,
    /// `"1"`, ...), each value an object `{title, description, brand, categories}`.
    ///
    /// Mapping: key → id; `title`, `description` (a string, or an array of strings joined
    /// with spaces); `brand` → `attrs.brand` (left out when empty); `categories` →
    /// `attrs.categories`, an array of strings: a comma-separated path is split on `,`,
    /// parts trimmed and empty parts removed (an array, or an array of arrays, of strings
    /// is flattened); `type` → type; any other key → `attrs` as is. Items come in
    /// ascending numeric key order when every key is an integer, else in file order.
    /// Errors name the line on which the item's key appears.
    Amazon,
}

impl Format {
    /// All formats, in the order they are documented.
    pub const ALL: [Format; 5] = [
        Format::Jsonl,
        Format::Csv,
        Format::Tsv,
        Format::Recbole,
        Format::Amazon,
    ];

    /// Guesses the format from a file extension (case-insensitive): `.jsonl`/`.ndjson`,
    /// `.csv`, `.tsv`, `.item` (RecBole), `.json` (Amazon layout).
    pub fn detect(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" | "ndjson" => Some(Format::Jsonl),
            "csv" => Some(Format::Csv),
            "tsv" => Some(Format::Tsv),
            "item" => Some(Format::Recbole),
            "json" => Some(Format::Amazon),
            _ => None,
        }
    }

    /// The name used on the command line and by [`FromStr`].
    pub fn name(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
            Format::Tsv => "tsv",
            Format::Recbole => "recbole",
            Format::Amazon => "amazon",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = CatalogError;

    fn from_str(s: &str) -> Result<Format, CatalogError> {
        let name = s.trim().to_ascii_lowercase();
        Format::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .ok_or_else(|| CatalogError::UnknownFormat {
                name: s.to_string(),
            })
    }
}

/// How to read a catalog file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// The file's format; `None` detects it from the extension ([`Format::detect`]).
    pub format: Option<Format>,
    /// Type given to items whose source has none (normalised with [`normalize_type`]).
    pub default_type: String,
    /// Leave out (and list in [`Catalog::skipped`]) records that cannot be read or fail
    /// validation, instead of failing on the first. Off by default.
    pub skip_invalid: bool,
}

impl Default for LoadOptions {
    /// Detect the format; untyped items become `item`.
    fn default() -> Self {
        LoadOptions {
            format: None,
            default_type: "item".to_string(),
            skip_invalid: false,
        }
    }
}

/// Errors of this module. Each names the file (`<memory>` for [`Catalog::from_items`])
/// and, where it is about one place in it, the 1-based line and the field.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The file could not be read.
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A format name that is not one of `jsonl`, `csv`, `tsv`, `recbole`, `amazon`.
    #[error("unknown catalog format {name:?}: expected one of jsonl, csv, tsv, recbole, amazon")]
    UnknownFormat { name: String },
    /// No format was given and the file name does not tell it.
    #[error(
        "{}: cannot tell the catalog format from the file name; use a .jsonl, .csv, .tsv, \
         .item (RecBole) or .json (Amazon) extension, or name the format \
         (jsonl, csv, tsv, recbole, amazon)",
        .path.display()
    )]
    CannotDetect { path: PathBuf },
    /// A line (or record) that cannot be parsed at all.
    #[error("{}:{line}: {message}", .path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A field with a wrong or missing value (or a missing required column).
    #[error("{}:{line}: field {field:?}: {message}", .path.display())]
    Field {
        path: PathBuf,
        line: usize,
        field: String,
        message: String,
    },
    /// Two items with the same id.
    #[error("{}:{line}: field \"id\": duplicate id {id:?}, first used on line {first_line}", .path.display())]
    DuplicateId {
        path: PathBuf,
        line: usize,
        first_line: usize,
        id: String,
    },
    /// The file holds no items.
    #[error("{}: the catalog has no items", .path.display())]
    Empty { path: PathBuf },
    /// An item with no text at all (no title, description or attributes): nothing to
    /// embed.
    #[error(
        "{}:{line}: field \"title\": item {id:?} has no text: the title is empty and there is \
         neither a description nor any attribute",
        .path.display()
    )]
    MissingText {
        path: PathBuf,
        line: usize,
        id: String,
    },
    /// An item type that is not a valid type name (see [`normalize_type`]).
    #[error("{}:{line}: field \"type\": {reason}", .path.display())]
    InvalidType {
        path: PathBuf,
        line: usize,
        value: String,
        reason: String,
    },
    /// [`LoadOptions::default_type`] is not a valid type name.
    #[error("default item type: {reason}")]
    InvalidDefaultType { value: String, reason: String },
    /// A line that is not valid UTF-8 (JSONL, CSV, TSV and Amazon files).
    #[error("{}:{line}: invalid UTF-8 {detail}", .path.display())]
    InvalidUtf8 {
        path: PathBuf,
        line: usize,
        detail: String,
    },
}

impl CatalogError {
    /// The file the error is about, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            CatalogError::Io { path, .. }
            | CatalogError::CannotDetect { path }
            | CatalogError::Syntax { path, .. }
            | CatalogError::Field { path, .. }
            | CatalogError::DuplicateId { path, .. }
            | CatalogError::Empty { path }
            | CatalogError::MissingText { path, .. }
            | CatalogError::InvalidType { path, .. }
            | CatalogError::InvalidUtf8 { path, .. } => Some(path),
            CatalogError::UnknownFormat { .. } | CatalogError::InvalidDefaultType { .. } => None,
        }
    }

    /// The 1-based line the error is about, if any.
    pub fn line(&self) -> Option<usize> {
        match self {
            CatalogError::Syntax { line, .. }
            | CatalogError::Field { line, .. }
            | CatalogError::DuplicateId { line, .. }
            | CatalogError::MissingText { line, .. }
            | CatalogError::InvalidType { line, .. }
            | CatalogError::InvalidUtf8 { line, .. } => Some(*line),
            _ => None,
        }
    }
}

/// Normalises an entity type name: trims, lowercases, turns spaces and hyphens into `_`.
/// The result must match `^[a-z][a-z0-9_]{0,31}$` and must not look like a semantic-ID
/// level token (`^[a-z]_[0-9]+$`, e.g. `a_17`), because types become vocabulary tokens
/// (`<movie>`) next to level tokens (`<a_17>`). The error is a sentence saying why.
pub fn normalize_type(raw: &str) -> Result<String, String> {
    let t: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_whitespace() || c == '-' {
                '_'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect();
    if t.is_empty() {
        return Err("type is empty".to_string());
    }
    let first_ok = t.as_bytes()[0].is_ascii_lowercase();
    let rest_ok = t
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !first_ok || !rest_ok || t.len() > 32 {
        return Err(format!(
            "invalid type {raw:?}: a type must start with a letter and use only letters, \
             digits, '_', ' ' or '-', at most 32 characters"
        ));
    }
    let b = t.as_bytes();
    if b.len() >= 3 && b[1] == b'_' && b[2..].iter().all(u8::is_ascii_digit) {
        return Err(format!(
            "invalid type {raw:?}: it looks like a semantic-ID level token (letter, '_', \
             digits, as in a_17); choose another name"
        ));
    }
    Ok(t)
}

impl Item {
    /// Whether some attribute holds text or a number (not only nulls, empty strings or
    /// empty lists): what a template can render for an item without a title.
    pub fn has_attr_text(&self) -> bool {
        fn filled(v: &Value) -> bool {
            match v {
                Value::Null => false,
                Value::String(s) => !s.trim().is_empty(),
                Value::Array(a) => a.iter().any(filled),
                Value::Object(o) => o.values().any(filled),
                Value::Bool(_) | Value::Number(_) => true,
            }
        }
        self.attrs.values().any(filled)
    }
}

/// A validated catalog: items in source order, ids unique.
#[derive(Debug, Clone)]
pub struct Catalog {
    /// The items, in catalog order. The id index behind [`Catalog::index_of`] is built
    /// when the catalog is made; after changing ids here, rebuild the catalog with
    /// [`Catalog::from_items`].
    pub items: Vec<Item>,
    index: HashMap<String, usize>,
    /// The 1-based source line of each item (its position for [`Catalog::from_items`]).
    lines: Vec<usize>,
    /// Records left out under [`LoadOptions::skip_invalid`], in file order.
    pub skipped: Vec<Skipped>,
}

impl PartialEq for Catalog {
    fn eq(&self, other: &Self) -> bool {
        self.items == other.items
    }
}

/// An item as read from a file, with the line it came from.
struct Raw {
    item: Item,
    line: usize,
}

impl Catalog {
    /// Reads and validates a catalog file. The format is `opts.format`, or detected
    /// from the extension.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Catalog, CatalogError> {
        let format = match opts.format {
            Some(f) => f,
            None => Format::detect(path).ok_or_else(|| CatalogError::CannotDetect {
                path: path.to_path_buf(),
            })?,
        };
        let default_type = normalize_type(&opts.default_type).map_err(|reason| {
            CatalogError::InvalidDefaultType {
                value: opts.default_type.clone(),
                reason,
            }
        })?;
        let bytes = std::fs::read(path).map_err(|source| CatalogError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
        let mut skips = Skips::new(opts.skip_invalid);
        let raws = match format {
            Format::Jsonl => read_jsonl(path, bytes, &mut skips)?,
            Format::Csv => read_delimited(path, bytes, b',', &mut skips)?,
            Format::Tsv => read_delimited(path, bytes, b'\t', &mut skips)?,
            Format::Recbole => read_recbole(path, bytes, &mut skips)?,
            Format::Amazon => read_amazon(path, bytes, &mut skips)?,
        };
        finish(path, raws, &default_type, skips)
    }

    /// The 1-based line item `i` came from (its position for in-memory catalogs).
    pub fn line_of(&self, i: usize) -> usize {
        self.lines.get(i).copied().unwrap_or(i + 1)
    }

    /// The catalog without the items at `drop` (sorted or not), each recorded in
    /// [`Catalog::skipped`] with its reason. What `--skip-invalid` does with items whose
    /// text only turns out empty after the template renders.
    pub fn without(&self, drop: &[(usize, String)]) -> Catalog {
        let gone: std::collections::HashSet<usize> = drop.iter().map(|(i, _)| *i).collect();
        let mut skipped = self.skipped.clone();
        for (i, reason) in drop {
            skipped.push(Skipped {
                line: self.line_of(*i),
                id: self.items.get(*i).map(|it| it.id.clone()),
                reason: reason.clone(),
            });
        }
        skipped.sort_by_key(|s| s.line);
        let mut items = Vec::with_capacity(self.items.len());
        let mut lines = Vec::with_capacity(self.items.len());
        let mut index = HashMap::with_capacity(self.items.len());
        for (i, it) in self.items.iter().enumerate() {
            if gone.contains(&i) {
                continue;
            }
            index.insert(it.id.clone(), items.len());
            items.push(it.clone());
            lines.push(self.line_of(i));
        }
        Catalog {
            items,
            index,
            lines,
            skipped,
        }
    }

    /// Builds a catalog from items in memory, with the same normalisation and
    /// validation as [`Catalog::load`] (types normalised, title and description trimmed,
    /// ids unique, some text per item). Errors name the file `<memory>` and, as the line,
    /// the item's 1-based position. An item with an empty type is an error here.
    pub fn from_items(items: Vec<Item>) -> Result<Catalog, CatalogError> {
        let raws = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| Raw { item, line: i + 1 })
            .collect();
        finish(Path::new("<memory>"), raws, "", Skips::new(false))
    }

    /// The distinct item types, sorted.
    pub fn types(&self) -> Vec<String> {
        let mut t: Vec<String> = self.items.iter().map(|i| i.item_type.clone()).collect();
        t.sort();
        t.dedup();
        t
    }

    /// Position of the item with this id.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.index
            .get(id)
            .copied()
            .filter(|&i| self.items.get(i).is_some_and(|it| it.id == id))
    }

    /// The item with this id.
    pub fn get(&self, id: &str) -> Option<&Item> {
        self.index_of(id).map(|i| &self.items[i])
    }

    /// Writes the catalog as JSONL, one [`Item`] per line, in catalog order: the
    /// normalised `catalog.jsonl`, which [`Catalog::load`] reads back unchanged.
    pub fn write_jsonl(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        for item in &self.items {
            serde_json::to_writer(&mut *w, item)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are no items (never true for a loaded catalog).
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Shared validation: types, text, unique ids, non-empty.
fn finish(
    path: &Path,
    raws: Vec<Raw>,
    default_type: &str,
    mut skips: Skips,
) -> Result<Catalog, CatalogError> {
    let mut first_line: HashMap<String, usize> = HashMap::with_capacity(raws.len());
    let mut index = HashMap::with_capacity(raws.len());
    let mut items = Vec::with_capacity(raws.len());
    let mut lines = Vec::with_capacity(raws.len());
    for Raw { item, line } in raws {
        let id = item.id.clone();
        match check_item(path, item, line, default_type, &first_line) {
            Ok(item) => {
                first_line.insert(item.id.clone(), line);
                index.insert(item.id.clone(), items.len());
                items.push(item);
                lines.push(line);
            }
            Err(e) => skips.take(e, line, Some(id).filter(|i| !i.trim().is_empty()))?,
        }
    }
    if items.is_empty() {
        return Err(CatalogError::Empty {
            path: path.to_path_buf(),
        });
    }
    let mut skipped = skips.list;
    skipped.sort_by_key(|s| s.line);
    Ok(Catalog {
        items,
        index,
        lines,
        skipped,
    })
}

/// One item's validation: id, type, some text, a new id.
fn check_item(
    path: &Path,
    mut item: Item,
    line: usize,
    default_type: &str,
    first_line: &HashMap<String, usize>,
) -> Result<Item, CatalogError> {
    if item.id.trim().is_empty() {
        return Err(field_err(path, line, "id", "the id is empty"));
    }
    let raw_type = if item.item_type.trim().is_empty() {
        default_type
    } else {
        item.item_type.as_str()
    };
    item.item_type = normalize_type(raw_type).map_err(|reason| CatalogError::InvalidType {
        path: path.to_path_buf(),
        line,
        value: raw_type.to_string(),
        reason,
    })?;
    trim_in_place(&mut item.title);
    trim_in_place(&mut item.description);
    // An empty title is fine when other text can stand in for it (a template that reads
    // the categories, say); whether the rendered text is empty is checked once the
    // template has rendered it.
    if item.title.is_empty() && item.description.is_empty() && !item.has_attr_text() {
        return Err(CatalogError::MissingText {
            path: path.to_path_buf(),
            line,
            id: item.id,
        });
    }
    if let Some(&first) = first_line.get(&item.id) {
        return Err(CatalogError::DuplicateId {
            path: path.to_path_buf(),
            line,
            first_line: first,
            id: item.id,
        });
    }
    Ok(item)
}

fn trim_in_place(s: &mut String) {
    let t = s.trim();
    if t.len() != s.len() {
        *s = t.to_string();
    }
}

fn field_err(path: &Path, line: usize, field: &str, message: impl Into<String>) -> CatalogError {
    CatalogError::Field {
        path: path.to_path_buf(),
        line,
        field: field.to_string(),
        message: message.into(),
    }
}

fn syntax_err(path: &Path, line: usize, message: impl Into<String>) -> CatalogError {
    CatalogError::Syntax {
        path: path.to_path_buf(),
        line,
        message: message.into(),
    }
}

/// A short rendering of a JSON value for "found ..." in messages.
fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 40 {
        let cut: String = s.chars().take(37).collect();
        format!("{cut}...")
    } else {
        s
    }
}

/// Splits file content into lines numbered from 1, without `\n` / `\r\n`.
fn lines(bytes: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(move |_| !bytes.is_empty())
        .map(|(i, l)| (i + 1, l.strip_suffix(b"\r").unwrap_or(l)))
}

fn utf8_line<'a>(path: &Path, line: usize, bytes: &'a [u8]) -> Result<&'a str, CatalogError> {
    std::str::from_utf8(bytes).map_err(|e| CatalogError::InvalidUtf8 {
        path: path.to_path_buf(),
        line,
        detail: format!("(at byte {} of the line)", e.valid_up_to() + 1),
    })
}

/// Strips serde_json's " at line L column C" suffix from a message.
fn serde_message(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::amazon::top_level_key_lines;
    use super::recbole::{parse_number, utf8_or_latin1};
    use super::*;

    #[test]
    fn normalize_type_rules() {
        assert_eq!(normalize_type(" Movie ").unwrap(), "movie");
        assert_eq!(
            normalize_type("Podcast Episode").unwrap(),
            "podcast_episode"
        );
        assert_eq!(normalize_type("sci-fi").unwrap(), "sci_fi");
        assert_eq!(normalize_type("a").unwrap(), "a");
        assert_eq!(normalize_type("a_b").unwrap(), "a_b");
        assert_eq!(normalize_type("ab_12").unwrap(), "ab_12");
        assert!(normalize_type("a_17").unwrap_err().contains("level token"));
        assert!(normalize_type("").is_err());
        assert!(normalize_type("1movie").is_err());
        assert!(normalize_type("_movie").is_err());
        assert!(normalize_type("mo<vie").is_err());
        assert!(normalize_type("film·noir").is_err());
        assert!(normalize_type(&"x".repeat(32)).is_ok());
        assert!(normalize_type(&"x".repeat(33)).is_err());
    }

    #[test]
    fn format_names_and_detection() {
        for f in Format::ALL {
            assert_eq!(f.to_string().parse::<Format>().unwrap(), f);
        }
        assert_eq!("CSV".parse::<Format>().unwrap(), Format::Csv);
        assert!("xml".parse::<Format>().is_err());
        let d = |p: &str| Format::detect(Path::new(p));
        assert_eq!(d("a/b.jsonl"), Some(Format::Jsonl));
        assert_eq!(d("b.NDJSON"), Some(Format::Jsonl));
        assert_eq!(d("b.csv"), Some(Format::Csv));
        assert_eq!(d("b.tsv"), Some(Format::Tsv));
        assert_eq!(d("ml-100k.item"), Some(Format::Recbole));
        assert_eq!(d("items.json"), Some(Format::Amazon));
        assert_eq!(d("items.txt"), None);
        assert_eq!(d("items"), None);
    }

    #[test]
    fn numbers_parse_to_integers_when_whole() {
        assert_eq!(parse_number("1995"), Some(Value::from(1995)));
        assert_eq!(parse_number("1995.0"), Some(Value::from(1995)));
        assert_eq!(parse_number("2.5"), Some(Value::from(2.5)));
        assert_eq!(parse_number("V"), None);
        assert_eq!(parse_number("NaN"), None);
    }

    #[test]
    fn key_lines_of_nested_object() {
        let text =
            "{\n \"0\": {\"title\": \"a,\\\"b\", \"x\": [1, {\"y\": 2}]},\n\n \"1\"\n: {}\n}";
        assert_eq!(
            top_level_key_lines(text),
            vec![("0".to_string(), 2), ("1".to_string(), 4)]
        );
    }

    #[test]
    fn lines_handles_crlf_and_final_newline() {
        let v: Vec<_> = lines(b"a\r\nb\n\nc\n").collect();
        assert_eq!(
            v,
            vec![
                (1, &b"a"[..]),
                (2, &b"b"[..]),
                (3, &b""[..]),
                (4, &b"c"[..])
            ]
        );
        assert_eq!(lines(b"").count(), 0);
    }

    #[test]
    fn latin1_fallback() {
        assert_eq!(utf8_or_latin1(b"Mis\xe9rables"), "Misérables");
        assert_eq!(utf8_or_latin1("Misérables".as_bytes()), "Misérables");
    }
}
