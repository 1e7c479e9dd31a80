//! Weights stored in bf16 or int8 for decoding.
//!
//! A decoding step streams every weight of the model once (see [`super::skinny`]), so its
//! time is the weights' size over the memory's speed: halving the bytes per weight halves
//! the step. bf16 keeps f32's exponent and 8 bits of mantissa (a relative error of at most
//! 2⁻⁹ per weight); int8 keeps one f32 scale per 32 weights of a row, as GGUF's q8_0 does
//! (an error of at most half a step, the group's largest magnitude / 254). The kernels
//! widen each vector of weights to f32 in registers and multiply in f32, so activations,
//! the KV cache and every sum stay f32. Only the matrices of the layers and the token
//! matrix are packed; norms, the item table and soft-prompt weights stay f32.
//!
//! Packed weights are for inference: nothing differentiates through them.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Error, Result, Tensor};

use super::skinny::{self, Rows, BF16, INT8, INT8_GROUP};

/// How a model's matrices are stored for decoding, chosen at load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightFormat {
    /// As trained: 4 bytes per weight.
    #[default]
    F32,
    /// bfloat16: 2 bytes per weight.
    Bf16,
    /// int8 with an f32 scale per 32 weights: 1.125 bytes per weight.
    Int8,
}

impl WeightFormat {
    pub const NAMES: [&'static str; 3] = ["f32", "bf16", "int8"];
}

impl FromStr for WeightFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(WeightFormat::F32),
            "bf16" => Ok(WeightFormat::Bf16),
            "int8" => Ok(WeightFormat::Int8),
            _ => Err(format!(
                "unknown weight format '{s}': expected one of {}",
                WeightFormat::NAMES.join(", ")
            )),
        }
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::Int8 => "int8",
        })
    }
}

/// A `[n, k]` matrix in bf16 or int8, rows padded with zeros to a multiple of
/// [`INT8_GROUP`] elements.
#[derive(Clone, Debug)]
pub struct Packed {
    n: usize,
    k: usize,
    stride: usize,
    data: Data,
}

#[derive(Clone, Debug)]
enum Data {
    Bf16(Vec<u16>),
    Int8 { q: Vec<i8>, scales: Vec<f32> },
}

/// f32 → bf16, rounding to nearest even.
fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

impl Packed {
    /// `w` (`[n, k]` f32) stored as `format`; `None` for [`WeightFormat::F32`] (the tensor
    /// is used as it is). Fails on a weight that is not finite.
    pub fn new(w: &Tensor, format: WeightFormat) -> Result<Option<Packed>> {
        if format == WeightFormat::F32 {
            return Ok(None);
        }
        let (n, k) = w.dims2()?;
        let w = w.to_dtype(DType::F32)?.contiguous()?;
        // The tensor's own buffer, not a copy: packing a model must not hold two f32
        // copies of its largest matrix at once.
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Err(Error::Msg("packed weights live on the CPU".into()));
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            return Err(Error::Msg("packing needs a contiguous matrix".into()));
        };
        let v = &cpu.as_slice::<f32>()?[a..b];
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::Msg(format!(
                "weight [{}, {}] of a [{n}, {k}] matrix is {}: cannot pack it",
                i / k,
                i % k,
                v[i]
            )));
        }
        let stride = k.div_ceil(INT8_GROUP) * INT8_GROUP;
        let data = match format {
            WeightFormat::Bf16 => {
                let mut d = vec![0u16; n * stride];
                for (row, src) in d.chunks_exact_mut(stride).zip(v.chunks_exact(k)) {
                    for (o, &x) in row.iter_mut().zip(src) {
                        *o = to_bf16(x);
                    }
                }
                Data::Bf16(d)
            }
            _ => {
                let groups = stride / INT8_GROUP;
                let mut q = vec![0i8; n * stride];
                let mut scales = vec![0f32; n * groups];
                for (r, src) in v.chunks_exact(k).enumerate() {
                    for (g, part) in src.chunks(INT8_GROUP).enumerate() {
                        let max = part.iter().fold(0f32, |a, x| a.max(x.abs()));
                        let s = max / 127.0;
                        scales[r * groups + g] = s;
                        if s == 0.0 {
                            continue;
                        }
                        let dst = &mut q[r * stride + g * INT8_GROUP..][..part.len()];
                        for (o, &x) in dst.iter_mut().zip(part) {
                            *o = (x / s).round().clamp(-127.0, 127.0) as i8;
                        }
                    }
                }
                Data::Int8 { q, scales }
            }
        };
        Ok(Some(Packed { n, k, stride, data }))
    }

    pub fn format(&self) -> WeightFormat {
        match self.data {
            Data::Bf16(_) => WeightFormat::Bf16,
            Data::Int8 { .. } => WeightFormat::Int8,
        }
    }

    /// `(n, k)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes held (weights and scales).
    pub fn bytes(&self) -> usize {
        match &self.data {
            Data::Bf16(d) => d.len() * 2,
            Data::Int8 { q, scales } => q.len() + scales.len() * 4,
        }
    }

    pub(crate) fn rows(&self) -> Rows<'_> {
        let (kind, data, scales): (u8, *const u8, &[f32]) = match &self.data {
            Data::Bf16(d) => (BF16, d.as_ptr() as *const u8, &[]),
            Data::Int8 { q, scales } => (INT8, q.as_ptr() as *const u8, scales),
        };
        Rows {
            kind,
            data,
            n: self.n,
            k: self.k,
            stride: self.stride,
            scales,
            groups: self.stride / INT8_GROUP,
        }
    }

    /// `x · wᵀ` for `x` `[m, k]` f32 (any `m`: more than [`skinny::MAX_ROWS`] rows go through
    /// the streaming product in groups of that many) → `[m, n]`.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.k {
            return Err(Error::Msg(format!(
                "packed product: input has {k} columns, the weight {}",
                self.k
            )));
        }
        let xv = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let out = skinny::stream_rows(&xv, m, &self.rows());
        Tensor::from_vec(out, (m, self.n), x.device())
    }

    /// Rows `ids` (`[t]` u32, each < n) as f32 `[t, k]`: an embedding lookup.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.to_vec1::<u32>()?;
        let rows = self.rows();
        let mut out = vec![0f32; ids.len() * self.k];
        for (&id, o) in ids.iter().zip(out.chunks_exact_mut(self.k)) {
            if id as usize >= self.n {
                return Err(Error::Msg(format!(
                    "row {id} of a {}-row packed matrix",
                    self.n
                )));
            }
            rows.row_f32(id as usize, o);
        }
        Tensor::from_vec(out, (ids.len(), self.k), &Device::Cpu)
    }

    /// The whole matrix as f32 `[n, k]`: what the packed weights stand for.
    pub fn dequantize(&self) -> Result<Tensor> {
        let rows = self.rows();
        let mut out = vec![0f32; self.n * self.k];
        for (r, o) in out.chunks_exact_mut(self.k).enumerate() {
            rows.row_f32(r, o);
        }
        Tensor::from_vec(out, (self.n, self.k), &Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::{self, Level};

    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
        let n = b.sqr().unwrap().sum_all().unwrap();
        (d.to_scalar::<f32>().unwrap() / n.to_scalar::<f32>().unwrap()).sqrt()
    }

    #[test]
    fn formats_parse_and_print() {
        for name in WeightFormat::NAMES {
            assert_eq!(name.parse::<WeightFormat>().unwrap().to_string(), name);
        }
        assert!("fp16".parse::<WeightFormat>().unwrap_err().contains("int8"));
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(-2.5), 0xc020);
    }

    /// The packed product equals the f32 product of the dequantised matrix (the kernel is
    /// exact up to f32 rounding), and the dequantised matrix is within each format's
    /// rounding of the original: the products' relative error is below 0.4% for bf16 and
    /// 1% for int8 on Gaussian weights.
    #[test]
    fn packed_products_match_f32() {
        let dev = Device::Cpu;
        for (m, k, n) in [
            (1, 7, 5),
            (10, 576, 200),
            (19, 100, 67),
            (40, 64, 33),
            (5, 33, 1),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let exact = x.matmul(&w.t().unwrap()).unwrap();
            for (format, bound) in [(WeightFormat::Bf16, 4e-3), (WeightFormat::Int8, 1e-2)] {
                let p = Packed::new(&w, format).unwrap().unwrap();
                assert_eq!(p.format(), format);
                let ours = p.matmul_t(&x).unwrap();
                let deq = x.matmul(&p.dequantize().unwrap().t().unwrap()).unwrap();
                let kernel = rel_err(&ours, &deq);
                assert!(kernel < 1e-5, "{format} m={m} k={k} n={n}: kernel {kernel}");
                let err = rel_err(&ours, &exact);
                assert!(err < bound, "{format} m={m} k={k} n={n}: {err}");
                // Every kernel this CPU can run gives the same product.
                if m <= skinny::MAX_ROWS {
                    let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    for level in [Level::Portable, Level::Avx2, Level::Avx512] {
                        if level <= simd::level() {
                            let out = skinny::stream_at(level, &xv, m, &p.rows());
                            let t = Tensor::from_vec(out, (m, n), &dev).unwrap();
                            let e = rel_err(&t, &deq);
                            assert!(e < 1e-5, "{format} {level:?} m={m} k={k} n={n}: {e}");
                        }
                    }
                }
            }
        }
        assert!(Packed::new(
            &Tensor::zeros((2, 2), DType::F32, &dev).unwrap(),
            WeightFormat::F32
        )
        .unwrap()
        .is_none());
    }

    #[test]
    fn lookup_and_bad_input() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 40), &dev).unwrap();
        let p = Packed::new(&w, WeightFormat::Int8).unwrap().unwrap();
        let ids = Tensor::new(&[4u32, 0, 4], &dev).unwrap();
        let rows = p.embedding(&ids).unwrap();
        let want = p.dequantize().unwrap().embedding(&ids).unwrap();
        assert_eq!(rel_err(&rows, &want), 0.0);
        assert!(p.embedding(&Tensor::new(&[6u32], &dev).unwrap()).is_err());
        assert!(p
            .matmul_t(&Tensor::zeros((1, 39), DType::F32, &dev).unwrap())
            .is_err());
        let bad = Tensor::new(&[[1f32, f32::NAN]], &dev).unwrap();
        let err = Packed::new(&bad, WeightFormat::Bf16)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[0, 1]") && err.contains("NaN"), "{err}");
        // 6 rows × 64 padded bytes + 6 × 2 scales.
        assert_eq!(p.bytes(), 6 * 64 + 6 * 2 * 4);
    }
}
