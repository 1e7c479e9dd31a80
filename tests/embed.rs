//! Embedding tests: the candle MiniLM encoder against an independent numpy reference
//! (tests/data/minilm_reference.json, made by scripts/minilm_reference.py), and loading
//! precomputed embeddings.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use sidrec::embed::{
    encode_all, load_precomputed, save_npy, BertEncoder, EmbedError, Embeddings, Encoder,
    DEFAULT_MAX_TOKENS,
};
use sidrec::npy;

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn minilm_dir() -> PathBuf {
    let dir = manifest().join("assets/minilm");
    if !dir.join("model.safetensors").is_file() {
        panic!(
            "{} has no MiniLM model; run scripts/fetch-assets.sh to download the test assets",
            dir.display()
        );
    }
    dir
}

fn encoder() -> &'static BertEncoder {
    static ENC: OnceLock<BertEncoder> = OnceLock::new();
    ENC.get_or_init(|| BertEncoder::from_dir(&minilm_dir(), DEFAULT_MAX_TOKENS).unwrap())
}

struct RefSentence {
    text: String,
    ids: Vec<u32>,
    embedding: Vec<f32>,
}

fn reference() -> Vec<RefSentence> {
    let path = manifest().join("tests/data/minilm_reference.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| RefSentence {
            text: s["text"].as_str().unwrap().to_string(),
            ids: s["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect(),
            embedding: s["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect(),
        })
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    dot(a, b) / (dot(a, a).sqrt() * dot(b, b).sqrt())
}

#[test]
fn minilm_dim_and_name() {
    let enc = encoder();
    assert_eq!(enc.dim(), 384);
    assert_eq!(enc.name(), "minilm");
}

#[test]
fn token_ids_match_reference() {
    let enc = encoder();
    let refs = reference();
    assert!(refs.iter().any(|r| r.ids.len() > 40));
    assert!(refs.iter().any(|r| !r.text.is_ascii()));
    for r in &refs {
        assert_eq!(enc.token_ids(&r.text).unwrap(), r.ids, "{:?}", r.text);
    }
}

#[test]
fn embeddings_match_reference_batched_and_single() {
    let enc = encoder();
    let refs = reference();
    let texts: Vec<&str> = refs.iter().map(|r| r.text.as_str()).collect();
    let batch = enc.encode_batch(&texts).unwrap();
    assert_eq!(batch.len(), refs.len());
    let (mut worst, mut worst_abs) = (0f64, 0f32);
    for (r, b) in refs.iter().zip(&batch) {
        let single = enc.encode_batch(&[r.text.as_str()]).unwrap().remove(0);
        for (how, v) in [("batch", b), ("single", &single)] {
            assert_eq!(v.len(), 384);
            let norm = dot(v, v).sqrt();
            assert!(
                (norm - 1.0).abs() < 1e-5,
                "{how} norm {norm} for {:?}",
                r.text
            );
            let gap = 1.0 - cosine(v, &r.embedding);
            worst = worst.max(gap);
            for (a, b) in v.iter().zip(&r.embedding) {
                worst_abs = worst_abs.max((a - b).abs());
            }
            assert!(gap <= 1e-4, "{how} cosine gap {gap:e} for {:?}", r.text);
        }
    }
    eprintln!("vs numpy reference: max cosine gap {worst:e}, max |element diff| {worst_abs:e}");
}

#[test]
fn same_call_twice_is_bit_identical() {
    let enc = encoder();
    let texts: Vec<String> = reference().into_iter().map(|r| r.text).collect();
    let a = encode_all(enc, &texts, 3, &mut |_| {}).unwrap();
    let b = encode_all(enc, &texts, 3, &mut |_| {}).unwrap();
    assert_eq!(a.data.len(), b.data.len());
    assert!(a
        .data
        .iter()
        .zip(&b.data)
        .all(|(x, y)| x.to_bits() == y.to_bits()));
}

#[test]
fn encode_all_keeps_input_order() {
    let enc = encoder();
    let texts: Vec<String> = [
        "a much longer description of a science fiction film about space travel and time",
        "jazz",
        "an upbeat pop song",
        "true crime podcast",
        "",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut progress = Vec::new();
    let emb = encode_all(enc, &texts, 2, &mut |d| progress.push(d)).unwrap();
    assert_eq!(progress, vec![2, 4, 5]);
    assert_eq!((emb.n, emb.d), (5, 384));
    emb.validate("encode_all").unwrap();
    for (i, t) in texts.iter().enumerate() {
        let single = enc.encode_batch(&[t.as_str()]).unwrap().remove(0);
        let c = cosine(emb.row(i), &single);
        assert!(c > 1.0 - 1e-5, "row {i} ({t:?}) cosine {c}");
    }
}

#[test]
fn similar_sentences_are_closer() {
    let enc = encoder();
    let v = enc
        .encode_batch(&[
            "A man is playing a guitar.",
            "Someone strums an acoustic guitar.",
            "The stock market fell sharply on Tuesday.",
            "A space adventure movie with aliens and starships",
            "Science fiction film about an interstellar war",
            "A cookbook of Italian pasta recipes",
        ])
        .unwrap();
    assert!(cosine(&v[0], &v[1]) > cosine(&v[0], &v[2]) + 0.2);
    assert!(cosine(&v[3], &v[4]) > cosine(&v[3], &v[5]) + 0.2);
    assert!(cosine(&v[3], &v[4]) > cosine(&v[4], &v[0]));
}

#[test]
fn truncation_caps_tokens() {
    let enc = BertEncoder::from_dir(&minilm_dir(), 16).unwrap();
    let long = "word ".repeat(100);
    assert_eq!(enc.token_ids(&long).unwrap().len(), 16);
    let v = enc.encode_batch(&[long.as_str(), "short"]).unwrap();
    assert!((dot(&v[0], &v[0]) - 1.0).abs() < 1e-5);
    let err = BertEncoder::from_dir(&minilm_dir(), 10_000).err().unwrap();
    assert!(err.to_string().contains("10000"), "{err}");
}

/// Throughput on ~1000 short item texts (run with `--ignored --nocapture`).
#[test]
#[ignore]
fn throughput_1000_items() {
    let enc = encoder();
    let genres = ["drama", "comedy", "thriller", "documentary", "animation"];
    let texts: Vec<String> = (0..1000)
        .map(|i| {
            format!(
                "Item {i}: a {} title from {} about {}",
                genres[i % 5],
                1950 + i % 70,
                ["love", "war", "family", "music", "crime", "space"][i % 6]
            )
        })
        .collect();
    let start = Instant::now();
    let emb = encode_all(enc, &texts, 64, &mut |_| {}).unwrap();
    let secs = start.elapsed().as_secs_f64();
    emb.validate("throughput").unwrap();
    eprintln!(
        "encoded {} texts in {secs:.2}s: {:.0} sentences/s",
        emb.n,
        emb.n as f64 / secs
    );
}

#[test]
fn missing_model_file_is_named() {
    let src = minilm_dir();
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let err = BertEncoder::from_dir(dir.path(), 256).err().unwrap();
    assert!(matches!(err, EmbedError::MissingFile { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    let empty = tempfile::tempdir().unwrap();
    let err = BertEncoder::from_dir(empty.path(), 256).err().unwrap();
    assert!(err.to_string().contains("config.json"), "{err}");
}

struct WrongDim;

impl Encoder for WrongDim {
    fn name(&self) -> &str {
        "wrong"
    }
    fn dim(&self) -> usize {
        8
    }
    fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        Ok(texts.iter().map(|_| vec![1.0; 4]).collect())
    }
}

#[test]
fn dimension_mismatch_is_an_error() {
    let texts = vec!["a".to_string(), "b".to_string()];
    let err = encode_all(&WrongDim, &texts, 1, &mut |_| {}).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            EmbedError::Dim {
                expected: 8,
                found: 4,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("wrong") && msg.contains('8') && msg.contains('4'),
        "{msg}"
    );
}

#[test]
fn precomputed_npy_roundtrip_and_numpy_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("emb.npy");
    let emb = Embeddings {
        n: 3,
        d: 2,
        data: vec![0.1, 0.2, -0.3, 0.4, 1e-7, 5.0],
    };
    save_npy(&emb, &path).unwrap();
    let back = load_precomputed(&path).unwrap();
    assert_eq!((back.n, back.d), (3, 2));
    assert_eq!(back.data, emb.data);

    // Files written by numpy.save.
    let data = manifest().join("tests/data");
    let e = load_precomputed(&data.join("numpy_f4.npy")).unwrap();
    assert_eq!((e.n, e.d), (2, 3));
    assert_eq!(e.data, vec![1.0, -2.5, 3.25, 0.5, 1e-3, -7.0]);
    let e = load_precomputed(&data.join("numpy_f8.npy")).unwrap();
    assert_eq!((e.n, e.d), (3, 2));
    assert_eq!(e.row(2), &[5.0, 6.0]);
    let e = load_precomputed(&data.join("numpy_f2.npy")).unwrap();
    assert_eq!(e.data, vec![0.5, -1.0]);
    for (file, want) in [("numpy_fortran.npy", "Fortran"), ("numpy_i8.npy", "'<i8'")] {
        let msg = load_precomputed(&data.join(file)).unwrap_err().to_string();
        assert!(msg.contains(file) && msg.contains(want), "{msg}");
    }
    let (raw, r, c) = npy::read_f32_matrix(&data.join("numpy_f4.npy")).unwrap();
    assert_eq!((raw.len(), r, c), (6, 2, 3));
}

fn write_safetensors(path: &Path, tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, dt, shape, bytes)| {
            (
                name.to_string(),
                TensorView::new(*dt, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn precomputed_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let vals = [1.0f32, -2.0, 0.5, 4.0, 0.25, -0.125];

    // Named "embeddings" among other tensors.
    let p = dir.path().join("named.safetensors");
    write_safetensors(
        &p,
        vec![
            ("ids", Dtype::F32, vec![3], f32_bytes(&[1.0, 2.0, 3.0])),
            ("embeddings", Dtype::F32, vec![3, 2], f32_bytes(&vals)),
        ],
    );
    let e = load_precomputed(&p).unwrap();
    assert_eq!((e.n, e.d, e.data.as_slice()), (3, 2, &vals[..]));

    // The only tensor, whatever its name, in each float dtype.
    let f64b: Vec<u8> = vals
        .iter()
        .flat_map(|x| (*x as f64).to_le_bytes())
        .collect();
    // All values are exactly representable in f16 and bf16.
    let f16b: Vec<u8> = [0x3c00u16, 0xc000, 0x3800, 0x4400, 0x3400, 0xb000]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let bf16b: Vec<u8> = vals
        .iter()
        .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
        .collect();
    for (dt, bytes) in [
        (Dtype::F32, f32_bytes(&vals)),
        (Dtype::F64, f64b),
        (Dtype::F16, f16b),
        (Dtype::BF16, bf16b),
    ] {
        let p = dir.path().join(format!("{dt:?}.safetensors"));
        write_safetensors(&p, vec![("vectors", dt, vec![2, 3], bytes)]);
        let e = load_precomputed(&p).unwrap();
        assert_eq!((e.n, e.d), (2, 3), "{dt:?}");
        assert_eq!(e.data, vals, "{dt:?}");
    }

    // Ambiguous: several tensors, none named "embeddings".
    let p = dir.path().join("ambiguous.safetensors");
    write_safetensors(
        &p,
        vec![
            ("a", Dtype::F32, vec![1, 2], f32_bytes(&[1.0, 2.0])),
            ("b", Dtype::F32, vec![1, 2], f32_bytes(&[1.0, 2.0])),
        ],
    );
    let msg = load_precomputed(&p).unwrap_err().to_string();
    assert!(
        msg.contains("ambiguous.safetensors") && msg.contains("[a, b]"),
        "{msg}"
    );

    // Wrong rank.
    let p = dir.path().join("rank1.safetensors");
    write_safetensors(
        &p,
        vec![("embeddings", Dtype::F32, vec![6], f32_bytes(&vals))],
    );
    let msg = load_precomputed(&p).unwrap_err().to_string();
    assert!(msg.contains("2-D") && msg.contains("[6]"), "{msg}");

    // Wrong dtype.
    let p = dir.path().join("ints.safetensors");
    write_safetensors(
        &p,
        vec![("embeddings", Dtype::I32, vec![1, 2], vec![0u8; 8])],
    );
    let msg = load_precomputed(&p).unwrap_err().to_string();
    assert!(
        msg.contains("ints.safetensors") && msg.contains("I32"),
        "{msg}"
    );
}

#[test]
fn non_finite_rows_are_rejected_with_row() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = vec![0.5f32; 5 * 3];
    data[2 * 3 + 1] = f32::NAN;
    data[4 * 3] = f32::NEG_INFINITY;
    let npy_path = dir.path().join("bad.npy");
    npy::write_f32_matrix(&npy_path, &data, 5, 3).unwrap();
    let err = load_precomputed(&npy_path).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            EmbedError::NonFinite {
                row: 2,
                count: 2,
                ..
            }
        ),
        "{msg}"
    );
    assert!(msg.contains("bad.npy") && msg.contains("row 2"), "{msg}");

    let st_path = dir.path().join("bad.safetensors");
    write_safetensors(
        &st_path,
        vec![("embeddings", Dtype::F32, vec![5, 3], f32_bytes(&data))],
    );
    let msg = load_precomputed(&st_path).unwrap_err().to_string();
    assert!(
        msg.contains("bad.safetensors") && msg.contains("row 2"),
        "{msg}"
    );
}

#[test]
fn precomputed_rejects_empty_and_unknown_format() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("empty.npy");
    npy::write_f32_matrix(&p, &[], 0, 384).unwrap();
    let msg = load_precomputed(&p).unwrap_err().to_string();
    assert!(msg.contains("empty.npy") && msg.contains("empty"), "{msg}");

    let p = dir.path().join("vectors.csv");
    std::fs::write(&p, "1,2\n").unwrap();
    let msg = load_precomputed(&p).unwrap_err().to_string();
    assert!(msg.contains("vectors.csv") && msg.contains(".npy"), "{msg}");

    let msg = load_precomputed(&dir.path().join("absent.npy"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("absent.npy"), "{msg}");
}
