//! CSV and TSV catalogs with a header row.

use super::*;

fn csv_err(path: &Path, e: csv::Error) -> CatalogError {
    let line = e.position().map(|p| p.line() as usize).unwrap_or(1);
    match e.into_kind() {
        csv::ErrorKind::Io(source) => CatalogError::Io {
            path: path.to_path_buf(),
            source,
        },
        csv::ErrorKind::Utf8 { pos, err } => CatalogError::InvalidUtf8 {
            path: path.to_path_buf(),
            line: pos.map(|p| p.line() as usize).unwrap_or(line),
            detail: format!("in column {}", err.field() + 1),
        },
        csv::ErrorKind::UnequalLengths {
            pos,
            expected_len,
            len,
        } => syntax_err(
            path,
            pos.map(|p| p.line() as usize).unwrap_or(line),
            format!("expected {expected_len} fields (as in the header), found {len}"),
        ),
        other => syntax_err(path, line, format!("{other:?}")),
    }
}

pub(super) fn read_delimited(
    path: &Path,
    bytes: &[u8],
    delimiter: u8,
    skips: &mut Skips,
) -> Result<Vec<Raw>, CatalogError> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .from_reader(bytes);
    let header_rec = reader.headers().map_err(|e| csv_err(path, e))?.clone();
    let header_line = header_rec
        .position()
        .map(|p| p.line() as usize)
        .unwrap_or(1);
    let header: Vec<String> = header_rec.iter().map(|h| h.trim().to_string()).collect();
    let find = |name: &str| header.iter().position(|h| h.eq_ignore_ascii_case(name));
    for (i, h) in header.iter().enumerate() {
        if h.is_empty() {
            return Err(syntax_err(
                path,
                header_line,
                format!("column {} of the header has no name", i + 1),
            ));
        }
        if header[..i].iter().any(|o| o.eq_ignore_ascii_case(h)) {
            return Err(syntax_err(
                path,
                header_line,
                format!("column {h:?} appears twice in the header"),
            ));
        }
    }
    let missing = |name: &str| {
        field_err(
            path,
            header_line,
            name,
            format!(
                "missing required column; the header has: {}",
                header.join(", ")
            ),
        )
    };
    let id_col = find("id").ok_or_else(|| missing("id"))?;
    let title_col = find("title").ok_or_else(|| missing("title"))?;
    let type_col = find("type");
    let desc_col = find("description");
    let mut out = Vec::new();
    for rec in reader.records() {
        let rec = match rec.map_err(|e| csv_err(path, e)) {
            Ok(rec) => rec,
            Err(e @ CatalogError::Io { .. }) => return Err(e),
            Err(e) => {
                let line = e.line().unwrap_or(0);
                skips.take(e, line, None)?;
                continue;
            }
        };
        let line = rec.position().map(|p| p.line() as usize).unwrap_or(0);
        let get = |c: usize| rec.get(c).unwrap_or("").to_string();
        let mut attrs = Map::new();
        for (c, name) in header.iter().enumerate() {
            if [Some(id_col), Some(title_col), type_col, desc_col].contains(&Some(c)) {
                continue;
            }
            let v = rec.get(c).unwrap_or("");
            if !v.trim().is_empty() {
                attrs.insert(name.clone(), Value::String(v.to_string()));
            }
        }
        out.push(Raw {
            item: Item {
                id: get(id_col),
                item_type: type_col.map(get).unwrap_or_default(),
                title: get(title_col),
                description: desc_col.map(get).unwrap_or_default(),
                attrs,
            },
            line,
        });
    }
    Ok(out)
}
