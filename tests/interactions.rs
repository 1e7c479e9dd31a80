//! Interaction readers and the leave-one-out split: fixtures under `tests/data/train/`
//! and the real MovieLens files under `assets/` (fetched by `scripts/fetch-assets.sh`).

use std::path::{Path, PathBuf};

use sidrec::catalog::{Catalog, Item, LoadOptions};
use sidrec::interactions::{InterFormat, InteractionsError, ReadOptions, Sequences};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/train")
        .join(name)
}

fn asset(rel: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets")
        .join(rel);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-assets.sh to fetch the test assets",
        p.display()
    );
    p
}

fn catalog() -> Catalog {
    Catalog::load(&fixture("catalog.jsonl"), &LoadOptions::default()).unwrap()
}

/// The item ids of a user's sequence.
fn ids<'a>(c: &'a Catalog, seq: &[u32]) -> Vec<&'a str> {
    seq.iter()
        .map(|&i| c.items[i as usize].id.as_str())
        .collect()
}

fn user<'a>(s: &'a Sequences, name: &str) -> &'a [u32] {
    let u = s
        .users
        .iter()
        .position(|n| n == name)
        .unwrap_or_else(|| panic!("user {name} missing"));
    &s.seqs[u]
}

#[test]
fn recbole_sorts_by_timestamp_and_keeps_ties_in_file_order() {
    let c = catalog();
    let (s, stats) = Sequences::load(&fixture("small.inter"), &c, &ReadOptions::default()).unwrap();
    // Users in order of first appearance; u3 (2 interactions) dropped.
    assert_eq!(s.users, ["u1", "u2", "u4"]);
    assert_eq!(ids(&c, user(&s, "u1")), ["m1", "m2", "m3", "p1"]);
    // m1, m2, m3 share timestamp 200: file order.
    assert_eq!(ids(&c, user(&s, "u2")), ["p4", "m1", "m2", "m3"]);
    assert_eq!(
        ids(&c, user(&s, "u4")),
        ["p1", "m4", "p2", "m6", "p3", "m5", "p4"]
    );
    assert_eq!(stats.users_read, 4);
    assert_eq!(stats.interactions_read, 17);
    assert_eq!(stats.users_dropped, 1);
    assert_eq!(stats.interactions_dropped, 2);
    assert_eq!(stats.users, 3);
    assert_eq!(stats.interactions, 15);
    assert_eq!(s.interactions(), 15);
}

#[test]
fn min_len_is_configurable_but_at_least_three() {
    let c = catalog();
    let opts = ReadOptions {
        min_len: 5,
        ..ReadOptions::default()
    };
    let (s, stats) = Sequences::load(&fixture("small.inter"), &c, &opts).unwrap();
    assert_eq!(s.users, ["u4"]);
    assert_eq!(stats.users_dropped, 3);
    let opts = ReadOptions {
        min_len: 2,
        ..ReadOptions::default()
    };
    let e = Sequences::load(&fixture("small.inter"), &c, &opts).unwrap_err();
    assert!(matches!(e, InteractionsError::MinLen { min_len: 2 }), "{e}");
    let opts = ReadOptions {
        min_len: 100,
        ..ReadOptions::default()
    };
    let e = Sequences::load(&fixture("small.inter"), &c, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no user has at least 100 interactions"), "{e}");
}

#[test]
fn unknown_item_names_file_line_and_id() {
    let c = catalog();
    let e = Sequences::load(&fixture("unknown.inter"), &c, &ReadOptions::default()).unwrap_err();
    assert_eq!(e.line(), Some(6));
    let msg = e.to_string();
    assert!(msg.contains("unknown.inter:6:"), "{msg}");
    assert!(msg.contains("item \"m9\" is not in the catalog"), "{msg}");
    assert!(msg.contains("user \"u2\""), "{msg}");

    let e = Sequences::load(&fixture("unknown.json"), &c, &ReadOptions::default()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("unknown.json:3:"), "{msg}");
    assert!(msg.contains("\"nope\""), "{msg}");
}

#[test]
fn unknown_items_can_be_skipped_and_counted() {
    let c = catalog();
    let opts = ReadOptions {
        skip_unknown: true,
        ..ReadOptions::default()
    };
    let (s, stats) = Sequences::load(&fixture("unknown.inter"), &c, &opts).unwrap();
    // u2 keeps 2 of its 3 items: below the minimum.
    assert_eq!(s.users, ["u1"]);
    assert_eq!(stats.unknown_skipped, 1);
    assert_eq!(stats.users_dropped, 1);
    assert_eq!(stats.interactions_dropped, 2);
    let opts = ReadOptions {
        skip_unknown: true,
        min_len: 3,
        format: None,
        skip_invalid: false,
    };
    let (s, stats) = Sequences::load(&fixture("unknown.json"), &c, &opts).unwrap();
    assert_eq!(s.users, ["0"]);
    assert_eq!(stats.unknown_skipped, 1);
    assert_eq!(stats.users_dropped, 1);
}

#[test]
fn amazon_layout_keeps_list_order() {
    let c = catalog();
    let (s, stats) =
        Sequences::load(&fixture("interactions.json"), &c, &ReadOptions::default()).unwrap();
    assert_eq!(s.users, ["0", "2"]);
    assert_eq!(ids(&c, &s.seqs[0]), ["m1", "m2", "m3", "m4"]);
    assert_eq!(ids(&c, &s.seqs[1]), ["m5", "p3", "m6"]);
    assert_eq!(stats.users_dropped, 1);
}

#[test]
fn amazon_layout_accepts_integer_ids() {
    let items = (0..4)
        .map(|i| Item {
            id: i.to_string(),
            item_type: "product".into(),
            title: format!("product {i}"),
            description: String::new(),
            attrs: Default::default(),
        })
        .collect();
    let c = Catalog::from_items(items).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("interactions.json");
    std::fs::write(&p, r#"{"0": [3, 1, 2], "1": [0, 1, 2, 3]}"#).unwrap();
    let (s, _) = Sequences::load(&p, &c, &ReadOptions::default()).unwrap();
    assert_eq!(s.seqs, vec![vec![3, 1, 2], vec![0, 1, 2, 3]]);
}

#[test]
fn jsonl_layout() {
    let c = catalog();
    let (s, stats) =
        Sequences::load(&fixture("interactions.jsonl"), &c, &ReadOptions::default()).unwrap();
    assert_eq!(s.users, ["alice", "bob"]);
    assert_eq!(ids(&c, &s.seqs[1]), ["p1", "p2", "p3", "m4"]);
    assert_eq!(stats.users_dropped, 1);

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("dup.jsonl");
    std::fs::write(
        &p,
        "{\"user\": \"a\", \"items\": [\"m1\"]}\n{\"user\": \"a\", \"items\": [\"m2\"]}\n",
    )
    .unwrap();
    let e = Sequences::load(&p, &c, &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("dup.jsonl:2: user \"a\" already appears on line 1"),
        "{e}"
    );
    std::fs::write(&p, "{\"user\": \"a\", \"items\": \"m1\"}\n").unwrap();
    let e = Sequences::load(&p, &c, &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("dup.jsonl:1: field \"items\""), "{e}");
}

#[test]
fn format_detection_and_names() {
    assert_eq!(
        InterFormat::detect(Path::new("x.inter")),
        Some(InterFormat::Recbole)
    );
    assert_eq!(
        InterFormat::detect(Path::new("x.json")),
        Some(InterFormat::Amazon)
    );
    assert_eq!(
        InterFormat::detect(Path::new("x.jsonl")),
        Some(InterFormat::Jsonl)
    );
    assert_eq!(InterFormat::detect(Path::new("x.csv")), None);
    assert_eq!(
        "amazon".parse::<InterFormat>().unwrap(),
        InterFormat::Amazon
    );
    assert!("xml".parse::<InterFormat>().is_err());
    let e = Sequences::load(Path::new("x.csv"), &catalog(), &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot tell the interactions format"), "{e}");
}

#[test]
fn bad_recbole_lines_are_errors_with_lines() {
    let c = catalog();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.inter");
    std::fs::write(
        &p,
        "user_id:token\titem_id:token\ttimestamp:float\nu\tm1\t1\nu\tm2\n",
    )
    .unwrap();
    let e = Sequences::load(&p, &c, &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad.inter:3: 2 tab-separated fields"), "{e}");
    std::fs::write(
        &p,
        "user_id:token\titem_id:token\ttimestamp:float\nu\tm1\tsoon\n",
    )
    .unwrap();
    let e = Sequences::load(&p, &c, &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad.inter:2: field \"timestamp\""), "{e}");
    std::fs::write(&p, "user:token\titem_id:token\n").unwrap();
    let e = Sequences::load(&p, &c, &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bad.inter:1: header has no user_id column"),
        "{e}"
    );
}

#[test]
fn split_is_leave_one_out() {
    let c = catalog();
    let (s, _) = Sequences::load(&fixture("small.inter"), &c, &ReadOptions::default()).unwrap();
    let split = s.split();
    assert_eq!(split.train.len(), s.len());
    assert_eq!(split.valid.len(), s.len());
    assert_eq!(split.test.len(), s.len());
    for (u, seq) in s.seqs.iter().enumerate() {
        let n = seq.len();
        assert_eq!(split.train[u], seq[..n - 2]);
        assert_eq!(split.valid[u], (seq[..n - 2].to_vec(), seq[n - 2]));
        assert_eq!(split.test[u], (seq[..n - 1].to_vec(), seq[n - 1]));
    }
    // u1: m1 m2 m3 p1.
    assert_eq!(ids(&c, &split.train[0]), ["m1", "m2"]);
    assert_eq!(c.items[split.valid[0].1 as usize].id, "m3");
    assert_eq!(c.items[split.test[0].1 as usize].id, "p1");
}

#[test]
fn json_object_is_the_peers_layout() {
    let c = catalog();
    let (s, _) = Sequences::load(&fixture("small.inter"), &c, &ReadOptions::default()).unwrap();
    let v = s.to_json_object();
    assert_eq!(v["0"], serde_json::json!(s.seqs[0]));
    assert_eq!(v.as_object().unwrap().len(), 3);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("interactions.json");
    s.write_json(&p).unwrap();
    // Item indices of this catalog are its positions: reading the file back against a
    // catalog whose ids are those positions gives the same sequences.
    let items = (0..c.len())
        .map(|i| Item {
            id: i.to_string(),
            ..c.items[i].clone()
        })
        .collect();
    let by_index = Catalog::from_items(items).unwrap();
    let (back, _) = Sequences::load(&p, &by_index, &ReadOptions::default()).unwrap();
    assert_eq!(back.seqs, s.seqs);
    assert_eq!(back.users, ["0", "1", "2"]);
}

fn assert_no_leakage(s: &Sequences) {
    let split = s.split();
    for u in 0..s.len() {
        let train = &split.train[u];
        let (vh, vt) = &split.valid[u];
        let (th, tt) = &split.test[u];
        // The targets are the last two interactions and never part of the training part
        // (by position; an item a user consumed twice may legitimately recur).
        assert_eq!(train.len() + 2, s.seqs[u].len());
        assert_eq!(vh, train);
        assert_eq!(&th[..train.len()], &train[..]);
        assert_eq!(th.len(), train.len() + 1);
        assert_eq!(th[train.len()], *vt);
        let distinct = {
            let mut v = s.seqs[u].clone();
            v.sort_unstable();
            v.dedup();
            v.len() == s.seqs[u].len()
        };
        if distinct {
            assert!(
                !train.contains(vt),
                "user {u}: validation target in training"
            );
            assert!(!train.contains(tt), "user {u}: test target in training");
            assert!(
                !vh.contains(tt),
                "user {u}: test target in validation history"
            );
        }
    }
}

#[test]
fn no_leakage_on_fixtures() {
    let c = catalog();
    let (s, _) = Sequences::load(&fixture("small.inter"), &c, &ReadOptions::default()).unwrap();
    assert_no_leakage(&s);
}

#[test]
fn movielens_100k() {
    let c = Catalog::load(
        &asset("ml-100k/ml-100k.item"),
        &LoadOptions {
            format: None,
            default_type: "movie".into(),
            skip_invalid: false,
        },
    )
    .unwrap();
    assert_eq!(c.len(), 1682);
    let (s, stats) =
        Sequences::load(&asset("ml-100k/ml-100k.inter"), &c, &ReadOptions::default()).unwrap();
    assert_eq!(s.len(), 943);
    assert_eq!(s.interactions(), 100_000);
    assert_eq!(stats.users_dropped, 0);
    assert_eq!(s.users[0], "196");
    // User 196's first three ratings share a timestamp (881250949): file order.
    assert_eq!(
        ids(&c, &s.seqs[0][..6]),
        ["242", "286", "269", "306", "340", "1022"]
    );
    assert_eq!(s.seqs[0].len(), 39);
    let u1 = user(&s, "1");
    assert_eq!(u1.len(), 272);
    assert_eq!(ids(&c, &u1[..4]), ["168", "172", "165", "156"]);
    assert_eq!(ids(&c, &u1[u1.len() - 2..]), ["74", "102"]);
    let split = s.split();
    assert_eq!(
        c.items[split.test[s.users.iter().position(|u| u == "1").unwrap()].1 as usize].id,
        "102"
    );
    assert_no_leakage(&s);
    let total: usize = split.train.iter().map(Vec::len).sum();
    assert_eq!(total, 100_000 - 2 * 943);
}

#[test]
fn movielens_1m_ids_are_titles() {
    let c = Catalog::load(
        &asset("ml-1m/ml-1m.item"),
        &LoadOptions {
            format: None,
            default_type: "movie".into(),
            skip_invalid: false,
        },
    )
    .unwrap();
    let (s, _) = Sequences::load(&asset("ml-1m/ml-1m.inter"), &c, &ReadOptions::default()).unwrap();
    assert_eq!(s.len(), 6040);
    assert_eq!(s.interactions(), 1_000_209);
    assert!(c.index_of("Toy Story (1995)").is_some());
    assert_no_leakage(&s);
}
