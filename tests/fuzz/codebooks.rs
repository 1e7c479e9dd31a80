//! `codebooks.safetensors` and `sids.jsonl`: the SID vocabulary recorded in the
//! codebooks' metadata, whatever it says, is refused with an error naming the file or is
//! safe to use; a mutated `sids.jsonl` never panics the SID map.

use std::collections::HashMap;

use proptest::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use sidrec::artifacts::{self, SidMap, SidRecord};
use sidrec::sid::SidVocab;

use crate::{config, mutate, mutations};

/// A `codebooks.safetensors` with one `[k, d]` f32 level and the `sidrec` metadata.
fn codebooks(meta: &str) -> Vec<u8> {
    let data = [0u8; 4 * 2 * 3];
    let view = TensorView::new(Dtype::F32, vec![2, 3], &data).unwrap();
    let meta = HashMap::from([(artifacts::META_KEY.to_string(), meta.to_string())]);
    safetensors::serialize([("level_0", view)], Some(meta)).unwrap()
}

fn vocab_json() -> impl Strategy<Value = Value> {
    let count = prop_oneof![
        6 => (0u64..5).prop_map(Value::from),
        2 => prop::sample::select(vec![1u64 << 32, u64::MAX, usize::MAX as u64 / 3, 1 << 40])
            .prop_map(Value::from),
        1 => Just(json!(-1)),
    ];
    (
        prop::collection::vec(prop_oneof!["[a-z]{1,5}", ".{0,5}"], 0..4),
        prop_oneof![
            8 => prop::collection::vec(count.clone(), 0..5).prop_map(Value::from),
            1 => prop::collection::vec(Just(json!(1)), 26..200).prop_map(Value::from),
        ],
        count,
        prop::option::weighted(0.1, crate::json_value()),
    )
        .prop_map(|(types, levels, dedup, junk)| {
            let mut v = json!({"types": types, "levels": levels, "dedup": dedup});
            if let Some(j) = junk {
                v["levels"] = j;
            }
            v
        })
}

/// Uses a vocabulary the way the loaders do: sizes, token names, parsing SIDs.
fn exercise_vocab(vocab: &SidVocab, sid: &str, ids: &[u32]) {
    let n = vocab.len();
    let _ = vocab.dedup_letter();
    let _ = vocab.type_ids();
    if n <= 10_000 {
        assert_eq!(vocab.tokens().len(), n);
    }
    for &id in ids {
        let _ = vocab.token(id);
    }
    let _ = vocab.format(ids);
    let _ = vocab.decode(ids);
    if let Ok(parsed) = vocab.parse(sid) {
        let text = vocab.format(&parsed).unwrap();
        assert_eq!(vocab.parse(&text).unwrap(), parsed);
    }
}

proptest! {
    #![proptest_config(config(300))]

    /// The vocabulary recorded in the metadata, whatever it says, is refused or usable.
    #[test]
    fn codebooks_vocab_never_panics(
        vocab in vocab_json(),
        wrap in prop_oneof![4 => Just(0u8), 1 => 1u8..4],
        sid in prop_oneof!["(<[a-z]{1,2}(_[0-9]{1,3})?>){1,6}", ".{0,12}"],
        ids in prop::collection::vec(prop_oneof![0u32..40, any::<u32>()], 0..6),
    ) {
        let meta = match wrap {
            0 => json!({"vocab": vocab, "seed": 1}).to_string(),
            1 => vocab.to_string(),
            2 => "{\"vocab\": ".to_string(),
            _ => json!({"vocab": null}).to_string(),
        };
        let dir = crate::scratch();
        let file = dir.path().join(artifacts::CODEBOOKS_FILE);
        std::fs::write(&file, codebooks(&meta)).unwrap();
        match artifacts::read_vocab(dir.path()) {
            Ok(v) => exercise_vocab(&v, &sid, &ids),
            Err(e) => prop_assert!(e.to_string().contains(&file.display().to_string()), "{}", e),
        }
        let books = artifacts::read_codebooks(dir.path()).unwrap();
        prop_assert_eq!(books.len(), 1);
    }

    /// `sids.jsonl` mutated beside a valid vocabulary never panics the SID map.
    #[test]
    fn sid_map_never_panics(muts in mutations()) {
        let dir = crate::scratch();
        let vocab = json!({"types": ["movie"], "levels": [3, 2], "dedup": 2});
        std::fs::write(
            dir.path().join(artifacts::CODEBOOKS_FILE),
            codebooks(&json!({"vocab": vocab}).to_string()),
        )
        .unwrap();
        let records = [
            ("1", "<movie><a_0><b_1>", vec![0, 1]),
            ("2", "<movie><a_2><b_0><c_0>", vec![2, 0, 0]),
            ("3", "<movie><a_2><b_0><c_1>", vec![2, 0, 1]),
        ];
        let mut text = Vec::new();
        for (id, sid, codes) in records {
            let r = SidRecord { id: id.into(), item_type: "movie".into(), codes, sid: sid.into() };
            serde_json::to_writer(&mut text, &r).unwrap();
            text.push(b'\n');
        }
        let path = dir.path().join(artifacts::SIDS_FILE);
        std::fs::write(&path, mutate(text, &muts)).unwrap();
        if let Ok(map) = SidMap::load(dir.path()) {
            for i in 0..map.len() {
                let _ = map.lookup_sid(&map.records[i].sid);
                let _ = map.sharing_prefix(i, 2);
            }
        }
    }
}

#[test]
fn codebooks_fixture_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = json!({"types": ["movie"], "levels": [3, 2], "dedup": 2});
    std::fs::write(
        dir.path().join(artifacts::CODEBOOKS_FILE),
        codebooks(&json!({"vocab": vocab}).to_string()),
    )
    .unwrap();
    let v = artifacts::read_vocab(dir.path()).unwrap();
    assert_eq!(v.len(), 1 + 3 + 2 + 2);
}

/// Found by `codebooks_vocab_never_panics`: absurd level sizes in the metadata of
/// `codebooks.safetensors` overflowed the vocabulary size; now they are an error naming
/// the file.
#[test]
fn codebooks_with_absurd_vocab_is_a_clean_error() {
    for vocab in [
        json!({"types": ["movie"], "levels": [u64::MAX, 1], "dedup": 0}),
        json!({"types": ["movie"], "levels": vec![1; 160], "dedup": 0}),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(artifacts::CODEBOOKS_FILE);
        std::fs::write(&file, codebooks(&json!({ "vocab": vocab }).to_string())).unwrap();
        let err = artifacts::read_vocab(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert!(err.contains("vocab"), "{err}");
    }
}
