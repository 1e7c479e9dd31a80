//! Float matrices from outside: `.npy` files and `.safetensors` files for precomputed
//! embeddings. Headers that lie (wrong dtypes, shapes with huge, negative or overflowing
//! dims, data shorter than the shape, lengths beyond the file) give clean errors without
//! allocating what they claim; valid arrays round-trip.

use std::collections::HashMap;

use proptest::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use sidrec::embed::{load_precomputed, EmbedError};
use sidrec::npy;

use crate::{allocation_budget, config, junk, largest_allocation, mutate, mutations};

// ---------------------------------------------------------------------------------------
// .npy

/// A `.npy` file: magic, version, header length (`declared`, or the true one), header
/// text, payload.
fn npy_file(version: u8, header: &str, declared: Option<u32>, payload: &[u8]) -> Vec<u8> {
    let mut out = b"\x93NUMPY".to_vec();
    out.extend_from_slice(&[version, 0]);
    let len = declared.unwrap_or(header.len() as u32);
    if version == 1 {
        out.extend_from_slice(&(len as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&len.to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(payload);
    out
}

fn descr() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec!["'<f4'", "'<f8'", "'<f2'"]).prop_map(String::from),
        2 => prop::sample::select(vec![
            "'>f4'", "'|u1'", "'<i8'", "'<c8'", "'O'", "''", "'<f4", "<f4", "\"<f4\"",
            "'<f16'", "('<f4', (2,))", "[('a', '<f4')]", "'<f4' '<f8'",
        ])
        .prop_map(String::from),
        1 => ".{0,8}",
    ]
}

fn fortran() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => Just("False".to_string()),
        1 => Just("True".to_string()),
        1 => prop::sample::select(vec!["0", "false", "'False'", ""]).prop_map(String::from),
    ]
}

fn dim() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (0u32..5).prop_map(|d| d.to_string()),
        3 => prop::sample::select(vec![
            "1000000000000",
            "4611686018427387904",
            "9223372036854775807",
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999999999",
            "-1",
            "-0",
            "2L",
            "",
            " 3 ",
            "abc",
            "1e3",
            "0x10",
            "3.0",
        ])
        .prop_map(String::from),
        1 => "[0-9]{1,24}",
    ]
}

fn shape() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            3 => prop::collection::vec(dim(), 2),
            1 => prop::collection::vec(dim(), 0..5),
        ],
        any::<bool>(),
        prop::sample::select(vec![
            ("(", ")"),
            ("(", ")"),
            ("[", "]"),
            ("(", ""),
            ("", ")"),
        ]),
    )
        .prop_map(|(dims, trailing_comma, (open, close))| {
            let mut s = format!("{open}{}", dims.join(", "));
            if trailing_comma || dims.len() == 1 {
                s.push(',');
            }
            s.push_str(close);
            s
        })
}

/// A header dict: the three keys with generated values, in any order, each sometimes
/// left out, quoted with `'` or `"`, with numpy's padding or none.
fn header() -> impl Strategy<Value = String> {
    let entry = |key: &'static str, value: BoxedStrategy<String>| {
        (value, prop::bool::weighted(0.95), any::<bool>()).prop_map(move |(v, keep, dq)| {
            keep.then(|| {
                if dq {
                    format!("\"{key}\": {v}")
                } else {
                    format!("'{key}': {v}")
                }
            })
        })
    };
    (
        entry("descr", descr().boxed()),
        entry("fortran_order", fortran().boxed()),
        entry("shape", shape().boxed()),
        0usize..70,
    )
        .prop_flat_map(|(a, b, c, pad)| {
            let entries: Vec<String> = [a, b, c].into_iter().flatten().collect();
            (Just(entries).prop_shuffle(), Just(pad))
        })
        .prop_map(|(entries, pad)| format!("{{{}, }}{}\n", entries.join(", "), " ".repeat(pad)))
}

/// Reads `bytes` as a `.npy` file (directly and as precomputed embeddings) and checks
/// that nothing panics, nothing large is allocated, errors name the file and what
/// loads is consistent.
fn read_npy(bytes: &[u8]) -> Result<(), TestCaseError> {
    let dir = crate::scratch();
    let path = dir.path().join("fuzzed.npy");
    std::fs::write(&path, bytes).unwrap();
    let name = path.display().to_string();
    let (result, largest) = largest_allocation(|| npy::read_f32_matrix(&path));
    prop_assert!(
        largest <= allocation_budget(bytes.len()),
        "{} bytes",
        largest
    );
    match result {
        Ok((data, rows, cols)) => prop_assert_eq!(Some(data.len()), rows.checked_mul(cols)),
        Err(e) => prop_assert!(e.to_string().contains(&name), "{}", e),
    }
    let (result, largest) = largest_allocation(|| load_precomputed(&path));
    prop_assert!(
        largest <= allocation_budget(bytes.len()),
        "{} bytes",
        largest
    );
    check_embeddings(&name, result)
}

fn check_embeddings(
    name: &str,
    result: Result<sidrec::embed::Embeddings, EmbedError>,
) -> Result<(), TestCaseError> {
    match result {
        Ok(emb) => {
            prop_assert!(emb.n > 0 && emb.d > 0);
            prop_assert_eq!(emb.data.len(), emb.n * emb.d);
            prop_assert!(emb.data.iter().all(|v| v.is_finite()));
        }
        Err(e) => prop_assert!(e.to_string().contains(name), "{}", e),
    }
    Ok(())
}

/// A valid file of any supported version and dtype: `(bytes, expected values)`.
fn valid_npy() -> impl Strategy<Value = (Vec<u8>, Vec<f32>, usize, usize)> {
    (1u8..=3, 0usize..3, 0usize..5, 0usize..5).prop_flat_map(|(version, dtype, rows, cols)| {
        prop::collection::vec(any::<u16>(), rows * cols).prop_map(move |raw| {
            let (descr, payload, values): (&str, Vec<u8>, Vec<f32>) = match dtype {
                0 => {
                    let v: Vec<f32> = raw.iter().map(|&r| r as f32 - 1000.0).collect();
                    ("<f4", v.iter().flat_map(|x| x.to_le_bytes()).collect(), v)
                }
                1 => {
                    let v: Vec<f64> = raw.iter().map(|&r| r as f64 / 7.0).collect();
                    let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                    ("<f8", v.iter().flat_map(|x| x.to_le_bytes()).collect(), f)
                }
                _ => {
                    // Finite halves only (exponent below 31).
                    let h: Vec<u16> = raw.iter().map(|&r| r & 0xbbff).collect();
                    let f: Vec<f32> = h.iter().map(|&x| f16(x)).collect();
                    ("<f2", h.iter().flat_map(|x| x.to_le_bytes()).collect(), f)
                }
            };
            let header = format!(
                "{{'descr': '{descr}', 'fortran_order': False, 'shape': ({rows}, {cols}), }}\n"
            );
            (
                npy_file(version, &header, None, &payload),
                values,
                rows,
                cols,
            )
        })
    })
}

/// IEEE half to f32 (the reference for the reader's own conversion).
fn f16(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let mant = (h & 0x3ff) as f32;
    sign * match exp {
        0 => mant * 2f32.powi(-24),
        _ => (1.0 + mant / 1024.0) * 2f32.powi(exp - 15),
    }
}

proptest! {
    #![proptest_config(config(500))]

    /// Generated headers, true or lying header lengths, random payloads.
    #[test]
    fn npy_headers_never_panic(
        version in prop_oneof![12 => 1u8..=3, 1 => any::<u8>()],
        header in header(),
        lie in prop::option::weighted(0.15, prop_oneof![any::<u32>(), 0u32..200]),
        // Up to 160 bytes: enough for most small shapes of every dtype.
        payload in prop::collection::vec(any::<u8>(), 0..160),
    ) {
        read_npy(&npy_file(version, &header, lie, &payload))?;
    }

    /// Arbitrary bytes, with the magic string in front half the time.
    #[test]
    fn npy_arbitrary_bytes_never_panic(magic in any::<bool>(), version in 0u8..5, bytes in junk(200)) {
        let mut file = Vec::new();
        if magic {
            file.extend_from_slice(b"\x93NUMPY");
            file.push(version);
        }
        file.extend_from_slice(&bytes);
        read_npy(&file)?;
    }

    /// Valid files read back exactly; mutated, they still never panic.
    #[test]
    fn npy_round_trip((bytes, values, rows, cols) in valid_npy(), muts in mutations()) {
        let dir = crate::scratch();
        let path = dir.path().join("valid.npy");
        std::fs::write(&path, &bytes).unwrap();
        let (data, r, c) = npy::read_f32_matrix(&path).unwrap();
        prop_assert_eq!((r, c), (rows, cols));
        prop_assert_eq!(data, values);
        read_npy(&mutate(bytes, &muts))?;
    }

    /// What `write_f32_matrix` writes, `read_f32_matrix` and `load_precomputed` read.
    #[test]
    fn npy_write_read(rows in 0usize..6, cols in 0usize..6, seed in any::<u64>()) {
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| f32::from_bits((seed.rotate_left(i as u32 * 7) as u32) & 0xbfff_ffff))
            .collect();
        let dir = crate::scratch();
        let path = dir.path().join("w.npy");
        npy::write_f32_matrix(&path, &data, rows, cols).unwrap();
        let (back, r, c) = npy::read_f32_matrix(&path).unwrap();
        prop_assert_eq!((r, c), (rows, cols));
        prop_assert_eq!(
            back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            data.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        match load_precomputed(&path) {
            Ok(emb) => prop_assert_eq!(emb.data, data),
            Err(e) => prop_assert!(rows == 0 || cols == 0 || matches!(e, EmbedError::NonFinite { .. }), "{}", e),
        }
    }
}

/// A header claiming 10^12 rows over a 16-byte payload is refused before anything of
/// that size is allocated.
#[test]
fn npy_huge_shape_small_file_is_a_clean_error() {
    for shape in [
        "(1000000000000, 384)",
        "(18446744073709551615, 2)",
        "(4611686018427387904, 4)",
    ] {
        let header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}\n");
        let bytes = npy_file(1, &header, None, &[0; 16]);
        let dir = crate::scratch();
        let path = dir.path().join("huge.npy");
        std::fs::write(&path, &bytes).unwrap();
        let (r, largest) = largest_allocation(|| npy::read_f32_matrix(&path));
        let err = r.unwrap_err().to_string();
        assert!(err.contains("huge.npy"), "{err}");
        assert!(largest < 1 << 20, "{largest}");
    }
}

// ---------------------------------------------------------------------------------------
// .safetensors

const DTYPES: &[&str] = &[
    "F32", "F16", "BF16", "F64", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL",
    "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64", "f32", "",
];

/// A JSON number or something pretending to be one, for shapes and offsets.
fn json_dim() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => (0u64..6).prop_map(Value::from),
        2 => prop::sample::select(vec![
            1_000_000_000_000u64,
            u64::MAX,
            1 << 62,
            1 << 32,
            usize::MAX as u64 / 2 + 1,
        ])
        .prop_map(Value::from),
        1 => (-5i64..0).prop_map(Value::from),
        1 => Just(json!(1.5)),
        1 => Just(json!("3")),
        1 => Just(json!(1e300)),
    ]
}

/// The size in bytes of an element of a safetensors dtype name; `None` for names that
/// are not dtypes or are smaller than a byte.
fn dtype_size(name: &str) -> Option<u64> {
    Some(match name {
        "F64" | "I64" | "U64" | "C64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 1,
        _ => return None,
    })
}

/// A safetensors header as JSON and the payload length it implies. Tensors get
/// generated dtypes and shapes (huge, negative, fractional dims among them); offsets
/// follow from them (consecutive, as the format wants) unless they are generated too,
/// which they are a fifth of the time. Sometimes a `__metadata__` entry is added.
fn st_header() -> impl Strategy<Value = (Value, u64)> {
    let tensor = (
        prop_oneof![
            3 => prop::sample::select(vec!["F32", "F16", "BF16", "F64"]).prop_map(Value::from),
            3 => prop::sample::select(DTYPES.to_vec()).prop_map(Value::from),
            1 => crate::json_value(),
        ],
        prop_oneof![
            6 => prop::collection::vec(0u64..5, 2).prop_map(Value::from),
            3 => prop::collection::vec(json_dim(), 0..4).prop_map(Value::from),
            1 => crate::json_value(),
        ],
        prop::option::weighted(
            0.2,
            prop_oneof![
                4 => prop::collection::vec(json_dim(), 2).prop_map(Value::from),
                1 => prop::collection::vec(json_dim(), 0..4).prop_map(Value::from),
            ],
        ),
    );
    let name = prop_oneof![4 => Just("embeddings".to_string()), 4 => "[a-z]{1,4}", 1 => Just("__metadata__".to_string())];
    let metadata = prop_oneof![
        3 => prop::collection::hash_map("[a-z]{0,4}", ".{0,6}", 0..3)
            .prop_map(|m| serde_json::to_value(m).unwrap()),
        1 => crate::json_value(),
    ];
    (
        prop_oneof![
            1 => prop::collection::vec((name.clone(), tensor.clone()), 0..1),
            6 => prop::collection::vec((name, tensor), 1..3),
        ],
        prop::option::weighted(0.3, metadata),
    )
        .prop_map(|(tensors, meta)| {
            let mut obj = serde_json::Map::new();
            let mut end = 0u64;
            for (name, (dtype, shape, offsets)) in tensors {
                let size = dtype.as_str().and_then(dtype_size).and_then(|s| {
                    shape
                        .as_array()?
                        .iter()
                        .try_fold(s, |acc, d| acc.checked_mul(d.as_u64()?))
                });
                let offsets = offsets.unwrap_or_else(|| {
                    let start = end;
                    end = end.saturating_add(size.unwrap_or(4));
                    json!([start, end])
                });
                obj.insert(
                    name,
                    json!({"dtype": dtype, "shape": shape, "data_offsets": offsets}),
                );
            }
            if let Some(m) = meta {
                obj.insert("__metadata__".into(), m);
            }
            (Value::Object(obj), end)
        })
}

fn st_file(header: &[u8], declared: Option<u64>, payload: &[u8]) -> Vec<u8> {
    let mut out = declared
        .unwrap_or(header.len() as u64)
        .to_le_bytes()
        .to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(payload);
    out
}

fn read_safetensors(bytes: &[u8]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzzed.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let (result, largest) = largest_allocation(|| load_precomputed(&path));
    prop_assert!(
        largest <= allocation_budget(bytes.len()),
        "{} bytes",
        largest
    );
    check_embeddings(&path.display().to_string(), result)
}

/// A valid safetensors file with one or two tensors of supported or unsupported dtypes.
fn valid_safetensors() -> impl Strategy<Value = (Vec<u8>, Option<Vec<f32>>)> {
    let tensor = (
        prop::sample::select(vec![
            Dtype::F32,
            Dtype::F16,
            Dtype::BF16,
            Dtype::F64,
            Dtype::I32,
            Dtype::U8,
        ]),
        prop::collection::vec(0usize..4, 0..4),
    )
        .prop_flat_map(|(dtype, shape)| {
            let n = shape.iter().product::<usize>() * dtype.bitsize() / 8;
            (
                Just(dtype),
                Just(shape),
                prop::collection::vec(any::<u8>(), n),
            )
        });
    (
        prop::collection::vec((prop_oneof!["embeddings", "[a-z]{1,3}"], tensor), 1..3),
        any::<bool>(),
    )
        .prop_map(|(tensors, with_meta)| {
            let tensors: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> =
                tensors.into_iter().collect();
            let views: Vec<(String, TensorView<'_>)> = tensors
                .iter()
                .map(|(name, (dtype, shape, data))| {
                    (
                        name.clone(),
                        TensorView::new(*dtype, shape.clone(), data).unwrap(),
                    )
                })
                .collect();
            let meta = with_meta.then(|| HashMap::from([("k".to_string(), "v".to_string())]));
            let bytes = safetensors::serialize(views, meta).unwrap();
            // The expected f32 values when the file holds exactly the embeddings as f32.
            let chosen = tensors
                .get("embeddings")
                .or_else(|| (tensors.len() == 1).then(|| tensors.values().next().unwrap()));
            let expected = chosen.and_then(|(dtype, shape, data)| {
                (*dtype == Dtype::F32 && shape.len() == 2).then(|| {
                    data.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect()
                })
            });
            (bytes, expected)
        })
}

proptest! {
    #![proptest_config(config(400))]

    /// Generated headers (huge, negative, overflowing shapes; bad offsets; unknown
    /// dtypes), true or lying header lengths, random payloads.
    #[test]
    fn safetensors_headers_never_panic(
        (header, len) in st_header(),
        lie in prop::option::weighted(0.15, prop_oneof![any::<u64>(), 0u64..300]),
        payload_len in prop_oneof![3 => Just(None), 1 => (0usize..96).prop_map(Some)],
        fill in prop_oneof![Just(0u8), Just(0x3f), any::<u8>()],
        muts in prop::option::weighted(0.3, mutations()),
    ) {
        // The implied length (when it is small), or a generated one.
        let n = payload_len.unwrap_or(len.min(4096) as usize);
        let payload = vec![fill; n];
        let mut bytes = st_file(header.to_string().as_bytes(), lie, &payload);
        if let Some(muts) = muts {
            bytes = mutate(bytes, &muts);
        }
        read_safetensors(&bytes)?;
    }

    #[test]
    fn safetensors_arbitrary_bytes_never_panic(bytes in junk(200)) {
        read_safetensors(&bytes)?;
    }

    /// Valid files load (f32 `[n, d]` exactly, when finite); mutated, they never panic.
    #[test]
    fn safetensors_round_trip((bytes, expected) in valid_safetensors(), muts in mutations()) {
        let dir = crate::scratch();
        let path = dir.path().join("valid.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let loaded = load_precomputed(&path);
        if let Some(values) = expected {
            let usable = !values.is_empty() && values.iter().all(|v| v.is_finite());
            match loaded {
                Ok(emb) => prop_assert_eq!(emb.data, values),
                Err(e) => prop_assert!(!usable, "{}", e),
            }
        }
        read_safetensors(&mutate(bytes, &muts))?;
    }
}
