//! Collaborative item vectors (`collab`) and `tokenize` with `--interactions`: the PPMI
//! factorisation checked against a PPMI matrix computed here independently, and the codes
//! of items that users take together checked to share a prefix when text says nothing.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sidrec::artifacts::{self, SidRecord};
use sidrec::catalog::LoadOptions;
use sidrec::collab::{self, CollabConfig, CollabError};
use sidrec::interactions::ReadOptions;
use sidrec::npy;
use sidrec::progress::Progress;
use sidrec::quantize::QuantizeConfig;
use sidrec::template::Template;
use sidrec::tokenize::{self, CollabOptions, EmbeddingSource, TokenizeOptions};

/// PPMI written out the slow way: every pair within `window`, weight 1/distance, both
/// directions, then max(0, ln(c_ab · T / (c_a · c_b))).
fn ppmi_dense(seqs: &[Vec<u32>], n: usize, window: usize) -> Vec<Vec<f64>> {
    let mut c = vec![vec![0.0; n]; n];
    for s in seqs {
        for i in 0..s.len() {
            for j in i + 1..s.len().min(i + window + 1) {
                let (a, b) = (s[i] as usize, s[j] as usize);
                if a != b {
                    c[a][b] += 1.0 / (j - i) as f64;
                    c[b][a] += 1.0 / (j - i) as f64;
                }
            }
        }
    }
    let sums: Vec<f64> = c.iter().map(|r| r.iter().sum()).collect();
    let total: f64 = sums.iter().sum();
    (0..n)
        .map(|a| {
            (0..n)
                .map(|b| {
                    if c[a][b] == 0.0 {
                        0.0
                    } else {
                        (c[a][b] * total / (sums[a] * sums[b])).ln().max(0.0)
                    }
                })
                .collect()
        })
        .collect()
}

#[test]
fn two_items_give_plus_and_minus_ln2() {
    // c_01 = c_10 = 1, T = 2: PPMI = [[0, ln 2], [ln 2, 0]], eigenvalues ±ln 2, and each
    // item's row has squared norm |λ1|·u1² + |λ2|·u2² = ln 2 · (½ + ½).
    let cfg = CollabConfig {
        dim: 2,
        ..Default::default()
    };
    let (v, dim, stats) = collab::vectors(&[vec![0, 1]], 2, &cfg).unwrap();
    assert_eq!(dim, 2);
    let ln2 = 2f64.ln();
    let mut ev = stats.eigenvalues.clone();
    ev.sort_by(f64::total_cmp);
    assert!(
        (ev[0] + ln2).abs() < 1e-9 && (ev[1] - ln2).abs() < 1e-9,
        "{ev:?}"
    );
    for i in 0..2 {
        let sq: f64 = v[i * 2..i * 2 + 2]
            .iter()
            .map(|&x| (x as f64).powi(2))
            .sum();
        assert!((sq - ln2).abs() < 1e-5, "item {i}: {sq}");
    }
    assert_eq!((stats.items_covered, stats.nonzeros), (2, 2));
}

#[test]
fn full_rank_vectors_reconstruct_the_ppmi_matrix() {
    // With every dimension kept, Σ_e sign(λ_e) x_ae x_be must give back PPMI_ab.
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let n = 12;
    let seqs: Vec<Vec<u32>> = (0..30)
        .map(|_| {
            (0..rng.gen_range(2..7))
                .map(|_| rng.gen_range(0..n as u32))
                .collect()
        })
        .collect();
    let cfg = CollabConfig {
        dim: n,
        window: 2,
        iters: 30,
        seed: 3,
    };
    let (v, dim, stats) = collab::vectors(&seqs, n, &cfg).unwrap();
    let want = ppmi_dense(&seqs, n, 2);
    let covered = want.iter().filter(|r| r.iter().any(|&x| x > 0.0)).count();
    assert_eq!(stats.items_covered, covered);
    let signs: Vec<f64> = stats.eigenvalues.iter().map(|l| l.signum()).collect();
    for a in 0..n {
        for b in 0..n {
            let got: f64 = (0..dim)
                .map(|e| signs[e] * v[a * dim + e] as f64 * v[b * dim + e] as f64)
                .sum();
            assert!(
                (got - want[a][b]).abs() < 1e-4,
                "PPMI[{a}][{b}]: want {}, got {got}",
                want[a][b]
            );
        }
    }
    // Largest magnitude first.
    assert!(stats
        .eigenvalues
        .windows(2)
        .all(|w| w[0].abs() >= w[1].abs() - 1e-9));
}

#[test]
fn truncated_vectors_are_deterministic_and_zero_for_unseen_items() {
    let seqs = vec![vec![0, 1, 2, 0, 1], vec![2, 3, 4], vec![3, 4, 0]];
    let cfg = CollabConfig {
        dim: 3,
        ..Default::default()
    };
    let (a, dim, _) = collab::vectors(&seqs, 6, &cfg).unwrap();
    let (b, _, _) = collab::vectors(&seqs, 6, &cfg).unwrap();
    assert_eq!(dim, 3);
    assert_eq!(a, b, "same input and seed, different vectors");
    assert!(
        a[5 * dim..6 * dim].iter().all(|&x| x == 0.0),
        "item 5 never occurs"
    );
    assert!(a[..5 * dim].iter().any(|&x| x != 0.0));
}

#[test]
fn bad_input_is_named() {
    let cfg = CollabConfig::default();
    assert!(matches!(
        collab::vectors(&[vec![0, 9]], 3, &cfg),
        Err(CollabError::ItemOutOfRange { item: 9, n: 3 })
    ));
    assert!(matches!(
        collab::vectors(&[vec![0], vec![1, 1]], 3, &cfg),
        Err(CollabError::NoCooccurrence { window: 3 })
    ));
    let zero = CollabConfig {
        dim: 0,
        ..Default::default()
    };
    assert!(matches!(
        collab::vectors(&[vec![0, 1]], 2, &zero),
        Err(CollabError::ZeroDim)
    ));
}

#[test]
fn combine_gives_each_part_its_share_of_distances() {
    // Two items, text rows (3,4) and (0,5) (norms 5), collab rows (1,0) and (0,2).
    let text = [3.0, 4.0, 0.0, 5.0];
    let col = [1.0, 0.0, 0.0, 2.0];
    let out = collab::combine(&text, 2, &col, 2, 0.25);
    assert_eq!(out.len(), 8);
    let norm = |r: &[f32]| r.iter().map(|x| x * x).sum::<f32>();
    assert!((norm(&out[..2]) - 0.75).abs() < 1e-6);
    assert!((norm(&out[2..4]) - 0.25).abs() < 1e-6);
    assert!((out[0] - 0.6 * 0.75f32.sqrt()).abs() < 1e-6);
    assert!((out[3] - 0.0).abs() < 1e-6 && (out[2] - 0.5).abs() < 1e-6);
    // A zero collaborative row stays zero.
    let out = collab::combine(&text, 2, &[0.0; 4], 2, 0.5);
    assert!(out[2..4].iter().chain(&out[6..8]).all(|&x| x == 0.0));
}

fn write_catalog(dir: &Path, n: usize) -> std::path::PathBuf {
    let path = dir.join("items.jsonl");
    let lines: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"id": "i{i}", "type": "product", "title": "item {i}"}}"#))
        .collect();
    fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn options(
    catalog: &Path,
    emb: &Path,
    out: &Path,
    collab: Option<CollabOptions>,
) -> TokenizeOptions {
    TokenizeOptions {
        catalog: Some(catalog.to_path_buf()),
        load: LoadOptions::default(),
        template: Template::default(),
        embeddings: EmbeddingSource::Precomputed(emb.to_path_buf()),
        batch_size: 32,
        max_tokens: sidrec::embed::DEFAULT_MAX_TOKENS,
        quantize: QuantizeConfig {
            levels: vec![2, 8],
            seed: 0,
            ..Default::default()
        },
        out: out.to_path_buf(),
        force: false,
        save_embeddings: false,
        collab,
    }
}

fn first_codes(dir: &Path) -> HashMap<String, u32> {
    fs::read_to_string(dir.join(artifacts::SIDS_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<SidRecord>(l).unwrap())
        .map(|r| (r.id, r.codes[0]))
        .collect()
}

/// 16 items with random text vectors; users take items 0–7 together and 8–15 together.
/// With the interactions weighing 0.9, the two level-1 codes are the two groups; the
/// last two items of every user (evaluation targets) are never read.
#[test]
fn items_taken_together_share_the_first_code() {
    let tmp = tempfile::tempdir().unwrap();
    let n = 16;
    let catalog = write_catalog(tmp.path(), n);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let emb: Vec<f32> = (0..n * 8).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let emb_path = tmp.path().join("e.npy");
    npy::write_f32_matrix(&emb_path, &emb, n, 8).unwrap();
    let mut lines = Vec::new();
    for u in 0..40 {
        let base = if u % 2 == 0 { 0 } else { 8 };
        let mut items: Vec<String> = (0..6)
            .map(|_| format!("\"i{}\"", base + rng.gen_range(0..8)))
            .collect();
        // Cross-group tails: only in the held-out positions.
        items.push(format!("\"i{}\"", 8 - base + rng.gen_range(0..8)));
        items.push(format!("\"i{}\"", 8 - base + rng.gen_range(0..8)));
        lines.push(format!(
            r#"{{"user": "u{u}", "items": [{}]}}"#,
            items.join(", ")
        ));
    }
    let inter = tmp.path().join("inter.jsonl");
    fs::write(&inter, lines.join("\n") + "\n").unwrap();
    let collab = |weight| CollabOptions {
        interactions: inter.clone(),
        read: ReadOptions::default(),
        weight,
        config: CollabConfig {
            dim: 4,
            ..Default::default()
        },
    };

    let out = tmp.path().join("collab");
    let report = tokenize::run(
        &options(&catalog, &emb_path, &out, Some(collab(0.9))),
        Progress::new(true),
    )
    .unwrap();
    let c = report.collab.as_ref().expect("collab report");
    assert_eq!((c.users, c.training_interactions), (40, 240));
    assert_eq!(report.d, 8 + 4);
    let codes = first_codes(&out);
    let group = |g: usize| -> Vec<u32> {
        (g * 8..g * 8 + 8)
            .map(|i| codes[&format!("i{i}")])
            .collect()
    };
    let (a, b) = (group(0), group(1));
    assert!(a.iter().all(|&x| x == a[0]), "group 0 split: {a:?}");
    assert!(b.iter().all(|&x| x == b[0]), "group 1 split: {b:?}");
    assert_ne!(a[0], b[0]);
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["collab"]["weight"].as_f64(), Some(0.9f32 as f64));

    // Text alone (no --interactions) does not find the groups in random vectors.
    let plain = tmp.path().join("plain");
    let report = tokenize::run(
        &options(&catalog, &emb_path, &plain, None),
        Progress::new(true),
    )
    .unwrap();
    assert!(report.collab.is_none());
    let codes = first_codes(&plain);
    let a: Vec<u32> = (0..8).map(|i| codes[&format!("i{i}")]).collect();
    assert!(
        a.iter().any(|&x| x != a[0]),
        "random text vectors grouped 0-7: {a:?}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(plain.join("report.json")).unwrap()).unwrap();
    assert!(json.get("collab").is_none());

    // A weight outside 0..1 and an unreadable file are errors, and nothing is written.
    let bad = tmp.path().join("bad");
    let err = tokenize::run(
        &options(&catalog, &emb_path, &bad, Some(collab(1.5))),
        Progress::new(true),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--collab-weight 1.5"), "{err}");
    let mut missing = collab(0.5);
    missing.interactions = tmp.path().join("nope.jsonl");
    let err = tokenize::run(
        &options(&catalog, &emb_path, &bad, Some(missing)),
        Progress::new(true),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("nope.jsonl"), "{err}");
    assert!(!bad.exists());
}
