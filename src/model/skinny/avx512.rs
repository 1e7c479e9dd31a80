//! The AVX-512 kernel of the streaming product, written with intrinsics: tiles of four
//! weight rows by up to five input rows keep twenty accumulators in registers, so each
//! vector load feeds two to five multiply-adds (an autovectorised 2 × 4 tile was bound by
//! loads and horizontal sums: 10 GB/s at ten rows against 16 GB/s for one). A decoding
//! step's ten beams are two full tiles; the ragged end of `k` uses masked loads of the
//! inputs (packed weight rows are padded with zeros).

use std::arch::x86_64::*;

use super::{Rows, BF16, F32, INT8_GROUP};

/// Weight rows per tile.
const R: usize = 4;
/// Most input rows per tile.
const C: usize = 5;
/// f32 lanes of a vector.
const L: usize = 16;

/// Weight rows `r0..r0 + rows` of `w` (stored as `K`) dotted with the `m` rows of `x`,
/// into `out[(r - r0) · m + j]`.
///
/// # Safety
/// The CPU must support AVX-512F; rows `r0..r0 + rows` exist in `w`, `x` holds `m · k`
/// and `out` `rows · m`.
#[target_feature(enable = "avx512f")]
pub unsafe fn block<const K: u8>(
    w: &Rows,
    r0: usize,
    rows: usize,
    x: &[f32],
    m: usize,
    out: &mut [f32],
) {
    debug_assert!(x.len() >= m * w.k && out.len() >= rows * m);
    let mut r = 0;
    while r + R <= rows {
        groups::<K, R>(w, r0, r, x, m, out);
        r += R;
    }
    while r < rows {
        groups::<K, 1>(w, r0, r, x, m, out);
        r += 1;
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
fn groups<const K: u8, const RR: usize>(
    w: &Rows,
    r0: usize,
    r: usize,
    x: &[f32],
    m: usize,
    out: &mut [f32],
) {
    let mut j = 0;
    while j < m {
        // SAFETY: weight rows r0 + r..r0 + r + RR and input rows j..j + c exist (the
        // callers' shapes), and the writes stay inside `out`'s rows r..r + RR.
        unsafe {
            match (m - j).min(C) {
                5 => tile::<K, RR, 5>(w, r0 + r, x, m, j, &mut out[r * m..]),
                4 => tile::<K, RR, 4>(w, r0 + r, x, m, j, &mut out[r * m..]),
                3 => tile::<K, RR, 3>(w, r0 + r, x, m, j, &mut out[r * m..]),
                2 => tile::<K, RR, 2>(w, r0 + r, x, m, j, &mut out[r * m..]),
                _ => tile::<K, RR, 1>(w, r0 + r, x, m, j, &mut out[r * m..]),
            }
        }
        j += C;
    }
}

/// 16 elements of weight row `row` from element `p` on, as f32.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load<const K: u8>(w: &Rows, row: usize, p: usize) -> __m512 {
    let at = row * w.stride + p;
    unsafe {
        match K {
            F32 => _mm512_loadu_ps((w.data as *const f32).add(at)),
            BF16 => {
                let h = _mm256_loadu_si256((w.data as *const u16).add(at) as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
            _ => {
                let q = _mm_loadu_si128((w.data as *const i8).add(at) as *const __m128i);
                let s = *w.scales.get_unchecked(row * w.groups + p / INT8_GROUP);
                _mm512_mul_ps(
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)),
                    _mm512_set1_ps(s),
                )
            }
        }
    }
}

/// `out[a · m + j + b] = w[row + a] · x[j + b]` for `a < RR`, `b < CC`.
// Indexed loops over the register tile: each index names one register.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile<const K: u8, const RR: usize, const CC: usize>(
    w: &Rows,
    row: usize,
    x: &[f32],
    m: usize,
    j: usize,
    out: &mut [f32],
) {
    let k = w.k;
    // Bytes per element, and elements per cache line of the weight.
    let size = match K {
        F32 => 4,
        BF16 => 2,
        _ => 1,
    };
    let line = 64 / size;
    let mut acc = [[_mm512_setzero_ps(); CC]; RR];
    unsafe {
        let xp = x.as_ptr().add(j * k);
        let mut p = 0;
        while p + L <= k {
            let mut wv = [_mm512_setzero_ps(); RR];
            for (a, v) in wv.iter_mut().enumerate() {
                *v = load::<K>(w, row + a, p);
                // The next tile's rows, one cache line per row: the hardware prefetcher
                // alone left the loads above waiting on memory.
                if p % line == 0 {
                    let next = w.data.wrapping_add(((row + RR + a) * w.stride + p) * size);
                    _mm_prefetch::<_MM_HINT_T0>(next as *const i8);
                }
            }
            for b in 0..CC {
                let xv = _mm512_loadu_ps(xp.add(b * k + p));
                for a in 0..RR {
                    acc[a][b] = _mm512_fmadd_ps(wv[a], xv, acc[a][b]);
                }
            }
            p += L;
        }
        if p < k {
            let mask: __mmask16 = ((1u32 << (k - p)) - 1) as __mmask16;
            let mut wv = [_mm512_setzero_ps(); RR];
            for (a, v) in wv.iter_mut().enumerate() {
                *v = match K {
                    F32 => {
                        _mm512_maskz_loadu_ps(mask, (w.data as *const f32).add((row + a) * k + p))
                    }
                    // Packed rows are zero-padded past `k`.
                    _ => load::<K>(w, row + a, p),
                };
            }
            for b in 0..CC {
                let xv = _mm512_maskz_loadu_ps(mask, xp.add(b * k + p));
                for a in 0..RR {
                    acc[a][b] = _mm512_fmadd_ps(wv[a], xv, acc[a][b]);
                }
            }
        }
    }
    for (a, r) in acc.iter().enumerate() {
        for (b, v) in r.iter().enumerate() {
            out[a * m + j + b] = _mm512_reduce_add_ps(*v);
        }
    }
}
