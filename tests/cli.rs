//! Command-line tests of `sidrec tokenize` and `sidrec inspect`: help, input errors,
//! and a tokenize → inspect round trip on precomputed embeddings.

use std::fs;
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

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

fn fixture(name: &str) -> PathBuf {
    manifest().join("tests/data/tokenize").join(name)
}

/// `sidrec` run inside `dir`, so that nothing lands in the repository.
fn sidrec(dir: &Path) -> Command {
    let mut cmd = Command::cargo_bin("sidrec").unwrap();
    cmd.current_dir(dir);
    cmd
}

fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.assert().success().get_output().stdout.clone();
    String::from_utf8(out).unwrap()
}

fn stderr_of_failure(cmd: &mut Command) -> String {
    let out = cmd.assert().failure().code(1).get_output().stderr.clone();
    String::from_utf8(out).unwrap()
}

/// `n` points in `clusters` tight groups, written as a float32 .npy file.
fn write_clustered_npy(path: &Path, n: usize, d: usize, clusters: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let centres: Vec<f32> = (0..clusters * d)
        .map(|_| rng.gen_range(-1.0..1.0))
        .collect();
    let mut data = Vec::with_capacity(n * d);
    for i in 0..n {
        let c = &centres[(i % clusters) * d..(i % clusters + 1) * d];
        data.extend(c.iter().map(|&v| v + 0.05 * rng.gen_range(-1.0f32..1.0)));
    }
    sidrec::npy::write_f32_matrix(path, &data, n, d).unwrap();
}

#[test]
fn help_lists_commands_and_output_files() {
    let tmp = tempfile::tempdir().unwrap();
    let top = stdout_of(sidrec(tmp.path()).arg("--help"));
    assert!(top.contains("tokenize"), "{top}");
    assert!(top.contains("inspect"), "{top}");
    assert!(top.contains("sidrec tokenize CATALOG -o DIR"), "{top}");

    let help = stdout_of(sidrec(tmp.path()).args(["tokenize", "--help"]));
    for needle in [
        "catalog.jsonl",
        "sids.jsonl",
        "codebooks.safetensors",
        "report.json",
        "--embeddings",
        "--codes",
        "--levels",
        "--force",
    ] {
        assert!(
            help.contains(needle),
            "tokenize --help lacks {needle}:\n{help}"
        );
    }
    let help = stdout_of(sidrec(tmp.path()).args(["inspect", "--help"]));
    for needle in ["--item", "--sid", "--json"] {
        assert!(
            help.contains(needle),
            "inspect --help lacks {needle}:\n{help}"
        );
    }
}

#[test]
fn malformed_catalog_line_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let catalog = fixture("malformed_line3.jsonl");
    let err = stderr_of_failure(
        sidrec(tmp.path())
            .arg("tokenize")
            .arg(&catalog)
            .arg("--encoder")
            .arg(minilm_dir())
            .args(["-o", "out", "--quiet"]),
    );
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("malformed_line3.jsonl:3:"), "{err}");
    assert!(err.contains("invalid JSON"), "{err}");
    assert!(!tmp.path().join("out").exists());
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[test]
fn duplicate_id_names_both_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let err = stderr_of_failure(
        sidrec(tmp.path())
            .arg("tokenize")
            .arg(fixture("duplicate_id.jsonl"))
            .arg("--encoder")
            .arg(minilm_dir())
            .args(["-o", "out", "--quiet"]),
    );
    assert!(err.contains("duplicate_id.jsonl:4:"), "{err}");
    assert!(err.contains("duplicate id \"d2\""), "{err}");
    assert!(err.contains("first used on line 2"), "{err}");
    assert!(!tmp.path().join("out").exists());
}

#[test]
fn empty_catalog_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let err = stderr_of_failure(
        sidrec(tmp.path())
            .arg("tokenize")
            .arg(fixture("empty.jsonl"))
            .arg("--encoder")
            .arg(minilm_dir())
            .args(["-o", "out", "--quiet"]),
    );
    assert!(err.contains("empty.jsonl"), "{err}");
    assert!(err.contains("the catalog has no items"), "{err}");
    assert!(!tmp.path().join("out").exists());
}

#[test]
fn unknown_format_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = sidrec(tmp.path())
        .arg("tokenize")
        .arg(fixture("mixed.jsonl"))
        .args(["--format", "xml", "-o", "out"])
        .assert()
        .failure()
        .code(2)
        .get_output()
        .clone();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("invalid value 'xml'"), "{err}");
    assert!(err.contains("--format"), "{err}");
    assert!(
        err.contains("expected one of jsonl, csv, tsv, recbole, amazon"),
        "{err}"
    );
    assert!(!tmp.path().join("out").exists());
}

/// Recipe settings that contradict each other, or name no setting, are refused before
/// anything is read or written.
#[test]
fn contradicting_recipe_settings_name_what_they_need() {
    let tmp = tempfile::tempdir().unwrap();
    let base = [
        "train",
        "--artifacts",
        "art",
        "--interactions",
        "u.jsonl",
        "-o",
        "m",
        "--recipe",
        "movielens",
    ];
    for (extra, needs) in [
        (
            &["--set", "sid_only_histories=false"][..],
            "sequence_examples needs sid_only_histories = true",
        ),
        (
            &[
                "--set",
                "sequence_examples=false",
                "--set",
                "short_windows=3",
            ][..],
            "short_windows cuts sequence examples: it needs sequence_examples = true",
        ),
        (
            &["--set", "item_dropout=0.3"][..],
            "item_dropout drops item vectors: it needs item_embeddings = true",
        ),
        (&["--set", "dropuot=0.3"][..], "unknown field `dropuot`"),
        (&["--set", "dropout=1.5"][..], "dropout must be in [0, 1)"),
    ] {
        let err = stderr_of_failure(sidrec(tmp.path()).args(base).args(extra));
        assert!(err.contains(needs), "{err}");
        assert!(!tmp.path().join("m").exists());
    }
}

/// `train --help` keeps the flags a user needs; the rest is the recipe's.
#[test]
fn train_help_has_at_most_fifteen_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let help = stdout_of(sidrec(tmp.path()).args(["train", "--help"]));
    let flags = help
        .lines()
        .filter(|l| l.trim_start().starts_with('-'))
        .count();
    assert!(flags <= 15, "{flags} flags:\n{help}");
    assert!(
        help.contains("--recipe") && help.contains("--set"),
        "{help}"
    );
}

#[test]
fn codes_count_must_match_levels() {
    let tmp = tempfile::tempdir().unwrap();
    write_clustered_npy(&tmp.path().join("e.npy"), 40, 8, 4);
    let err = stderr_of_failure(sidrec(tmp.path()).args([
        "tokenize",
        "--embeddings",
        "e.npy",
        "-o",
        "out",
        "--codes",
        "8,8,8",
        "--levels",
        "2",
        "--quiet",
    ]));
    assert!(err.contains("--codes lists 3 sizes for 2 levels"), "{err}");
    assert!(!tmp.path().join("out").exists());
}

#[test]
fn tokenize_then_inspect() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_clustered_npy(&dir.join("vectors.npy"), 200, 16, 10);

    let summary = stdout_of(sidrec(dir).args([
        "tokenize",
        "--embeddings",
        "vectors.npy",
        "-o",
        "art",
        "--codes",
        "8",
        "--levels",
        "2",
        "--quiet",
    ]));
    assert!(
        summary.starts_with(
            "200 items (item 200), d=16, 2 levels x [8, 8] codes, assign=balanced, seed=0"
        ),
        "{summary}"
    );
    assert!(summary.contains("wrote        art"), "{summary}");
    for f in [
        "catalog.jsonl",
        "sids.jsonl",
        "codebooks.safetensors",
        "report.json",
    ] {
        assert!(dir.join("art").join(f).is_file(), "{f} missing");
    }

    // Running again without --force fails and names the flag.
    let err = stderr_of_failure(sidrec(dir).args([
        "tokenize",
        "--embeddings",
        "vectors.npy",
        "-o",
        "art",
        "--codes",
        "8",
        "--levels",
        "2",
        "--quiet",
    ]));
    assert!(err.contains("--force"), "{err}");

    // The summary again, from the report.
    let inspect = stdout_of(sidrec(dir).args(["inspect", "art"]));
    assert!(inspect.starts_with("200 items (item 200)"), "{inspect}");
    let collisions = inspect
        .lines()
        .find(|l| l.trim_start().starts_with("collisions"))
        .unwrap_or_else(|| panic!("no collisions line:\n{inspect}"));
    let report: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("art/report.json")).unwrap()).unwrap();
    let rate = report["collision_rate"].as_f64().unwrap();
    assert!(
        collisions.contains(&format!("{:.2}% of items before dedup", rate * 100.0)),
        "{collisions} (rate {rate})"
    );
    assert!(inspect.contains("level a"), "{inspect}");
    assert!(inspect.contains("level b"), "{inspect}");

    // --json without an item prints report.json's content.
    let as_json: Value =
        serde_json::from_str(&stdout_of(sidrec(dir).args(["inspect", "art", "--json"]))).unwrap();
    assert_eq!(as_json["n"], 200);
    assert_eq!(as_json["codes"], serde_json::json!([8, 8]));

    // One item, as JSON.
    let item: Value = serde_json::from_str(&stdout_of(
        sidrec(dir).args(["inspect", "art", "--item", "0", "--json"]),
    ))
    .unwrap();
    let sid = item["sid"].as_str().unwrap().to_string();
    assert!(sid.starts_with("<item><a_"), "{item}");
    assert_eq!(item["item"]["id"], "0");
    assert_eq!(item["item"]["title"], "item 0");
    let sids = fs::read_to_string(dir.join("art/sids.jsonl")).unwrap();
    let first: Value = serde_json::from_str(sids.lines().next().unwrap()).unwrap();
    assert_eq!(first["sid"], sid.as_str());
    assert_eq!(item["codes"], first["codes"]);
    let neighbours = item["neighbours"].as_array().unwrap();
    assert!(!neighbours.is_empty(), "{item}");
    assert!(neighbours.len() <= 10, "default --limit is 10: {item}");
    let tokens = |s: &str| -> Vec<String> { s.split_inclusive('>').map(String::from).collect() };
    let own = tokens(&sid);
    for nb in neighbours {
        assert_ne!(nb["id"], "0", "an item is not its own neighbour");
        let shared = nb["shared_prefix"].as_u64().unwrap() as usize;
        assert!(shared >= 1 && shared < own.len(), "{nb}");
        let theirs = tokens(nb["sid"].as_str().unwrap());
        assert_eq!(theirs[..shared], own[..shared], "{nb} vs {sid}");
    }
    // Longest shared prefix first.
    let depths: Vec<u64> = neighbours
        .iter()
        .map(|n| n["shared_prefix"].as_u64().unwrap())
        .collect();
    assert!(depths.windows(2).all(|w| w[0] >= w[1]), "{depths:?}");
    let limited: Value = serde_json::from_str(&stdout_of(
        sidrec(dir).args(["inspect", "art", "--item", "0", "--json", "--limit", "3"]),
    ))
    .unwrap();
    assert_eq!(limited["neighbours"].as_array().unwrap().len(), 3);

    // SID lookup finds item 0, as text and as JSON.
    let text = stdout_of(sidrec(dir).args(["inspect", "art", "--sid", &sid]));
    let head = text.lines().next().unwrap();
    assert!(head.starts_with(&sid), "{text}");
    assert!(head.ends_with("item 0  [0]"), "{text}");
    let by_sid: Value = serde_json::from_str(&stdout_of(
        sidrec(dir).args(["inspect", "art", "--sid", &sid, "--json"]),
    ))
    .unwrap();
    assert_eq!(by_sid["item"]["id"], "0");
    assert_eq!(by_sid["sid"], sid.as_str());

    // Unknown item and unknown SID.
    let err = stderr_of_failure(sidrec(dir).args(["inspect", "art", "--item", "nope"]));
    assert!(err.contains("no item with id \"nope\""), "{err}");
    let err = stderr_of_failure(sidrec(dir).args(["inspect", "art", "--sid", "<item><a_9><b_0>"]));
    assert!(err.contains("no item has SID <item><a_9><b_0>"), "{err}");
    // Not an artifact directory.
    let err = stderr_of_failure(sidrec(dir).args(["inspect", "nowhere"]));
    assert!(err.contains("report.json"), "{err}");
}

/// Items that differ only in their dedup token share every level code with each other:
/// they are an item's closest neighbours, so `inspect` must list them first, with the
/// number of tokens they really share (type + every level).
#[test]
fn inspect_lists_dedup_siblings_first() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_clustered_npy(&dir.join("vectors.npy"), 200, 16, 10);
    sidrec(dir)
        .args([
            "tokenize",
            "--embeddings",
            "vectors.npy",
            "-o",
            "art",
            "--codes",
            "8",
            "--levels",
            "2",
            "--quiet",
        ])
        .assert()
        .success();
    // 200 items, 64 code tuples: item 0 has a dedup code and siblings sharing its tuple.
    let records: Vec<Value> = fs::read_to_string(dir.join("art/sids.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let codes = |r: &Value| -> Vec<u64> {
        r["codes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .collect()
    };
    let own = codes(&records[0]);
    assert_eq!(
        own.len(),
        3,
        "item 0 should carry a dedup code: {}",
        records[0]
    );
    let mut siblings: Vec<String> = records[1..]
        .iter()
        .filter(|r| codes(r)[..2] == own[..2])
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert!(!siblings.is_empty());
    siblings.sort();

    let item: Value = serde_json::from_str(&stdout_of(
        sidrec(dir).args(["inspect", "art", "--item", "0", "--json", "--limit", "199"]),
    ))
    .unwrap();
    let neighbours = item["neighbours"].as_array().unwrap();
    let mut first: Vec<String> = neighbours[..siblings.len()]
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_string())
        .collect();
    first.sort();
    assert_eq!(
        first, siblings,
        "the items sharing item 0's whole code tuple ({}) are not listed first",
        item["sid"]
    );
    for n in &neighbours[..siblings.len()] {
        assert_eq!(
            n["shared_prefix"], 3,
            "type + 2 level tokens are shared: {n}"
        );
    }
}

/// `--interactions` joins collaborative vectors: the summary says so, flags that need it
/// are refused without it, and a bad interaction line is named with its file and line.
#[test]
fn tokenize_with_interactions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_clustered_npy(&dir.join("vectors.npy"), 60, 8, 6);
    let lines: Vec<String> = (0..30)
        .map(|u| {
            let items: Vec<String> = (0..5)
                .map(|k| format!("\"{}\"", (u * 7 + k) % 60))
                .collect();
            format!(r#"{{"user": "u{u}", "items": [{}]}}"#, items.join(", "))
        })
        .collect();
    fs::write(dir.join("inter.jsonl"), lines.join("\n") + "\n").unwrap();
    let args = |out: &str, inter: &str| {
        vec![
            "tokenize".to_string(),
            "--embeddings".into(),
            "vectors.npy".into(),
            "--interactions".into(),
            inter.into(),
            "--collab-dim".into(),
            "4".into(),
            "-o".into(),
            out.into(),
            "--codes".into(),
            "4".into(),
            "--levels".into(),
            "2".into(),
            "--quiet".into(),
        ]
    };
    let summary = stdout_of(sidrec(dir).args(args("art", "inter.jsonl")));
    assert!(summary.contains("d=12,"), "{summary}");
    assert!(
        summary.contains("collab       weight 0.3 dim 4 window 3 from inter.jsonl (30 users, 90 training interactions"),
        "{summary}"
    );
    let inspect = stdout_of(sidrec(dir).args(["inspect", "art"]));
    assert!(inspect.contains("collab       weight 0.3"), "{inspect}");

    // A weight without interactions is a usage error.
    let out = sidrec(dir)
        .args([
            "tokenize",
            "--embeddings",
            "vectors.npy",
            "--collab-weight",
            "0.3",
            "-o",
            "x",
        ])
        .assert()
        .failure()
        .code(2)
        .get_output()
        .stderr
        .clone();
    let err = String::from_utf8(out).unwrap();
    assert!(err.contains("--interactions"), "{err}");

    // An unknown item on line 2 is named, and nothing is written.
    fs::write(
        dir.join("bad.jsonl"),
        "{\"user\": \"a\", \"items\": [\"1\", \"2\", \"3\"]}\n{\"user\": \"b\", \"items\": [\"1\", \"nope\", \"3\"]}\n",
    )
    .unwrap();
    let err = stderr_of_failure(sidrec(dir).args(args("bad-out", "bad.jsonl")));
    assert!(
        err.contains("bad.jsonl") && err.contains('2') && err.contains("nope"),
        "{err}"
    );
    assert!(!dir.join("bad-out").exists());
}
