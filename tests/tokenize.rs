//! End-to-end tests of `tokenize::run`: catalog → MiniLM embeddings (or precomputed
//! vectors) → residual k-means → typed SIDs → artifact directory, and reading the
//! directory back (`SidMap`, the trie, `catalog.jsonl`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use sidrec::artifacts::{self, SidMap, SidRecord};
use sidrec::catalog::{Catalog, LoadOptions};
use sidrec::npy;
use sidrec::progress::Progress;
use sidrec::quantize::{Assign, QuantizeConfig};
use sidrec::template::Template;
use sidrec::tokenize::{self, EmbeddingSource, Report, TokenizeOptions};
use sidrec::trie::Mask;

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn minilm_dir() -> PathBuf {
    let dir = manifest().join("assets/minilm");
    if !dir.join("model.safetensors").is_file() {
        panic!(
            "{} has no MiniLM model: run scripts/fetch-assets.sh",
            dir.display()
        );
    }
    dir
}

fn ml100k_item() -> PathBuf {
    let path = manifest().join("assets/ml-100k/ml-100k.item");
    if !path.is_file() {
        panic!("{} is missing: run scripts/fetch-assets.sh", path.display());
    }
    path
}

fn fixture(name: &str) -> PathBuf {
    manifest().join("tests/data/tokenize").join(name)
}

/// Options with small codebooks, quiet, no force.
fn options(
    catalog: Option<PathBuf>,
    embeddings: EmbeddingSource,
    codes: &[usize],
    seed: u64,
    out: &Path,
) -> TokenizeOptions {
    TokenizeOptions {
        catalog,
        load: LoadOptions::default(),
        template: Template::default(),
        embeddings,
        batch_size: 32,
        max_tokens: sidrec::embed::DEFAULT_MAX_TOKENS,
        quantize: QuantizeConfig {
            levels: codes.to_vec(),
            seed,
            ..Default::default()
        },
        out: out.to_path_buf(),
        force: false,
        save_embeddings: false,
        collab: None,
    }
}

fn quiet() -> Progress {
    Progress::new(true)
}

fn read_sids(dir: &Path) -> Vec<SidRecord> {
    fs::read_to_string(dir.join(artifacts::SIDS_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn read_report(dir: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(dir.join(artifacts::REPORT_FILE)).unwrap()).unwrap()
}

fn without(mut v: Value, key: &str) -> Value {
    v.as_object_mut().unwrap().remove(key);
    v
}

/// The SID string a record's type and codes must produce: one letter per level, the dedup
/// code (if any) under the next letter.
fn expected_sid(r: &SidRecord) -> String {
    let mut s = format!("<{}>", r.item_type);
    for (l, c) in r.codes.iter().enumerate() {
        s.push_str(&format!("<{}_{}>", (b'a' + l as u8) as char, c));
    }
    s
}

/// `1 − distinct (type, level codes) / n`, computed from the records.
fn collision_rate_of(records: &[SidRecord], levels: usize) -> f64 {
    let distinct: HashSet<(&str, &[u32])> = records
        .iter()
        .map(|r| (r.item_type.as_str(), &r.codes[..levels]))
        .collect();
    1.0 - distinct.len() as f64 / records.len() as f64
}

/// `n` points in `clusters` tight groups around random centres in `[-1, 1]^d`.
fn clustered(n: usize, d: usize, clusters: usize, noise: f32, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let centres: Vec<f32> = (0..clusters * d)
        .map(|_| rng.gen_range(-1.0..1.0))
        .collect();
    let mut data = Vec::with_capacity(n * d);
    for i in 0..n {
        let c = &centres[(i % clusters) * d..(i % clusters + 1) * d];
        data.extend(c.iter().map(|&v| v + noise * rng.gen_range(-1.0f32..1.0)));
    }
    data
}

fn write_safetensors(path: &Path, name: &str, data: &[f32], n: usize, d: usize) {
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n, d], &bytes).unwrap();
    let out = safetensors::serialize(vec![(name.to_string(), view)], None).unwrap();
    fs::write(path, out).unwrap();
}

/// Names of the entries of a directory, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn mixed_catalog_through_minilm() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mixed");
    let catalog_path = fixture("mixed.jsonl");
    let mut opts = options(
        Some(catalog_path.clone()),
        EmbeddingSource::ModelDir(minilm_dir()),
        &[16, 16, 16],
        7,
        &out,
    );
    opts.save_embeddings = true;
    let report = tokenize::run(&opts, quiet()).unwrap();

    assert_eq!(
        entries(&out),
        [
            ".sidrec-output",
            "catalog.jsonl",
            "codebooks.safetensors",
            "embeddings.npy",
            "report.json",
            "sids.jsonl"
        ]
    );
    // Nothing but the output directory next to it (no temporary directories left).
    assert_eq!(entries(tmp.path()), ["mixed"]);

    // --- report.json ---
    let json = read_report(&out);
    assert_eq!(json["n"], 60);
    assert_eq!(json["d"], 384);
    assert_eq!(json["levels"], 3);
    assert_eq!(json["codes"], serde_json::json!([16, 16, 16]));
    assert_eq!(json["assign"], "balanced");
    assert_eq!(json["seed"], 7);
    assert_eq!(
        json["types"],
        serde_json::json!({"audiobook": 20, "movie": 20, "podcast": 20})
    );
    assert_eq!(json["template"], Template::default().source());
    let level_mse: Vec<f64> = json["level_mse"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(level_mse.len(), 3);
    // Unit vectors have mean squared norm 1: each level must explain part of what is left.
    assert!(level_mse[0] < 1.0, "level mse {level_mse:?}");
    assert!(
        level_mse.windows(2).all(|w| w[1] < w[0]),
        "level mse not decreasing: {level_mse:?}"
    );
    assert!(
        level_mse[2] > 0.0,
        "60 items cannot be reconstructed exactly"
    );
    assert_eq!(json["final_mse"].as_f64().unwrap(), level_mse[2]);
    let collision_rate = json["collision_rate"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&collision_rate));
    let qlevels = json["quantization"]["levels"].as_array().unwrap();
    assert_eq!(qlevels.len(), 3);
    for (l, lv) in qlevels.iter().enumerate() {
        assert_eq!(lv["codes"], 16);
        assert_eq!(lv["mse"].as_f64().unwrap(), level_mse[l]);
        let usage = lv["usage"].as_f64().unwrap();
        let perplexity = lv["perplexity"].as_f64().unwrap();
        assert!(usage > 0.0 && usage <= 1.0, "level {l} usage {usage}");
        assert!(
            (1.0..=16.0 + 1e-9).contains(&perplexity),
            "level {l} perplexity {perplexity}"
        );
        // Perplexity counts equally used codes: never more than the codes in use.
        assert!(perplexity <= usage * 16.0 + 1e-9, "level {l}: {lv}");
    }
    let fanout = json["quantization"]["fanout"].as_array().unwrap();
    assert_eq!(fanout.len(), 3);
    for (depth, f) in fanout.iter().enumerate() {
        assert_eq!(f["depth"], depth);
        let max = f["max"].as_u64().unwrap();
        let mean = f["mean"].as_f64().unwrap();
        assert!((1..=16).contains(&max), "fanout {f}");
        assert!(mean >= 1.0 && mean <= max as f64, "fanout {f}");
    }
    let timings = json["timings"].as_object().unwrap();
    let keys: Vec<&str> = timings.keys().map(|k| k.as_str()).collect();
    assert_eq!(keys, ["load", "embed", "quantize", "levels", "total"]);
    for k in ["load", "embed", "quantize", "total"] {
        assert!(timings[k].as_f64().unwrap() >= 0.0, "timing {k}");
    }
    let level_times = timings["levels"].as_array().unwrap();
    assert_eq!(level_times.len(), 3);
    for t in level_times {
        assert!(t["fit"].as_f64().unwrap() > 0.0 && t["assign"].as_f64().unwrap() > 0.0);
    }
    assert!(timings["embed"].as_f64().unwrap() > 0.0);
    assert!(timings["total"].as_f64().unwrap() >= timings["embed"].as_f64().unwrap());
    // The returned report is the file's.
    // (Compared as re-parsed text: serde_json's float parsing is not exactly round-trip,
    // so both sides must go through the same string-to-f64 path.)
    let returned: Value = serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
    assert_eq!(
        without(returned, "timings"),
        without(json.clone(), "timings")
    );
    let parsed: Report = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(parsed.vocab, report.vocab);

    // --- sids.jsonl ---
    let catalog = Catalog::load(&catalog_path, &LoadOptions::default()).unwrap();
    let records = read_sids(&out);
    assert_eq!(records.len(), 60);
    let dedup = json["dedup_codes"].as_u64().unwrap() as usize;
    let mut seen = HashSet::new();
    for (r, item) in records.iter().zip(&catalog.items) {
        assert_eq!(r.id, item.id, "sids.jsonl is in catalog order");
        assert_eq!(r.item_type, item.item_type);
        assert!(
            r.sid.starts_with(&format!("<{}><a_", item.item_type)),
            "{r:?}"
        );
        match r.codes.len() {
            3 => {}
            4 => assert!((r.codes[3] as usize) < dedup, "{r:?}, {dedup} dedup codes"),
            n => panic!("{n} codes in {r:?}"),
        }
        assert!(r.codes[..3].iter().all(|&c| c < 16), "{r:?}");
        assert_eq!(r.sid, expected_sid(r));
        assert!(seen.insert(r.sid.clone()), "duplicate SID {}", r.sid);
    }
    let with_dedup = records.iter().filter(|r| r.codes.len() == 4).count();
    assert_eq!(
        json["quantization"]["items_with_dedup"].as_u64().unwrap() as usize,
        with_dedup
    );
    assert_eq!(dedup == 0, with_dedup == 0);
    assert!((collision_rate - collision_rate_of(&records, 3)).abs() < 1e-12);
    // Types come from the catalog: the integer id and capitalised type were normalised.
    let stoic = records.iter().find(|r| r.id == "120").unwrap();
    assert!(stoic.sid.starts_with("<audiobook>"), "{stoic:?}");

    // --- codebooks.safetensors ---
    let books = artifacts::read_codebooks(&out).unwrap();
    assert_eq!(books.len(), 3);
    for b in &books {
        assert_eq!((b.k, b.d), (16, 384));
        assert!(b.data.iter().all(|v| v.is_finite()));
    }
    let vocab = artifacts::read_vocab(&out).unwrap();
    assert_eq!(vocab, report.vocab);
    assert_eq!(vocab.types, ["audiobook", "movie", "podcast"]);
    assert_eq!(vocab.levels, [16, 16, 16]);
    assert_eq!(vocab.dedup, dedup);

    // --- catalog.jsonl round-trips ---
    let written = artifacts::read_catalog(&out).unwrap();
    assert_eq!(written, catalog);
    assert_eq!(written.items[59].id, "120");
    assert_eq!(written.items[59].attrs["language"], "en");

    // --- SidMap and the trie ---
    let map = SidMap::load(&out).unwrap();
    assert_eq!(map.len(), 60);
    assert_eq!(map.records, records);
    for (i, r) in records.iter().enumerate() {
        let ids = map.vocab.parse(&r.sid).unwrap();
        assert_eq!(ids.len(), r.codes.len() + 1);
        assert_eq!(map.trie.lookup(&ids), Some(i as u32), "{}", r.sid);
        assert_eq!(map.trie.path(i as u32), Some(&ids[..]));
        assert_eq!(map.lookup_sid(&r.sid), Some(r));
        assert_eq!(map.index_of(&r.id), Some(i));
    }
    assert_eq!(map.lookup_sid("<movie><a_0><b_0><c_99>"), None);
    let root_children: Vec<u32> = map.vocab.type_ids().collect();
    assert_eq!(map.trie.children(map.trie.root()), &root_children[..]);
    let podcast = map.vocab.type_id("podcast").unwrap();
    let mask = Mask::from_types(&map.trie, &[podcast]);
    assert_eq!(mask.allowed_items(), 20);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(
            mask.allows_item(&map.trie, i as u32),
            r.item_type == "podcast",
            "{r:?}"
        );
    }
    let movie = map.vocab.type_id("movie").unwrap();
    let movie_node = map.trie.child(map.trie.root(), movie).unwrap();
    assert!(!mask.allows_node(&map.trie, movie_node));
    assert_eq!(
        Mask::from_types(&map.trie, &[podcast, movie]).allowed_items(),
        40
    );

    // --- the saved embeddings reproduce the SIDs through the precomputed path ---
    let (emb, n, d) = npy::read_f32_matrix(&out.join(artifacts::EMBEDDINGS_FILE)).unwrap();
    assert_eq!((n, d), (60, 384));
    for row in emb.chunks_exact(d) {
        let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!(
            (norm - 1.0).abs() < 1e-4,
            "MiniLM rows are unit vectors: {norm}"
        );
    }
    let out2 = tmp.path().join("again");
    let opts2 = options(
        Some(catalog_path),
        EmbeddingSource::Precomputed(out.join(artifacts::EMBEDDINGS_FILE)),
        &[16, 16, 16],
        7,
        &out2,
    );
    let report2 = tokenize::run(&opts2, quiet()).unwrap();
    assert!(report2.encoder.starts_with("precomputed:"));
    assert_eq!(report2.template, None);
    assert_eq!(read_sids(&out2), records);
}

/// Runs the mixed fixture through MiniLM with `seed` into `out`.
fn run_mixed(out: &Path, seed: u64) -> Report {
    let opts = options(
        Some(fixture("mixed.jsonl")),
        EmbeddingSource::ModelDir(minilm_dir()),
        &[16, 16, 16],
        seed,
        out,
    );
    tokenize::run(&opts, quiet()).unwrap()
}

/// Removes the wall-clock fields of a report: the `timings` object.
fn strip_clock(mut v: Value) -> Value {
    v.as_object_mut().unwrap().remove("timings");
    v
}

#[test]
fn same_seed_is_byte_identical_and_another_seed_is_not() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    run_mixed(&a, 3);
    run_mixed(&b, 3);
    run_mixed(&c, 4);
    for file in [
        artifacts::CATALOG_FILE,
        artifacts::SIDS_FILE,
        artifacts::CODEBOOKS_FILE,
    ] {
        assert!(
            fs::read(a.join(file)).unwrap() == fs::read(b.join(file)).unwrap(),
            "{file} differs between two runs with the same seed"
        );
    }
    let (ra, rb) = (read_report(&a), read_report(&b));
    assert_eq!(strip_clock(ra.clone()), strip_clock(rb.clone()));
    assert_ne!(ra["timings"], Value::Null);

    // Another seed: other codebooks (the catalog is the same).
    assert_eq!(
        fs::read(a.join(artifacts::CATALOG_FILE)).unwrap(),
        fs::read(c.join(artifacts::CATALOG_FILE)).unwrap()
    );
    assert!(
        fs::read(a.join(artifacts::CODEBOOKS_FILE)).unwrap()
            != fs::read(c.join(artifacts::CODEBOOKS_FILE)).unwrap()
    );
    let (ba, bc) = (
        artifacts::read_codebooks(&a).unwrap(),
        artifacts::read_codebooks(&c).unwrap(),
    );
    assert_eq!(ba.len(), bc.len());
    assert_ne!(
        ba[0].data, bc[0].data,
        "level a codebooks equal across seeds"
    );
    assert_eq!(read_report(&c)["seed"], 4);
}

#[test]
fn report_differs_only_in_timings() {
    // The documented contract of report.json: on the same input and seed, the "timings"
    // object is the only thing that may differ.
    let tmp = tempfile::tempdir().unwrap();
    let emb = tmp.path().join("e.npy");
    npy::write_f32_matrix(&emb, &clustered(300, 16, 12, 0.05, 1), 300, 16).unwrap();
    let mut reports = Vec::new();
    for name in ["a", "b"] {
        let out = tmp.path().join(name);
        let opts = options(
            None,
            EmbeddingSource::Precomputed(emb.clone()),
            &[8, 8, 8],
            0,
            &out,
        );
        tokenize::run(&opts, quiet()).unwrap();
        reports.push(without(read_report(&out), "timings"));
    }
    let diff: Vec<String> = json_diff(&reports[0], &reports[1], "");
    assert!(
        diff.is_empty(),
        "report.json differs outside \"timings\" between two identical runs: {diff:?}"
    );
}

/// Paths at which two JSON values differ.
fn json_diff(a: &Value, b: &Value, at: &str) -> Vec<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter()
                .flat_map(|k| {
                    json_diff(
                        x.get(k).unwrap_or(&Value::Null),
                        y.get(k).unwrap_or(&Value::Null),
                        &format!("{at}.{k}"),
                    )
                })
                .collect()
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .flat_map(|(i, (p, q))| json_diff(p, q, &format!("{at}[{i}]")))
            .collect(),
        _ if a == b => Vec::new(),
        _ => vec![at.to_string()],
    }
}

#[test]
fn precomputed_embeddings_without_catalog() {
    let tmp = tempfile::tempdir().unwrap();
    let (n, d) = (400, 24);
    let data = clustered(n, d, 20, 0.05, 11);
    let npy_path = tmp.path().join("vectors.npy");
    npy::write_f32_matrix(&npy_path, &data, n, d).unwrap();

    let mut rates = BTreeMap::new();
    for assign in [Assign::Plain, Assign::Balanced] {
        let out = tmp.path().join(format!("out-{assign}"));
        let mut opts = options(
            None,
            EmbeddingSource::Precomputed(npy_path.clone()),
            &[8, 8, 8],
            0,
            &out,
        );
        opts.quantize.assign = assign;
        let report = tokenize::run(&opts, quiet()).unwrap();
        assert_eq!((report.n, report.d, report.levels), (n, d, 3));
        assert_eq!(
            report.encoder,
            format!("precomputed:{}", npy_path.display())
        );
        assert_eq!(report.template, None);
        assert_eq!(report.types, BTreeMap::from([("item".to_string(), n)]));

        let records = read_sids(&out);
        assert_eq!(records.len(), n);
        let sids: HashSet<&str> = records.iter().map(|r| r.sid.as_str()).collect();
        assert_eq!(sids.len(), n, "{assign}: SIDs are not unique");
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.id, i.to_string());
            assert_eq!(r.item_type, "item");
            assert!(r.sid.starts_with("<item><a_"), "{r:?}");
            assert_eq!(r.sid, expected_sid(r));
        }
        let catalog = artifacts::read_catalog(&out).unwrap();
        assert_eq!(catalog.len(), n);
        assert_eq!(catalog.items[7].id, "7");
        assert_eq!(catalog.items[7].title, "item 7");
        assert!((report.collision_rate - collision_rate_of(&records, 3)).abs() < 1e-12);
        assert_eq!(SidMap::load(&out).unwrap().len(), n);
        rates.insert(assign.to_string(), report.collision_rate);
    }
    let (plain, balanced) = (rates["plain"], rates["balanced"]);
    assert!(
        balanced <= plain,
        "balanced collision rate {balanced} > plain {plain}"
    );
    // 20 tight clusters of 20 points: nearest-centroid codes must collide inside them.
    assert!(plain > 0.0, "plain assignment had no collisions: {rates:?}");

    // The same matrix as .safetensors gives the same SIDs.
    let st_path = tmp.path().join("vectors.safetensors");
    write_safetensors(&st_path, "embeddings", &data, n, d);
    let out = tmp.path().join("out-st");
    let opts = options(
        None,
        EmbeddingSource::Precomputed(st_path.clone()),
        &[8, 8, 8],
        0,
        &out,
    );
    let report = tokenize::run(&opts, quiet()).unwrap();
    assert_eq!(report.encoder, format!("precomputed:{}", st_path.display()));
    assert_eq!(report.collision_rate, balanced);
    assert_eq!(read_sids(&out), read_sids(&tmp.path().join("out-balanced")));

    // Anonymous items take the default type.
    let out = tmp.path().join("out-track");
    let mut opts = options(
        None,
        EmbeddingSource::Precomputed(npy_path),
        &[8, 8, 8],
        0,
        &out,
    );
    opts.load.default_type = "Music Track".into();
    tokenize::run(&opts, quiet()).unwrap();
    assert!(read_sids(&out)
        .iter()
        .all(|r| r.item_type == "music_track" && r.sid.starts_with("<music_track><a_")));
}

#[test]
fn bad_embeddings_leave_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let catalog = fixture("mixed.jsonl");
    let d = 8;

    // One row short.
    let short = tmp.path().join("short.npy");
    npy::write_f32_matrix(&short, &clustered(59, d, 5, 0.1, 2), 59, d).unwrap();
    // A NaN in row 17.
    let nan = tmp.path().join("nan.npy");
    let mut data = clustered(60, d, 5, 0.1, 3);
    data[17 * d + 3] = f32::NAN;
    npy::write_f32_matrix(&nan, &data, 60, d).unwrap();

    let out = tmp.path().join("out");
    let err = tokenize::run(
        &options(
            Some(catalog.clone()),
            EmbeddingSource::Precomputed(short.clone()),
            &[4, 4],
            0,
            &out,
        ),
        quiet(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains(&short.display().to_string()), "{err}");
    assert!(err.contains("59 rows"), "{err}");
    assert!(err.contains("60 items"), "{err}");
    assert!(!out.exists());

    let err = tokenize::run(
        &options(
            Some(catalog.clone()),
            EmbeddingSource::Precomputed(nan.clone()),
            &[4, 4],
            0,
            &out,
        ),
        quiet(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains(&nan.display().to_string()), "{err}");
    assert!(err.contains("row 17"), "{err}");
    assert!(!out.exists());
    // Nothing half-written beside it either.
    assert_eq!(entries(tmp.path()), ["nan.npy", "short.npy"]);

    // With --force, a failing run leaves the previous directory untouched.
    // (A previous output: the marker lists what sidrec wrote, so --force may replace it.)
    fs::create_dir(&out).unwrap();
    fs::write(out.join("marker.txt"), "previous run").unwrap();
    fs::write(
        out.join(sidrec::atomic::MARKER),
        r#"{"entries": ["marker.txt"]}"#,
    )
    .unwrap();
    for (bad, codes) in [(&short, vec![4, 4]), (&nan, vec![4, 4])] {
        let mut opts = options(
            Some(catalog.clone()),
            EmbeddingSource::Precomputed(bad.clone()),
            &codes,
            0,
            &out,
        );
        opts.force = true;
        assert!(tokenize::run(&opts, quiet()).is_err());
        assert_eq!(entries(&out), [".sidrec-output", "marker.txt"]);
        assert_eq!(
            fs::read_to_string(out.join("marker.txt")).unwrap(),
            "previous run"
        );
    }
    // Also when the failure is in quantization, after the embeddings loaded fine.
    let good = tmp.path().join("good.npy");
    npy::write_f32_matrix(&good, &clustered(60, d, 5, 0.1, 4), 60, d).unwrap();
    let mut opts = options(
        Some(catalog.clone()),
        EmbeddingSource::Precomputed(good.clone()),
        &[4, 1],
        0,
        &out,
    );
    opts.force = true;
    let err = tokenize::run(&opts, quiet()).unwrap_err().to_string();
    assert!(err.contains("level 1 has 1 codes"), "{err}");
    assert_eq!(entries(&out), [".sidrec-output", "marker.txt"]);
    assert_eq!(
        entries(tmp.path()),
        ["good.npy", "nan.npy", "out", "short.npy"]
    );

    // A good run with force replaces it completely and cleans up after itself.
    opts.quantize.levels = vec![4, 4];
    tokenize::run(&opts, quiet()).unwrap();
    assert_eq!(
        entries(&out),
        [
            ".sidrec-output",
            "catalog.jsonl",
            "codebooks.safetensors",
            "report.json",
            "sids.jsonl"
        ]
    );
    assert_eq!(
        entries(tmp.path()),
        ["good.npy", "nan.npy", "out", "short.npy"]
    );
}

#[test]
fn existing_output_needs_force() {
    let tmp = tempfile::tempdir().unwrap();
    let emb = tmp.path().join("e.npy");
    npy::write_f32_matrix(&emb, &clustered(50, 8, 5, 0.1, 5), 50, 8).unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("marker.txt"), "keep me").unwrap();
    let opts = options(None, EmbeddingSource::Precomputed(emb), &[4, 4], 0, &out);
    let err = tokenize::run(&opts, quiet()).unwrap_err().to_string();
    assert!(err.contains("--force"), "{err}");
    assert!(err.contains(&out.display().to_string()), "{err}");
    assert_eq!(entries(&out), ["marker.txt"]);
    assert_eq!(
        fs::read_to_string(out.join("marker.txt")).unwrap(),
        "keep me"
    );
    assert_eq!(entries(tmp.path()), ["e.npy", "out"]);
}

/// The acceptance run on real data: all of MovieLens-100k through MiniLM with the
/// default settings (3 levels x 256 codes, balanced).
#[test]
fn ml100k_full_catalog_with_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ml-100k");
    let opts = TokenizeOptions {
        catalog: Some(ml100k_item()),
        load: LoadOptions {
            format: None,
            default_type: "movie".into(),
            skip_invalid: false,
        },
        template: Template::default(),
        embeddings: EmbeddingSource::ModelDir(minilm_dir()),
        batch_size: 64,
        max_tokens: sidrec::embed::DEFAULT_MAX_TOKENS,
        quantize: QuantizeConfig::default(),
        out: out.clone(),
        force: false,
        save_embeddings: false,
        collab: None,
    };
    let report = tokenize::run(&opts, quiet()).unwrap();
    eprintln!(
        "ml-100k: collision rate {:.4}, level mse {:?}, timings {:?}",
        report.collision_rate, report.level_mse, report.timings
    );
    assert_eq!((report.n, report.d), (1682, 384));
    assert_eq!(report.codes, [256, 256, 256]);
    assert_eq!(report.assign, Assign::Balanced);
    assert_eq!(report.types, BTreeMap::from([("movie".to_string(), 1682)]));
    assert!(report.level_mse.windows(2).all(|w| w[1] < w[0]));

    let records = read_sids(&out);
    assert_eq!(records.len(), 1682);
    let unique: HashSet<&str> = records.iter().map(|r| r.sid.as_str()).collect();
    assert_eq!(unique.len(), 1682, "SIDs are not unique");
    let json = read_report(&out);
    let rate = json["collision_rate"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&rate));
    assert!((rate - collision_rate_of(&records, 3)).abs() < 1e-12);

    let by_id: HashMap<&str, &SidRecord> = records.iter().map(|r| (r.id.as_str(), r)).collect();
    let toy_story = by_id["1"];
    assert!(toy_story.sid.starts_with("<movie><a_"), "{toy_story:?}");
    let catalog = artifacts::read_catalog(&out).unwrap();
    assert_eq!(catalog.get("1").unwrap().title, "Toy Story");
    let map = SidMap::load(&out).unwrap();
    assert_eq!(map.lookup_sid(&toy_story.sid).unwrap().id, "1");
}
