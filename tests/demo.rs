//! The committed demo model (models/demo) as a person on a fresh clone meets it: no
//! --model, no fetched assets. Its files must match their checksums, and the README's
//! request must come back as 1990s comedies that are not Toy Story itself.

use std::path::Path;

use serde_json::Value;

fn demo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo"))
}

fn sidrec() -> assert_cmd::Command {
    let mut c = assert_cmd::Command::cargo_bin("sidrec").unwrap();
    c.env_remove("SIDREC_MODEL");
    c
}

#[test]
fn demo_files_match_their_checksums_and_fit_the_budget() {
    use sha2::Digest;
    let sums = std::fs::read_to_string(demo().join("SHA256SUMS")).unwrap();
    let mut total = 0;
    let mut files = 0;
    for line in sums.lines() {
        let (want, name) = line.split_once("  ").unwrap();
        let bytes = std::fs::read(demo().join(name)).unwrap();
        total += bytes.len();
        files += 1;
        assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), want, "{name}");
    }
    assert!(files >= 7, "{files} files listed");
    assert!(total <= 25 << 20, "{total} bytes: over 25 MB");
}

/// The demo records the prompts this build reads (so `scripts/demo-model.sh --check`,
/// which retrains with them, can reproduce sidrec.json): a change to prompts/ must come
/// with the demo's new prompts version.
#[test]
fn demo_records_the_prompts_of_this_build() {
    let side = sidrec::model::hfdir::Sidecar::read(demo()).unwrap();
    assert_eq!(
        side.prompts_version,
        sidrec::train::data::Prompts::builtin().fingerprint()
    );
}

/// Runs `sidrec recommend ARGS --json` with no model; it must succeed. Returns the JSON
/// answer and what it wrote to stderr (what it read from the words).
fn recommend_json(args: &[&str]) -> (Value, String) {
    let out = sidrec()
        .arg("recommend")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    (serde_json::from_slice(&out.stdout).unwrap(), err)
}

#[test]
fn recommend_without_a_model_uses_the_demo() {
    let (v, err) = recommend_json(&["a 90s comedy like Toy Story"]);
    assert!(
        err.contains("history+=1") && err.contains("genre=Comedy"),
        "{err}"
    );
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 10);
    let catalog: Vec<Value> = std::fs::read_to_string(demo().join("catalog.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for it in items {
        let id = it["id"].as_str().unwrap();
        assert_ne!(id, "1", "Toy Story itself");
        let c = catalog.iter().find(|c| c["id"] == id).unwrap();
        let year = c["attrs"]["year"].as_i64().unwrap();
        assert!((1990..2000).contains(&year), "{c}");
        assert!(
            c["attrs"]["genre"]
                .as_array()
                .unwrap()
                .iter()
                .any(|g| g == "Comedy"),
            "{c}"
        );
    }

    // MovieLens writes "Godfather, The"; people type "The Godfather" (and there is a
    // "Godfather: Part II, The" too).
    // The prompt names the item by its SID (and its title, for a model whose histories
    // carry titles).
    let (v, _) = recommend_json(&["--history", "The Godfather", "-k", "3"]);
    let godfather = catalog
        .iter()
        .position(|c| c["title"] == "Godfather, The")
        .unwrap();
    let sid = std::fs::read_to_string(demo().join("sids.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .nth(godfather)
        .unwrap()["sid"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(v["prompt"].as_str().unwrap().contains(&sid), "{v}");

    // The same words given to the model alone still name catalog items only.
    let out = sidrec()
        .args([
            "recommend",
            "a 90s comedy like Toy Story",
            "--literal",
            "-k",
            "5",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 5);
}

#[test]
fn repl_without_a_model_uses_the_demo() {
    let out = sidrec()
        .args(["repl", "--no-history-file"])
        .write_stdin(":history add Toy Story\n:k 3\n:go\na horror movie from the 1980s\n:quit\n")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("added Toy Story (1)"), "{text}");
    assert!(text.contains("  3. "), "{text}");
}

/// The demo reads requests itself (`--literal`: no keyword reader, no filter): the
/// README's two requests, whose words name no genre the catalog spells, come back mostly
/// as comedies and horror films.
#[test]
fn the_demo_reads_requests_in_its_own_words() {
    let catalog: Vec<Value> = std::fs::read_to_string(demo().join("catalog.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (request, genre) in [
        ("something light-hearted and silly", "Comedy"),
        ("a movie about ghosts and haunted houses", "Horror"),
    ] {
        let (v, err) = recommend_json(&[request, "--literal"]);
        assert!(!err.contains("(read "), "the keyword reader ran: {err}");
        let items = v["items"].as_array().unwrap();
        let hits = items
            .iter()
            .filter(|it| {
                let c = catalog.iter().find(|c| c["id"] == it["id"]).unwrap();
                c["attrs"]["genre"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|g| g == genre)
            })
            .count();
        assert!(hits >= 6, "{request}: {hits} of 10 are {genre}: {v}");
    }
}

#[test]
fn recommend_with_packed_weights_and_a_bad_format() {
    for w in ["bf16", "int8"] {
        let (v, _) = recommend_json(&["--history", "1,50", "--weights", w]);
        assert_eq!(v["items"].as_array().unwrap().len(), 10, "{w}: {v}");
    }
    let out = sidrec()
        .args(["recommend", "--history", "1", "--weights", "fp16"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("fp16") && err.contains("f32, bf16, int8"),
        "{err}"
    );
}
