//! RecBole atomic `.item` files: a header of `name:type` fields.

use super::*;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Token,
    TokenSeq,
    Float,
    FloatSeq,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Id,
    Title,
    Description,
    Type,
    Year,
    Genre,
    Other,
}

/// Decodes one line: UTF-8, or Latin-1 when it is not valid UTF-8.
pub(super) fn utf8_or_latin1(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => std::borrow::Cow::Owned(bytes.iter().map(|&b| b as char).collect()),
    }
}

pub(super) fn read_recbole(
    path: &Path,
    bytes: &[u8],
    skips: &mut Skips,
) -> Result<Vec<Raw>, CatalogError> {
    let mut it = lines(bytes).filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace));
    let Some((header_line, header_bytes)) = it.next() else {
        return Ok(Vec::new());
    };
    let header_text = utf8_or_latin1(header_bytes);
    let mut columns: Vec<(String, Kind, Role)> = Vec::new();
    let mut title_taken = false;
    for spec in header_text.split('\t') {
        let spec = spec.trim();
        let Some((name, kind)) = spec.rsplit_once(':') else {
            return Err(syntax_err(
                path,
                header_line,
                format!("header field {spec:?} is not of the form name:type (e.g. item_id:token)"),
            ));
        };
        let kind = match kind {
            "token" => Kind::Token,
            "token_seq" => Kind::TokenSeq,
            "float" => Kind::Float,
            "float_seq" => Kind::FloatSeq,
            other => {
                return Err(syntax_err(
                    path,
                    header_line,
                    format!(
                        "header field {spec:?} has unknown type {other:?} \
                         (expected token, token_seq, float or float_seq)"
                    ),
                ))
            }
        };
        let mut role = match name {
            "item_id" => Role::Id,
            "movie_title" | "title" | "name" => Role::Title,
            "description" => Role::Description,
            "type" => Role::Type,
            "release_year" | "year" => Role::Year,
            "class" | "genre" | "genres" => Role::Genre,
            _ => Role::Other,
        };
        if role == Role::Title {
            if title_taken {
                role = Role::Other;
            }
            title_taken = true;
        }
        if role != Role::Other && columns.iter().any(|c| c.2 == role) {
            return Err(syntax_err(
                path,
                header_line,
                format!("header field {spec:?} maps to the same item field as an earlier one"),
            ));
        }
        columns.push((name.to_string(), kind, role));
    }
    if !columns.iter().any(|c| c.2 == Role::Id) {
        return Err(field_err(
            path,
            header_line,
            "item_id",
            format!("missing required column; the header has: {header_text}"),
        ));
    }
    let mut out = Vec::new();
    for (line, raw) in it {
        match recbole_line(path, line, raw, &columns) {
            Ok(item) => out.push(Raw { item, line }),
            Err(e) => skips.take(e, line, None)?,
        }
    }
    Ok(out)
}

/// One record of a RecBole `.item` file under the header's `columns`.
fn recbole_line(
    path: &Path,
    line: usize,
    raw: &[u8],
    columns: &[(String, Kind, Role)],
) -> Result<Item, CatalogError> {
    {
        let text = utf8_or_latin1(raw);
        let fields: Vec<&str> = text.split('\t').collect();
        if fields.len() != columns.len() {
            return Err(syntax_err(
                path,
                line,
                format!(
                    "expected {} tab-separated fields (as in the header), found {}",
                    columns.len(),
                    fields.len()
                ),
            ));
        }
        let mut item = Item {
            id: String::new(),
            item_type: String::new(),
            title: String::new(),
            description: String::new(),
            attrs: Map::new(),
        };
        for ((name, kind, role), value) in columns.iter().zip(fields) {
            let value = value.trim();
            match role {
                Role::Id => item.id = value.to_string(),
                Role::Title => item.title = value.to_string(),
                Role::Description => item.description = value.to_string(),
                Role::Type => item.item_type = value.to_string(),
                Role::Year => {
                    if let Some(n) = parse_number(value) {
                        item.attrs.insert("year".to_string(), n);
                    }
                }
                Role::Genre => {
                    let words: Vec<Value> = value
                        .split(|c: char| c.is_whitespace() || c == '|')
                        .filter(|w| !w.is_empty())
                        .map(|w| Value::String(w.to_string()))
                        .collect();
                    if !words.is_empty() {
                        item.attrs.insert("genre".to_string(), Value::Array(words));
                    }
                }
                Role::Other => {
                    if value.is_empty() {
                        continue;
                    }
                    let v = match kind {
                        Kind::Token => Value::String(value.to_string()),
                        Kind::TokenSeq => Value::Array(
                            value
                                .split_whitespace()
                                .map(|w| Value::String(w.to_string()))
                                .collect(),
                        ),
                        Kind::Float => parse_number(value).ok_or_else(|| {
                            field_err(
                                path,
                                line,
                                name,
                                format!("expected a number, found {value:?}"),
                            )
                        })?,
                        Kind::FloatSeq => Value::Array(
                            value
                                .split_whitespace()
                                .map(|w| {
                                    parse_number(w).ok_or_else(|| {
                                        field_err(
                                            path,
                                            line,
                                            name,
                                            format!("expected numbers, found {w:?}"),
                                        )
                                    })
                                })
                                .collect::<Result<_, _>>()?,
                        ),
                    };
                    item.attrs.insert(name.clone(), v);
                }
            }
        }
        Ok(item)
    }
}

/// A number as JSON: an integer when it is a whole number (`1995`, `1995.0`).
pub(super) fn parse_number(s: &str) -> Option<Value> {
    if let Ok(i) = s.parse::<i64>() {
        return Some(Value::from(i));
    }
    let f: f64 = s.parse().ok()?;
    if !f.is_finite() {
        return None;
    }
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        Some(Value::from(f as i64))
    } else {
        serde_json::Number::from_f64(f).map(Value::Number)
    }
}
