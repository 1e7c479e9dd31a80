//! Items named in words: history entries given as ids or titles, titles read out of a
//! request ("like Toy Story"), and the loose title search behind both. The engine's
//! catalog is the only source; nothing here touches the model.

use super::*;

impl Engine {
    /// One history entry (an id or a title) as a catalog item. Unknown or ambiguous
    /// titles are errors that say so and list the candidates.
    pub fn resolve_item(&self, entry: &str) -> std::result::Result<ItemIdx, DecodeError> {
        let found = self.find_items(entry, 6);
        match found.as_slice() {
            [one] => Ok(*one),
            [] => Err(DecodeError::Invalid(format!(
                "no item matches {entry:?} (by id or title)"
            ))),
            many => {
                let items = &self.catalog.items;
                let exact: Vec<ItemIdx> = many
                    .iter()
                    .copied()
                    .filter(|&i| items[i as usize].title.eq_ignore_ascii_case(entry.trim()))
                    .collect();
                if let [one] = exact.as_slice() {
                    return Ok(*one);
                }
                let list: Vec<String> = many
                    .iter()
                    .map(|&i| {
                        let it = &items[i as usize];
                        format!("{} ({})", it.title, it.id)
                    })
                    .collect();
                Err(DecodeError::Invalid(format!(
                    "{entry:?} matches several items: {}; use an id",
                    list.join(", ")
                )))
            }
        }
    }

    /// Reads what a request says in words into its limits, as a person means them:
    /// titles after "like" join the history ([`Engine::read_titles_in_query`]) and the
    /// catalog's attribute values (genres, decades, categories, brands) become filter
    /// clauses ([`read_attributes`]) added to the request's own. The words stay in the
    /// prompt. A reading that would leave no item allowed is dropped. Returns what was
    /// read, for the caller to show. Only recommend, search and auto requests are read.
    pub fn read_request(&self, req: &mut Request) -> Vec<Reading> {
        if !matches!(req.mode, Mode::Auto | Mode::Recommend | Mode::Search) {
            return Vec::new();
        }
        let mut out: Vec<Reading> = self
            .read_titles_in_query(req)
            .into_iter()
            .map(|i| {
                let it = &self.catalog.items[i as usize];
                Reading {
                    words: data::item_label(it, 12),
                    clause: format!("history+={}", it.id),
                }
            })
            .collect();
        let attrs = read_attributes(&req.query, &self.catalog);
        if attrs.is_empty() {
            return out;
        }
        let mut clauses: Vec<String> = req.filter.iter().cloned().collect();
        clauses.extend(attrs.iter().map(|r| r.clause.clone()));
        let expr = clauses.join(", ");
        let keeps_some = Filter::parse(&expr, &self.catalog)
            .map(|f| self.catalog.items.iter().any(|i| f.matches(i)))
            .unwrap_or(false);
        if keeps_some {
            req.filter = Some(expr);
            out.extend(attrs);
        }
        out
    }

    /// Reads items the request names by title after "like", "similar to" or "such as"
    /// (`a 90s comedy like Toy Story and Aladdin`) into its history, and leaves the rest
    /// of the words as the query (`a 90s comedy`), so the model gets what it was trained
    /// on: a history plus a request in words. The named items are excluded from the
    /// answer (a user asking for films like Toy Story has seen it). Only recommend and
    /// auto requests are read; a clause is taken only when every title in it names exactly
    /// one item (by exact title, or a title it begins, shortest first), so free words are
    /// never guessed into items. Returns the items it added.
    pub fn read_titles_in_query(&self, req: &mut Request) -> Vec<ItemIdx> {
        if !matches!(req.mode, Mode::Auto | Mode::Recommend) {
            return Vec::new();
        }
        let q = req.query.clone();
        // ASCII lowering keeps every byte offset, so positions found in `lower` slice `q`.
        let lower = q.to_ascii_lowercase();
        let clause = ["similar to ", "such as ", "like "].iter().find_map(|m| {
            lower.match_indices(m).find_map(|(at, _)| {
                let starts_word = at == 0 || !lower[..at].ends_with(|c: char| c.is_alphanumeric());
                starts_word.then_some((at, at + m.len()))
            })
        });
        let Some((start, tail)) = clause else {
            return Vec::new();
        };
        let mut items = Vec::new();
        for piece in split_titles(&q[tail..]) {
            match self.find_title(piece) {
                Some(i) => items.push(i),
                None => return Vec::new(),
            }
        }
        if items.is_empty() {
            return Vec::new();
        }
        let rest = q[..start]
            .trim()
            .trim_end_matches(|c: char| c == ',' || c.is_whitespace())
            .to_string();
        req.query = rest;
        for &i in &items {
            if !req.history.contains(&i) {
                req.history.push(i);
            }
        }
        req.exclude_seen = true;
        items
    }

    /// The one item a title names: an exact title (with or without its year, leading
    /// article in either place) or, failing that, the shortest title it begins.
    fn find_title(&self, title: &str) -> Option<ItemIdx> {
        let want = normalize(title);
        if want.is_empty() {
            return None;
        }
        let mut prefix: Option<(usize, ItemIdx)> = None;
        for (i, it) in self.catalog.items.iter().enumerate() {
            for form in title_forms(&it.title) {
                if form == want {
                    return Some(i as ItemIdx);
                }
                if form.starts_with(&want) && form.as_bytes().get(want.len()) == Some(&b' ') {
                    let better = prefix.is_none_or(|(len, _)| form.len() < len);
                    if better {
                        prefix = Some((form.len(), i as ItemIdx));
                    }
                }
            }
        }
        prefix.map(|(_, i)| i)
    }

    /// Finds catalog items by id or title: an exact id first, then an exact title
    /// (case-insensitive, with or without the year, a trailing article in front), then the titles containing every
    /// word of `query`, shortest first. At most `limit` results.
    pub fn find_items(&self, query: &str, limit: usize) -> Vec<ItemIdx> {
        let q = query.trim();
        if let Some(i) = self.index_of(q) {
            return vec![i];
        }
        let norm = |s: &str| -> String {
            s.to_lowercase()
                .chars()
                .map(|c| if c.is_alphanumeric() { c } else { ' ' })
                .collect::<String>()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        let nq = norm(q);
        if nq.is_empty() {
            return Vec::new();
        }
        let with_year = |it: &Item| match it.attrs.get("year") {
            Some(y) => norm(&format!("{} {}", it.title, y)),
            None => norm(&it.title),
        };
        // The forms titles are typed in (`the godfather` for `Godfather, The`) count as
        // exact too, as they do for titles read from a request.
        let typed = normalize(q);
        let exact: Vec<ItemIdx> = (0..self.catalog.items.len() as ItemIdx)
            .filter(|&i| {
                let it = &self.catalog.items[i as usize];
                norm(&it.title) == nq
                    || with_year(it) == nq
                    || title_forms(&it.title).contains(&typed)
            })
            .collect();
        if !exact.is_empty() {
            return exact.into_iter().take(limit).collect();
        }
        let words: Vec<&str> = nq.split(' ').collect();
        let mut partial: Vec<(usize, ItemIdx)> = (0..self.catalog.items.len() as ItemIdx)
            .filter_map(|i| {
                let t = with_year(&self.catalog.items[i as usize]);
                let tw: Vec<&str> = t.split(' ').collect();
                words
                    .iter()
                    .all(|w| tw.iter().any(|x| x.starts_with(w)))
                    .then_some((t.len(), i))
            })
            .collect();
        partial.sort();
        partial.into_iter().take(limit).map(|(_, i)| i).collect()
    }
}

/// The forms a person may type a catalog title in: as written, without a trailing
/// `(year)`, and with a trailing article moved to the front (`Godfather, The (1972)` →
/// `the godfather`), all normalized.
fn title_forms(title: &str) -> Vec<String> {
    let t = title.trim();
    let no_year = match t.rfind(" (") {
        Some(p)
            if t.ends_with(')') && t[p + 2..t.len() - 1].chars().all(|c| c.is_ascii_digit()) =>
        {
            &t[..p]
        }
        _ => t,
    };
    let mut forms = vec![normalize(t), normalize(no_year)];
    for art in ["The", "A", "An"] {
        if let Some(head) = no_year.strip_suffix(&format!(", {art}")) {
            forms.push(normalize(&format!("{art} {head}")));
        }
    }
    forms.dedup();
    forms
}

/// The titles in the tail of a "like …" clause: split on commas, `and`, `or`, `&`.
fn split_titles(tail: &str) -> Vec<&str> {
    let tail = tail.trim().trim_end_matches(['.', '!', '?', ' ']);
    let mut out = vec![tail];
    for sep in [",", " and ", " or ", " & "] {
        out = out
            .into_iter()
            .flat_map(|p| p.split(sep))
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
    }
    out
}
