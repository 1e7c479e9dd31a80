//! Records that `--skip-invalid` left out of a catalog or an interactions file.
//!
//! Real catalogs carry a few broken records (an Amazon catalog with an empty title, a
//! line cut short by an export). Failing the whole run for one of them is the safe
//! default; with `--skip-invalid` each bad record is dropped instead, and this list says
//! which (file line, id when known, the error it would have raised), so that nothing is
//! lost silently: `tokenize` writes it to `skipped.jsonl` beside the SIDs and both
//! `tokenize` and `train` print the count.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One record left out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// 1-based line of the record in its file (0 when the record has no line).
    pub line: usize,
    /// The record's id, when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The error the record would have raised without `--skip-invalid`.
    pub reason: String,
}

/// Collects skipped records, or turns the first bad one into the error when skipping is
/// off: readers call [`Skips::take`] wherever a record is bad and carry on when it
/// returns `Ok`.
#[derive(Debug, Default)]
pub struct Skips {
    on: bool,
    pub list: Vec<Skipped>,
}

impl Skips {
    pub fn new(on: bool) -> Self {
        Skips {
            on,
            list: Vec::new(),
        }
    }

    /// `Err(err)` when skipping is off; otherwise records the record and returns `Ok`.
    pub fn take<E: std::fmt::Display>(
        &mut self,
        err: E,
        line: usize,
        id: Option<String>,
    ) -> Result<(), E> {
        if !self.on {
            return Err(err);
        }
        self.list.push(Skipped {
            line,
            id,
            reason: err.to_string(),
        });
        Ok(())
    }
}

/// Writes skipped records as JSONL, one per line.
pub fn write_jsonl(list: &[Skipped], path: &Path) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    for s in list {
        serde_json::to_writer(&mut w, s)?;
        w.write_all(b"\n")?;
    }
    w.flush()
}

/// A one-line summary for stderr: the count and the first few records.
pub fn summary(what: &str, list: &[Skipped]) -> String {
    const SHOWN: usize = 3;
    let mut s = format!("skipped {} invalid {what}", list.len());
    for r in list.iter().take(SHOWN) {
        s.push_str(&format!("\n  {}", r.reason));
    }
    if list.len() > SHOWN {
        s.push_str(&format!("\n  ... and {} more", list.len() - SHOWN));
    }
    s
}
