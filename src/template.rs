//! The text embedded for each item, made from a small template language.
//!
//! A template is literal text with placeholders:
//!
//! | placeholder     | value                                   |
//! |-----------------|-----------------------------------------|
//! | `{id}`          | [`Item::id`]                            |
//! | `{type}`        | [`Item::item_type`]                     |
//! | `{title}`       | [`Item::title`]                         |
//! | `{description}` | [`Item::description`]                   |
//! | `{attrs.KEY}`   | the attribute `KEY` of [`Item::attrs`]  |
//!
//! `{{` and `}}` stand for literal braces; whitespace just inside the braces is ignored
//! (`{ title }` is `{title}`). A `{` without its `}`, a lone `}`, an empty `{}` and an
//! unknown name are errors.
//!
//! Attribute values render as text: strings as they are, numbers plainly (`1995`, never
//! `1995.0`; `2.5` stays `2.5`), booleans as `true`/`false`, arrays as their non-empty
//! elements joined with `", "`, objects as `key: value` pairs joined with `", "`; `null`
//! is missing.
//!
//! # Rendering rule
//!
//! The template is cut into a *lead* (the literal text before the first placeholder) and
//! *segments*, each a placeholder together with the literal text that follows it up to
//! the next placeholder (or the end). The lead is always written. A segment whose value is
//! missing or empty (after trimming) is dropped whole, its trailing literal with it; the
//! other segments write their value and then their literal. When the value already ends
//! with the punctuation mark (`.`, `,`, `;`, `:`, `!`, `?`) that its literal starts with,
//! the mark is not written twice (a title ending in `.` followed by `". "`). Finally runs
//! of whitespace (newlines included) become one space and the result is trimmed.
//!
//! So `{title}. {attrs.genre}. {description}` renders an item with no description as
//! `Toy Story. Animation, Children's, Comedy.`, and one with no genre as
//! `Toy Story. A toy cowboy...`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::catalog::Item;

/// The default item text template (`prompts/item_text.txt`); it suits every catalog
/// format: fields a dataset lacks simply drop out.
pub const DEFAULT_ITEM_TEXT: &str = include_str!("../prompts/item_text.txt");

/// What a placeholder refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Id,
    Type,
    Title,
    Description,
    Attr(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Segment {
    field: Field,
    trailing: String,
}

/// A parsed item text template. See the [module documentation](self) for the syntax and
/// the rendering rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    lead: String,
    segments: Vec<Segment>,
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template file could not be read.
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The template text is not valid. `line` and `column` are 1-based (column in
    /// characters); `path` is `None` for a template given as a string.
    #[error("{}:{line}:{column}: {message}", .path.as_deref().unwrap_or(Path::new("<template>")).display())]
    Syntax {
        path: Option<PathBuf>,
        line: usize,
        column: usize,
        message: String,
    },
}

impl Default for Template {
    /// The [`DEFAULT_ITEM_TEXT`] template.
    fn default() -> Self {
        Template::parse(DEFAULT_ITEM_TEXT).expect("the default item text template is valid")
    }
}

impl std::str::FromStr for Template {
    type Err = TemplateError;

    fn from_str(s: &str) -> Result<Template, TemplateError> {
        Template::parse(s)
    }
}

impl Template {
    /// Parses template text.
    pub fn parse(src: &str) -> Result<Template, TemplateError> {
        let err = |pos: usize, message: String| {
            let before = &src[..pos];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            TemplateError::Syntax {
                path: None,
                line,
                column,
                message,
            }
        };
        let mut lead = String::new();
        let mut segments: Vec<Segment> = Vec::new();
        let mut chars = src.char_indices().peekable();
        while let Some((pos, c)) = chars.next() {
            let literal = match segments.last_mut() {
                Some(seg) => &mut seg.trailing,
                None => &mut lead,
            };
            match c {
                '{' if chars.peek().map(|&(_, c)| c) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|&(_, c)| c) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => {
                    return Err(err(
                        pos,
                        "unmatched '}' (write '}}' for a literal brace)".to_string(),
                    ))
                }
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for (p, c) in chars.by_ref() {
                        match c {
                            '}' => {
                                closed = true;
                                break;
                            }
                            '{' => {
                                return Err(err(p, "'{' inside a placeholder".to_string()));
                            }
                            _ => name.push(c),
                        }
                    }
                    if !closed {
                        return Err(err(
                            pos,
                            "unclosed '{' (write '{{' for a literal brace)".to_string(),
                        ));
                    }
                    let field = match name.trim() {
                        "id" => Field::Id,
                        "type" => Field::Type,
                        "title" => Field::Title,
                        "description" => Field::Description,
                        "" => return Err(err(pos, "empty placeholder '{}'".to_string())),
                        other => match other.strip_prefix("attrs.") {
                            Some(key) if !key.trim().is_empty() => {
                                Field::Attr(key.trim().to_string())
                            }
                            _ => {
                                return Err(err(
                                    pos,
                                    format!(
                                        "unknown placeholder {{{other}}}: expected {{id}}, \
                                         {{type}}, {{title}}, {{description}} or {{attrs.KEY}}"
                                    ),
                                ))
                            }
                        },
                    };
                    segments.push(Segment {
                        field,
                        trailing: String::new(),
                    });
                }
                c => literal.push(c),
            }
        }
        Ok(Template {
            source: src.to_string(),
            lead,
            segments,
        })
    }

    /// Reads and parses a template file; syntax errors name the file.
    pub fn load(path: &Path) -> Result<Template, TemplateError> {
        let src = std::fs::read_to_string(path).map_err(|source| TemplateError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Template::parse(&src).map_err(|e| match e {
            TemplateError::Syntax {
                line,
                column,
                message,
                ..
            } => TemplateError::Syntax {
                path: Some(path.to_path_buf()),
                line,
                column,
                message,
            },
            other => other,
        })
    }

    /// The template text as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The attribute keys the template uses (`{attrs.KEY}`), in order of appearance.
    pub fn attr_keys(&self) -> Vec<&str> {
        self.segments
            .iter()
            .filter_map(|s| match &s.field {
                Field::Attr(k) => Some(k.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The text for one item (see the rendering rule in the module documentation).
    pub fn render(&self, item: &Item) -> String {
        let mut out = self.lead.clone();
        for seg in &self.segments {
            let value = match &seg.field {
                Field::Id => item.id.trim().to_string(),
                Field::Type => item.item_type.trim().to_string(),
                Field::Title => item.title.trim().to_string(),
                Field::Description => item.description.trim().to_string(),
                Field::Attr(k) => item.attrs.get(k).map(value_text).unwrap_or_default(),
            };
            if value.is_empty() {
                continue;
            }
            out.push_str(&value);
            let mut trailing = seg.trailing.as_str();
            if let Some(mark) = trailing.chars().next() {
                if ".,;:!?".contains(mark) && value.ends_with(mark) {
                    trailing = &trailing[mark.len_utf8()..];
                }
            }
            out.push_str(trailing);
        }
        collapse_whitespace(&out)
    }
}

/// The text of an attribute value; empty for null and empty values.
fn value_text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if !(n.is_i64() || n.is_u64()) && f.fract() == 0.0 && f.abs() < 1e15 => {
                format!("{}", f as i64)
            }
            _ => n.to_string(),
        },
        Value::String(s) => s.trim().to_string(),
        Value::Array(vs) => vs
            .iter()
            .map(value_text)
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(", "),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| (k, value_text(v)))
            .filter(|(_, s)| !s.is_empty())
            .map(|(k, s)| format!("{k}: {s}"))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

fn collapse_whitespace(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn item(title: &str, description: &str, attrs: Value) -> Item {
        Item {
            id: "1".into(),
            item_type: "movie".into(),
            title: title.into(),
            description: description.into(),
            attrs: attrs.as_object().cloned().unwrap_or_default(),
        }
    }

    fn toy_story() -> Item {
        item(
            "Toy Story",
            "",
            json!({"year": 1995, "genre": ["Animation", "Children's", "Comedy"]}),
        )
    }

    #[test]
    fn missing_placeholder_drops_its_trailing_text() {
        let t = Template::parse("{title}. {attrs.genre}. {description}").unwrap();
        assert_eq!(
            t.render(&toy_story()),
            "Toy Story. Animation, Children's, Comedy."
        );
        let t = Template::parse("{title}. {attrs.brand}. {attrs.year}.").unwrap();
        assert_eq!(t.render(&toy_story()), "Toy Story. 1995.");
    }

    #[test]
    fn lead_is_always_written() {
        let t = Template::parse("Movie: {attrs.nope} ({attrs.year})").unwrap();
        assert_eq!(t.render(&toy_story()), "Movie: 1995)");
        let t = Template::parse("Movie: {title} ({attrs.year})").unwrap();
        assert_eq!(t.render(&toy_story()), "Movie: Toy Story (1995)");
    }

    #[test]
    fn numbers_render_plainly() {
        let i = item("T", "", json!({"a": 1995.0, "b": 2.5, "c": -3, "d": true}));
        let t = Template::parse("{attrs.a} {attrs.b} {attrs.c} {attrs.d}").unwrap();
        assert_eq!(t.render(&i), "1995 2.5 -3 true");
    }

    #[test]
    fn punctuation_is_not_doubled() {
        let i = item("Staples (1000 Count).", "Heavy duty.", json!({}));
        let t = Template::parse("{title}. {description}").unwrap();
        assert_eq!(t.render(&i), "Staples (1000 Count). Heavy duty.");
    }

    #[test]
    fn braces_escape_and_whitespace_collapses() {
        let t = Template::parse("{{x}} {  title }\n\n  {{{type}}}\n").unwrap();
        assert_eq!(t.render(&toy_story()), "{x} Toy Story {movie}");
    }

    #[test]
    fn syntax_errors_have_positions() {
        let e = Template::parse("ab\n{title").unwrap_err().to_string();
        assert_eq!(
            e,
            "<template>:2:1: unclosed '{' (write '{{' for a literal brace)"
        );
        let e = Template::parse("{title} }").unwrap_err().to_string();
        assert!(e.starts_with("<template>:1:9: unmatched '}'"), "{e}");
        let e = Template::parse("{titel}").unwrap_err().to_string();
        assert!(e.contains("unknown placeholder {titel}"), "{e}");
        assert!(Template::parse("{}").is_err());
        assert!(Template::parse("{attrs.}").is_err());
        assert!(Template::parse("{a{b}").is_err());
    }

    #[test]
    fn default_template_parses_and_ignores_trailing_newline() {
        let t = Template::default();
        assert_eq!(
            t.render(&toy_story()),
            "Toy Story. 1995. Animation, Children's, Comedy."
        );
        assert!(!t.render(&toy_story()).ends_with('\n'));
    }
}
