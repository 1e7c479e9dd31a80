//! JSONL catalogs: one JSON object per line.

use super::*;

pub(super) fn read_jsonl(
    path: &Path,
    bytes: &[u8],
    skips: &mut Skips,
) -> Result<Vec<Raw>, CatalogError> {
    let mut out = Vec::new();
    for (line, raw) in lines(bytes) {
        match jsonl_line(path, line, raw) {
            Ok(Some(item)) => out.push(Raw { item, line }),
            Ok(None) => {}
            Err(e) => skips.take(e, line, None)?,
        }
    }
    Ok(out)
}

/// One JSONL line: `None` for a blank one.
fn jsonl_line(path: &Path, line: usize, raw: &[u8]) -> Result<Option<Item>, CatalogError> {
    let text = utf8_line(path, line, raw)?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    let value: Value = serde_json::from_str(text).map_err(|e| {
        syntax_err(
            path,
            line,
            format!(
                "invalid JSON: {} (column {})",
                serde_message(&e),
                e.column()
            ),
        )
    })?;
    let Value::Object(obj) = value else {
        return Err(syntax_err(
            path,
            line,
            format!("expected a JSON object, found {}", show(&value)),
        ));
    };
    jsonl_item(path, line, obj).map(Some)
}

fn jsonl_item(path: &Path, line: usize, obj: Map<String, Value>) -> Result<Item, CatalogError> {
    let mut id = None;
    let mut item_type = String::new();
    let mut title = None;
    let mut description = String::new();
    let mut attrs = Map::new();
    let mut extra = Map::new();
    for (key, value) in obj {
        match key.as_str() {
            "id" => id = Some(id_value(path, line, &value)?),
            "type" => item_type = opt_string(path, line, "type", value)?,
            "title" => match value {
                Value::String(s) => title = Some(s),
                other => {
                    return Err(field_err(
                        path,
                        line,
                        "title",
                        format!("expected a string, found {}", show(&other)),
                    ))
                }
            },
            "description" => description = opt_string(path, line, "description", value)?,
            "attrs" => match value {
                Value::Object(m) => attrs = m,
                Value::Null => {}
                other => {
                    return Err(field_err(
                        path,
                        line,
                        "attrs",
                        format!("expected an object, found {}", show(&other)),
                    ))
                }
            },
            _ => {
                extra.insert(key, value);
            }
        }
    }
    for (key, value) in extra {
        if attrs.contains_key(&key) {
            return Err(field_err(
                path,
                line,
                &key,
                format!("given both as a top-level key and in \"attrs\" (attrs.{key})"),
            ));
        }
        attrs.insert(key, value);
    }
    let id = id.ok_or_else(|| field_err(path, line, "id", "missing required field"))?;
    let title = title.ok_or_else(|| field_err(path, line, "title", "missing required field"))?;
    Ok(Item {
        id,
        item_type,
        title,
        description,
        attrs,
    })
}

fn id_value(path: &Path, line: usize, v: &Value) -> Result<String, CatalogError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        other => Err(field_err(
            path,
            line,
            "id",
            format!("expected a string or an integer, found {}", show(other)),
        )),
    }
}

/// An optional string field: null or absent is empty.
pub(super) fn opt_string(
    path: &Path,
    line: usize,
    field: &str,
    v: Value,
) -> Result<String, CatalogError> {
    match v {
        Value::String(s) => Ok(s),
        Value::Null => Ok(String::new()),
        other => Err(field_err(
            path,
            line,
            field,
            format!("expected a string, found {}", show(&other)),
        )),
    }
}
