//! Interaction files (RecBole `.inter`, Amazon `.json`, JSONL): arbitrary and mutated
//! input never panics, errors name the file and a line that exists, and what loads is
//! consistent with the catalog and the options.

use std::path::Path;

use proptest::prelude::*;
use sidrec::catalog::{Catalog, Item};
use sidrec::interactions::{InterFormat, ReadOptions, Sequences};

use crate::{config, junk, line_count, mutate, mutations};

const SEEDS: &[(InterFormat, &[u8])] = &[
    (
        InterFormat::Recbole,
        b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n\
          u1\t1\t5\t978300760\n\
          u1\t2\t3\t978300761\r\n\
          u2\t3\t4\t1e9\n\
          u1\t3\t4\t978300700\n\
          \n\
          u2\tMis\xe9rables\t1\t5\n\
          u2\t1\t1\t5\n\
          u3\t4\t2\t10\n\
          u3\t5\t2\t11\n\
          u3\ta\t2\t12\n\
          u3\tb\t2\t12\n\
          u4\t2\t2\t-3.5\n\
          u4\t3\t2\t0\n\
          u4\t4\t2\t2e3\n",
    ),
    (
        InterFormat::Amazon,
        b"{\n \"u1\": [\"1\", \"2\", 3],\n \"u2\": [1, 2, 3, \"b\"],\n \"u3\":\n [\"a\"],\n\
          \"u4\": [\"4\", \"5\", \"a\", \"b\", 1],\n \"5\": [2, 3, 4]\n}\n",
    ),
    (
        InterFormat::Jsonl,
        b"{\"user\": \"u1\", \"items\": [\"1\", \"2\", \"3\"]}\n\
          \n\
          {\"user\": 7, \"items\": [1, 2, \"a\", \"b\"]}\r\n\
          {\"user\": \"u3\", \"items\": []}\n\
          {\"user\": \"u4\", \"items\": [\"4\", \"5\", \"Mis\xc3\xa9rables\", 2]}\n\
          {\"user\": \"u5\", \"items\": [3, 2, 1]}\n",
    ),
];

fn catalog() -> Catalog {
    let ids = ["1", "2", "3", "4", "5", "a", "b", "Misérables"];
    Catalog::from_items(
        ids.iter()
            .map(|id| Item {
                id: id.to_string(),
                item_type: "movie".into(),
                title: format!("title {id}"),
                description: String::new(),
                attrs: Default::default(),
            })
            .collect(),
    )
    .unwrap()
}

fn format() -> impl Strategy<Value = InterFormat> {
    prop::sample::select(vec![
        InterFormat::Recbole,
        InterFormat::Amazon,
        InterFormat::Jsonl,
    ])
}

fn load_and_check(
    format: InterFormat,
    bytes: &[u8],
    skip_unknown: bool,
    min_len: usize,
) -> Result<(), TestCaseError> {
    let dir = crate::scratch();
    let path = dir.path().join("fuzzed-interactions.data");
    std::fs::write(&path, bytes).unwrap();
    let catalog = catalog();
    let opts = ReadOptions {
        format: Some(format),
        min_len,
        skip_unknown,
        // Skipping bad lines too exercises the readers' skip paths on the same input.
        skip_invalid: skip_unknown,
    };
    let (result, largest) = crate::largest_allocation(|| Sequences::load(&path, &catalog, &opts));
    prop_assert!(largest <= crate::allocation_budget(bytes.len()));
    match result {
        Ok((seqs, stats)) => {
            prop_assert!(!seqs.is_empty());
            prop_assert_eq!(seqs.users.len(), seqs.seqs.len());
            prop_assert_eq!(stats.users, seqs.len());
            prop_assert_eq!(stats.interactions, seqs.interactions());
            for s in &seqs.seqs {
                prop_assert!(s.len() >= min_len);
                prop_assert!(s.iter().all(|&i| (i as usize) < catalog.len()));
            }
            let split = seqs.split();
            prop_assert_eq!(split.test.len(), seqs.len());
        }
        Err(e) => {
            let msg = e.to_string();
            prop_assert!(msg.contains(&path.display().to_string()), "{}", msg);
            if let Some(line) = e.line() {
                let lines = line_count(bytes);
                prop_assert!(
                    (1..=lines).contains(&line),
                    "line {} of {}: {}",
                    line,
                    lines,
                    msg
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(400))]

    #[test]
    fn arbitrary_bytes_never_panic(
        format in format(),
        bytes in junk(400),
        skip in any::<bool>(),
        min_len in 3usize..5,
    ) {
        load_and_check(format, &bytes, skip, min_len)?;
    }

    #[test]
    fn mutated_files_never_panic(
        seed in prop::sample::select(SEEDS.to_vec()),
        other in format(),
        as_other in prop::bool::weighted(0.25),
        muts in mutations(),
        skip in any::<bool>(),
    ) {
        let (format, bytes) = seed;
        let bytes = mutate(bytes.to_vec(), &muts);
        load_and_check(if as_other { other } else { format }, &bytes, skip, 3)?;
    }
}

#[test]
fn every_seed_loads() {
    let dir = tempfile::tempdir().unwrap();
    for (format, bytes) in SEEDS {
        let path = dir.path().join("seed");
        std::fs::write(&path, bytes).unwrap();
        let opts = ReadOptions {
            format: Some(*format),
            skip_unknown: true,
            ..ReadOptions::default()
        };
        let (s, _) =
            Sequences::load(&path, &catalog(), &opts).unwrap_or_else(|e| panic!("{format}: {e}"));
        assert!(!s.is_empty(), "{format}");
    }
}

/// The file name in every error, even for a path with a directory part.
#[test]
fn errors_name_nested_paths() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub dir");
    std::fs::create_dir(&sub).unwrap();
    let path = sub.join("x.inter");
    std::fs::write(&path, b"user_id:token\n").unwrap();
    let err = Sequences::load(Path::new(&path), &catalog(), &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("sub dir/x.inter"), "{err}");
}
