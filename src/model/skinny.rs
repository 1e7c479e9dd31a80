//! Products of a few rows with a large weight matrix: the shape of decoding.
//!
//! A decoding step multiplies a handful of rows (one per beam) by every weight matrix of
//! the model: `[m, k] · [n, k]ᵀ` with `m` around 10 and `n · k` in the millions. A general
//! GEMM packs the weight into panels first, which for small `m` costs more than the product
//! (profiled on SmolLM2: most of a beam-search query went to packing). Here each weight row
//! is streamed once, straight from memory, and dotted with all `m` input rows while it is in
//! L1, a register tile of weight rows by input rows at a time (`avx512`, `avx2`; plain Rust
//! elsewhere), chosen at run time ([`crate::simd::level`]). Memory traffic is the weight
//! matrix once, which is the floor for this product. Weights are f32 tensors, or packed
//! bf16 / int8 rows ([`super::packed`]) widened to f32 in registers.
//!
//! Every output element is one sum in a fixed order, whatever `m` and the tiling: a row's
//! result never depends on the other rows of the product. Decoding relies on it (see
//! `llama::decoding`), and so uses these products for any number of rows
//! ([`matmul_t_rows`]). Used only where no gradient is needed; training keeps candle's
//! matmul.

use candle_core::{DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

use crate::simd::{self, Level};

mod avx2;
mod avx512;

/// Most input rows for which the streaming product beats a GEMM.
pub const MAX_ROWS: usize = 32;

/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// How the weight's elements are stored (a const parameter of the kernels, so each
/// storage gets its own loop with the conversion inlined).
pub(crate) const F32: u8 = 0;
pub(crate) const BF16: u8 = 1;
pub(crate) const INT8: u8 = 2;

/// Elements of an int8 row that share one scale.
pub const INT8_GROUP: usize = 32;

/// A weight matrix `[n, k]` as the kernels read it: row `r` starts at element
/// `r · stride` of `data`. f32 rows are the tensor's own (`stride = k`); bf16 and int8
/// rows are padded with zeros to a multiple of [`INT8_GROUP`], so a vector load never
/// needs a mask on the weight side. int8 row `r`'s elements `g · 32..` are scaled by
/// `scales[r · groups + g]`.
#[derive(Clone, Copy)]
pub(crate) struct Rows<'a> {
    pub kind: u8,
    pub data: *const u8,
    pub n: usize,
    pub k: usize,
    pub stride: usize,
    pub scales: &'a [f32],
    pub groups: usize,
}

// SAFETY: `Rows` only reads, and the storage it points into outlives every use (it is
// built from a borrow of that storage for one product).
unsafe impl Send for Rows<'_> {}
unsafe impl Sync for Rows<'_> {}

impl<'a> Rows<'a> {
    /// An f32 matrix `[n, k]`, row-major.
    pub(crate) fn f32(w: &'a [f32], n: usize, k: usize) -> Self {
        debug_assert_eq!(w.len(), n * k);
        Rows {
            kind: F32,
            data: w.as_ptr() as *const u8,
            n,
            k,
            stride: k,
            scales: &[],
            groups: 0,
        }
    }

    /// Row `r` as f32 into `buf` (`k` long): the portable path's view of packed rows,
    /// and how packed matrices are read back.
    pub(crate) fn row_f32(&self, r: usize, buf: &mut [f32]) {
        let base = r * self.stride;
        // SAFETY: row `r` < `n` has `stride` >= `k` elements of the kind's size.
        unsafe {
            match self.kind {
                F32 => buf.copy_from_slice(std::slice::from_raw_parts(
                    (self.data as *const f32).add(base),
                    self.k,
                )),
                BF16 => {
                    let src =
                        std::slice::from_raw_parts((self.data as *const u16).add(base), self.k);
                    for (o, &b) in buf.iter_mut().zip(src) {
                        *o = f32::from_bits((b as u32) << 16);
                    }
                }
                _ => {
                    let src =
                        std::slice::from_raw_parts((self.data as *const i8).add(base), self.k);
                    for (i, (o, &q)) in buf.iter_mut().zip(src).enumerate() {
                        *o = q as f32 * self.scales[r * self.groups + i / INT8_GROUP];
                    }
                }
            }
        }
    }
}

/// `x · wᵀ` for `x` `[m, k]` and `w` `[n, k]` when the streaming product applies (small
/// `m`, f32 on the CPU, contiguous `w`, no autograd); `None` otherwise.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    match x.dims2() {
        Ok((m, _)) if m <= MAX_ROWS => matmul_t_rows(x, w),
        _ => Ok(None),
    }
}

/// [`matmul_t`] for any number of rows, [`MAX_ROWS`] at a time: a row's result is the
/// same whichever rows it is computed with (see [`block`]), which decoding relies on.
/// Above a few dozen rows a GEMM would be faster.
pub fn matmul_t_rows(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let ((m, k), (n, kw)) = match (x.dims2(), w.dims2()) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return Ok(None),
    };
    if m == 0
        || k != kw
        || x.dtype() != DType::F32
        || w.dtype() != DType::F32
        || !matches!(x.device(), Device::Cpu)
        || x.track_op()
        || w.track_op()
    {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (Storage::Cpu(xs), Storage::Cpu(ws)) = (&*xs, &*ws) else {
        return Ok(None);
    };
    let (Some((xa, xb)), Some((wa, wb))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
    else {
        return Ok(None);
    };
    let xv = &xs.as_slice::<f32>()?[xa..xb];
    let wv = &ws.as_slice::<f32>()?[wa..wb];
    let out = stream_rows(xv, m, &Rows::f32(wv, n, k));
    Ok(Some(Tensor::from_vec(out, (m, n), x.device())?))
}

/// [`stream`] for any number of rows, [`MAX_ROWS`] at a time.
pub(crate) fn stream_rows(x: &[f32], m: usize, w: &Rows) -> Vec<f32> {
    if m <= MAX_ROWS {
        return stream(x, m, w);
    }
    let mut out = Vec::with_capacity(m * w.n);
    for part in x.chunks(MAX_ROWS * w.k) {
        out.extend(stream(part, part.len() / w.k, w));
    }
    out
}

/// `x · wᵀ` (`x` `[m, k]` row-major, `m` <= [`MAX_ROWS`]) → `[m, n]` row-major, every
/// weight row streamed once.
pub(crate) fn stream(x: &[f32], m: usize, w: &Rows) -> Vec<f32> {
    stream_at(simd::level(), x, m, w)
}

/// [`stream`] with the kernels of `level` (which the CPU must support).
pub(crate) fn stream_at(level: Level, x: &[f32], m: usize, w: &Rows) -> Vec<f32> {
    let (n, k) = (w.n, w.k);
    assert!(m <= MAX_ROWS && x.len() == m * k, "skinny product shape");
    // Each task computes its block weight-row major on the stack, then writes it into its
    // own columns of `out` (a transpose on one thread afterwards cost as much as a
    // decoding step's attention).
    let mut out = vec![0f32; m * n];
    let dst = SharedOut(out.as_mut_ptr());
    (0..n.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .for_each(|task| {
            let r0 = task * ROWS_PER_TASK;
            let rows = ROWS_PER_TASK.min(n - r0);
            let mut local = [0f32; ROWS_PER_TASK * MAX_ROWS];
            block(level, w, r0, rows, x, m, &mut local[..rows * m]);
            for j in 0..m {
                for r in 0..rows {
                    // SAFETY: `j * n + r0 + r` < `m * n`, and columns r0..r0 + rows
                    // belong to this task alone, so no two tasks write one element.
                    unsafe { dst.write(j * n + r0 + r, local[r * m + j]) };
                }
            }
        });
    out
}

/// The output buffer shared by the tasks of [`stream`], each writing its own columns.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: tasks write disjoint elements (see `stream`), and the buffer outlives them.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `i` is in bounds and no other thread accesses element `i` meanwhile.
    unsafe fn write(self, i: usize, v: f32) {
        unsafe { *self.0.add(i) = v };
    }
}

/// Which keys each query row of [`attention`] sees: the rows are `rows` consecutive
/// positions from `offset` on (repeated for every query head that shares the key/value
/// head), and position `offset + i` sees keys `0..=offset + i`.
#[derive(Clone, Copy, Debug)]
pub struct Causal {
    pub rows: usize,
    pub offset: usize,
}

/// Causal attention as one pass per key/value head: `q` `[b, g, r, d]` (the `r` query
/// rows that share key/value head `g`: `r / causal.rows` heads of `causal.rows`
/// positions each), `k` and `v` `[b, g, s, d]` with `s = offset + rows`; returns
/// `softmax(q kᵀ · scale) v` over each row's visible keys as `[b, g, r, d]`, or `None`
/// where it does not apply (autograd, not f32 on the CPU, other shapes).
///
/// A decoding step has one query per head and a few dozen keys: two batched GEMMs, a
/// scale and a softmax were eight candle operations per layer, and the GEMMs' thread
/// hand-offs cost more than their arithmetic. Here it is one loop, on one thread unless
/// the work is large. Each row is computed alone over exactly its visible keys, so a
/// position gives the same result whether its prompt is run in one pass or in pieces.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    causal: Causal,
) -> Result<Option<Tensor>> {
    let (Ok((b, g, r, d)), Ok(kd), Ok(vd)) = (q.dims4(), k.dims4(), v.dims4()) else {
        return Ok(None);
    };
    let s = kd.2;
    if kd != (b, g, s, d)
        || vd != kd
        || s == 0
        || causal.rows == 0
        || r % causal.rows != 0
        || causal.offset + causal.rows != s
        || [q, k, v]
            .iter()
            .any(|t| t.dtype() != DType::F32 || !matches!(t.device(), Device::Cpu) || t.track_op())
    {
        return Ok(None);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs)) = (&*qs, &*ks, &*vs) else {
        return Ok(None);
    };
    let (Some((qa, qb)), Some((ka, kb)), Some((va, vb))) = (
        ql.contiguous_offsets(),
        kl.contiguous_offsets(),
        vl.contiguous_offsets(),
    ) else {
        return Ok(None);
    };
    let (qv, kv, vv) = (
        &qs.as_slice::<f32>()?[qa..qb],
        &ks.as_slice::<f32>()?[ka..kb],
        &vs.as_slice::<f32>()?[va..vb],
    );
    let mut out = vec![0f32; b * g * r * d];
    let head = |i: usize, o: &mut [f32]| {
        let kh = &kv[i * s * d..][..s * d];
        let vh = &vv[i * s * d..][..s * d];
        let mut w = vec![0f32; s];
        for (row, (qr, or)) in qv[i * r * d..][..r * d]
            .chunks_exact(d)
            .zip(o.chunks_exact_mut(d))
            .enumerate()
        {
            let w = &mut w[..causal.offset + row % causal.rows + 1];
            let mut max = f32::NEG_INFINITY;
            for (wj, kr) in w.iter_mut().zip(kh.chunks_exact(d)) {
                *wj = dot(qr, kr) * scale;
                max = max.max(*wj);
            }
            let mut total = 0f32;
            for wj in w.iter_mut() {
                *wj = (*wj - max).exp();
                total += *wj;
            }
            or.fill(0.0);
            for (wj, vr) in w.iter().zip(vh.chunks_exact(d)) {
                let p = wj / total;
                for (o, x) in or.iter_mut().zip(vr) {
                    *o += p * x;
                }
            }
        }
    };
    // Below about a million multiply-adds a thread hand-off costs more than it saves.
    if b * g * r * s * d < 1 << 20 {
        for (i, o) in out.chunks_exact_mut(r * d).enumerate() {
            head(i, o);
        }
    } else {
        out.par_chunks_exact_mut(r * d)
            .enumerate()
            .for_each(|(i, o)| head(i, o));
    }
    Ok(Some(Tensor::from_vec(out, (b, g, r, d), q.device())?))
}

/// `a · b` with eight partial sums, which the compiler turns into vector code (a plain
/// iterator sum must keep the sequential order and stays scalar).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let body = a.len() / 8 * 8;
    for (x, y) in a[..body].chunks_exact(8).zip(b[..body].chunks_exact(8)) {
        for t in 0..8 {
            acc[t] += x[t] * y[t];
        }
    }
    let tail: f32 = a[body..].iter().zip(&b[body..]).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Weight rows `r0..r0 + rows` of `w` dotted with the `m` rows of `x`, into `out`
/// (`[rows, m]`), with the kernel for `level`: intrinsics for AVX-512 and AVX2 (fused
/// multiply-adds: the kernel is bound by instruction throughput once the weight streams
/// from memory), plain Rust otherwise. Every output element is one accumulation in a fixed
/// order whatever `m` and the tiling, so a row's result does not depend on which other
/// rows share the product (what makes a prompt computed in pieces equal to one pass).
fn block(level: Level, w: &Rows, r0: usize, rows: usize, x: &[f32], m: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `level` never names an extension the CPU lacks; the rows exist (the
        // caller's shapes) and `out` holds `rows · m`.
        match (level, w.kind) {
            (Level::Avx512, F32) => return unsafe { avx512::block::<F32>(w, r0, rows, x, m, out) },
            (Level::Avx512, BF16) => {
                return unsafe { avx512::block::<BF16>(w, r0, rows, x, m, out) }
            }
            (Level::Avx512, _) => return unsafe { avx512::block::<INT8>(w, r0, rows, x, m, out) },
            (Level::Avx2, F32) => return unsafe { avx2::block::<F32>(w, r0, rows, x, m, out) },
            (Level::Avx2, BF16) => return unsafe { avx2::block::<BF16>(w, r0, rows, x, m, out) },
            (Level::Avx2, _) => return unsafe { avx2::block::<INT8>(w, r0, rows, x, m, out) },
            (Level::Portable, _) => {}
        }
    }
    let _ = level;
    let k = w.k;
    let mut buf = vec![0f32; k];
    for r in 0..rows {
        w.row_f32(r0 + r, &mut buf);
        for j in 0..m {
            out[r * m + j] = dot(&buf, &x[j * k..][..k]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_candle_matmul() {
        let dev = Device::Cpu;
        for (m, k, n) in [
            (1, 7, 5),
            (3, 64, 130),
            (10, 576, 200),
            (32, 33, 65),
            (5, 16, 1),
            (10, 100, 67),
            (19, 576, 9),
            (7, 15, 4),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let ours = matmul_t(&x, &w).unwrap().expect("applies");
            let reference = x.matmul(&w.t().unwrap()).unwrap();
            let diff = max_abs_diff(&ours, &reference);
            assert!(diff < 1e-4, "m={m} k={k} n={n}: {diff}");
            // Every kernel this CPU can run, each row alone equal to the row in a batch.
            let (xv, wv) = (
                x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            let rows = Rows::f32(&wv, n, k);
            for level in [Level::Portable, Level::Avx2, Level::Avx512] {
                if level > simd::level() {
                    continue;
                }
                let all = stream_at(level, &xv, m, &rows);
                let t = Tensor::from_vec(all.clone(), (m, n), &dev).unwrap();
                let diff = max_abs_diff(&t, &reference);
                assert!(diff < 1e-4, "{level:?} m={m} k={k} n={n}: {diff}");
                for j in 0..m {
                    let one = stream_at(level, &xv[j * k..][..k], 1, &rows);
                    assert_eq!(one, all[j * n..][..n], "{level:?} row {j} alone");
                }
            }
        }
        // Not for many rows, nor where autograd must see the product.
        let big = Tensor::zeros((33, 8), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((4, 8), DType::F32, &dev).unwrap();
        assert!(matmul_t(&big, &w).unwrap().is_none());
        let var = candle_core::Var::zeros((4, 8), DType::F32, &dev).unwrap();
        let x = Tensor::zeros((2, 8), DType::F32, &dev).unwrap();
        assert!(matmul_t(&x, var.as_tensor()).unwrap().is_none());
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn attention_matches_softmax_of_products() {
        let dev = Device::Cpu;
        // (b, g, r, s, d): a decoding step, a grouped prompt, and one big enough to fan out.
        for (b, g, r, s, d) in [(10, 3, 3, 21, 64), (1, 2, 4, 1, 8), (4, 4, 8, 256, 64)] {
            let q = Tensor::randn(0f32, 1.0, (b, g, r, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (b, g, s, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, g, s, d), &dev).unwrap();
            let scale = 1.0 / (d as f32).sqrt();
            // One position per row group, seeing every key: no mask.
            let all = Causal {
                rows: 1,
                offset: s - 1,
            };
            let ours = attention(&q, &k, &v, scale, all).unwrap().expect("applies");
            let att = (q.matmul(&k.t().unwrap()).unwrap() * scale as f64).unwrap();
            let reference = candle_nn::ops::softmax_last_dim(&att)
                .unwrap()
                .matmul(&v)
                .unwrap();
            let diff = max_abs_diff(&ours, &reference);
            assert!(diff < 1e-5, "{b} {g} {r} {s} {d}: {diff}");
        }
        // Causal: 2 heads × 5 positions from 3 on, 8 keys, against a masked softmax.
        let (b, g, t, offset, d) = (2, 3, 5, 3, 16);
        let s = offset + t;
        let q = Tensor::randn(0f32, 1.0, (b, g, 2 * t, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, g, s, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, g, s, d), &dev).unwrap();
        let causal = Causal { rows: t, offset };
        let ours = attention(&q, &k, &v, 0.25, causal).unwrap().unwrap();
        let mask: Vec<f32> = (0..2 * t)
            .flat_map(|row| (0..s).map(move |j| if j > offset + row % t { -1e30 } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (2 * t, s), &dev).unwrap();
        let att = (q.matmul(&k.t().unwrap()).unwrap() * 0.25)
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let reference = candle_nn::ops::softmax_last_dim(&att)
            .unwrap()
            .matmul(&v)
            .unwrap();
        assert!(max_abs_diff(&ours, &reference) < 1e-5);
        // A position's row alone (the last position, offset 7) equals its row in the pass.
        let last = q.narrow(2, t - 1, 1).unwrap().contiguous().unwrap();
        let alone = Causal {
            rows: 1,
            offset: s - 1,
        };
        let one = attention(&last, &k, &v, 0.25, alone).unwrap().unwrap();
        let in_pass = ours.narrow(2, t - 1, 1).unwrap();
        assert_eq!(
            one.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            in_pass.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        // Not where autograd must see it, nor where the keys do not match the positions.
        let var = candle_core::Var::zeros((1, 1, 2, 4), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 1, 3, 4), DType::F32, &dev).unwrap();
        let c = Causal { rows: 2, offset: 1 };
        assert!(attention(var.as_tensor(), &k, &k, 1.0, c)
            .unwrap()
            .is_none());
        let q = Tensor::zeros((1, 1, 2, 4), DType::F32, &dev).unwrap();
        let c = Causal { rows: 2, offset: 0 };
        assert!(attention(&q, &k, &k, 1.0, c).unwrap().is_none());
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::model::packed::{Packed, WeightFormat};

    /// `cargo test --release --lib skinny::timing -- --ignored --nocapture`: the
    /// streaming product of SmolLM2's size (234k rows × 576) per kernel and weight
    /// format, against the memory floor (one read of the weight) and candle's matmul.
    #[test]
    #[ignore]
    fn skinny_bandwidth() {
        let dev = Device::Cpu;
        let (n, k) = (234_000, 576);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let f32_rows = Rows::f32(&wv, n, k);
        let bf16 = Packed::new(&w, WeightFormat::Bf16).unwrap().unwrap();
        let int8 = Packed::new(&w, WeightFormat::Int8).unwrap().unwrap();
        let time = |f: &dyn Fn()| {
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                f();
                best = best.min(t.elapsed().as_secs_f64());
            }
            best
        };
        for level in [Level::Avx2, Level::Avx512] {
            if level > simd::level() {
                continue;
            }
            for m in [1, 10, 19, MAX_ROWS] {
                let x = vec![0.5f32; m * k];
                let mut line = format!("{}, m={m}:", level.name());
                for (name, rows, bytes) in [
                    ("f32", f32_rows, n * k * 4),
                    ("bf16", bf16.rows(), bf16.bytes()),
                    ("int8", int8.rows(), int8.bytes()),
                ] {
                    let s = time(&|| {
                        stream_at(level, &x, m, &rows);
                    });
                    line += &format!(
                        " {name} {:.1} ms ({:.1} GB/s);",
                        s * 1e3,
                        bytes as f64 / 1e9 / s
                    );
                }
                let xt = Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
                let gemm = time(&|| {
                    xt.matmul(&w.t().unwrap()).unwrap();
                });
                println!("{line} candle matmul {:.1} ms", gemm * 1e3);
            }
        }
    }
}
