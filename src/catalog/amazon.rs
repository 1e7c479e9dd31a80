//! The Amazon layout: one JSON object keyed by item id.

use super::jsonl::opt_string;
use super::*;

/// The line of each top-level key of a JSON object, in file order. Assumes valid JSON
/// (it runs after serde_json has parsed the file).
pub(super) fn top_level_key_lines(text: &str) -> Vec<(String, usize)> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut line = 1usize;
    let mut expect_key = false;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\n' => line += 1,
            b'{' | b'[' => {
                depth += 1;
                expect_key = depth == 1 && b[i] == b'{';
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => expect_key = true,
            b'"' => {
                let start = i;
                let start_line = line;
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    match b[i] {
                        b'\\' => i += 1,
                        b'\n' => line += 1,
                        _ => {}
                    }
                    i += 1;
                }
                if depth == 1 && expect_key {
                    let key = serde_json::from_str::<String>(&text[start..=i.min(b.len() - 1)])
                        .unwrap_or_default();
                    out.push((key, start_line));
                    expect_key = false;
                }
            }
            _ => {}
        }
        i += 1;
    }
    out
}

pub(super) fn read_amazon(
    path: &Path,
    bytes: &[u8],
    skips: &mut Skips,
) -> Result<Vec<Raw>, CatalogError> {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let line = 1 + bytes[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            let line_start = bytes[..e.valid_up_to()]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1);
            return Err(CatalogError::InvalidUtf8 {
                path: path.to_path_buf(),
                line,
                detail: format!("(at byte {} of the line)", e.valid_up_to() - line_start + 1),
            });
        }
    };
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let value: Value = serde_json::from_str(text).map_err(|e| {
        syntax_err(
            path,
            e.line(),
            format!(
                "invalid JSON: {} (column {})",
                serde_message(&e),
                e.column()
            ),
        )
    })?;
    let Value::Object(map) = value else {
        return Err(syntax_err(
            path,
            1,
            format!(
                "expected a JSON object keyed by item id (Amazon layout), found {}",
                show(&value)
            ),
        ));
    };
    let key_lines = top_level_key_lines(text);
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (key, line) in &key_lines {
        if let Some(&first) = seen.get(key.as_str()) {
            // The JSON object kept one value for the key; the others are gone.
            let e = CatalogError::DuplicateId {
                path: path.to_path_buf(),
                line: *line,
                first_line: first,
                id: key.clone(),
            };
            skips.take(e, *line, Some(key.clone()))?;
            continue;
        }
        seen.insert(key, *line);
    }
    let mut entries: Vec<(String, Value)> = map.into_iter().collect();
    let numeric: Option<Vec<u64>> = entries.iter().map(|(k, _)| k.parse().ok()).collect();
    if let Some(keys) = numeric {
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by_key(|&i| keys[i]);
        let mut taken: Vec<Option<(String, Value)>> = entries.into_iter().map(Some).collect();
        entries = order.into_iter().filter_map(|i| taken[i].take()).collect();
    }
    let mut out = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        let line = seen.get(key.as_str()).copied().unwrap_or(1);
        match amazon_item(path, line, key.clone(), value) {
            Ok(item) => out.push(Raw { item, line }),
            Err(e) => skips.take(e, line, Some(key))?,
        }
    }
    Ok(out)
}

fn amazon_item(path: &Path, line: usize, key: String, value: Value) -> Result<Item, CatalogError> {
    let Value::Object(obj) = value else {
        return Err(syntax_err(
            path,
            line,
            format!("item {key:?}: expected an object, found {}", show(&value)),
        ));
    };
    let mut item = Item {
        id: key,
        item_type: String::new(),
        title: String::new(),
        description: String::new(),
        attrs: Map::new(),
    };
    for (field, v) in obj {
        match field.as_str() {
            "title" => item.title = opt_string(path, line, "title", v)?,
            "type" => item.item_type = opt_string(path, line, "type", v)?,
            "description" => {
                item.description = match v {
                    Value::Array(parts) => parts
                        .iter()
                        .map(|p| match p {
                            Value::String(s) => Ok(s.trim()),
                            other => Err(field_err(
                                path,
                                line,
                                "description",
                                format!("expected a string or strings, found {}", show(other)),
                            )),
                        })
                        .collect::<Result<Vec<_>, _>>()?
                        .join(" "),
                    other => opt_string(path, line, "description", other)?,
                }
            }
            "brand" => {
                let brand = opt_string(path, line, "brand", v)?;
                if !brand.trim().is_empty() {
                    item.attrs
                        .insert(field, Value::String(brand.trim().to_string()));
                }
            }
            "categories" => {
                let mut parts = Vec::new();
                collect_categories(path, line, &v, &mut parts)?;
                if !parts.is_empty() {
                    item.attrs.insert(field, Value::Array(parts));
                }
            }
            _ => {
                if !v.is_null() {
                    item.attrs.insert(field, v);
                }
            }
        }
    }
    Ok(item)
}

fn collect_categories(
    path: &Path,
    line: usize,
    v: &Value,
    out: &mut Vec<Value>,
) -> Result<(), CatalogError> {
    match v {
        Value::String(s) => out.extend(
            s.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| Value::String(p.to_string())),
        ),
        Value::Array(vs) => {
            for v in vs {
                collect_categories(path, line, v, out)?;
            }
        }
        Value::Null => {}
        other => {
            return Err(field_err(
                path,
                line,
                "categories",
                format!(
                    "expected a comma-separated string or an array of strings, found {}",
                    show(other)
                ),
            ))
        }
    }
    Ok(())
}
