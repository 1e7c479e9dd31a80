//! Catalog files in every format: arbitrary and mutated input never panics and errors
//! name the file and a line that exists; generated catalogs round-trip through the
//! normalised JSONL and through CSV.

use std::path::Path;

use proptest::prelude::*;
use serde_json::{Map, Value};
use sidrec::catalog::{normalize_type, Catalog, CatalogError, Format, Item, LoadOptions};

use crate::{config, json_value, junk, line_count, mutate, mutations};

/// Small valid files, one or more per format, that mutations start from. Together they
/// use every feature of each reader (quoted fields spanning lines, Latin-1 lines, list
/// and float columns, Amazon description arrays and nested categories).
const SEEDS: &[(Format, &[u8])] = &[
    (
        Format::Jsonl,
        b"{\"id\":\"1\",\"type\":\"movie\",\"title\":\"Toy Story\",\"description\":\"A toy.\",\
          \"attrs\":{\"year\":1995,\"genre\":[\"Animation\",\"Comedy\"]}}\n\
          \n\
          {\"id\":2,\"title\":\"Heat\",\"year\":1995,\"type\":null}\r\n\
          {\"id\":\"p1\",\"type\":\"Podcast Episode\",\"title\":\"\",\"description\":\"Talk\",\"attrs\":null}\n",
    ),
    (
        Format::Csv,
        b"id,type,title,description,year,genre\n\
          1,movie,Toy Story,\"A toy, \"\"cowboy\"\"\",1995,Animation|Comedy\n\
          2,movie,Heat,,1995,\"Crime\nDrama\"\r\n\
          3,,Alien,,,\n",
    ),
    (
        Format::Tsv,
        b"id\ttitle\tdescription\tbrand\n\
          a\tLab Tape\t\"Sticks, \"\"well\"\"\"\t3M\n\
          b\tPipette\t\t\n",
    ),
    (
        Format::Recbole,
        b"item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\tscore:float\ttags:float_seq\tlang:token\n\
          1\tToy Story\t1995\tAnimation Children's Comedy\t4.5\t1 2 3\ten\n\
          2\tMis\xe9rables\tunkonwn\tDrama|War\t\t\t\r\n\
          \n\
          3\tHeat\t1995.0\t\t2\t0.5\tfr\n\
          4\tAlien\t1979\tHorror Sci-Fi\t8.5\t1e3 -2\t\n\
          5\tFargo\t1996\tCrime\t\t\ten\n\
          6\tBabe\t1995\tChildren's|Drama\t7\t\tfr\n",
    ),
    (
        Format::Amazon,
        b"{\n \"0\": {\"title\": \"Tape\", \"description\": [\"Lab\", \"tape\"], \"brand\": \"3M\",\n\
          \"categories\": [[\"Lab\", \"Tape, Roll\"]]},\n\
          \"1\": {\"title\": \"Pipette\", \"categories\": \"Lab, Pipettes\", \"price\": 9.5, \"type\": \"tool\"},\n\
          \"2\": {\"title\": null, \"description\": \"A \\\"flask\\\"\"}\n}\n",
    ),
];

fn format() -> impl Strategy<Value = Format> {
    prop::sample::select(Format::ALL.to_vec())
}

/// Loads `bytes` as a `format` file and checks the outcome: a loaded catalog satisfies
/// the documented invariants, an error names the file and (where it has one) a line of
/// the file.
fn load_and_check(
    dir: &Path,
    format: Format,
    bytes: &[u8],
) -> Result<Result<Catalog, String>, TestCaseError> {
    let path = dir.join("fuzzed-catalog.data");
    std::fs::write(&path, bytes).unwrap();
    let opts = LoadOptions {
        format: Some(format),
        ..LoadOptions::default()
    };
    let (result, largest) = crate::largest_allocation(|| Catalog::load(&path, &opts));
    prop_assert!(
        largest <= crate::allocation_budget(bytes.len()),
        "{largest} bytes allocated at once for a {}-byte file",
        bytes.len()
    );
    match result {
        Ok(catalog) => {
            prop_assert!(!catalog.is_empty());
            for (i, item) in catalog.items.iter().enumerate() {
                prop_assert!(!item.id.trim().is_empty());
                prop_assert_eq!(
                    normalize_type(&item.item_type).ok(),
                    Some(item.item_type.clone())
                );
                // Some text: a title, a description, or an attribute a template can render.
                prop_assert!(
                    !item.title.is_empty() || !item.description.is_empty() || item.has_attr_text()
                );
                prop_assert_eq!(item.title.trim(), item.title.as_str());
                prop_assert_eq!(catalog.index_of(&item.id), Some(i));
            }
            Ok(Ok(catalog))
        }
        Err(e) => {
            check_error(&path, bytes, &e)?;
            Ok(Err(e.to_string()))
        }
    }
}

fn check_error(path: &Path, bytes: &[u8], e: &CatalogError) -> Result<(), TestCaseError> {
    let msg = e.to_string();
    prop_assert_eq!(e.path(), Some(path), "{}", msg);
    prop_assert!(msg.contains(&path.display().to_string()), "{}", msg);
    if let Some(line) = e.line() {
        let lines = line_count(bytes);
        prop_assert!(
            (1..=lines).contains(&line),
            "line {} of a {}-line file: {}",
            line,
            lines,
            msg
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(400))]

    /// Any bytes, read as any format.
    #[test]
    fn arbitrary_bytes_never_panic(format in format(), bytes in junk(400)) {
        let dir = crate::scratch();
        let _ = load_and_check(dir.path(), format, &bytes)?;
    }

    /// A valid file of each format, mutated, read as its own format (and, a quarter of
    /// the time, as another one).
    #[test]
    fn mutated_files_never_panic(
        seed in prop::sample::select(SEEDS.to_vec()),
        other in format(),
        as_other in prop::bool::weighted(0.25),
        muts in mutations(),
    ) {
        let (format, bytes) = seed;
        let bytes = mutate(bytes.to_vec(), &muts);
        let dir = crate::scratch();
        let _ = load_and_check(dir.path(), if as_other { other } else { format }, &bytes)?;
    }

    /// A generated catalog, written as normalised JSONL, reads back unchanged; mutated,
    /// it still never panics.
    #[test]
    fn jsonl_round_trip(items in items(), muts in mutations()) {
        let Ok(catalog) = Catalog::from_items(items) else {
            return Ok(());
        };
        let mut bytes = Vec::new();
        catalog.write_jsonl(&mut bytes).unwrap();
        let dir = crate::scratch();
        let back = load_and_check(dir.path(), Format::Jsonl, &bytes)?;
        prop_assert_eq!(back, Ok(catalog));
        let _ = load_and_check(dir.path(), Format::Jsonl, &mutate(bytes, &muts))?;
    }

    /// A generated catalog with string attributes, written as CSV or TSV by the `csv`
    /// crate (quoting as needed), reads back as the same items.
    #[test]
    fn delimited_round_trip(items in items(), tabs in any::<bool>(), muts in mutations()) {
        let items: Vec<Item> = items.into_iter().map(string_attrs).collect();
        let Ok(catalog) = Catalog::from_items(items) else {
            return Ok(());
        };
        let mut columns: Vec<String> = Vec::new();
        for item in &catalog.items {
            for k in item.attrs.keys() {
                if !columns.contains(k) {
                    columns.push(k.clone());
                }
            }
        }
        let mut w = csv::WriterBuilder::new()
            .delimiter(if tabs { b'\t' } else { b',' })
            .from_writer(Vec::new());
        let mut header = vec!["id", "type", "title", "description"];
        header.extend(columns.iter().map(String::as_str));
        w.write_record(&header).unwrap();
        for item in &catalog.items {
            let mut row = vec![
                item.id.clone(),
                item.item_type.clone(),
                item.title.clone(),
                item.description.clone(),
            ];
            for c in &columns {
                row.push(item.attrs.get(c).and_then(Value::as_str).unwrap_or("").to_string());
            }
            w.write_record(&row).unwrap();
        }
        let bytes = w.into_inner().unwrap();
        let format = if tabs { Format::Tsv } else { Format::Csv };
        let dir = crate::scratch();
        let back = load_and_check(dir.path(), format, &bytes)?;
        prop_assert_eq!(back, Ok(catalog));
        let _ = load_and_check(dir.path(), format, &mutate(bytes, &muts))?;
    }
}

/// Text of every kind: plain words, any Unicode (control characters, line and paragraph
/// separators), quotes and separators.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9 ]{1,12}",
        ".{0,16}",
        "[ \t\",;|\\\\'\u{2028}\u{feff}a-c]{0,8}",
    ]
}

fn item() -> impl Strategy<Value = Item> {
    // Never empty: `from_items` rejects an empty type, so such catalogs would be skipped.
    let item_type = prop_oneof!["[a-z][a-z0-9_]{0,8}", Just("Podcast Episode".to_string()),];
    let attr_key = "[a-z][a-z_]{0,6}".prop_filter("not a reserved column", |k| {
        !matches!(
            k.as_str(),
            "id" | "type" | "title" | "description" | "attrs"
        )
    });
    (
        prop_oneof!["[a-z0-9]{1,6}", ".{1,8}"],
        item_type,
        text(),
        prop_oneof![Just(String::new()), text()],
        prop::collection::vec((attr_key, json_value()), 0..4),
    )
        .prop_map(|(id, item_type, title, description, attrs)| Item {
            id,
            item_type,
            title,
            description,
            attrs: attrs.into_iter().collect(),
        })
}

fn items() -> impl Strategy<Value = Vec<Item>> {
    prop::collection::vec(item(), 1..8)
}

/// The item with only string attributes (what a CSV cell can hold), cells that are
/// blank after trimming left out as the reader leaves them out.
fn string_attrs(mut item: Item) -> Item {
    let attrs: Map<String, Value> = std::mem::take(&mut item.attrs)
        .into_iter()
        .filter_map(|(k, v)| match v {
            Value::String(s) if !s.trim().is_empty() => Some((k, Value::String(s))),
            _ => None,
        })
        .collect();
    item.attrs = attrs;
    item
}

#[test]
fn every_seed_loads() {
    let dir = tempfile::tempdir().unwrap();
    for (format, bytes) in SEEDS {
        let path = dir.path().join("seed");
        std::fs::write(&path, bytes).unwrap();
        let opts = LoadOptions {
            format: Some(*format),
            ..LoadOptions::default()
        };
        let c = Catalog::load(&path, &opts).unwrap_or_else(|e| panic!("{format}: {e}"));
        assert!(c.len() >= 2, "{format}");
    }
}

/// Found by `jsonl_round_trip`: serde_json's default float parsing is not correctly
/// rounded, so this attribute read back from `catalog.jsonl` one unit in the last place
/// off (…743e-85 for …746e-85), and the item text rendered from it changed. The
/// `float_roundtrip` feature makes the normalised catalog read back unchanged.
#[test]
fn jsonl_round_trip_keeps_every_float_bit() {
    let attrs = serde_json::json!({"a": [-2.1290384374050746e-85, 0.1, 1e300, 5e-324]});
    let item = Item {
        id: "a".into(),
        item_type: "a".into(),
        title: "A".into(),
        description: String::new(),
        attrs: attrs.as_object().cloned().unwrap(),
    };
    let catalog = Catalog::from_items(vec![item]).unwrap();
    let mut bytes = Vec::new();
    catalog.write_jsonl(&mut bytes).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.jsonl");
    std::fs::write(&path, &bytes).unwrap();
    let back = Catalog::load(&path, &LoadOptions::default()).unwrap();
    assert_eq!(back, catalog);
}
