//! Chat examples: a request in words, answered in the format its phrasing asks for.
//!
//! Why: NEO's prompts choose the output format (items, text, or both) as well as the
//! task. A model that has only ever answered with one SID has no reason to write a
//! sentence, and one that has only written profiles never names an item inside text.
//! Each example here takes a request, picks a format at random, wraps the request in a
//! phrasing of that format (`prompts/chat_items.txt`, `chat_text.txt`, `chat_both.txt`),
//! and writes the answer in it:
//!
//! - **items**: up to three SIDs separated by `"; "`, nothing else;
//! - **text**: one sentence naming what fits in plain words (titles and attributes as
//!   the catalog has them), no SID;
//! - **both**: a lead naming what the items have that the request asked for ("Horror
//!   movies from the 1980s:"), then up to three SIDs.
//!
//! Requests come from two places. Per item ([`DataOptions::chat_per_item`]): a lexicon
//! request from the item's own genre and/or decade ([`Lexicon::request_for`]), answered
//! with the item and up to two other items that satisfy it, so every item named is
//! right. Per user ([`DataOptions::chat_per_user`]): "something like {title}" for an item
//! of the user's training part, answered with the one or two items the user took right
//! after it, the collaborative reading of "like". Every text answer is true of the
//! catalog: it names only items that answer the request (satisfy it, or for "like"
//! follow the liked item) with the attributes they have.
//!
//! The whole chat message (request and format words) is also the example's request
//! vector, because at inference the user's message is all there is.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::data::{
    article, decade_of, genres, item_label, item_text, plural, render_random, year, DataError,
    DataOptions, Example, PromptKind, Prompts, Slot, Task,
};
use super::language::{Lexicon, Request};
use crate::artifacts::SidRecord;
use crate::catalog::Catalog;
use crate::interactions::Split;

/// The answer formats, in the order they are drawn.
const FORMATS: [PromptKind; 3] = [
    PromptKind::ChatItems,
    PromptKind::ChatText,
    PromptKind::ChatBoth,
];

/// Items at most in an items or both answer.
const MAX_ITEMS: usize = 3;

/// Item indices per lower-case genre and per decade: the items a request can be
/// answered with.
struct Satisfying {
    by_genre: BTreeMap<String, Vec<u32>>,
    by_decade: BTreeMap<i64, Vec<u32>>,
}

impl Satisfying {
    fn new(catalog: &Catalog) -> Satisfying {
        let mut by_genre: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        let mut by_decade: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
        for (i, item) in catalog.items.iter().enumerate() {
            for g in genres(item) {
                by_genre.entry(g.to_lowercase()).or_default().push(i as u32);
            }
            if let Some(y) = year(item) {
                by_decade.entry(decade_of(y)).or_default().push(i as u32);
            }
        }
        Satisfying {
            by_genre,
            by_decade,
        }
    }

    /// `first`, then up to `MAX_ITEMS - 1` other random items that satisfy `req`.
    fn answer_items(
        &self,
        catalog: &Catalog,
        first: u32,
        req: &Request,
        rng: &mut ChaCha8Rng,
    ) -> Vec<u32> {
        let pool = match (&req.genre, req.decade) {
            (Some(g), _) => self.by_genre.get(&g.to_lowercase()),
            (None, Some(d)) => self.by_decade.get(&d),
            (None, None) => None,
        };
        let mut out = vec![first];
        let Some(pool) = pool else { return out };
        let extra = rng.gen_range(0..MAX_ITEMS);
        // A bounded number of random draws: when the request also names a decade, few of
        // the genre's items may match it, and an answer with fewer items is still right.
        for _ in 0..extra * 8 {
            if out.len() > extra {
                break;
            }
            let &j = pool.choose(rng).unwrap_or(&first);
            if !out.contains(&j) && req.satisfied_by(&catalog.items[j as usize]) {
                out.push(j);
            }
        }
        out
    }
}

/// The lead sentence of a "both" answer to a lexicon request: what the items have that
/// the request asked for, in the catalog's words ("Horror movies from the 1980s:"), so
/// the text says why and is true of every item after it.
fn lead(req: &Request, noun: &str) -> String {
    let mut s = match &req.genre {
        Some(g) => format!("{g} {}", plural(noun)),
        None => {
            let p = plural(noun);
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect())
                .unwrap_or(p)
        }
    };
    if let Some(d) = req.decade {
        s.push_str(&format!(" from the {d}s"));
    }
    s + ":"
}

/// Builds the chat examples (see the module documentation) into `out`.
pub fn build(
    catalog: &Catalog,
    sids: &[SidRecord],
    split: &Split,
    prompts: &Prompts,
    opts: &DataOptions,
    rng: &mut ChaCha8Rng,
    out: &mut Vec<Example>,
) -> Result<(), DataError> {
    let lexicon = Lexicon::builtin();
    let sat = Satisfying::new(catalog);
    let sid_list = |items: &[u32]| {
        items
            .iter()
            .map(|&i| sids[i as usize].sid.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    };
    let text_of = |i: u32| item_text(&catalog.items[i as usize], opts.max_title_words);
    for (i, item) in catalog.items.iter().enumerate() {
        let noun = item.item_type.replace('_', " ");
        for _ in 0..opts.chat_per_item {
            let Some(req) = lexicon.request_for(item, rng) else {
                continue;
            };
            let items = sat.answer_items(catalog, i as u32, &req, rng);
            let kind = *FORMATS.choose(rng).unwrap_or(&PromptKind::ChatBoth);
            let answer = match kind {
                PromptKind::ChatItems => sid_list(&items),
                PromptKind::ChatText => text_answer(&items, &noun, &text_of),
                _ => format!("{} {}", lead(&req, &noun), sid_list(&items)),
            };
            push(prompts, kind, &req.text, &noun, answer, None, rng, out)?;
        }
    }
    for (u, train) in split.train.iter().enumerate() {
        if train.len() < 2 {
            continue;
        }
        for _ in 0..opts.chat_per_user {
            let p = rng.gen_range(0..train.len() - 1);
            let liked = &catalog.items[train[p] as usize];
            let title = item_label(liked, opts.max_title_words);
            let Some(request) = lexicon.like(&title, rng) else {
                break;
            };
            let next: Vec<u32> = train[p + 1..].iter().copied().take(2).collect();
            let noun = catalog.items[next[0] as usize].item_type.replace('_', " ");
            let kind = *FORMATS.choose(rng).unwrap_or(&PromptKind::ChatBoth);
            let answer = match kind {
                PromptKind::ChatItems => sid_list(&next),
                PromptKind::ChatText => format!(
                    "People who liked {title} went on to {}.",
                    and_or(&next.iter().map(|&i| text_of(i)).collect::<Vec<_>>())
                ),
                _ => format!("After {title}, people took: {}", sid_list(&next)),
            };
            push(
                prompts,
                kind,
                &request,
                &noun,
                answer,
                Some(u as u32),
                rng,
                out,
            )?;
        }
    }
    Ok(())
}

/// "Try Fargo (1996), Crime, Drama, Thriller." or "Try A or B." for several items.
fn text_answer(items: &[u32], noun: &str, text_of: &dyn Fn(u32) -> String) -> String {
    let texts: Vec<String> = items.iter().map(|&i| text_of(i)).collect();
    match texts.len() {
        1 => format!("Try {}.", texts[0]),
        _ => format!(
            "Try {}: {}.",
            plural_count(texts.len(), noun),
            texts.join("; ")
        ),
    }
}

fn plural_count(n: usize, noun: &str) -> String {
    let words = ["no", "one", "two", "three"];
    let n_word = words.get(n).copied().unwrap_or("some");
    if n == 1 {
        format!("{} {noun}", article(noun))
    } else {
        format!("{n_word} {}", plural(noun))
    }
}

fn and_or(parts: &[String]) -> String {
    match parts {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} or {last}", rest.join("; ")),
    }
}

#[allow(clippy::too_many_arguments)]
fn push(
    prompts: &Prompts,
    kind: PromptKind,
    request: &str,
    noun: &str,
    answer: String,
    user: Option<u32>,
    rng: &mut ChaCha8Rng,
    out: &mut Vec<Example>,
) -> Result<(), DataError> {
    let values = [(Slot::Query, request), (Slot::Type, noun)];
    if let Some(prompt) = render_random(prompts, kind, &values, rng)? {
        out.push(Example {
            task: Task::Chat,
            request: Some(prompt.clone()),
            prompt,
            context: String::new(),
            answer,
            user,
            taste: Vec::new(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leads_name_what_was_asked() {
        let req = |genre: Option<&str>, decade: Option<i64>| Request {
            text: String::new(),
            genre: genre.map(String::from),
            decade,
        };
        assert_eq!(
            lead(&req(Some("Horror"), Some(1980)), "movie"),
            "Horror movies from the 1980s:"
        );
        assert_eq!(
            lead(&req(None, Some(1990)), "movie"),
            "Movies from the 1990s:"
        );
        assert_eq!(lead(&req(Some("Sci-Fi"), None), "movie"), "Sci-Fi movies:");
    }
}
