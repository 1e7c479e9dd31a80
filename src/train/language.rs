//! Requests in words: what training data says when it asks for an item by its genre or
//! decade, phrased many ways.
//!
//! Why: a model taught only `a 1990s comedy movie` reads only that; users write
//! "something funny from the nineties" or "a film that makes me laugh". The lexicon in
//! `prompts/requests/` gives each genre name many paraphrases (moods, sub-genres,
//! audiences) and each decade several forms, and `frames.txt` the sentences they fill.
//! A request is drawn for an item from its own attributes, so the item is a right answer
//! to it; over the catalog, a request's answers are spread over the items that satisfy
//! it. The sentence encoder's vector of the request (the model's soft prompt) carries
//! the language the lexicon does not list; the held-out phrasings of
//! `tests/data/requests/` measure that, and a test checks they never occur here.
//!
//! Files (compiled in; `#` lines and blank lines skipped):
//!
//! - `genres.txt`: `Genre Name: phrase | phrase | …` (the name as the catalog spells
//!   it, matched case-insensitively);
//! - `decades.txt`: `1980: the 1980s | the eighties | …`;
//! - `frames.txt`: sentences with `{genre}`, `{decade}` and `{type}` slots; a frame is
//!   used for items that have a value for each slot it names.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::Rng;

use super::data::{genres, year, DataError};
use crate::catalog::Item;

const GENRES: &str = include_str!("../../prompts/requests/genres.txt");
const DECADES: &str = include_str!("../../prompts/requests/decades.txt");
const FRAMES: &str = include_str!("../../prompts/requests/frames.txt");
const LIKES: &str = include_str!("../../prompts/requests/likes.txt");

/// A request in words and what it asks for: an item satisfies it when it has the genre
/// (if any) and is from the decade (if any).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub text: String,
    /// The genre asked for, as the catalog spells it.
    pub genre: Option<String>,
    /// The decade asked for (1980 for the 1980s).
    pub decade: Option<i64>,
}

impl Request {
    /// Whether `item` is a right answer: it has the genre and is from the decade.
    pub fn satisfied_by(&self, item: &Item) -> bool {
        super::data::has_genre_and_decade(item, self.genre.as_deref(), self.decade)
    }
}

/// The request lexicon.
#[derive(Clone, Debug, Default)]
pub struct Lexicon {
    /// Lower-cased genre name → paraphrases.
    genres: BTreeMap<String, Vec<String>>,
    /// Decade (its first year) → forms.
    decades: BTreeMap<i64, Vec<String>>,
    /// Frames by the slots they name: genre only, decade only, both.
    frames: [Vec<String>; 3],
    /// Requests for something like a named item: sentences with a `{title}` slot.
    likes: Vec<String>,
}

const GENRE_ONLY: usize = 0;
const DECADE_ONLY: usize = 1;
const BOTH: usize = 2;

fn lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

fn bad(file: &str, line: usize, message: impl Into<String>) -> DataError {
    DataError::Prompt {
        path: format!("prompts/requests/{file}").into(),
        line,
        column: 1,
        message: message.into(),
    }
}

/// One `name: phrase | phrase` line: its number, the name and the phrases.
type Entry<'a> = (usize, &'a str, Vec<String>);

fn entries<'a>(file: &str, text: &'a str) -> Result<Vec<Entry<'a>>, DataError> {
    let mut out = Vec::new();
    for (n, line) in lines(text) {
        let (key, rest) = line
            .split_once(':')
            .ok_or_else(|| bad(file, n, "expected `name: phrase | phrase | …`"))?;
        let phrases: Vec<String> = rest
            .split('|')
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect();
        if phrases.is_empty() {
            return Err(bad(file, n, "no phrase after the colon"));
        }
        out.push((n, key.trim(), phrases));
    }
    Ok(out)
}

impl Lexicon {
    /// The lexicon compiled in from `prompts/requests/`, parsed once per process
    /// (every training build and test asks for it).
    pub fn builtin() -> &'static Lexicon {
        static BUILTIN: std::sync::OnceLock<Lexicon> = std::sync::OnceLock::new();
        // The files are checked by a unit test; a broken edit fails it.
        BUILTIN.get_or_init(|| {
            Lexicon::parse(GENRES, DECADES, FRAMES)
                .and_then(|l| l.with_likes(LIKES))
                .unwrap_or_default()
        })
    }

    pub fn parse(genres_txt: &str, decades_txt: &str, frames_txt: &str) -> Result<Self, DataError> {
        let mut lex = Lexicon::default();
        for (_, key, phrases) in entries("genres.txt", genres_txt)? {
            lex.genres.insert(key.to_lowercase(), phrases);
        }
        for (n, key, forms) in entries("decades.txt", decades_txt)? {
            let decade: i64 = key
                .parse()
                .ok()
                .filter(|d: &i64| d.rem_euclid(10) == 0)
                .ok_or_else(|| bad("decades.txt", n, format!("{key:?} is not a decade")))?;
            lex.decades.insert(decade, forms);
        }
        for (n, frame) in lines(frames_txt) {
            let (g, d) = (frame.contains("{genre}"), frame.contains("{decade}"));
            let rest = frame
                .replace("{genre}", "")
                .replace("{decade}", "")
                .replace("{type}", "");
            if rest.contains('{') || rest.contains('}') {
                return Err(bad(
                    "frames.txt",
                    n,
                    "unknown slot (slots: genre, decade, type)",
                ));
            }
            match (g, d) {
                (true, false) => lex.frames[GENRE_ONLY].push(frame.to_string()),
                (false, true) => lex.frames[DECADE_ONLY].push(frame.to_string()),
                (true, true) => lex.frames[BOTH].push(frame.to_string()),
                (false, false) => {
                    return Err(bad("frames.txt", n, "a frame needs {genre} or {decade}"))
                }
            }
        }
        Ok(lex)
    }

    /// Every phrase, form and frame: what training can say (for the held-out check).
    /// Adds the sentences of `likes.txt`: one per line, each with one `{title}` slot.
    pub fn with_likes(mut self, likes_txt: &str) -> Result<Self, DataError> {
        for (n, line) in lines(likes_txt) {
            if line.matches("{title}").count() != 1 || line.replace("{title}", "").contains('{') {
                return Err(bad("likes.txt", n, "a line needs exactly one {title} slot"));
            }
            self.likes.push(line.to_string());
        }
        Ok(self)
    }

    /// A request for something like the item titled `title` (`None` without sentences).
    pub fn like(&self, title: &str, rng: &mut impl Rng) -> Option<String> {
        let line = self.likes.choose(rng)?;
        Some(line.replace("{title}", title))
    }

    pub fn texts(&self) -> Vec<String> {
        let mut out: Vec<String> = self.genres.values().flatten().cloned().collect();
        out.extend(self.decades.values().flatten().cloned());
        out.extend(self.frames.iter().flatten().cloned());
        out.extend(self.likes.iter().cloned());
        out
    }

    /// The lexicon's paraphrases of a genre (case-insensitive name; empty if none).
    pub fn genre_phrases(&self, genre: &str) -> &[String] {
        self.genres
            .get(&genre.to_lowercase())
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The lexicon's forms of a decade (its first year; empty if none).
    pub fn decade_forms(&self, decade: i64) -> &[String] {
        self.decades.get(&decade).map(Vec::as_slice).unwrap_or(&[])
    }

    /// A genre of the item in words: its name or one of the lexicon's paraphrases.
    fn genre_words(&self, genre: &str, noun: &str, rng: &mut impl Rng) -> String {
        let name = genre.to_lowercase();
        let phrases = self.genres.get(&name).map(Vec::as_slice).unwrap_or(&[]);
        // The name itself a third of the time (and always without paraphrases), in one
        // of the ways people write it.
        if phrases.is_empty() || rng.gen_bool(1.0 / 3.0) {
            return match rng.gen_range(0..3) {
                0 => name,
                1 => format!("{} {name} {noun}", super::data::article(&name)),
                _ => format!("{name} {}", super::data::plural(noun)),
            };
        }
        phrases.choose(rng).cloned().unwrap_or(name)
    }

    fn decade_words(&self, year: i64, rng: &mut impl Rng) -> String {
        let decade = super::data::decade_of(year);
        match self.decades.get(&decade).and_then(|f| f.choose(rng)) {
            Some(f) if rng.gen_bool(0.75) => f.clone(),
            _ => format!("the {decade}s"),
        }
    }

    /// A request in words that `item` satisfies: one of its genres, its decade, or both,
    /// in a frame; `None` for items with neither (or a lexicon without frames for what
    /// they have). "unknown" is not a genre anyone asks for.
    pub fn request_for(&self, item: &Item, rng: &mut impl Rng) -> Option<Request> {
        let noun = item.item_type.replace('_', " ");
        let g: Vec<String> = genres(item)
            .into_iter()
            .filter(|g| !g.eq_ignore_ascii_case("unknown"))
            .collect();
        let y = year(item);
        let mut kinds = Vec::new();
        if !g.is_empty() {
            // Genre requests are the most varied: the most common kind.
            kinds.extend([GENRE_ONLY, GENRE_ONLY]);
        }
        if y.is_some() {
            kinds.push(DECADE_ONLY);
        }
        if !g.is_empty() && y.is_some() {
            kinds.push(BOTH);
        }
        kinds.retain(|&k| !self.frames[k].is_empty());
        let &kind = kinds.choose(rng)?;
        let frame = self.frames[kind].choose(rng)?;
        let mut text = frame.replace("{type}", &noun);
        let genre = g.choose(rng).filter(|_| kind != DECADE_ONLY).cloned();
        if let Some(genre) = &genre {
            text = text.replace("{genre}", &self.genre_words(genre, &noun, rng));
        }
        let decade = y.filter(|_| kind != GENRE_ONLY).map(super::data::decade_of);
        if let Some(y) = y.filter(|_| kind != GENRE_ONLY) {
            text = text.replace("{decade}", &self.decade_words(y, rng));
        }
        Some(Request {
            text,
            genre,
            decade,
        })
    }

    /// A request in words that `item` satisfies (its text only; see
    /// [`Lexicon::request_for`]).
    pub fn request(&self, item: &Item, rng: &mut impl Rng) -> Option<String> {
        self.request_for(item, rng).map(|r| r.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn builtin_files_parse() {
        let lex = Lexicon::parse(GENRES, DECADES, FRAMES).unwrap();
        assert!(lex.genres.len() >= 18, "{:?}", lex.genres.keys());
        assert!(lex.decades.contains_key(&1980));
        assert!(lex.frames.iter().all(|f| !f.is_empty()));
    }

    #[test]
    fn requests_come_from_the_items_attributes() {
        let lex = Lexicon::parse(
            "Horror: something scary | a creepy film",
            "1980: the eighties",
            "I want {genre}\n{type}s from {decade}\n{genre} from {decade}",
        )
        .unwrap();
        let item: Item = serde_json::from_str(
            r#"{"id":"1","type":"movie","title":"X","attrs":{"year":1984,"genre":["Horror"]}}"#,
        )
        .unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let r = lex.request(&item, &mut rng).unwrap();
            assert!(!r.contains('{'), "{r}");
            seen.insert(r);
        }
        assert!(seen.contains("I want something scary"), "{seen:?}");
        assert!(seen.contains("movies from the eighties"), "{seen:?}");
        assert!(
            seen.iter().any(|r| r.ends_with("from the 1980s")),
            "{seen:?}"
        );
        let bare: Item = serde_json::from_str(r#"{"id":"2","type":"movie","title":"Y"}"#).unwrap();
        assert_eq!(lex.request(&bare, &mut rng), None);
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let e = Lexicon::parse("Horror something", "", "").unwrap_err();
        assert!(e.to_string().contains("genres.txt:1"), "{e}");
        let e = Lexicon::parse("", "198: x", "").unwrap_err();
        assert!(e.to_string().contains("decades.txt:1"), "{e}");
        let e = Lexicon::parse("", "", "# c\nI want {mood}").unwrap_err();
        assert!(e.to_string().contains("frames.txt:2"), "{e}");
    }
}
