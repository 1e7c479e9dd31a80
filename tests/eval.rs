//! `sidrec eval` end to end on a model trained here: the report's files and shapes, beam
//! search equal to exact ranking when the beam is as wide as the catalog, steerability
//! with the filter at 100%, the peer runner, and bad input.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sidrec::decode::Engine;
use sidrec::eval::{self, Accumulator, ModelOptions};
use sidrec::interactions::{ReadOptions, Sequences};
use sidrec::progress::Progress;

/// (temporary directory, model directory, interactions file), trained once.
fn fixture() -> &'static (tempfile::TempDir, PathBuf, PathBuf) {
    static F: OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let model = common::trained_model(tmp.path());
        let inter = tmp.path().join("seqs.jsonl");
        assert!(inter.is_file());
        (tmp, model, inter)
    })
}

fn sidrec() -> assert_cmd::Command {
    assert_cmd::Command::cargo_bin("sidrec").unwrap()
}

/// `sidrec -q eval --model M --interactions I -o OUT`, to add flags to.
fn eval_cmd(model: &Path, inter: &Path, out: &Path) -> assert_cmd::Command {
    let mut cmd = sidrec();
    cmd.args(["-q", "eval", "--model"])
        .arg(model)
        .arg("--interactions")
        .arg(inter)
        .arg("-o")
        .arg(out);
    cmd
}

/// Asserts a command succeeded, showing its stderr if not.
fn assert_ok(res: &std::process::Output) {
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn eval_writes_the_report_and_a_full_beam_equals_exact_ranking() {
    let (tmp, model, inter) = fixture();
    let out = tmp.path().join("eval-full");
    let empty_peers = tmp.path().join("no-peers-here");
    std::fs::create_dir_all(&empty_peers).unwrap();
    let res = eval_cmd(model, inter, &out)
        .args([
            "--exact",
            "--beams",
            "10",
            "--steer-users",
            "8",
            "--name",
            "fixture",
        ])
        .arg("--peers")
        .arg(&empty_peers)
        .output()
        .unwrap();
    assert_ok(&res);
    for f in [
        "eval.json",
        "eval.md",
        "metrics.svg",
        "loss.svg",
        "rankings.jsonl",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let v = read_json(&out.join("eval.json"));
    // One ranking per user; the ranks in it give back the reported NDCG@10.
    let rankings: Vec<serde_json::Value> = std::fs::read_to_string(out.join("rankings.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rankings.len(), 24);
    let mut ndcg = 0.0;
    for r in &rankings {
        let ranked = r["ranked"].as_array().unwrap();
        assert_eq!(ranked.len(), 10, "{r}");
        let at = ranked.iter().position(|i| *i == r["target"]);
        assert_eq!(r["rank"].as_u64().map(|x| x as usize), at, "{r}");
        ndcg += at.map_or(0.0, |a| 1.0 / ((a + 2) as f64).log2());
    }
    let reported = v["rows"][0]["ndcg@10"].as_f64().unwrap();
    assert!(
        (ndcg / 24.0 - reported).abs() < 1e-4,
        "{ndcg} vs {reported}"
    );
    assert_eq!(v["dataset"], "fixture");
    assert_eq!(v["items"], 10);
    assert_eq!(v["users"], 24);
    let rows = v["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "sidrec",
            "sidrec (exact)",
            "most popular",
            "transition memory"
        ]
    );
    for r in rows {
        for k in ["recall@5", "recall@10", "ndcg@5", "ndcg@10"] {
            let x = r[k].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&x), "{k} = {x}");
        }
        assert!(r["ndcg@10"].as_f64() <= r["recall@10"].as_f64());
        assert!(r["recall@5"].as_f64() <= r["recall@10"].as_f64());
    }
    // Ten beams over a ten-item catalog search exhaustively: the same ranking as exact.
    for k in ["recall@5", "recall@10", "ndcg@5", "ndcg@10"] {
        let (b, e) = (rows[0][k].as_f64().unwrap(), rows[1][k].as_f64().unwrap());
        assert!((b - e).abs() < 1e-9, "{k}: beam {b} vs exact {e}");
    }
    // Ten items fill a top-10 list: recall@10 is 1 for everyone, NDCG@10 is not.
    assert_eq!(rows[0]["recall@10"], 1.0);
    assert_eq!(v["sidrec"]["valid_share"], 1.0);
    let cov = v["sidrec"]["coverage_at_10"].as_f64().unwrap();
    assert!(cov > 0.0 && cov <= 1.0);
    assert!(v["sidrec"]["latency"]["p50_ms"].as_f64().unwrap() > 0.0);
    // Steering: genre and decade constraints from the movies; the filter always holds.
    let steer = v["steering"].as_array().unwrap();
    assert!(!steer.is_empty());
    for s in steer {
        assert_eq!(s["filter"], 1.0, "{s}");
        let base = s["base_rate"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&base));
    }
    // Movies and podcasts: each type asked for; with the limit every item has the type.
    let types = v["type_steering"].as_array().unwrap();
    assert_eq!(types.len(), 2, "{types:?}");
    for t in types {
        assert_eq!(t["with_limit"], 1.0, "{t}");
        for k in ["base_rate", "text_only", "catalog_share"] {
            assert!((0.0..=1.0).contains(&t[k].as_f64().unwrap()), "{t}");
        }
    }
    // The peers were looked for and their absence said.
    let md = std::fs::read_to_string(out.join("eval.md")).unwrap();
    assert!(
        md.contains("| model | R@5 | R@10 | N@5 | N@10 | note |"),
        "{md}"
    );
    assert!(md.contains("markov skipped"), "{md}");
    assert!(md.contains("**Type steering**"), "{md}");
    assert!(md.contains("SASRec-CE skipped"), "{md}");
    let svg = std::fs::read_to_string(out.join("metrics.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("most popular"));

    // The report is not overwritten without --force, and stays as it was.
    let before = std::fs::read(out.join("eval.json")).unwrap();
    let res = eval_cmd(model, inter, &out)
        .args(["--no-peers", "--steer-users", "0"])
        .output()
        .unwrap();
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("--force"));
    assert_eq!(std::fs::read(out.join("eval.json")).unwrap(), before);

    // --exclude-seen is marked in the row and in the notes, as it leaves the protocol.
    let out = tmp.path().join("eval-excluded");
    let res = eval_cmd(model, inter, &out)
        .args(["--no-peers", "--steer-users", "0", "--exclude-seen"])
        .output()
        .unwrap();
    assert_ok(&res);
    let md = std::fs::read_to_string(out.join("eval.md")).unwrap();
    assert!(md.contains("history items excluded"), "{md}");
    assert!(
        md.contains("except that sidrec's rankings leave out"),
        "{md}"
    );
    assert!(
        md.contains("--exclude-seen: sidrec's rankings leave out"),
        "{md}"
    );
}

#[test]
fn the_library_scores_the_split_test_targets() {
    let (_tmp, model, inter) = fixture();
    let engine = Engine::load(model).unwrap();
    let (seqs, _) = Sequences::load(inter, engine.catalog(), &ReadOptions::default()).unwrap();
    let split = seqs.split();
    // The test target is each sequence's last item and is never in the training part.
    for (u, seq) in seqs.seqs.iter().enumerate() {
        assert_eq!(split.test[u].1, *seq.last().unwrap());
        assert_eq!(split.test[u].0, seq[..seq.len() - 1]);
        assert_eq!(split.train[u], seq[..seq.len() - 2]);
    }
    let cases: Vec<_> = split.test.clone();
    let r = eval::evaluate_model(
        &engine,
        &cases,
        &ModelOptions {
            beams: 10,
            exact: false,
            exact_group: 4,
            exclude_seen: false,
            mix_recent: 0,
            recent_decay: None,
            memory: None,
        },
        &Progress::new(true),
    )
    .unwrap();
    // With the history excluded (and the ranking mixed) no list holds a history item, and every list holds all
    // the catalog's other items up to ten (ten beams over ten items search exhaustively).
    let n_items = engine.catalog().items.len();
    let open: Vec<_> = cases
        .iter()
        .filter(|(h, _)| (0..n_items as u32).any(|i| !h.contains(&i)))
        .cloned()
        .collect();
    assert!(open.iter().any(|(h, _)| !h.is_empty()));
    let masked = eval::evaluate_model(
        &engine,
        &open,
        &ModelOptions {
            beams: 10,
            exact: false,
            exact_group: 4,
            exclude_seen: true,
            // Mixed with the last two items alone and the transition memory: the lists
            // stay as complete.
            mix_recent: 2,
            recent_decay: None,
            memory: Some(1.0),
        },
        &Progress::new(true),
    )
    .unwrap();
    for ((history, _), ranked) in open.iter().zip(&masked.rankings) {
        assert!(ranked.iter().all(|i| !history.contains(i)), "{ranked:?}");
        let unseen = (0..n_items as u32).filter(|i| !history.contains(i)).count();
        assert_eq!(ranked.len(), unseen.min(10), "{history:?} -> {ranked:?}");
    }
    // The same ranking, scored by hand.
    let mut acc = Accumulator::default();
    for (history, target) in &cases {
        let req = sidrec::decode::Request {
            mode: sidrec::decode::Mode::Recommend,
            history: history.clone(),
            k: 10,
            beams: Some(10),
            ..Default::default()
        };
        let ranked: Vec<u32> = engine.rank(&req).unwrap().iter().map(|h| h.item).collect();
        acc.add(&ranked, *target);
    }
    assert_eq!(r.metrics, acc.finish());

    // Exact ranking in small groups gives every item once, sorted, with the scores the
    // full beam gives.
    let req = sidrec::decode::Request {
        mode: sidrec::decode::Mode::Recommend,
        history: cases[0].0.clone(),
        k: 10,
        beams: Some(10),
        ..Default::default()
    };
    let exact = engine.rank_exact(&req, 3).unwrap();
    let beam = engine.rank(&req).unwrap();
    assert_eq!(exact.len(), 10);
    assert!(exact.windows(2).all(|w| w[0].score >= w[1].score));
    for (e, b) in exact.iter().zip(&beam) {
        assert_eq!(e.item, b.item);
        assert!(
            (e.score - b.score).abs() < 1e-4,
            "{} vs {}",
            e.score,
            b.score
        );
    }
}

#[test]
fn peers_are_run_and_their_failures_reported() {
    let dir = tempfile::tempdir().unwrap();
    let inter = dir.path().join("interactions.json");
    std::fs::write(&inter, r#"{"0": [1, 2, 3]}"#).unwrap();
    let good = dir.path().join("good.py");
    std::fs::write(
        &good,
        "import json, sys\nd = json.load(open(sys.argv[1]))\nprint('log line')\n\
         print(json.dumps({'peer': 'x', 'users': len(d), 'recall@5': 0.5, 'recall@10': 1.0, \
         'ndcg@5': 0.25, 'ndcg@10': 0.5, 'extra': sys.argv[2:]}))\n",
    )
    .unwrap();
    let (m, v) =
        eval::run_peer("python3", &good, &inter, &["--threads".into(), "2".into()]).unwrap();
    assert_eq!((m.users, m.recall_10, m.ndcg_5), (1, 1.0, 0.25));
    assert_eq!(v["extra"], serde_json::json!(["--threads", "2"]));

    let bad = dir.path().join("bad.py");
    std::fs::write(&bad, "import sys\nsys.exit('no torch here')\n").unwrap();
    let err = eval::run_peer("python3", &bad, &inter, &[]).unwrap_err();
    assert!(err.to_string().contains("no torch here"), "{err}");
    let silent = dir.path().join("silent.py");
    std::fs::write(&silent, "print('nothing')\n").unwrap();
    let err = eval::run_peer("python3", &silent, &inter, &[]).unwrap_err();
    assert!(err.to_string().contains("no JSON"), "{err}");
    let err = eval::run_peer("no-such-python-here", &good, &inter, &[]).unwrap_err();
    assert!(err.to_string().contains("cannot start"), "{err}");
}

#[test]
fn bad_input_is_an_error_that_names_it() {
    let (tmp, model, _) = fixture();
    let missing = tmp.path().join("missing.jsonl");
    let res = sidrec()
        .args(["-q", "eval", "--no-peers", "--model"])
        .arg(model)
        .arg("--interactions")
        .arg(&missing)
        .arg("-o")
        .arg(tmp.path().join("never"))
        .output()
        .unwrap();
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("missing.jsonl"));
    assert!(!tmp.path().join("never").exists());
    let res = sidrec()
        .args(["-q", "eval", "--model"])
        .arg(tmp.path().join("no-model"))
        .arg("--interactions")
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("no-model"));
}

/// The transition memory as a ranker, on a hand-computed case: the memory's items by
/// probability, then the most popular training items.
#[test]
fn memory_baseline_ranks_successors_then_popular_items() {
    use sidrec::interactions::Split;
    use sidrec::memory::{MemorySettings, TransitionMemory};
    let split = Split {
        train: vec![vec![0, 1], vec![0, 1], vec![0, 2], vec![3, 3, 3]],
        valid: Vec::new(),
        test: Vec::new(),
    };
    let m = TransitionMemory::build(6, &split.train, MemorySettings::default()).unwrap();
    // After 0: 1 (two of three), 2 (one of three). Item 5 was never followed.
    let ndcg = |target: u32| eval::memory_baseline(&m, &split, &[(vec![5, 0], target)], 6).ndcg_10;
    assert!((ndcg(1) - 1.0).abs() < 1e-9);
    assert!((ndcg(2) - 1.0 / 3f64.log2()).abs() < 1e-9);
    // Then by popularity: 0 and 3 (three times each; the lower index first).
    assert!((ndcg(0) - 1.0 / 4f64.log2()).abs() < 1e-9);
    assert!((ndcg(3) - 1.0 / 5f64.log2()).abs() < 1e-9);
}
