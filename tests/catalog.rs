//! Catalog formats, validation errors, round trips, the item text template, and the real
//! MovieLens RecBole files under `assets/` (fetched by `scripts/fetch-assets.sh`).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sidrec::catalog::{normalize_type, Catalog, CatalogError, Format, Item, LoadOptions};
use sidrec::template::{Template, TemplateError};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/catalog")
        .join(name)
}

fn opts(default_type: &str) -> LoadOptions {
    LoadOptions {
        format: None,
        default_type: default_type.to_string(),
        skip_invalid: false,
    }
}

fn load(name: &str) -> Catalog {
    Catalog::load(&fixture(name), &opts("movie")).unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

fn asset(rel: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets")
        .join(rel);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-assets.sh to fetch the test assets",
        p.display()
    );
    p
}

fn attrs(v: Value) -> serde_json::Map<String, Value> {
    v.as_object().cloned().unwrap()
}

/// Writes `content` to a file named `name` in a fresh directory and loads it.
fn load_bytes(name: &str, content: &[u8], format: Option<Format>) -> (PathBuf, CatalogError) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, content).unwrap();
    let o = LoadOptions {
        format,
        default_type: "item".into(),
        skip_invalid: false,
    };
    let err = Catalog::load(&path, &o).expect_err("expected an error");
    // The directory goes away; the path stays in the error message.
    (path, err)
}

fn bad(name: &str, content: &str) -> (String, CatalogError) {
    let (path, err) = load_bytes(name, content.as_bytes(), None);
    (path.display().to_string(), err)
}

// ---------------------------------------------------------------------------------------
// Formats

#[test]
fn jsonl_fields_defaults_and_extra_keys() {
    let c = load("movies.jsonl");
    assert_eq!(c.len(), 3);
    assert_eq!(c.types(), vec!["movie"]);
    let m1 = &c.items[0];
    assert_eq!(m1.id, "m1");
    assert_eq!(m1.title, "The Lighthouse Keeper");
    assert_eq!(
        m1.description,
        "A keeper and his apprentice wait out a storm."
    );
    assert_eq!(
        m1.attrs,
        attrs(json!({"year": 2019, "genre": ["Drama", "Horror"]}))
    );
    // Integer id becomes a string; unknown keys go to attrs, in order.
    let m2 = &c.items[1];
    assert_eq!(m2.id, "2");
    assert_eq!(
        m2.attrs,
        attrs(json!({"year": 1987, "director": "A. Lund"}))
    );
    assert_eq!(c.items[2].id, "m3");
    assert_eq!(c.index_of("2"), Some(1));
    assert_eq!(c.index_of("m3"), Some(2));
    assert_eq!(c.index_of("nope"), None);
    assert_eq!(c.get("m1").unwrap().title, "The Lighthouse Keeper");
}

#[test]
fn jsonl_mixed_types() {
    let c = Catalog::load(&fixture("mixed.jsonl"), &opts("Book")).unwrap();
    let types: Vec<&str> = c.items.iter().map(|i| i.item_type.as_str()).collect();
    assert_eq!(types, vec!["movie", "music_track", "podcast", "book"]);
    assert_eq!(c.types(), vec!["book", "movie", "music_track", "podcast"]);
    // An empty title is fine when there is a description.
    assert_eq!(c.items[2].title, "");
    assert_eq!(c.items[2].description, "Weekly talks about small boats.");
}

#[test]
fn csv_quoted_fields_and_string_attrs() {
    let c = load("movies.csv");
    assert_eq!(c.len(), 3);
    let m1 = &c.items[0];
    assert_eq!(
        m1.description,
        "A keeper and his apprentice\nwait out a storm, \"together\"."
    );
    assert_eq!(m1.attrs, attrs(json!({"year": "2019"})));
    assert_eq!(c.items[1].title, "Paper Moons, Again");
    assert_eq!(
        c.items[1].attrs,
        attrs(json!({"year": "1987", "director": "A. Lund"}))
    );
    assert!(c.items[2].attrs.is_empty());
    assert_eq!(c.types(), vec!["movie"]);
}

#[test]
fn csv_and_tsv_mixed_types() {
    let c = Catalog::load(&fixture("mixed.csv"), &opts("book")).unwrap();
    let types: Vec<&str> = c.items.iter().map(|i| i.item_type.as_str()).collect();
    assert_eq!(types, vec!["movie", "music_track", "book"]);
    assert_eq!(c.items[1].description, "A slow song.");

    let c = load("mixed.tsv");
    assert_eq!(c.types(), vec!["movie", "track"]);
}

#[test]
fn tsv() {
    let c = load("movies.tsv");
    assert_eq!(c.len(), 2);
    assert_eq!(
        c.items[0].description,
        "A keeper and his apprentice wait out a storm."
    );
    assert_eq!(c.items[1].attrs, attrs(json!({"year": "1987"})));
}

#[test]
fn recbole_ml100k_style() {
    let c = load("movies.item");
    assert_eq!(c.len(), 3);
    let toy = &c.items[0];
    assert_eq!(toy.id, "1");
    assert_eq!(toy.title, "Toy Boat");
    assert_eq!(toy.item_type, "movie");
    assert_eq!(
        toy.attrs,
        attrs(json!({"year": 1995, "genre": ["Animation", "Children's", "Comedy"]}))
    );
    assert_eq!(
        c.items[1].attrs["genre"],
        json!(["Crime", "Film-Noir"]),
        "Film-Noir stays one word"
    );
    // A year that is not a number is left out.
    assert_eq!(c.items[2].attrs, attrs(json!({"genre": ["unknown"]})));
}

#[test]
fn recbole_ml1m_style_crlf_float_year_token_genre() {
    let c = load("ml1m-style.item");
    assert_eq!(c.len(), 2);
    assert_eq!(c.items[0].id, "Toy Boat (1995)");
    assert_eq!(c.items[0].title, "Toy Boat");
    assert_eq!(
        c.items[0].attrs,
        attrs(json!({"year": 1995, "genre": ["Animation", "Children's", "Comedy"]}))
    );
    assert_eq!(c.items[1].attrs["year"], json!(1949));
    assert_eq!(c.items[1].attrs["genre"], json!(["Crime", "Film-Noir"]));
}

#[test]
fn recbole_mixed_types_and_other_fields() {
    let c = load("mixed.item");
    assert_eq!(c.types(), vec!["movie", "track"]);
    assert_eq!(
        c.items[0].attrs,
        attrs(json!({"rating": 4.5, "tags": ["family", "boats"], "scores": [1, 2.5]}))
    );
    assert_eq!(c.items[1].attrs, attrs(json!({"rating": 3})));
}

#[test]
fn recbole_latin1_lines_are_decoded() {
    let c = load("latin1.item");
    assert_eq!(c.items[0].title, "Misérables, Les");
    assert_eq!(c.items[1].title, "Cérémonie, La");
}

#[test]
fn amazon_layout() {
    let c = load("keyed_items.json");
    let ids: Vec<&str> = c.items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, vec!["0", "2", "10"], "numeric key order");
    let beakers = c.get("10").unwrap();
    assert_eq!(beakers.title, "Glass Beaker Set, 5 Sizes.");
    assert_eq!(
        beakers.description,
        "Borosilicate beakers for the lab bench."
    );
    assert_eq!(
        beakers.attrs,
        attrs(json!({
            "brand": "Clearwell",
            "categories": ["Industrial & Scientific", "Lab & Scientific Products",
                           "Lab Supplies & Consumables", "Beakers"]
        }))
    );
    let caliper = c.get("2").unwrap();
    assert_eq!(caliper.description, "");
    assert_eq!(
        caliper.attrs,
        attrs(json!({"categories": ["Industrial & Scientific", "Test", "Measure & Inspect"]})),
        "empty brand left out"
    );
}

#[test]
fn amazon_mixed_types_file_order_and_nested_categories() {
    let c = Catalog::load(&fixture("keyed_items_mixed.json"), &opts("product")).unwrap();
    let ids: Vec<&str> = c.items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, vec!["a", "b"], "file order when keys are not numbers");
    assert_eq!(c.types(), vec!["product", "tool"]);
    assert_eq!(
        c.items[1].attrs,
        attrs(json!({"categories": ["Safety", "Eyewear"], "color": "clear"}))
    );
}

#[test]
fn explicit_format_overrides_extension() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("items.txt");
    std::fs::write(&path, "id,title\n1,One\n").unwrap();
    let o = LoadOptions {
        format: Some(Format::Csv),
        default_type: "item".into(),
        skip_invalid: false,
    };
    let c = Catalog::load(&path, &o).unwrap();
    assert_eq!(c.items[0].title, "One");
    assert_eq!(c.items[0].item_type, "item");
    assert_eq!(LoadOptions::default().default_type, "item");
}

// ---------------------------------------------------------------------------------------
// Round trip

#[test]
fn write_jsonl_round_trips_every_format() {
    for name in [
        "movies.jsonl",
        "mixed.jsonl",
        "movies.csv",
        "mixed.csv",
        "movies.tsv",
        "movies.item",
        "ml1m-style.item",
        "mixed.item",
        "latin1.item",
        "keyed_items.json",
        "keyed_items_mixed.json",
    ] {
        let c = load(name);
        let mut buf = Vec::new();
        c.write_jsonl(&mut buf).unwrap();
        let text = String::from_utf8(buf.clone()).unwrap();
        assert_eq!(text.lines().count(), c.len(), "{name}: one line per item");
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("catalog.jsonl");
        std::fs::write(&out, &buf).unwrap();
        // The default type must not matter: every written item carries its type.
        let back = Catalog::load(&out, &opts("other")).unwrap();
        assert_eq!(back.items, c.items, "{name}");
        let mut again = Vec::new();
        back.write_jsonl(&mut again).unwrap();
        assert_eq!(again, buf, "{name}: byte-identical second write");
    }
}

#[test]
fn written_line_shape() {
    let c = Catalog::from_items(vec![
        Item {
            id: "1".into(),
            item_type: "Movie".into(),
            title: " Toy Boat ".into(),
            description: String::new(),
            attrs: attrs(json!({"year": 1995})),
        },
        Item {
            id: "2".into(),
            item_type: "movie".into(),
            title: "Night Train".into(),
            description: "Noir.".into(),
            attrs: Default::default(),
        },
    ])
    .unwrap();
    let mut buf = Vec::new();
    c.write_jsonl(&mut buf).unwrap();
    assert_eq!(
        String::from_utf8(buf).unwrap(),
        "{\"id\":\"1\",\"type\":\"movie\",\"title\":\"Toy Boat\",\"attrs\":{\"year\":1995}}\n\
         {\"id\":\"2\",\"type\":\"movie\",\"title\":\"Night Train\",\"description\":\"Noir.\"}\n"
    );
}

// ---------------------------------------------------------------------------------------
// Errors: every message names the file and the line (and the field where there is one)

#[test]
fn error_unreadable_file() {
    let path = fixture("does-not-exist.jsonl");
    let e = Catalog::load(&path, &opts("movie")).unwrap_err();
    assert!(matches!(e, CatalogError::Io { .. }));
    assert!(
        e.to_string().starts_with(&path.display().to_string()),
        "{e}"
    );
}

#[test]
fn error_cannot_detect_or_unknown_format() {
    let (p, e) = bad("items.txt", "id,title\n1,a\n");
    assert!(matches!(e, CatalogError::CannotDetect { .. }));
    assert!(e.to_string().starts_with(&p), "{e}");
    assert!(
        e.to_string().contains("jsonl, csv, tsv, recbole, amazon"),
        "{e}"
    );
    let e = "parquet".parse::<Format>().unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown catalog format \"parquet\": expected one of jsonl, csv, tsv, recbole, amazon"
    );
}

#[test]
fn error_jsonl_syntax() {
    let (p, e) = bad(
        "catalog.jsonl",
        "{\"id\":\"1\",\"title\":\"a\"}\n{\"id\":\"2\",\"title\":\"b\"\n",
    );
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("{p}:2: invalid JSON: EOF while parsing")),
        "{msg}"
    );
    assert_eq!(e.line(), Some(2));

    let (p, e) = bad("catalog.jsonl", "\n\n[1, 2]\n");
    assert_eq!(
        e.to_string(),
        format!("{p}:3: expected a JSON object, found [1,2]")
    );
}

#[test]
fn error_jsonl_wrong_field_types() {
    let (p, e) = bad(
        "catalog.jsonl",
        "{\"id\":\"1\",\"title\":\"a\"}\n{\"id\":\"2\",\"title\":\"b\"}\n{\"id\":\"3\",\"title\":42}\n",
    );
    assert_eq!(
        e.to_string(),
        format!("{p}:3: field \"title\": expected a string, found 42")
    );
    match e {
        CatalogError::Field { line, field, .. } => {
            assert_eq!(line, 3);
            assert_eq!(field, "title");
        }
        other => panic!("{other:?}"),
    }
    let (p, e) = bad("c.jsonl", "{\"id\":1.5,\"title\":\"a\"}\n");
    assert_eq!(
        e.to_string(),
        format!("{p}:1: field \"id\": expected a string or an integer, found 1.5")
    );
    let (p, e) = bad("c.jsonl", "{\"id\":\"1\",\"title\":\"a\",\"attrs\":[1]}\n");
    assert_eq!(
        e.to_string(),
        format!("{p}:1: field \"attrs\": expected an object, found [1]")
    );
    let (p, e) = bad(
        "c.jsonl",
        "{\"id\":\"1\",\"title\":\"a\",\"description\":true}\n",
    );
    assert_eq!(
        e.to_string(),
        format!("{p}:1: field \"description\": expected a string, found true")
    );
    let (p, e) = bad("c.jsonl", "{\"id\":\"1\",\"title\":\"a\",\"type\":7}\n");
    assert!(e
        .to_string()
        .starts_with(&format!("{p}:1: field \"type\":")));
    let (p, e) = bad(
        "c.jsonl",
        "{\"id\":\"1\",\"title\":\"a\",\"year\":1,\"attrs\":{\"year\":2}}\n",
    );
    assert!(e
        .to_string()
        .starts_with(&format!("{p}:1: field \"year\": given both")));
}

#[test]
fn error_jsonl_missing_fields() {
    let (p, e) = bad(
        "c.jsonl",
        "{\"id\":\"1\",\"title\":\"a\"}\n{\"title\":\"b\"}\n",
    );
    assert_eq!(
        e.to_string(),
        format!("{p}:2: field \"id\": missing required field")
    );
    let (p, e) = bad("c.jsonl", "{\"id\":\"1\"}\n");
    assert_eq!(
        e.to_string(),
        format!("{p}:1: field \"title\": missing required field")
    );
    let (p, e) = bad("c.jsonl", "{\"id\":\"  \",\"title\":\"a\"}\n");
    assert_eq!(
        e.to_string(),
        format!("{p}:1: field \"id\": the id is empty")
    );
}

#[test]
fn error_csv_missing_column_and_bad_record() {
    let (p, e) = bad("items.csv", "id,name,year\n1,a,2000\n");
    assert_eq!(
        e.to_string(),
        format!("{p}:1: field \"title\": missing required column; the header has: id, name, year")
    );
    let (p, e) = bad("items.tsv", "title\tyear\na\t2000\n");
    assert!(e
        .to_string()
        .starts_with(&format!("{p}:1: field \"id\": missing required column")));
    // A quoted field spanning lines: the error names the line where the record starts.
    let (p, e) = bad(
        "items.csv",
        "id,title,description\n1,a,\"two\nlines\"\n2,b\n",
    );
    assert_eq!(
        e.to_string(),
        format!("{p}:4: expected 3 fields (as in the header), found 2")
    );
    let (p, e) = bad("items.csv", "id,title\n1,a\n1,b\n");
    assert_eq!(
        e.to_string(),
        format!("{p}:3: field \"id\": duplicate id \"1\", first used on line 2")
    );
    let (p, e) = bad("items.csv", "id,title,Title\n1,a,b\n");
    assert!(e
        .to_string()
        .starts_with(&format!("{p}:1: column \"Title\" appears twice")));
}

#[test]
fn error_duplicate_ids_name_both_lines() {
    let (p, e) = bad(
        "c.jsonl",
        "{\"id\":\"x\",\"title\":\"a\"}\n\n{\"id\":\"y\",\"title\":\"b\"}\n{\"id\":\"x\",\"title\":\"c\"}\n",
    );
    assert_eq!(
        e.to_string(),
        format!("{p}:4: field \"id\": duplicate id \"x\", first used on line 1")
    );
    match e {
        CatalogError::DuplicateId {
            line, first_line, ..
        } => assert_eq!((line, first_line), (4, 1)),
        other => panic!("{other:?}"),
    }
    // An integer id and the same id as a string are the same id.
    let (_, e) = bad(
        "c.jsonl",
        "{\"id\":7,\"title\":\"a\"}\n{\"id\":\"7\",\"title\":\"b\"}\n",
    );
    assert!(matches!(e, CatalogError::DuplicateId { .. }));
}

#[test]
fn error_empty_catalog() {
    for (name, content) in [
        ("c.jsonl", "\n\n"),
        ("c.jsonl", ""),
        ("c.csv", "id,title\n"),
        ("c.item", "item_id:token\tmovie_title:token_seq\n"),
        ("c.json", "{}"),
    ] {
        let (p, e) = bad(name, content);
        assert!(matches!(e, CatalogError::Empty { .. }), "{name}: {e:?}");
        assert_eq!(e.to_string(), format!("{p}: the catalog has no items"));
    }
}

#[test]
fn error_missing_text() {
    let (p, e) = bad(
        "c.jsonl",
        "{\"id\":\"1\",\"title\":\"a\"}\n{\"id\":\"2\",\"title\":\"   \",\"description\":\"\"}\n",
    );
    assert_eq!(
        e.to_string(),
        format!(
            "{p}:2: field \"title\": item \"2\" has no text: the title is empty and there is neither a description nor any attribute"
        )
    );
    let (p, e) = bad("c.csv", "id,title,year\n1,,\n");
    assert!(e
        .to_string()
        .starts_with(&format!("{p}:2: field \"title\": item \"1\" has no text")));
    let (p, e) = bad(
        "c.item",
        "item_id:token\tmovie_title:token_seq\n1\tA\n2\t \n",
    );
    assert!(e
        .to_string()
        .starts_with(&format!("{p}:3: field \"title\"")));
}

#[test]
fn error_invalid_type() {
    let (p, e) = bad(
        "c.jsonl",
        "{\"id\":\"1\",\"title\":\"a\",\"type\":\"movie\"}\n{\"id\":\"2\",\"title\":\"b\",\"type\":\"a_17\"}\n",
    );
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("{p}:2: field \"type\": invalid type \"a_17\"")),
        "{msg}"
    );
    assert!(msg.contains("semantic-ID level token"), "{msg}");
    let (p, e) = bad("c.csv", "id,type,title\n1,9lives,a\n");
    assert!(e
        .to_string()
        .starts_with(&format!("{p}:2: field \"type\": invalid type \"9lives\"")));

    let e = Catalog::load(&fixture("movies.jsonl"), &opts("b_2")).unwrap_err();
    assert!(
        matches!(e, CatalogError::InvalidDefaultType { .. }),
        "{e:?}"
    );
    assert!(e
        .to_string()
        .starts_with("default item type: invalid type \"b_2\""));
}

#[test]
fn error_invalid_utf8_names_the_line() {
    let (p, e) = load_bytes(
        "c.jsonl",
        b"{\"id\":\"1\",\"title\":\"a\"}\n{\"id\":\"2\",\"title\":\"Mis\xe9rables\"}\n",
        None,
    );
    assert_eq!(
        e.to_string(),
        format!("{}:2: invalid UTF-8 (at byte 23 of the line)", p.display())
    );
    let (p, e) = load_bytes("c.csv", b"id,title\n1,a\n2,Mis\xe9rables\n", None);
    assert_eq!(
        e.to_string(),
        format!("{}:3: invalid UTF-8 in column 2", p.display())
    );
    let (p, e) = load_bytes(
        "c.json",
        b"{\n \"0\": {\"title\": \"a\"},\n \"1\": {\"title\": \"\xe9\"}\n}",
        None,
    );
    assert_eq!(
        e.to_string(),
        format!("{}:3: invalid UTF-8 (at byte 18 of the line)", p.display())
    );
}

#[test]
fn error_recbole_header_and_rows() {
    let (p, e) = bad("c.item", "item_id\ttitle:token\n1\ta\n");
    assert!(e.to_string().starts_with(&format!(
        "{p}:1: header field \"item_id\" is not of the form name:type"
    )));
    let (p, e) = bad("c.item", "item_id:token\ttitle:text\n1\ta\n");
    assert!(e.to_string().starts_with(&format!(
        "{p}:1: header field \"title:text\" has unknown type"
    )));
    let (p, e) = bad("c.item", "id:token\ttitle:token\n1\ta\n");
    assert!(e.to_string().starts_with(&format!(
        "{p}:1: field \"item_id\": missing required column"
    )));
    let (p, e) = bad("c.item", "item_id:token\ttitle:token\n1\ta\n2\n");
    assert_eq!(
        e.to_string(),
        format!("{p}:3: expected 2 tab-separated fields (as in the header), found 1")
    );
    let (p, e) = bad(
        "c.item",
        "item_id:token\ttitle:token\tprice:float\n1\ta\tcheap\n",
    );
    assert_eq!(
        e.to_string(),
        format!("{p}:2: field \"price\": expected a number, found \"cheap\"")
    );
    let (p, e) = bad("c.item", "item_id:token\ttitle:token\n1\ta\n1\tb\n");
    assert_eq!(
        e.to_string(),
        format!("{p}:3: field \"id\": duplicate id \"1\", first used on line 2")
    );
}

#[test]
fn error_amazon_names_the_key_line() {
    let (p, e) = bad(
        "items.json",
        "{\n  \"0\": {\"title\": \"a\"},\n  \"1\": {\"title\": 5}\n}\n",
    );
    assert_eq!(
        e.to_string(),
        format!("{p}:3: field \"title\": expected a string, found 5")
    );
    let (p, e) = bad(
        "items.json",
        "{\n  \"0\": {\"title\": \"a\"},\n  \"1\": {\"title\": \"b\"},\n  \"0\": {\"title\": \"c\"}\n}\n",
    );
    assert_eq!(
        e.to_string(),
        format!("{p}:4: field \"id\": duplicate id \"0\", first used on line 2")
    );
    let (p, e) = bad(
        "items.json",
        "{\n  \"0\": {\"title\": \"a\"},\n  \"1\": {\"title\": \"\"}\n}\n",
    );
    assert!(e
        .to_string()
        .starts_with(&format!("{p}:3: field \"title\": item \"1\" has no text")));
    let (p, e) = bad(
        "items.json",
        "{\n  \"0\": {\"title\": \"a\"},\n  \"1\": {\"title\" \"b\"}\n}\n",
    );
    assert!(
        e.to_string()
            .starts_with(&format!("{p}:3: invalid JSON: expected `:`")),
        "{e}"
    );
    let (p, e) = bad("items.json", "[1, 2]");
    assert!(e
        .to_string()
        .starts_with(&format!("{p}:1: expected a JSON object keyed by item id")));
    let (p, e) = bad("items.json", "{\n \"0\": \"just a title\"\n}");
    assert_eq!(
        e.to_string(),
        format!("{p}:2: item \"0\": expected an object, found \"just a title\"")
    );
    let (p, e) = bad(
        "items.json",
        "{\n \"0\": {\"title\": \"a\", \"categories\": 3}\n}",
    );
    assert!(e
        .to_string()
        .starts_with(&format!("{p}:2: field \"categories\":")));
}

#[test]
fn from_items_validates_like_load() {
    let item = |id: &str, t: &str, title: &str| Item {
        id: id.into(),
        item_type: t.into(),
        title: title.into(),
        description: String::new(),
        attrs: Default::default(),
    };
    let c =
        Catalog::from_items(vec![item("1", "Movie", "A"), item("2", "music track", "B")]).unwrap();
    assert_eq!(c.types(), vec!["movie", "music_track"]);
    assert_eq!(c.index_of("2"), Some(1));

    let e =
        Catalog::from_items(vec![item("1", "movie", "A"), item("1", "movie", "B")]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "<memory>:2: field \"id\": duplicate id \"1\", first used on line 1"
    );
    let e = Catalog::from_items(vec![item("1", "movie", " ")]).unwrap_err();
    assert!(e.to_string().starts_with("<memory>:1: field \"title\""));
    let e = Catalog::from_items(vec![item("1", "", "A")]).unwrap_err();
    assert!(
        e.to_string().starts_with("<memory>:1: field \"type\""),
        "{e}"
    );
    let e = Catalog::from_items(vec![]).unwrap_err();
    assert_eq!(e.to_string(), "<memory>: the catalog has no items");
}

#[test]
fn type_names() {
    assert_eq!(normalize_type("Music Track").unwrap(), "music_track");
    assert_eq!(normalize_type("  TV-Show ").unwrap(), "tv_show");
    assert!(normalize_type("z_0").is_err());
    assert!(normalize_type("movie!").is_err());
}

// ---------------------------------------------------------------------------------------
// Template over loaded catalogs

#[test]
fn default_template_over_every_format() {
    let t = Template::default();
    let c = load("movies.item");
    assert_eq!(
        t.render(&c.items[0]),
        "Toy Boat. 1995. Animation, Children's, Comedy."
    );
    let c = load("keyed_items.json");
    assert_eq!(
        t.render(c.get("10").unwrap()),
        "Glass Beaker Set, 5 Sizes. Clearwell. Industrial & Scientific, Lab & Scientific \
         Products, Lab Supplies & Consumables, Beakers. Borosilicate beakers for the lab bench."
    );
    assert_eq!(
        t.render(c.get("2").unwrap()),
        "Digital Caliper 150mm. Industrial & Scientific, Test, Measure & Inspect."
    );
    let c = load("mixed.jsonl");
    assert_eq!(t.render(&c.items[2]), "Weekly talks about small boats.");
    let c = load("movies.csv");
    assert_eq!(
        t.render(&c.items[0]),
        "The Lighthouse Keeper. 2019. A keeper and his apprentice wait out a storm, \"together\"."
    );
}

#[test]
fn template_file_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("item_text.txt");
    std::fs::write(&path, "{title}.\n{attrs.genre}. {descripton}\n").unwrap();
    let e = Template::load(&path).unwrap_err();
    assert!(
        matches!(
            e,
            TemplateError::Syntax {
                line: 2,
                column: 16,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string().starts_with(&format!(
            "{}:2:16: unknown placeholder {{descripton}}",
            path.display()
        )),
        "{e}"
    );
    std::fs::write(&path, "{type}: {title} ({attrs.year})\n").unwrap();
    let t = Template::load(&path).unwrap();
    let c = load("movies.item");
    assert_eq!(t.render(&c.items[0]), "movie: Toy Boat (1995)");
    let e = Template::load(&dir.path().join("missing.txt")).unwrap_err();
    assert!(matches!(e, TemplateError::Io { .. }));
}

// ---------------------------------------------------------------------------------------
// Real MovieLens files (RecBole atomic format), from scripts/fetch-assets.sh

#[test]
fn real_ml100k() {
    let c = Catalog::load(&asset("ml-100k/ml-100k.item"), &opts("movie")).unwrap();
    assert_eq!(c.len(), 1682);
    assert_eq!(c.types(), vec!["movie"]);
    let toy = c.get("1").unwrap();
    assert_eq!(toy.title, "Toy Story");
    assert_eq!(
        toy.attrs,
        attrs(json!({"year": 1995, "genre": ["Animation", "Children's", "Comedy"]}))
    );
    // Non-ASCII titles are UTF-8 in this release.
    assert_eq!(c.get("1633").unwrap().title, "Á köldum klaka (Cold Fever)");
    // Placeholder row: title "unkonwn", year "unkonwn" (left out), genre "unknown".
    let odd = c.get("267").unwrap();
    assert_eq!(odd.title, "unkonwn");
    assert_eq!(odd.attrs, attrs(json!({"genre": ["unknown"]})));
    // The year column holds "V" here (the video marker slipped into it).
    assert!(!c.get("1412").unwrap().attrs.contains_key("year"));
    assert_eq!(
        Template::default().render(toy),
        "Toy Story. 1995. Animation, Children's, Comedy."
    );
}

#[test]
fn real_ml1m() {
    let c = Catalog::load(&asset("ml-1m/ml-1m.item"), &opts("movie")).unwrap();
    assert_eq!(c.len(), 3883);
    let toy = &c.items[0];
    assert_eq!(toy.id, "Toy Story (1995)");
    assert_eq!(toy.title, "Toy Story");
    assert_eq!(
        toy.attrs,
        attrs(json!({"year": 1995, "genre": ["Animation", "Children's", "Comedy"]}))
    );
    assert!(c.items.iter().all(|i| i.attrs["year"].is_i64()));
    assert!(c.items.iter().all(|i| !i.title.ends_with('\r')));
    assert_eq!(c.get("Alien³ (1992)").unwrap().title, "Alien³");
}
