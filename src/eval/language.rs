//! Language steering: requests in words that training never saw (a held-out file such
//! as `tests/data/requests/movielens.jsonl`), asked of the model alone, beside dense
//! retrieval with the same sentence encoder; the same words added to users' histories;
//! and whether the profiles the model writes name the genres the history really has.
//!
//! Why here and not only in a test: the figures are a benchmark of a trained model (the
//! issue's bars: 90% on direct phrasings, 80% on paraphrases), and a test cannot train
//! a model worth measuring.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Accumulator, EvalError, TOP};
use crate::catalog::{Catalog, Item};
use crate::decode::{Engine, Format, GenConfig, Mode, Output, Request};
use crate::embed::{encode_all, BertEncoder};
use crate::model::soft_prompt::REQUEST_TOKENS;
use crate::progress::Progress;
use crate::train::data;
use crate::trie::ItemIdx;

/// One held-out request and what its answers must satisfy.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeldOut {
    pub request: String,
    /// `direct` (names the genre or decade) or `paraphrase` (does not).
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub genre: Option<String>,
    /// The decade's first year.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decade: Option<i64>,
    /// A category the item must have anywhere in its category path (products).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// The item's brand (products).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brand: Option<String>,
}

impl HeldOut {
    /// Whether an item satisfies every constraint of the request.
    pub fn satisfied_by(&self, item: &Item) -> bool {
        let genre_and_decade = data::has_genre_and_decade(item, self.genre.as_deref(), self.decade);
        let category_ok = self.category.as_ref().is_none_or(|c| {
            data::categories(item)
                .iter()
                .any(|x| x.eq_ignore_ascii_case(c))
        });
        let brand_ok = self
            .brand
            .as_ref()
            .is_none_or(|b| data::brand(item).is_some_and(|x| x.eq_ignore_ascii_case(b)));
        genre_and_decade && category_ok && brand_ok
    }
}

/// Reads a held-out request file (JSON lines), naming the file and line of a bad one.
pub fn load_requests(path: &Path) -> Result<Vec<HeldOut>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: HeldOut = serde_json::from_str(line).map_err(|e| EvalError::Requests {
            path: path.to_path_buf(),
            line: n + 1,
            reason: e.to_string(),
        })?;
        if r.genre.is_none() && r.decade.is_none() && r.category.is_none() && r.brand.is_none() {
            return Err(EvalError::Requests {
                path: path.to_path_buf(),
                line: n + 1,
                reason: "a request needs a \"genre\", \"decade\", \"category\" or \"brand\" \
                         to check"
                    .into(),
            });
        }
        out.push(r);
    }
    Ok(out)
}

/// Words alone: the share of top-10 items that satisfy the request, per kind of
/// phrasing.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct WordsResult {
    pub kind: String,
    pub requests: usize,
    /// Share of the catalog that satisfies the requests (mean over requests).
    pub catalog_rate: f64,
    /// The model alone (search mode, the request's words as given).
    pub model: f64,
    /// Dense retrieval: cosine between the request's and each item's text vector.
    pub dense: f64,
}

/// History plus words, on sampled test users.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HistoryWordsResult {
    pub users: usize,
    /// Share of top-10 satisfying a request, from the history alone.
    pub history_only: f64,
    /// The same users with the request's words added.
    pub history_and_words: f64,
    /// Users whose held-out next item satisfies some held-out request.
    pub target_users: usize,
    /// NDCG@10 of those users' next item without and with words it satisfies.
    pub ndcg_without: f64,
    pub ndcg_with: f64,
}

/// Profiles the model writes (`describe`): the genres they name, checked against the
/// history's three most frequent ones.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DescribeResult {
    pub users: usize,
    /// Genre mentions in all profiles.
    pub named: usize,
    /// Share of mentions among the history's top 3 genres.
    pub in_top3: f64,
    /// Share of profiles that name at least one genre.
    pub with_genre: f64,
    /// One example profile, for the report.
    pub example: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LanguageReport {
    pub file: String,
    pub words: Vec<WordsResult>,
    pub history: Option<HistoryWordsResult>,
    pub describe: Option<DescribeResult>,
    pub format: Option<super::format::FormatReport>,
}

/// The top-10 of the model for `req`, as catalog indices.
fn top(engine: &Engine, req: &Request) -> Result<Vec<ItemIdx>, EvalError> {
    Ok(engine.rank(req)?.iter().map(|h| h.item).collect())
}

fn share(catalog: &Catalog, items: &[ItemIdx], r: &HeldOut) -> f64 {
    let ok = items
        .iter()
        .filter(|&&i| r.satisfied_by(&catalog.items[i as usize]))
        .count();
    ok as f64 / items.len().max(1) as f64
}

/// Dense retrieval over the catalog: every item's short text (`Title (year), genres`)
/// and every request through the same encoder, top-10 by cosine.
struct Dense {
    items: Vec<f32>,
    dim: usize,
}

impl Dense {
    fn new(enc: &BertEncoder, catalog: &Catalog, progress: &Progress) -> Result<Self, EvalError> {
        let texts: Vec<String> = catalog
            .items
            .iter()
            .map(|i| data::item_text(i, 10))
            .collect();
        let bar = progress.bar(texts.len() as u64, "dense retrieval: item vectors");
        let e = encode_all(enc, &texts, 64, &mut |d| bar.set_position(d as u64))
            .map_err(|e| EvalError::Encoder(e.to_string()))?;
        bar.finish_and_clear();
        Ok(Dense {
            items: e.data,
            dim: e.d,
        })
    }

    fn top(&self, q: &[f32]) -> Vec<ItemIdx> {
        let mut scored: Vec<(f32, ItemIdx)> = self
            .items
            .chunks_exact(self.dim)
            .enumerate()
            .map(|(i, row)| (row.iter().zip(q).map(|(a, b)| a * b).sum(), i as ItemIdx))
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        scored.into_iter().take(TOP).map(|(_, i)| i).collect()
    }
}

/// The genres a profile names: every catalog genre whose name occurs in the text as a
/// word (case-insensitive), each once.
pub fn named_genres(text: &str, genres: &[String]) -> Vec<String> {
    let lower = text.to_lowercase();
    genres
        .iter()
        .filter(|g| {
            let g = g.to_lowercase();
            lower.match_indices(&g).any(|(at, _)| {
                let before = lower[..at].chars().next_back();
                let after = lower[at + g.len()..].chars().next();
                let edge = |c: Option<char>| c.is_none_or(|c| !c.is_alphanumeric() && c != '-');
                edge(before) && edge(after)
            })
        })
        .cloned()
        .collect()
}

/// Options of [`evaluate`].
pub struct LanguageOptions<'a> {
    pub file: PathBuf,
    /// The sentence encoder of the dense baseline (the one the SIDs were made with).
    pub encoder: PathBuf,
    /// (history, next item) of sampled test users.
    pub users: &'a [(Vec<ItemIdx>, ItemIdx)],
    pub beams: usize,
    /// Held-out format phrasings ([`super::format`]; `None`: no format section).
    pub formats: Option<PathBuf>,
}

/// Runs the language section (see the module documentation).
pub fn evaluate(
    engine: &Engine,
    opts: &LanguageOptions,
    progress: &Progress,
) -> Result<LanguageReport, EvalError> {
    let requests = load_requests(&opts.file)?;
    let catalog = engine.catalog();
    let enc = BertEncoder::from_dir(&opts.encoder, REQUEST_TOKENS)
        .map_err(|e| EvalError::Encoder(e.to_string()))?;
    let dense = Dense::new(&enc, catalog, progress)?;
    let texts: Vec<String> = requests.iter().map(|r| r.request.clone()).collect();
    let qv =
        encode_all(&enc, &texts, 64, &mut |_| {}).map_err(|e| EvalError::Encoder(e.to_string()))?;
    let ask = |query: &str, history: &[ItemIdx]| Request {
        mode: if history.is_empty() {
            Mode::Search
        } else {
            Mode::Recommend
        },
        query: query.to_string(),
        history: history.to_vec(),
        k: TOP,
        beams: Some(opts.beams.max(TOP)),
        ..Request::default()
    };

    // 1. Words alone.
    let mut by_kind: BTreeMap<String, (usize, [f64; 3])> = BTreeMap::new();
    let bar = progress.bar(requests.len() as u64, "language: words alone");
    for (i, r) in requests.iter().enumerate() {
        let model = top(engine, &ask(&r.request, &[]))?;
        let dense_top = dense.top(qv.row(i));
        let rate = catalog.items.iter().filter(|it| r.satisfied_by(it)).count() as f64
            / catalog.items.len().max(1) as f64;
        let e = by_kind.entry(r.kind.clone()).or_insert((0, [0.0; 3]));
        e.0 += 1;
        e.1[0] += rate;
        e.1[1] += share(catalog, &model, r);
        e.1[2] += share(catalog, &dense_top, r);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let words = by_kind
        .into_iter()
        .map(|(kind, (n, s))| WordsResult {
            kind,
            requests: n,
            catalog_rate: s[0] / n.max(1) as f64,
            model: s[1] / n.max(1) as f64,
            dense: s[2] / n.max(1) as f64,
        })
        .collect();

    // 2. History plus words: each user gets one request (round robin) for the share, and
    // users whose next item satisfies a direct request are ranked with and without it.
    let direct: Vec<&HeldOut> = requests.iter().filter(|r| r.kind == "direct").collect();
    let history = if opts.users.is_empty() || requests.is_empty() {
        None
    } else {
        let bar = progress.bar(opts.users.len() as u64, "language: history + words");
        let (mut base, mut with) = (0.0, 0.0);
        let (mut acc_without, mut acc_with) = (Accumulator::default(), Accumulator::default());
        for (u, (h, target)) in opts.users.iter().enumerate() {
            let r = &requests[u % requests.len()];
            let plain = top(engine, &ask("", h))?;
            base += share(catalog, &plain, r);
            with += share(catalog, &top(engine, &ask(&r.request, h))?, r);
            let item = &catalog.items[*target as usize];
            let fits: Vec<&&HeldOut> = direct.iter().filter(|r| r.satisfied_by(item)).collect();
            if !fits.is_empty() {
                let r = fits[u % fits.len()];
                acc_without.add(&plain, *target);
                acc_with.add(&top(engine, &ask(&r.request, h))?, *target);
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        let n = opts.users.len() as f64;
        let (without, withw) = (acc_without.finish(), acc_with.finish());
        Some(HistoryWordsResult {
            users: opts.users.len(),
            history_only: base / n,
            history_and_words: with / n,
            target_users: without.users,
            ndcg_without: without.ndcg_10,
            ndcg_with: withw.ndcg_10,
        })
    };

    // 3. Profiles.
    let all_genres: Vec<String> = {
        let mut g: Vec<String> = catalog.items.iter().flat_map(data::genres).collect();
        g.sort();
        g.dedup();
        g.retain(|x| !x.eq_ignore_ascii_case("unknown"));
        g
    };
    let describe = if opts.users.is_empty() || all_genres.is_empty() {
        None
    } else {
        let bar = progress.bar(opts.users.len() as u64, "language: profiles");
        let mut res = DescribeResult::default();
        let (mut in_top3, mut with_genre) = (0usize, 0usize);
        for (h, _) in opts.users {
            let req = Request {
                mode: Mode::Describe,
                format: Format::Text,
                history: h.clone(),
                k: TOP,
                ..Request::default()
            };
            let out = engine.generate(&req, &GenConfig::default())?;
            let text: String = out
                .iter()
                .filter_map(|o| match o {
                    Output::Text { text } => Some(text.as_str()),
                    Output::Item(_) => None,
                })
                .collect();
            let named = named_genres(&text, &all_genres);
            let top3 = data::top_genres(catalog, h, 3);
            res.named += named.len();
            in_top3 += named.iter().filter(|g| top3.contains(g)).count();
            with_genre += usize::from(!named.is_empty());
            if res.example.is_empty() {
                res.example = text;
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        res.users = opts.users.len();
        res.in_top3 = in_top3 as f64 / res.named.max(1) as f64;
        res.with_genre = with_genre as f64 / res.users.max(1) as f64;
        Some(res)
    };
    // 4. Answer formats asked in words.
    let format = match &opts.formats {
        Some(f) => Some(super::format::evaluate(engine, &requests, f, progress)?),
        None => None,
    };
    Ok(LanguageReport {
        file: opts.file.display().to_string(),
        words,
        history,
        describe,
        format,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn genres_are_named_as_words() {
        let g: Vec<String> = ["Drama", "War", "Sci-Fi", "Film-Noir", "Children's"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            named_genres(
                "Mostly Drama, Sci-Fi and Children's; mostly 1990s movies.",
                &g
            ),
            ["Drama", "Sci-Fi", "Children's"]
        );
        // "war" inside "software" or "Star Wars" is not the genre; "Noir" alone is not
        // "Film-Noir".
        assert!(named_genres("software, Star Wars, Noir", &g).is_empty());
    }

    #[test]
    fn held_out_requests_check_genre_and_decade() {
        let r = HeldOut {
            request: "a drama from the eighties".into(),
            kind: "direct".into(),
            genre: Some("Drama".into()),
            decade: Some(1980),
            category: None,
            brand: None,
        };
        let item = |y: i64, g: &[&str]| -> Item {
            serde_json::from_value(serde_json::json!({
                "id": "x", "type": "movie", "title": "X", "attrs": {"year": y, "genre": g}
            }))
            .unwrap()
        };
        assert!(r.satisfied_by(&item(1984, &["Drama", "War"])));
        assert!(!r.satisfied_by(&item(1994, &["Drama"])));
        assert!(!r.satisfied_by(&item(1984, &["Comedy"])));
        let tape = HeldOut {
            request: "duct tape from 3M".into(),
            kind: "direct".into(),
            genre: None,
            decade: None,
            category: Some("duct tape".into()),
            brand: Some("3M".into()),
        };
        let product = |brand: &str, cats: &str| -> Item {
            serde_json::from_value(serde_json::json!({
                "id": "p", "type": "product", "title": "P",
                "attrs": {"brand": brand, "categories": cats.split(',').collect::<Vec<_>>()}
            }))
            .unwrap()
        };
        assert!(tape.satisfied_by(&product("3M", "Industrial & Scientific,Tapes,Duct Tape")));
        assert!(!tape.satisfied_by(&product(
            "Gorilla",
            "Industrial & Scientific,Tapes,Duct Tape"
        )));
        assert!(!tape.satisfied_by(&product(
            "3M",
            "Industrial & Scientific,Tapes,Electrical Tape"
        )));
    }
}
