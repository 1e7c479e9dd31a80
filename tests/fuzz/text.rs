//! The small text syntaxes: attribute filters, request bodies (and the attribute words
//! read from a request's query), SID strings and item text templates. Arbitrary input
//! never panics; valid generated input parses to what was meant.

use proptest::prelude::*;
use serde_json::{json, Value};
use sidrec::catalog::{Catalog, Item};
use sidrec::decode::query::read_attributes;
use sidrec::decode::Filter;
use sidrec::serve::{GenerateBody, RecommendBody};
use sidrec::sid::SidVocab;
use sidrec::template::{Template, TemplateError};

use crate::{config, json_value, line_count, mutate, mutations};

fn item(id: &str, title: &str, attrs: Value) -> Item {
    Item {
        id: id.into(),
        item_type: "movie".into(),
        title: title.into(),
        description: String::new(),
        attrs: attrs.as_object().cloned().unwrap_or_default(),
    }
}

/// Items with every kind of attribute a filter meets: numbers, numeric strings, lists,
/// nested values, nulls, odd key names.
fn catalog() -> Catalog {
    Catalog::from_items(vec![
        item(
            "1",
            "Toy Story",
            json!({"year": 1995, "genre": ["Animation", "Comedy"], "rating": 8.3}),
        ),
        item(
            "2",
            "Heat",
            json!({"year": "1995", "genre": ["Crime", null, 3], "brand": "3M"}),
        ),
        item(
            "3",
            "Alien",
            json!({"year": -1e300, "genre": "Sci-Fi", "a b": {"x": [1]}, "naïve": true}),
        ),
        item(
            "4",
            "Lab Coat",
            json!({"category": "Lab Safety", "categories": ["Lab", "Lab Tape"], "year": null}),
        ),
        item("5", "Nothing", json!({})),
    ])
    .unwrap()
}

// ---------------------------------------------------------------------------------------
// Filters

const FIELDS: &[&str] = &[
    "year",
    "genre",
    "rating",
    "brand",
    "category",
    "categories",
    "type",
    "title",
    "id",
    "naïve",
    "a b",
];
const OPS: &[&str] = &["=", "!=", ">=", "<=", ">", "<", "~"];

/// Filter-like text: fields, operators, values and separators in any order, with noise.
fn filterish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        3 => prop::sample::select(FIELDS.to_vec()).prop_map(String::from),
        3 => prop::sample::select(OPS.to_vec()).prop_map(String::from),
        2 => prop::sample::select(vec![
            ",", " and ", " AND ", "&&", " ", "\"", "1995", "-1e400", "NaN", "inf", "1e-400",
            "Comedy", "é", "\u{0}", "=>", "==", "~~",
        ])
        .prop_map(String::from),
        1 => ".{0,4}",
    ];
    prop::collection::vec(piece, 0..12).prop_map(|p| p.concat())
}

fn check_filter(expr: &str, catalog: &Catalog) -> Result<(), TestCaseError> {
    match Filter::parse(expr, catalog) {
        Ok(f) => {
            prop_assert_eq!(f.expr(), expr);
            for it in &catalog.items {
                let _ = f.matches(it);
            }
        }
        Err(e) => prop_assert!(e.to_string().contains("bad filter"), "{}", e),
    }
    Ok(())
}

/// One valid clause: a known field, an operator, a value it accepts.
fn clause() -> impl Strategy<Value = String> {
    (
        prop::sample::select(FIELDS.to_vec()),
        prop::sample::select(OPS.to_vec()),
        prop_oneof![
            any::<i32>().prop_map(|n| n.to_string()),
            any::<f32>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| f.to_string()),
        ],
        "[A-Za-z0-9][A-Za-z0-9'_.-]{0,8}",
        " {0,2}",
        any::<bool>(),
    )
        .prop_map(|(field, op, number, word, space, quoted)| {
            let value = if matches!(op, ">=" | "<=" | ">" | "<") {
                number
            } else if quoted {
                format!("\"{word}\"")
            } else {
                word
            };
            format!("{field}{space}{op}{space}{value}")
        })
}

proptest! {
    #![proptest_config(config(500))]

    #[test]
    fn filter_arbitrary_text_never_panics(expr in ".{0,40}") {
        check_filter(&expr, &catalog())?;
    }

    #[test]
    fn filter_like_text_never_panics(expr in filterish()) {
        check_filter(&expr, &catalog())?;
    }

    /// Clauses of known fields with fitting values, joined by any separator, parse.
    #[test]
    fn valid_filters_parse(
        clauses in prop::collection::vec(clause(), 1..5),
        sep in prop::sample::select(vec![",", ", ", " and ", " AND ", "&&", " && "]),
    ) {
        let expr = clauses.join(sep);
        let c = catalog();
        let f = Filter::parse(&expr, &c);
        prop_assert!(f.is_ok(), "{:?}: {}", expr, f.unwrap_err());
        check_filter(&expr, &c)?;
    }

    /// `id=X` keeps exactly item X; `id!=X` every other.
    #[test]
    fn id_filters_select_the_item(i in 0usize..5) {
        let c = catalog();
        let id = &c.items[i].id;
        let eq = Filter::parse(&format!("id={id}"), &c).unwrap();
        let ne = Filter::parse(&format!("id != \"{id}\""), &c).unwrap();
        for (j, it) in c.items.iter().enumerate() {
            prop_assert_eq!(eq.matches(it), i == j);
            prop_assert_eq!(ne.matches(it), i != j);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Request bodies

/// A request body: mostly the known fields with values of the right or wrong type.
fn bodyish() -> impl Strategy<Value = Value> {
    let key = prop::sample::select(vec![
        "query",
        "history",
        "types",
        "filter",
        "k",
        "exclude_seen",
        "mode",
        "beams",
        "mix_recent",
        "recent_decay",
        "memory",
        "literal",
        "format",
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "unknown",
    ]);
    let value = prop_oneof![
        2 => json_value(),
        1 => prop::sample::select(vec![
            json!(-1), json!(1e300), json!(u64::MAX), json!(18446744073709551616.0),
            json!(0.5), json!("10"), json!(["a", 1]), json!(null), json!(true),
            json!(f32::MAX as f64 * 2.0),
        ]),
    ];
    prop_oneof![
        4 => prop::collection::vec((key, value), 0..6)
            .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        1 => json_value(),
    ]
}

proptest! {
    #![proptest_config(config(500))]

    /// Any JSON value, as a value and as text, and mutated text of it.
    #[test]
    fn request_bodies_never_panic(body in bodyish(), muts in mutations()) {
        let _ = serde_json::from_value::<RecommendBody>(body.clone());
        let _ = serde_json::from_value::<GenerateBody>(body.clone());
        let text = body.to_string().into_bytes();
        let _ = serde_json::from_slice::<RecommendBody>(&text);
        let _ = serde_json::from_slice::<GenerateBody>(&text);
        let text = mutate(text, &muts);
        let _ = serde_json::from_slice::<RecommendBody>(&text);
        let _ = serde_json::from_slice::<GenerateBody>(&text);
    }

    /// Well-typed bodies deserialize to what they say.
    #[test]
    fn valid_request_bodies_deserialize(
        query in ".{0,20}",
        history in prop::collection::vec(".{0,6}", 0..4),
        k in prop::option::of(0usize..100),
        mix_recent in 0usize..10,
        seed in prop::option::of(any::<u64>()),
        temperature in prop::option::of(0f32..2.0),
    ) {
        let rec: RecommendBody = serde_json::from_value(json!({
            "query": query, "history": history, "k": k, "mix_recent": mix_recent,
        }))
        .unwrap();
        prop_assert_eq!(&rec.query, &query);
        prop_assert_eq!(&rec.history, &history);
        prop_assert_eq!(rec.k, k);
        prop_assert_eq!(rec.mix_recent, Some(mix_recent));
        let gen: GenerateBody = serde_json::from_value(json!({
            "query": query, "seed": seed, "temperature": temperature,
        }))
        .unwrap();
        prop_assert_eq!(gen.seed, seed);
        prop_assert_eq!(gen.temperature, temperature);
    }

    /// The attribute words of any query: reading never panics and every reading names
    /// words of the query.
    #[test]
    fn query_reading_never_panics(
        query in prop_oneof![
            ".{0,30}",
            prop::collection::vec(
                prop::sample::select(vec![
                    "90s", "1990s", "1990's", "nineties", "before", "after", "since", "1985",
                    "2099", "1799", "00s", "-90s", "by", "from", "3m", "comedy", "comedies",
                    "lab", "tape", "sci", "fi", "'s", "ǅ", "İ", " ", ",",
                ]),
                0..8,
            )
            .prop_map(|w| w.join(" ")),
        ],
    ) {
        let c = catalog();
        for r in read_attributes(&query, &c) {
            prop_assert!(!r.words.is_empty() && !r.clause.is_empty());
        }
    }
}

// ---------------------------------------------------------------------------------------
// SID strings

fn vocab() -> SidVocab {
    SidVocab::new(vec!["movie".into(), "podcast".into()], vec![4, 3, 12], 2).unwrap()
}

/// A valid `(type, codes, dedup)` of [`vocab`].
fn sid_parts() -> impl Strategy<Value = (String, Vec<u32>, Option<u32>)> {
    (
        prop::sample::select(vec!["movie", "podcast"]).prop_map(String::from),
        (0u32..4, 0u32..3, 0u32..12).prop_map(|(a, b, c)| vec![a, b, c]),
        prop::option::of(0u32..2),
    )
}

proptest! {
    #![proptest_config(config(500))]

    #[test]
    fn sid_arbitrary_text_never_panics(
        text in prop_oneof![
            ".{0,30}",
            "(<[a-z]{0,7}(_[0-9+-]{0,12})?>?){0,6}",
        ],
        ids in prop::collection::vec(prop_oneof![0u32..30, any::<u32>()], 0..6),
    ) {
        let v = vocab();
        if let Ok(parsed) = v.parse(&text) {
            let again = v.format(&parsed).unwrap();
            prop_assert_eq!(v.parse(&again).unwrap(), parsed);
        }
        let _ = v.decode(&ids);
        let _ = v.format(&ids);
    }

    /// encode, format, parse and decode agree; mutated SID strings never panic.
    #[test]
    fn sid_round_trip((t, codes, dedup) in sid_parts(), muts in mutations()) {
        let v = vocab();
        let ids = v.encode(&t, &codes, dedup).unwrap();
        let s = v.format(&ids).unwrap();
        prop_assert_eq!(v.parse(&s).unwrap(), ids.clone());
        let sid = v.decode(&ids).unwrap();
        prop_assert_eq!((sid.item_type, sid.codes, sid.dedup), (t, codes, dedup));
        let bent = String::from_utf8_lossy(&mutate(s.into_bytes(), &muts)).into_owned();
        let _ = v.parse(&bent);
    }

    /// Deserialized vocabularies (as the codebooks metadata and model directories hold
    /// them) with any sizes are refused or usable.
    #[test]
    fn sid_vocab_from_json_never_panics(
        types in prop::collection::vec("[a-z]{1,4}", 0..3),
        levels in prop_oneof![
            prop::collection::vec(prop_oneof![0usize..5, Just(usize::MAX), Just(1usize << 40)], 0..4),
            prop::collection::vec(Just(1usize), 20..40),
        ],
        dedup in prop_oneof![0usize..4, Just(usize::MAX)],
        sid in "(<[a-z]{1,4}(_[0-9]{1,3})?>){1,5}",
    ) {
        let value = json!({"types": types, "levels": levels, "dedup": dedup});
        if let Ok(v) = serde_json::from_value::<SidVocab>(value) {
            let n = v.len();
            let _ = v.dedup_letter();
            let _ = v.token(n as u32);
            let _ = v.parse(&sid);
            if n < 10_000 {
                prop_assert_eq!(v.tokens().len(), n);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Templates

#[derive(Debug, Clone)]
enum Piece {
    Text(String),
    Field(String),
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        2 => ".{0,6}".prop_map(Piece::Text),
        1 => prop_oneof![
            prop::sample::select(vec!["id", "type", "title", "description", " title ", "attrs.year"])
                .prop_map(String::from),
            "attrs\\.[a-z]{1,6}",
        ]
        .prop_map(Piece::Field),
    ]
}

fn source_of(pieces: &[Piece]) -> String {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Text(t) => t.replace('{', "{{").replace('}', "}}"),
            Piece::Field(f) => format!("{{{f}}}"),
        })
        .collect()
}

fn check_template_error(src: &str, e: &TemplateError) -> Result<(), TestCaseError> {
    if let TemplateError::Syntax { line, column, .. } = e {
        let lines = line_count(src.as_bytes());
        prop_assert!((1..=lines).contains(line), "line {} of {}", line, lines);
        prop_assert!(*column >= 1 && *column <= src.chars().count() + 1);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(500))]

    #[test]
    fn template_arbitrary_text_never_panics(
        src in prop_oneof![".{0,40}", "[{}a-z. \n]{0,30}", "(\\{[a-z. ]{0,12}\\}?[^{}]{0,3}){0,5}"],
    ) {
        match Template::parse(&src) {
            Ok(t) => {
                for it in &catalog().items {
                    let _ = t.render(it);
                }
            }
            Err(e) => check_template_error(&src, &e)?,
        }
    }

    /// Literal text (braces escaped) and placeholders parse, name their attributes in
    /// order, and a template without placeholders renders its text.
    #[test]
    fn valid_templates_parse(pieces in prop::collection::vec(piece(), 0..8)) {
        let src = source_of(&pieces);
        let t = Template::parse(&src);
        prop_assert!(t.is_ok(), "{:?}: {}", src, t.unwrap_err());
        let t = t.unwrap();
        prop_assert_eq!(t.source(), src.as_str());
        let keys: Vec<String> = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Field(f) => f.trim().strip_prefix("attrs.").map(str::to_string),
                _ => None,
            })
            .collect();
        prop_assert_eq!(t.attr_keys(), keys.iter().map(String::as_str).collect::<Vec<_>>());
        let rendered: Vec<String> = catalog().items.iter().map(|it| t.render(it)).collect();
        if !pieces.iter().any(|p| matches!(p, Piece::Field(_))) {
            let text: String = pieces
                .iter()
                .map(|p| match p {
                    Piece::Text(t) => t.as_str(),
                    Piece::Field(_) => "",
                })
                .collect();
            let want = text.split_whitespace().collect::<Vec<_>>().join(" ");
            for r in rendered {
                prop_assert_eq!(&r, &want);
            }
        }
    }
}

/// Found by `sid_vocab_from_json_never_panics`: a vocabulary read from a file skipped
/// `SidVocab::new`, so `levels: [usize::MAX]` overflowed in `len()` (a panic in debug
/// builds, a wrong size in release) and more than 158 levels overflowed the level
/// letter. Deserializing now applies the limits of `new`.
#[test]
fn sid_vocab_from_json_applies_the_limits() {
    let err = |v: Value| {
        serde_json::from_value::<SidVocab>(v)
            .unwrap_err()
            .to_string()
    };
    let e = err(json!({"types": ["a"], "levels": [usize::MAX], "dedup": 0}));
    assert!(e.contains("SID tokens"), "{e}");
    let e = err(json!({"types": [], "levels": [3, 1usize << 40], "dedup": 2}));
    assert!(e.contains("SID tokens"), "{e}");
    let e = err(json!({"types": ["a"], "levels": [1], "dedup": usize::MAX}));
    assert!(e.contains("SID tokens"), "{e}");
    let e = err(json!({"types": ["a"], "levels": vec![1; 200], "dedup": 0}));
    assert!(e.contains("200 levels"), "{e}");
    let v: SidVocab =
        serde_json::from_value(json!({"types": ["b", "a", "a"], "levels": [2], "dedup": 0}))
            .unwrap();
    assert_eq!(v.types, ["a", "b"]);
    assert_eq!(v.len(), 4);
}
