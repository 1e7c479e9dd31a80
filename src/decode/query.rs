//! Reading the attribute words of a request (`a 90s comedy`) as limits.
//!
//! A small model follows the words of a request only loosely (`sidrec eval` measures how
//! loosely), while the catalog knows exactly which items are comedies from the 1990s.
//! So the words that name the catalog's own attribute values become filter clauses, and
//! the model ranks within them: `90s` → `year>=1990, year<=1999`, `comedies` →
//! `genre=Comedy`, `lab tape` → `categories=Lab Tape`, `by 3M` → `brand=3M`. Only values
//! the catalog has are read, as whole words; nothing else is guessed, and the words stay
//! in the prompt as well. Callers show what was read (the CLI prints it, the API returns
//! it) and can turn it off (`--literal`).

use std::collections::BTreeSet;

use serde_json::Value;

use crate::catalog::Catalog;

/// One reading: the words and the clause they became.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Reading {
    pub words: String,
    pub clause: String,
}

/// Lower-case words joined by single spaces, punctuation other than `'` dropped.
pub fn normalize(s: &str) -> String {
    s.to_lowercase()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '\'' {
                c
            } else {
                ' '
            }
        })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `phrase` occurs in `text` as whole words (both normalized).
fn has_phrase(text: &str, phrase: &str) -> bool {
    if phrase.is_empty() {
        return false;
    }
    text.match_indices(phrase).any(|(at, _)| {
        let before = at == 0 || text.as_bytes()[at - 1] == b' ';
        let end = at + phrase.len();
        let after = end == text.len() || text.as_bytes()[end] == b' ';
        before && after
    })
}

/// The forms a value may be written in: as is, plural, and a few everyday synonyms of
/// genre names.
fn forms(value: &str) -> Vec<String> {
    let v = normalize(value);
    let mut out = vec![v.clone()];
    if let Some(stem) = v.strip_suffix('y') {
        out.push(format!("{stem}ies"));
    } else if v.ends_with("'s") {
    } else if let Some(stem) = v.strip_suffix('s') {
        out.push(stem.to_string());
    } else {
        out.push(format!("{v}s"));
    }
    let synonyms: &[(&str, &[&str])] = &[
        ("sci fi", &["scifi", "science fiction"]),
        ("children's", &["kids", "family", "children"]),
        ("animation", &["animated", "cartoon", "cartoons"]),
        ("romance", &["romantic"]),
        ("film noir", &["noir"]),
        ("musical", &["musicals"]),
    ];
    for (name, syn) in synonyms {
        if v == *name {
            out.extend(syn.iter().map(|s| s.to_string()));
        }
    }
    out
}

/// Decades and year bounds: `90s`, `1990s`, `nineties` → the decade; `before 1980`,
/// `after 1990`, `since 1990` → a bound.
fn year_clauses(text: &str) -> Vec<Reading> {
    const NAMED: [(&str, i64); 6] = [
        ("fifties", 1950),
        ("sixties", 1960),
        ("seventies", 1970),
        ("eighties", 1980),
        ("nineties", 1990),
        ("twenties", 1920),
    ];
    let words: Vec<&str> = text.split(' ').collect();
    let mut out = Vec::new();
    for (i, w) in words.iter().enumerate() {
        let decade = NAMED
            .iter()
            .find(|(n, _)| n == w)
            .map(|&(_, d)| d)
            .or_else(|| {
                let digits = w.strip_suffix("'s").or_else(|| w.strip_suffix('s'))?;
                let n: i64 = digits.parse().ok()?;
                match digits.len() {
                    2 if n % 10 == 0 => Some(if n >= 30 { 1900 + n } else { 2000 + n }),
                    4 if n % 10 == 0 && (1800..2100).contains(&n) => Some(n),
                    _ => None,
                }
            });
        if let Some(d) = decade {
            out.push(Reading {
                words: w.to_string(),
                clause: format!("year>={d}, year<={}", d + 9),
            });
            continue;
        }
        let year = w
            .parse::<i64>()
            .ok()
            .filter(|y| w.len() == 4 && (1800..2100).contains(y));
        if let (Some(y), Some(prev)) = (year, i.checked_sub(1).map(|p| words[p])) {
            let clause = match prev {
                "before" => format!("year<{y}"),
                "after" => format!("year>{y}"),
                "since" => format!("year>={y}"),
                _ => continue,
            };
            out.push(Reading {
                words: format!("{prev} {y}"),
                clause,
            });
        }
    }
    out
}

/// The clauses `query` names in `catalog`'s terms: decades and year bounds (if items
/// have a `year`), genres and categories anywhere, brands after "by" or "from".
pub fn read_attributes(query: &str, catalog: &Catalog) -> Vec<Reading> {
    let text = normalize(query);
    if text.is_empty() {
        return Vec::new();
    }
    let mut values: BTreeSet<(&'static str, String)> = BTreeSet::new();
    let mut has_year = false;
    for it in &catalog.items {
        has_year |= it.attrs.contains_key("year");
        for key in ["genre", "categories", "brand"] {
            let strings: Vec<&str> = match it.attrs.get(key) {
                Some(Value::String(s)) => vec![s.as_str()],
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            for s in strings {
                let s = s.trim();
                if s.chars().filter(|c| c.is_alphanumeric()).count() >= 2
                    && !s.eq_ignore_ascii_case("unknown")
                {
                    values.insert((key, s.to_string()));
                }
            }
        }
    }
    let mut out = Vec::new();
    if has_year {
        out.extend(year_clauses(&text));
    }
    for (key, value) in &values {
        let found = if *key == "brand" {
            let b = normalize(value);
            ["by", "from"]
                .iter()
                .map(|p| format!("{p} {b}"))
                .find(|p| has_phrase(&text, p))
        } else {
            forms(value).into_iter().find(|f| has_phrase(&text, f))
        };
        if let Some(words) = found {
            // A value inside a longer value that also matched (`tape` in `lab tape`)
            // adds nothing.
            out.push(Reading {
                words,
                clause: format!("{key}={value}"),
            });
        }
    }
    let all: Vec<String> = out.iter().map(|r| r.words.clone()).collect();
    out.retain(|r| {
        !all.iter()
            .any(|w| w.len() > r.words.len() && has_phrase(w, &r.words))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Item;

    fn item(id: &str, attrs: serde_json::Value) -> Item {
        Item {
            id: id.into(),
            item_type: "movie".into(),
            title: id.into(),
            description: String::new(),
            attrs: attrs.as_object().cloned().unwrap_or_default(),
        }
    }

    fn clauses(q: &str, c: &Catalog) -> Vec<String> {
        read_attributes(q, c)
            .into_iter()
            .map(|r| r.clause)
            .collect()
    }

    #[test]
    fn genres_decades_and_bounds() {
        let c = Catalog::from_items(vec![
            item(
                "a",
                serde_json::json!({"year": 1995, "genre": ["Comedy", "Sci-Fi"]}),
            ),
            item(
                "b",
                serde_json::json!({"year": 1977, "genre": ["War", "Children's"]}),
            ),
        ])
        .unwrap();
        assert_eq!(
            clauses("a 90s comedy like nothing else", &c),
            ["year>=1990, year<=1999", "genre=Comedy"]
        );
        assert_eq!(
            clauses("Comedies from the 1970's", &c),
            ["year>=1970, year<=1979", "genre=Comedy"]
        );
        assert_eq!(
            clauses("science fiction before 1980", &c),
            ["year<1980", "genre=Sci-Fi"]
        );
        assert_eq!(
            clauses("something for kids, since 1990", &c),
            ["year>=1990", "genre=Children's"]
        );
        assert_eq!(
            clauses("a war movie from the eighties", &c),
            ["year>=1980, year<=1989", "genre=War"]
        );
        // Whole words only; numbers that are not decades or bounded years are not read.
        assert!(clauses("a warm hug", &c).is_empty());
        assert!(clauses("top 10 from 1995 or 95", &c).is_empty());
        assert!(clauses("", &c).is_empty());
    }

    #[test]
    fn categories_and_brands() {
        let c = Catalog::from_items(vec![
            item(
                "a",
                serde_json::json!({"categories": ["Lab Tape", "Tape"], "brand": "3M"}),
            ),
            item(
                "b",
                serde_json::json!({"categories": ["Pipettes"], "brand": "Eppendorf"}),
            ),
        ])
        .unwrap();
        // The longer category wins over the one inside it; no year attribute, no year
        // clause; brands only after "by"/"from".
        assert_eq!(
            clauses("lab tape by 3M in the 90s", &c),
            ["brand=3M", "categories=Lab Tape"]
        );
        assert_eq!(clauses("a pipette", &c), ["categories=Pipettes"]);
        assert!(clauses("eppendorf", &c).is_empty());
    }
}
