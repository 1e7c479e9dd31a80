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
    // out_t[r * m + j] = w_r · x_j, weight-row major so each task owns its block.
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(ROWS_PER_TASK * m)
        .zip(wv.par_chunks(ROWS_PER_TASK * k))
        .for_each(|(o, wblock)| block(wblock, xv, k, m, o));
    let mut out = vec![0f32; m * n];
    for (r, row) in out_t.chunks_exact(m).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            out[j * n + r] = v;
        }
    }
    Ok(Some(Tensor::from_vec(out, (m, n), x.device())?))
}

/// [`block_kernel`] for the widest vector extension the CPU has, with fused multiply-add
/// where it exists (half the instructions of a multiply and an add: the kernel is bound by
/// instruction throughput once the weight streams from memory). Results may differ from
/// the portable version in the last bits; on one machine they are always the same.
fn block(w: &[f32], x: &[f32], k: usize, m: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,fma")]
        unsafe fn avx512(w: &[f32], x: &[f32], k: usize, m: usize, out: &mut [f32]) {
            block_kernel::<true>(w, x, k, m, out)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(w: &[f32], x: &[f32], k: usize, m: usize, out: &mut [f32]) {
            block_kernel::<true>(w, x, k, m, out)
        }
        if is_x86_feature_detected!("fma") {
            if is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports the extensions.
                return unsafe { avx512(w, x, k, m, out) };
            }
            if is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports the extensions.
                return unsafe { avx2(w, x, k, m, out) };
            }
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
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let ours = matmul_t(&x, &w).unwrap().expect("applies");
            let reference = x.matmul(&w.t().unwrap()).unwrap();
            let diff = (ours - reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
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
