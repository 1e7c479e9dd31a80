//! Products of a few rows with a large weight matrix: the shape of decoding.
//!
//! A decoding step multiplies a handful of rows (one per beam) by every weight matrix of
//! the model: `[m, k] · [n, k]ᵀ` with `m` around 10 and `n · k` in the millions. A general
//! GEMM packs the weight into panels first, which for small `m` costs more than the product
//! (profiled on SmolLM2: most of a beam-search query went to packing). Here each weight row
//! is streamed once, straight from memory, and dotted with all `m` input rows while it is in
//! L1, four input rows at a time, in SIMD lanes chosen at run time. Memory traffic is the
//! weight matrix once, which is the floor for this product.
//!
//! Used only where no gradient is needed (inputs and weights both outside autograd) and the
//! weight is a contiguous f32 `[n, k]`; training keeps candle's matmul.

use candle_core::{DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

/// Most input rows for which the streaming product beats a GEMM.
pub const MAX_ROWS: usize = 32;

const LANES: usize = 16;
/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// `x · wᵀ` for `x` `[m, k]` and `w` `[n, k]` when the streaming product applies (small
/// `m`, f32 on the CPU, contiguous `w`, no autograd); `None` otherwise.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let ((m, k), (n, kw)) = match (x.dims2(), w.dims2()) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return Ok(None),
    };
    if m == 0
        || m > MAX_ROWS
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
    // Each task computes its block weight-row major on the stack, then writes it into its
    // own columns of `out` (a transpose on one thread afterwards cost as much as a
    // decoding step's attention).
    let mut out = vec![0f32; m * n];
    let dst = SharedOut(out.as_mut_ptr());
    wv.par_chunks(ROWS_PER_TASK * k)
        .enumerate()
        .for_each(|(task, wblock)| {
            let rows = wblock.len() / k;
            let mut local = [0f32; ROWS_PER_TASK * MAX_ROWS];
            block(wblock, xv, k, m, &mut local[..rows * m]);
            let r0 = task * ROWS_PER_TASK;
            for j in 0..m {
                for r in 0..rows {
                    // SAFETY: `j * n + r0 + r` < `m * n`, and columns r0..r0 + rows
                    // belong to this task alone, so no two tasks write one element.
                    unsafe { dst.write(j * n + r0 + r, local[r * m + j]) };
                }
            }
        });
    Ok(Some(Tensor::from_vec(out, (m, n), x.device())?))
}

/// The output buffer shared by the tasks of [`matmul_t`], each writing its own columns.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: tasks write disjoint elements (see `matmul_t`), and the buffer outlives them.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `i` is in bounds and no other thread accesses element `i` meanwhile.
    unsafe fn write(self, i: usize, v: f32) {
        unsafe { *self.0.add(i) = v };
    }
}

/// Unmasked attention for few queries, as one pass per key/value head: `q`
/// `[b, g, r, d]` (the `r` query rows that share key/value head `g`), `k` and `v`
/// `[b, g, s, d]`; returns `softmax(q kᵀ · scale) v` as `[b, g, r, d]`, or `None` where it
/// does not apply (autograd, not f32 on the CPU, other shapes).
///
/// A decoding step has one query per head and a few dozen keys: two batched GEMMs, a
/// scale and a softmax were eight candle operations per layer, and the GEMMs' thread
/// hand-offs cost more than their arithmetic. Here it is one loop, on one thread unless
/// the work is large.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Option<Tensor>> {
    let (Ok((b, g, r, d)), Ok(kd), Ok(vd)) = (q.dims4(), k.dims4(), v.dims4()) else {
        return Ok(None);
    };
    let s = kd.2;
    if kd != (b, g, s, d)
        || vd != kd
        || s == 0
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
        for (qr, or) in qv[i * r * d..][..r * d]
            .chunks_exact(d)
            .zip(o.chunks_exact_mut(d))
        {
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

/// [`block_kernel`] for the widest vector extension the CPU has, with fused multiply-add
/// where it exists (half the instructions of a multiply and an add: the kernel is bound by
/// instruction throughput once the weight streams from memory). Results may differ from
/// the portable version in the last bits; on one machine they are always the same.
fn block(w: &[f32], x: &[f32], k: usize, m: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(w: &[f32], x: &[f32], k: usize, m: usize, out: &mut [f32]) {
            block_kernel::<true>(w, x, k, m, out)
        }
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the extension.
            return unsafe { avx512::block(w, x, k, m, out) };
        }
        if is_x86_feature_detected!("fma") && is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports the extensions.
            return unsafe { avx2(w, x, k, m, out) };
        }
    }
    block_kernel::<false>(w, x, k, m, out)
}

/// For every weight row in `w` (`rows × k`): its dot products with the `m` rows of `x`.
/// Two weight rows times four input rows per pass: eight independent accumulator chains
/// keep both vector add units busy (four chains were bound by the add latency), and each
/// input chunk loaded serves two weight rows.
#[inline(always)]
fn block_kernel<const FMA: bool>(w: &[f32], x: &[f32], k: usize, m: usize, out: &mut [f32]) {
    let rows = w.len() / k;
    let mut r = 0;
    while r < rows {
        // A lone last row is paired with itself.
        let r1 = (r + 1).min(rows - 1);
        let (w0, w1) = (&w[r * k..][..k], &w[r1 * k..][..k]);
        let mut j = 0;
        while j < m {
            // A short last group of input rows repeats its last row.
            let row = |i: usize| &x[(j + i).min(m - 1) * k..][..k];
            let d = dots2x4::<FMA>(w0, w1, [row(0), row(1), row(2), row(3)]);
            for i in 0..4.min(m - j) {
                out[r * m + j + i] = d[0][i];
                if r1 != r {
                    out[r1 * m + j + i] = d[1][i];
                }
            }
            j += 4;
        }
        r += 2;
    }
}

#[inline(always)]
fn dots2x4<const FMA: bool>(w0: &[f32], w1: &[f32], x: [&[f32]; 4]) -> [[f32; 4]; 2] {
    // Named accumulators and zipped exact chunks: the compiler keeps all eight in vector
    // registers and drops every bounds check.
    let (mut a0, mut a1, mut a2, mut a3) =
        ([0f32; LANES], [0f32; LANES], [0f32; LANES], [0f32; LANES]);
    let (mut b0, mut b1, mut b2, mut b3) =
        ([0f32; LANES], [0f32; LANES], [0f32; LANES], [0f32; LANES]);
    let body = w0.len() / LANES * LANES;
    for (((((u, v), c0), c1), c2), c3) in w0[..body]
        .chunks_exact(LANES)
        .zip(w1[..body].chunks_exact(LANES))
        .zip(x[0][..body].chunks_exact(LANES))
        .zip(x[1][..body].chunks_exact(LANES))
        .zip(x[2][..body].chunks_exact(LANES))
        .zip(x[3][..body].chunks_exact(LANES))
    {
        for t in 0..LANES {
            if FMA {
                a0[t] = u[t].mul_add(c0[t], a0[t]);
                a1[t] = u[t].mul_add(c1[t], a1[t]);
                a2[t] = u[t].mul_add(c2[t], a2[t]);
                a3[t] = u[t].mul_add(c3[t], a3[t]);
                b0[t] = v[t].mul_add(c0[t], b0[t]);
                b1[t] = v[t].mul_add(c1[t], b1[t]);
                b2[t] = v[t].mul_add(c2[t], b2[t]);
                b3[t] = v[t].mul_add(c3[t], b3[t]);
            } else {
                a0[t] += u[t] * c0[t];
                a1[t] += u[t] * c1[t];
                a2[t] += u[t] * c2[t];
                a3[t] += u[t] * c3[t];
                b0[t] += v[t] * c0[t];
                b1[t] += v[t] * c1[t];
                b2[t] += v[t] * c2[t];
                b3[t] += v[t] * c3[t];
            }
        }
    }
    let tail = |wr: &[f32], xr: &[f32]| -> f32 {
        wr[body..].iter().zip(&xr[body..]).map(|(a, b)| a * b).sum()
    };
    let sum = |a: &[f32; LANES]| -> f32 { a.iter().sum() };
    [
        [
            sum(&a0) + tail(w0, x[0]),
            sum(&a1) + tail(w0, x[1]),
            sum(&a2) + tail(w0, x[2]),
            sum(&a3) + tail(w0, x[3]),
        ],
        [
            sum(&b0) + tail(w1, x[0]),
            sum(&b1) + tail(w1, x[1]),
            sum(&b2) + tail(w1, x[2]),
            sum(&b3) + tail(w1, x[3]),
        ],
    ]
}

/// The AVX-512 kernel, written with intrinsics: tiles of four weight rows by up to five
/// input rows keep twenty accumulators in registers, so each vector load feeds two to
/// five multiply-adds (the autovectorised 2 × 4 tile was bound by loads and horizontal
/// sums: 10 GB/s at ten rows against 16 GB/s for one). A decoding step's ten beams are two
/// full tiles; the ragged end of `k` uses masked loads instead of a scalar tail.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Weight rows per tile.
    const R: usize = 4;
    /// Most input rows per tile.
    const C: usize = 5;

    /// Same contract as [`super::block_kernel`].
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn block(w: &[f32], x: &[f32], k: usize, m: usize, out: &mut [f32]) {
        let rows = w.len() / k;
        debug_assert!(x.len() >= m * k && out.len() >= rows * m);
        let mut r = 0;
        while r + R <= rows {
            groups::<R>(w, x, k, m, r, out);
            r += R;
        }
        while r < rows {
            groups::<1>(w, x, k, m, r, out);
            r += 1;
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn groups<const RR: usize>(
        w: &[f32],
        x: &[f32],
        k: usize,
        m: usize,
        r: usize,
        out: &mut [f32],
    ) {
        let mut j = 0;
        while j < m {
            // SAFETY: rows r..r + RR of `w` and j..j + c of `x` exist (checked by the
            // callers' shapes), and the writes stay inside `out`'s rows r..r + RR.
            unsafe {
                match (m - j).min(C) {
                    5 => tile::<RR, 5>(w, x, k, m, r, j, out),
                    4 => tile::<RR, 4>(w, x, k, m, r, j, out),
                    3 => tile::<RR, 3>(w, x, k, m, r, j, out),
                    2 => tile::<RR, 2>(w, x, k, m, r, j, out),
                    _ => tile::<RR, 1>(w, x, k, m, r, j, out),
                }
            }
            j += C;
        }
    }

    /// `out[(r + a) * m + j + b] = w[r + a] · x[j + b]` for `a < RR`, `b < CC`.
    // Indexed loops over the register tile: each index names one register.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const RR: usize, const CC: usize>(
        w: &[f32],
        x: &[f32],
        k: usize,
        m: usize,
        r: usize,
        j: usize,
        out: &mut [f32],
    ) {
        let mut acc = [[_mm512_setzero_ps(); CC]; RR];
        let wp = w.as_ptr().add(r * k);
        let xp = x.as_ptr().add(j * k);
        let mut p = 0;
        while p + 16 <= k {
            let mut wv = [_mm512_setzero_ps(); RR];
            for (a, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(wp.add(a * k + p));
                // The next tile's rows, one cache line per row: the hardware prefetcher
                // alone left the loads above waiting on memory.
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add((RR + a) * k + p) as *const i8);
            }
            for b in 0..CC {
                let xv = _mm512_loadu_ps(xp.add(b * k + p));
                for a in 0..RR {
                    acc[a][b] = _mm512_fmadd_ps(wv[a], xv, acc[a][b]);
                }
            }
            p += 16;
        }
        if p < k {
            let mask: __mmask16 = ((1u32 << (k - p)) - 1) as __mmask16;
            let mut wv = [_mm512_setzero_ps(); RR];
            for (a, v) in wv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(mask, wp.add(a * k + p));
            }
            for b in 0..CC {
                let xv = _mm512_maskz_loadu_ps(mask, xp.add(b * k + p));
                for a in 0..RR {
                    acc[a][b] = _mm512_fmadd_ps(wv[a], xv, acc[a][b]);
                }
            }
        }
        for (a, row) in acc.iter().enumerate() {
            for (b, v) in row.iter().enumerate() {
                out[(r + a) * m + j + b] = _mm512_reduce_add_ps(*v);
            }
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
            let ours = attention(&q, &k, &v, scale).unwrap().expect("applies");
            let att = (q.matmul(&k.t().unwrap()).unwrap() * scale as f64).unwrap();
            let reference = candle_nn::ops::softmax_last_dim(&att)
                .unwrap()
                .matmul(&v)
                .unwrap();
            let diff = max_abs_diff(&ours, &reference);
            assert!(diff < 1e-5, "{b} {g} {r} {s} {d}: {diff}");
        }
        // Not where autograd must see it.
        let var = candle_core::Var::zeros((1, 1, 2, 4), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 1, 3, 4), DType::F32, &dev).unwrap();
        assert!(attention(var.as_tensor(), &k, &k, 1.0).unwrap().is_none());
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// `cargo test --release --lib skinny::timing -- --ignored --nocapture`: the
    /// streaming product against the memory floor (one read of the weight).
    #[test]
    #[ignore]
    fn skinny_bandwidth() {
        let dev = Device::Cpu;
        let w = Tensor::ones((234_000, 576), DType::F32, &dev).unwrap();
        for m in [1, 4, 10, 19, MAX_ROWS] {
            let x = Tensor::ones((m, 576), DType::F32, &dev).unwrap();
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                let _ = matmul_t(&x, &w).unwrap().unwrap();
                best = best.min(t.elapsed().as_secs_f64());
            }
            let gb = 234_000.0 * 576.0 * 4.0 / 1e9;
            let mut gemm = f64::MAX;
            for _ in 0..3 {
                let t = std::time::Instant::now();
                let _ = x.matmul(&w.t().unwrap()).unwrap();
                gemm = gemm.min(t.elapsed().as_secs_f64());
            }
            println!(
                "m={m}: {:.1} ms, {:.1} GB/s; candle matmul {:.1} ms",
                best * 1e3,
                gb / best,
                gemm * 1e3
            );
        }
    }
}
