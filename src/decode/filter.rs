//! Attribute filters for requests: `year>=1990`, `genre=Comedy`, `category~Lab`,
//! combined with `,` or ` and ` (all must hold).
//!
//! A clause is `FIELD OP VALUE` with `OP` one of `=`, `!=`, `>=`, `<=`, `>`, `<`, `~`
//! (contains, case-insensitive). `FIELD` is an attribute of the catalog (`attrs`), or
//! `type`, `title`, `id`. Equality and `~` compare text case-insensitively and, on a list
//! attribute (`genre: ["Action", "Comedy"]`), hold when any element matches; `!=` holds
//! when none does. Order comparisons are numeric (a number or a numeric string). An
//! item without the attribute fails every clause on it except `!=`.
//!
//! The filter becomes a trie [`Mask`] (`O(items)`), so it restricts decoding without
//! touching the trie.

use serde_json::Value;

use super::DecodeError;
use crate::catalog::{Catalog, Item};
use crate::trie::{Mask, Trie};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Ge,
    Le,
    Gt,
    Lt,
    Contains,
}

#[derive(Clone, Debug, PartialEq)]
struct Clause {
    field: String,
    op: Op,
    value: String,
    number: Option<f64>,
}

/// A parsed filter expression.
#[derive(Clone, Debug, PartialEq)]
pub struct Filter {
    expr: String,
    clauses: Vec<Clause>,
}

impl Filter {
    /// Parses `expr`; checks that every field exists in `catalog` (a typo would otherwise
    /// silently exclude everything) and that order comparisons have numeric values.
    pub fn parse(expr: &str, catalog: &Catalog) -> Result<Filter, DecodeError> {
        let err = |reason: String| DecodeError::Filter {
            expr: expr.to_string(),
            reason,
        };
        let normalized = expr
            .replace(" and ", ",")
            .replace(" AND ", ",")
            .replace("&&", ",");
        let mut clauses = Vec::new();
        for part in normalized
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            // Longest operators first, so `>=` is not read as `>`.
            const OPS: [(&str, Op); 7] = [
                (">=", Op::Ge),
                ("<=", Op::Le),
                ("!=", Op::Ne),
                ("=", Op::Eq),
                (">", Op::Gt),
                ("<", Op::Lt),
                ("~", Op::Contains),
            ];
            let found = OPS
                .iter()
                .filter_map(|&(sym, op)| part.find(sym).map(|i| (i, sym, op)))
                .min_by_key(|&(i, sym, _)| (i, std::cmp::Reverse(sym.len())));
            let Some((i, sym, op)) = found else {
                return Err(err(format!(
                    "{part:?} has no operator (use =, !=, >=, <=, >, < or ~)"
                )));
            };
            let field = part[..i].trim().to_string();
            let value = part[i + sym.len()..].trim().trim_matches('"').to_string();
            if field.is_empty() || value.is_empty() {
                return Err(err(format!("{part:?} needs a field and a value")));
            }
            if !known_field(catalog, &field) {
                let mut fields: Vec<String> = catalog
                    .items
                    .iter()
                    .flat_map(|i| i.attrs.keys().cloned())
                    .collect();
                fields.sort();
                fields.dedup();
                return Err(err(format!(
                    "no item has a field {field:?} (fields: type, title, id{}{})",
                    if fields.is_empty() { "" } else { ", " },
                    fields.join(", ")
                )));
            }
            let number = value.parse::<f64>().ok();
            if matches!(op, Op::Ge | Op::Le | Op::Gt | Op::Lt) && number.is_none() {
                return Err(err(format!("{sym} needs a number, not {value:?}")));
            }
            clauses.push(Clause {
                field,
                op,
                value,
                number,
            });
        }
        if clauses.is_empty() {
            return Err(err("empty filter".into()));
        }
        Ok(Filter {
            expr: expr.to_string(),
            clauses,
        })
    }

    /// The expression as given.
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// Whether `item` passes every clause.
    pub fn matches(&self, item: &Item) -> bool {
        self.clauses.iter().all(|c| c.matches(item))
    }

    /// The mask of the items that pass (catalog index = trie item).
    pub fn mask(&self, trie: &Trie, catalog: &Catalog) -> Mask {
        Mask::from_fn(trie, |i| {
            catalog
                .items
                .get(i as usize)
                .is_some_and(|item| self.matches(item))
        })
    }
}

fn known_field(catalog: &Catalog, field: &str) -> bool {
    matches!(field, "type" | "title" | "id")
        || catalog.items.iter().any(|i| i.attrs.contains_key(field))
}

impl Clause {
    fn matches(&self, item: &Item) -> bool {
        let owned;
        let v: &Value = match self.field.as_str() {
            "type" => {
                owned = Value::String(item.item_type.clone());
                &owned
            }
            "title" => {
                owned = Value::String(item.title.clone());
                &owned
            }
            "id" => {
                owned = Value::String(item.id.clone());
                &owned
            }
            f => match item.attrs.get(f) {
                Some(v) => v,
                None => return self.op == Op::Ne,
            },
        };
        let scalars: Vec<&Value> = match v {
            Value::Array(a) => a.iter().collect(),
            other => vec![other],
        };
        match self.op {
            Op::Eq => scalars.iter().any(|s| self.text_eq(s)),
            Op::Ne => !scalars.iter().any(|s| self.text_eq(s)),
            Op::Contains => {
                let needle = self.value.to_lowercase();
                scalars
                    .iter()
                    .any(|s| text(s).is_some_and(|t| t.to_lowercase().contains(&needle)))
            }
            Op::Ge | Op::Le | Op::Gt | Op::Lt => {
                let want = self.number.unwrap_or(f64::NAN);
                scalars
                    .iter()
                    .filter_map(|s| number(s))
                    .any(|x| match self.op {
                        Op::Ge => x >= want,
                        Op::Le => x <= want,
                        Op::Gt => x > want,
                        _ => x < want,
                    })
            }
        }
    }

    fn text_eq(&self, v: &Value) -> bool {
        match (number(v), self.number) {
            (Some(x), Some(y)) => x == y,
            _ => text(v).is_some_and(|t| t.eq_ignore_ascii_case(&self.value)),
        }
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        let lines = [
            r#"{"id":"1","type":"movie","title":"Toy Story","attrs":{"year":1995,"genre":["Animation","Comedy"]}}"#,
            r#"{"id":"2","type":"movie","title":"Heat","attrs":{"year":1995,"genre":["Crime"]}}"#,
            r#"{"id":"3","type":"movie","title":"Alien","attrs":{"year":"1979","genre":["Horror","Sci-Fi"]}}"#,
            r#"{"id":"4","type":"product","title":"Lab Coat","attrs":{"category":"Lab Safety"}}"#,
        ];
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.jsonl");
        std::fs::write(&p, lines.join("\n")).unwrap();
        Catalog::load(&p, &Default::default()).unwrap()
    }

    fn ids(f: &Filter, c: &Catalog) -> Vec<String> {
        c.items
            .iter()
            .filter(|i| f.matches(i))
            .map(|i| i.id.clone())
            .collect()
    }

    #[test]
    fn clauses() {
        let c = catalog();
        let f = |e: &str| ids(&Filter::parse(e, &c).unwrap(), &c);
        assert_eq!(f("year>=1990"), ["1", "2"]);
        assert_eq!(f("year<1990"), ["3"]);
        assert_eq!(f("genre=comedy"), ["1"]);
        assert_eq!(f("genre!=Comedy"), ["2", "3", "4"]);
        assert_eq!(f("category~lab"), ["4"]);
        assert_eq!(f("year>=1990, genre=Crime"), ["2"]);
        assert_eq!(f("type=movie and year=1979"), ["3"]);
        assert_eq!(f("title~story"), ["1"]);
    }

    #[test]
    fn bad_filters_say_what_is_wrong() {
        let c = catalog();
        let e = Filter::parse("yaer>=1990", &c).unwrap_err().to_string();
        assert!(e.contains("yaer") && e.contains("year"), "{e}");
        assert!(Filter::parse("year>=nineties", &c)
            .unwrap_err()
            .to_string()
            .contains("number"));
        assert!(Filter::parse("genre", &c).is_err());
        assert!(Filter::parse(" , ", &c).is_err());
        assert!(Filter::parse("=x", &c).is_err());
    }
}
