//! Answer format from words: asked in chat for items, text or both, does the answer
//! have that form?
//!
//! Each held-out request is wrapped in a held-out format phrasing (a file of
//! `items: …{request}…` lines, `tests/data/requests/formats.txt`), one per format in
//! turn, and answered in chat mode with the format left to the model
//! ([`Format::Auto`]): the decoder lets it write text or open an item at every step, so
//! the form of the answer is the model's own reading of the words. An answer is
//! **items** when it names at least one item and its text between them has no word,
//! **text** when it names none and has a word, **both** when it has items and words.
//! The items named are also checked against the request (genre, decade).

use std::path::Path;

use serde::Serialize;

use super::language::HeldOut;
use super::EvalError;
use crate::decode::{Engine, GenConfig, Mode, Output, Request};
use crate::progress::Progress;

/// The three answer forms, as written at the start of a format line.
pub const FORMS: [&str; 3] = ["items", "text", "both"];

/// A format phrasing: the form it asks for and its text with `{request}`.
#[derive(Clone, Debug, PartialEq)]
pub struct FormatPhrasing {
    pub form: &'static str,
    pub text: String,
}

/// Reads a format file: `form: phrasing with {request}` per line, `#` comments and
/// blank lines skipped; every form needs at least one phrasing.
pub fn load_formats(path: &Path) -> Result<Vec<FormatPhrasing>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let bad = |line: usize, reason: String| EvalError::Requests {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (form, rest) = line
            .split_once(':')
            .ok_or_else(|| bad(n + 1, "expected `items|text|both: phrasing`".into()))?;
        let form = FORMS.iter().find(|f| **f == form.trim()).ok_or_else(|| {
            bad(
                n + 1,
                format!("unknown form {:?} (items, text, both)", form),
            )
        })?;
        if rest.matches("{request}").count() != 1 {
            return Err(bad(n + 1, "a phrasing needs exactly one {request}".into()));
        }
        out.push(FormatPhrasing {
            form,
            text: rest.trim().to_string(),
        });
    }
    for f in FORMS {
        if !out.iter().any(|p| p.form == f) {
            return Err(bad(0, format!("no phrasing asks for {f}")));
        }
    }
    Ok(out)
}

/// Titles written in `text` (each `(year)` closes one) and how many of them end a
/// catalog label there.
fn titles_in(text: &str, labels: &[String]) -> (usize, usize) {
    let b = text.as_bytes();
    let (mut n, mut real) = (0, 0);
    for (i, _) in text.match_indices('(') {
        let year = b
            .get(i + 1..i + 5)
            .is_some_and(|y| y.iter().all(u8::is_ascii_digit));
        if !(year && b.get(i + 5) == Some(&b')')) {
            continue;
        }
        n += 1;
        let upto = &text[..i + 6];
        real += usize::from(
            labels
                .iter()
                .any(|l| l.len() > 7 && upto.ends_with(l.as_str())),
        );
    }
    (n, real)
}

/// The form of an answer: `items`, `text`, `both`, or `empty`.
pub fn form_of(answer: &[Output]) -> &'static str {
    let items = answer.iter().any(|o| matches!(o, Output::Item(_)));
    let words = answer.iter().any(|o| match o {
        Output::Text { text } => text.chars().any(char::is_alphabetic),
        Output::Item(_) => false,
    });
    match (items, words) {
        (true, false) => "items",
        (false, true) => "text",
        (true, true) => "both",
        (false, false) => "empty",
    }
}

/// Per asked form: how many answers, how many in that form, what the others were.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FormResult {
    pub asked: String,
    pub answers: usize,
    /// Share of answers in the asked form.
    pub right_form: f64,
    /// Answers per form given (items, text, both, empty).
    pub given: Vec<(String, usize)>,
    /// Share of the items named (in items and both answers) that satisfy the request.
    pub items_satisfy: f64,
    /// Titles written in words (`Title (year)` in the text) and how many of them are a
    /// catalog item's label: text is free, so a title in it may be made up.
    pub titles_in_text: usize,
    pub titles_real: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FormatReport {
    pub file: String,
    pub forms: Vec<FormResult>,
    /// One answer per form, as the report shows it.
    pub examples: Vec<(String, String)>,
}

/// Asks every request once per form, with that form's phrasings in turn.
pub fn evaluate(
    engine: &Engine,
    requests: &[HeldOut],
    file: &Path,
    progress: &Progress,
) -> Result<FormatReport, EvalError> {
    let phrasings = load_formats(file)?;
    let catalog = engine.catalog();
    let labels: Vec<String> = catalog
        .items
        .iter()
        .map(|it| crate::train::data::item_label(it, usize::MAX))
        .collect();
    let mut report = FormatReport {
        file: file.display().to_string(),
        ..FormatReport::default()
    };
    let bar = progress.bar((requests.len() * FORMS.len()) as u64, "language: formats");
    for form in FORMS {
        let own: Vec<&FormatPhrasing> = phrasings.iter().filter(|p| p.form == form).collect();
        let mut res = FormResult {
            asked: form.to_string(),
            ..FormResult::default()
        };
        let mut given = std::collections::BTreeMap::new();
        let (mut named, mut right_items) = (0usize, 0usize);
        for (i, r) in requests.iter().enumerate() {
            let message = own[i % own.len()].text.replace("{request}", &r.request);
            let req = Request {
                mode: Mode::Chat,
                query: message.clone(),
                ..Request::default()
            };
            let answer = engine.generate(&req, &GenConfig::default())?;
            let got = form_of(&answer);
            *given.entry(got).or_insert(0usize) += 1;
            for o in &answer {
                if let Output::Text { text } = o {
                    let (n, real) = titles_in(text, &labels);
                    res.titles_in_text += n;
                    res.titles_real += real;
                }
                if let Output::Item(rec) = o {
                    named += 1;
                    let item = engine.index_of(&rec.id).map(|i| &catalog.items[i as usize]);
                    right_items += usize::from(item.is_some_and(|it| r.satisfied_by(it)));
                }
            }
            if i == 0 {
                report
                    .examples
                    .push((message, crate::decode::engine::render_outputs(&answer)));
            }
            bar.inc(1);
        }
        res.answers = requests.len();
        res.right_form = given.get(form).copied().unwrap_or(0) as f64 / res.answers.max(1) as f64;
        res.given = ["items", "text", "both", "empty"]
            .iter()
            .map(|f| (f.to_string(), given.get(f).copied().unwrap_or(0)))
            .collect();
        res.items_satisfy = right_items as f64 / named.max(1) as f64;
        report.forms.push(res);
    }
    bar.finish_and_clear();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::engine::Recommendation;

    fn item() -> Output {
        Output::Item(Recommendation {
            rank: 1,
            id: "1".into(),
            title: "Fargo".into(),
            item_type: "movie".into(),
            score: 0.0,
            sid: "<movie><a_1>".into(),
        })
    }

    fn text(t: &str) -> Output {
        Output::Text { text: t.into() }
    }

    #[test]
    fn forms_are_read_from_the_answer() {
        assert_eq!(form_of(&[item(), text("; "), item()]), "items");
        assert_eq!(form_of(&[text("Try Fargo (1996), Crime.")]), "text");
        assert_eq!(form_of(&[text("Some picks:"), item()]), "both");
        assert_eq!(form_of(&[text(" . ")]), "empty");
        assert_eq!(form_of(&[]), "empty");
    }

    #[test]
    fn titles_in_text_are_checked_against_the_catalog() {
        let labels = vec!["Fargo (1996)".to_string(), "Scream (1996)".to_string()];
        assert_eq!(
            titles_in("Try Fargo (1996), Crime; Screamer (1996).", &labels),
            (2, 1)
        );
        assert_eq!(titles_in("Mostly 1990s (no year) movies", &labels), (0, 0));
    }

    #[test]
    fn format_files_name_line_and_reason() {
        let dir = std::env::temp_dir().join(format!("sidrec-formats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("formats.txt");
        std::fs::write(
            &f,
            "# c\nitems: {request}, a list\ntext: {request} in words\n",
        )
        .unwrap();
        let e = load_formats(&f).unwrap_err().to_string();
        assert!(e.contains("no phrasing asks for both"), "{e}");
        std::fs::write(&f, "items: {request}\nprose: {request}\n").unwrap();
        let e = load_formats(&f).unwrap_err().to_string();
        assert!(e.contains(":2") && e.contains("unknown form"), "{e}");
        std::fs::write(&f, "items: a list\n").unwrap();
        let e = load_formats(&f).unwrap_err().to_string();
        assert!(e.contains(":1") && e.contains("{request}"), "{e}");
        std::fs::write(&f, "items: {request}\ntext: {request}.\nboth: {request}!\n").unwrap();
        assert_eq!(load_formats(&f).unwrap().len(), 3);
        std::fs::remove_dir_all(&dir).ok();
    }
}
