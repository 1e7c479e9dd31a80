//! Minimal reader and writer for NumPy `.npy` files holding a 2-D float matrix.
//!
//! Reading accepts format versions 1.0, 2.0 and 3.0, C order, little-endian `float32`
//! (`<f4`), and converts `float64` (`<f8`) and `float16` (`<f2`) to `f32`. Anything else
//! (Fortran order, other dtypes, big-endian data, other ranks) is refused with an error
//! that names the file and what was found. Writing always produces version 1.0, `<f4`,
//! with the header padded to a multiple of 64 bytes exactly as `numpy.save` does, so
//! the files round-trip through `numpy.load`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Errors of this module. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a .npy file (missing the \\x93NUMPY magic string)")]
    NotNpy { path: PathBuf },
    #[error("{path}: unsupported .npy format version {major}.{minor} (supported: 1.0, 2.0, 3.0)")]
    Version { path: PathBuf, major: u8, minor: u8 },
    #[error("{path}: malformed .npy header: {reason}")]
    Header { path: PathBuf, reason: String },
    #[error(
        "{path}: unsupported dtype '{descr}' (expected little-endian float: '<f4', '<f8' or '<f2')"
    )]
    Dtype { path: PathBuf, descr: String },
    #[error(
        "{path}: array is stored in Fortran (column-major) order; save it in C order \
         (numpy.ascontiguousarray) and try again"
    )]
    FortranOrder { path: PathBuf },
    #[error("{path}: expected a 2-D array, found shape {shape}")]
    Rank { path: PathBuf, shape: String },
    #[error("{path}: data is truncated: shape needs {expected} bytes, file has {found}")]
    Truncated {
        path: PathBuf,
        expected: usize,
        found: usize,
    },
    #[error("{path}: cannot write a {rows}x{cols} matrix from {len} values")]
    Size {
        path: PathBuf,
        rows: usize,
        cols: usize,
        len: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dtype {
    F2,
    F4,
    F8,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::F2 => 2,
            Dtype::F4 => 4,
            Dtype::F8 => 8,
        }
    }
}

/// Reads a 2-D float matrix from a `.npy` file: returns `(data, rows, cols)`, row-major.
pub fn read_f32_matrix(path: &Path) -> Result<(Vec<f32>, usize, usize), NpyError> {
    let bytes = fs::read(path).map_err(|source| NpyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &bytes)
}

fn parse(path: &Path, bytes: &[u8]) -> Result<(Vec<f32>, usize, usize), NpyError> {
    let header_err = |reason: String| NpyError::Header {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < 8 || &bytes[..6] != MAGIC {
        return Err(NpyError::NotNpy {
            path: path.to_path_buf(),
        });
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (header_len, start): (usize, usize) = match major {
        1 if bytes.len() >= 10 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        1..=3 => return Err(header_err("file ends inside the header length".into())),
        _ => {
            return Err(NpyError::Version {
                path: path.to_path_buf(),
                major,
                minor,
            })
        }
    };
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| header_err(format!("header length {header_len} runs past end of file")))?;
    let header = std::str::from_utf8(&bytes[start..end])
        .map_err(|_| header_err("header is not valid text".into()))?;

    let descr = dict_value(header, "descr")
        .ok_or_else(|| header_err(format!("no 'descr' key in {}", header.trim())))?;
    let descr =
        unquote(descr).ok_or_else(|| header_err(format!("'descr' is not a string: {descr}")))?;
    let dtype = match descr {
        "<f4" => Dtype::F4,
        "<f8" => Dtype::F8,
        "<f2" => Dtype::F2,
        other => {
            return Err(NpyError::Dtype {
                path: path.to_path_buf(),
                descr: other.to_string(),
            })
        }
    };
    let fortran = dict_value(header, "fortran_order")
        .ok_or_else(|| header_err(format!("no 'fortran_order' key in {}", header.trim())))?;
    match fortran {
        "False" => {}
        "True" => {
            return Err(NpyError::FortranOrder {
                path: path.to_path_buf(),
            })
        }
        other => return Err(header_err(format!("bad 'fortran_order' value {other}"))),
    }
    let shape_text = dict_value(header, "shape")
        .ok_or_else(|| header_err(format!("no 'shape' key in {}", header.trim())))?;
    let shape = parse_shape(shape_text)
        .ok_or_else(|| header_err(format!("bad 'shape' value {shape_text}")))?;
    let (rows, cols) = match shape.as_slice() {
        [r, c] => (*r, *c),
        _ => {
            return Err(NpyError::Rank {
                path: path.to_path_buf(),
                shape: shape_text.to_string(),
            })
        }
    };

    let count = rows
        .checked_mul(cols)
        .ok_or_else(|| header_err(format!("shape {shape_text} overflows")))?;
    let expected = count
        .checked_mul(dtype.size())
        .ok_or_else(|| header_err(format!("shape {shape_text} overflows")))?;
    let payload = &bytes[end..];
    if payload.len() < expected {
        return Err(NpyError::Truncated {
            path: path.to_path_buf(),
            expected,
            found: payload.len(),
        });
    }
    let payload = &payload[..expected];
    let data: Vec<f32> = match dtype {
        Dtype::F4 => payload
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F8 => payload
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        Dtype::F2 => payload
            .chunks_exact(2)
            .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
    };
    Ok((data, rows, cols))
}

/// The raw text of a value in the header's Python dict literal, for a key written with
/// single or double quotes. Values are strings, `True`/`False`, or a tuple.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pos = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = header[pos + key.len() + 2..].trim_start();
    let rest = rest.strip_prefix(':')?.trim_start();
    let len = match rest.chars().next()? {
        '(' => rest.find(')')? + 1,
        q @ ('\'' | '"') => rest[1..].find(q)? + 2,
        _ => rest.find([',', '}']).unwrap_or(rest.len()),
    };
    Some(rest[..len].trim())
}

fn unquote(s: &str) -> Option<&str> {
    s.strip_prefix('\'')
        .and_then(|s| s.strip_suffix('\''))
        .or_else(|| s.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
}

fn parse_shape(s: &str) -> Option<Vec<usize>> {
    let inner = s.strip_prefix('(')?.strip_suffix(')')?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.trim_end_matches('L').parse().ok())
        .collect()
}

/// IEEE 754 half precision to single precision (exact).
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x3ff) as u32;
    match exp {
        0 => {
            // zero or subnormal: mant * 2^-24
            let v = mant as f32 * f32::from_bits(0x3380_0000);
            if sign != 0 {
                -v
            } else {
                v
            }
        }
        31 => f32::from_bits(sign | 0x7f80_0000 | (mant << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (mant << 13)),
    }
}

/// Writes a row-major `rows x cols` matrix as a version 1.0, `<f4`, C-order `.npy` file.
pub fn write_f32_matrix(
    path: &Path,
    data: &[f32],
    rows: usize,
    cols: usize,
) -> Result<(), NpyError> {
    if rows.checked_mul(cols) != Some(data.len()) {
        return Err(NpyError::Size {
            path: path.to_path_buf(),
            rows,
            cols,
            len: data.len(),
        });
    }
    let mut out = Vec::with_capacity(128 + data.len() * 4);
    out.extend_from_slice(&header_v1(rows, cols));
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let io = |source| NpyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::File::create(path).map_err(io)?;
    file.write_all(&out).map_err(io)?;
    file.flush().map_err(io)
}

/// Magic, version 1.0, header length and the dict, padded with spaces and a final
/// newline so the data starts at a multiple of 64 bytes (numpy's layout).
fn header_v1(rows: usize, cols: usize) -> Vec<u8> {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    let unpadded = MAGIC.len() + 2 + 2 + dict.len() + 1;
    let total = unpadded.div_ceil(64) * 64;
    let mut text = dict;
    text.push_str(&" ".repeat(total - unpadded));
    text.push('\n');
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(text.len() as u16).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy_bytes(version: u8, dict: &str, payload: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[version, 0]);
        let mut text = dict.to_string();
        text.push('\n');
        if version == 1 {
            out.extend_from_slice(&(text.len() as u16).to_le_bytes());
        } else {
            out.extend_from_slice(&(text.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn p() -> &'static Path {
        Path::new("x.npy")
    }

    #[test]
    fn header_is_64_aligned_like_numpy() {
        for (r, c) in [(0, 0), (3, 4), (123456789, 384), (1, 1)] {
            let h = header_v1(r, c);
            assert_eq!(h.len() % 64, 0);
            assert_eq!(*h.last().unwrap(), b'\n');
        }
        // numpy.save(np.zeros((2,3), 'f4')) produces exactly this header.
        let h = header_v1(2, 3);
        assert_eq!(h.len(), 128);
        assert!(std::str::from_utf8(&h[10..])
            .unwrap()
            .starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"));
    }

    #[test]
    fn roundtrip_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.npy");
        let data: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 1.0).collect();
        write_f32_matrix(&path, &data, 3, 4).unwrap();
        let (got, r, c) = read_f32_matrix(&path).unwrap();
        assert_eq!((r, c), (3, 4));
        assert_eq!(got, data);
    }

    #[test]
    fn versions_and_dtypes() {
        let f4: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        for v in [1, 2, 3] {
            let b = npy_bytes(
                v,
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2), }",
                &f4,
            );
            assert_eq!(parse(p(), &b).unwrap(), (vec![1.0, 2.0], 1, 2));
        }
        let f8: Vec<u8> = [1.5f64, -2.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let b = npy_bytes(
            1,
            "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 1), }",
            &f8,
        );
        assert_eq!(parse(p(), &b).unwrap(), (vec![1.5, -2.25], 2, 1));
        // f16: 1.0 = 0x3c00, -2.0 = 0xc000, 65504 = 0x7bff, smallest subnormal 0x0001
        let f2: Vec<u8> = [0x3c00u16, 0xc000, 0x7bff, 0x0001]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let b = npy_bytes(
            1,
            "{'descr': '<f2', 'fortran_order': False, 'shape': (2, 2), }",
            &f2,
        );
        let (d, _, _) = parse(p(), &b).unwrap();
        assert_eq!(d, vec![1.0, -2.0, 65504.0, 2f32.powi(-24)]);
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn refusals_name_file_and_finding() {
        let d = [0u8; 64];
        let cases = [
            (
                "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }",
                "Fortran",
            ),
            (
                "{'descr': '<i8', 'fortran_order': False, 'shape': (2, 2), }",
                "'<i8'",
            ),
            (
                "{'descr': '>f4', 'fortran_order': False, 'shape': (2, 2), }",
                "'>f4'",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }",
                "(4,)",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 2), }",
                "(1, 2, 2)",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (100, 2), }",
                "truncated",
            ),
        ];
        for (dict, want) in cases {
            let err = parse(p(), &npy_bytes(1, dict, &d)).unwrap_err().to_string();
            assert!(err.contains("x.npy") && err.contains(want), "{err}");
        }
        let err = parse(p(), b"PK\x03\x04 zip").unwrap_err().to_string();
        assert!(err.contains("x.npy") && err.contains("magic"), "{err}");
        let err = parse(p(), b"\x93NUMPY\x09\x00\x00\x00")
            .unwrap_err()
            .to_string();
        assert!(err.contains("version 9.0"), "{err}");
        let err = write_f32_matrix(Path::new("y.npy"), &[1.0; 5], 2, 3)
            .unwrap_err()
            .to_string();
        assert!(err.contains("y.npy") && err.contains("2x3"), "{err}");
    }

    #[test]
    fn missing_file_names_path() {
        let err = read_f32_matrix(Path::new("/nonexistent/dir/e.npy"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/dir/e.npy"), "{err}");
    }
}
