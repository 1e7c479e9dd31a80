//! k-means on dense f32 rows: the hot path of catalog tokenization.
//!
//! Residual k-means runs one k-means per level, so this module is where the time goes.
//! Distances are computed as `‖c‖² − 2·x·c` (the `‖x‖²` term does not change the argmin)
//! by one matrix product per block of rows ([`gemm`], the same kernel candle uses on CPU),
//! with row blocks spread over threads. That is the layout faiss uses too; it is what
//! makes the assignment of 100k items to 256 centroids a few tens of milliseconds.
//!
//! Fitting follows faiss' recipe, which is what users compare against: at most
//! `max_points_per_centroid · k` rows are sampled for training, centroids start from
//! k-means++ on a smaller sample, then Lloyd iterations; an empty cluster is re-seeded by
//! splitting the largest one. Plain Lloyd iterations skip most distance computations with
//! Hamerly's bounds (see `lloyd_bounded`) and give the labels of recomputing them all
//! (up to float ties). Results are a pure function of the input and the seed: the row
//! blocks are independent, and every reduction runs in a fixed order.

use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Rows per block of the distance product. 256 rows × 256 centroids of f32 is 256 KiB of
/// output, which stays in L2 while the argmin scans it.
const BLOCK_ROWS: usize = 256;

/// How a k-means is fitted.
#[derive(Clone, Debug)]
pub struct KMeansConfig {
    /// Number of centroids.
    pub k: usize,
    /// Lloyd iterations.
    pub iters: usize,
    /// Seed for sampling and initialisation.
    pub seed: u64,
    /// Train on at most this many points per centroid (faiss' default is 256); the rest are
    /// only assigned. More points barely move the centroids but cost linear time.
    pub max_points_per_centroid: usize,
    /// Initialisation.
    pub init: Init,
}

impl Default for KMeansConfig {
    fn default() -> Self {
        KMeansConfig {
            k: 256,
            iters: 20,
            seed: 0,
            max_points_per_centroid: 256,
            init: Init::PlusPlus,
        }
    }
}

/// Centroid initialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// k distinct random training points (faiss' default).
    Random,
    /// k-means++ (D² sampling) on a sample of at most 32·k training points: O(32·k²·d),
    /// a fraction of one Lloyd iteration, and a better start than random points.
    PlusPlus,
}

/// Row-major matrix view: `n` rows of `d` floats.
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a> {
    pub data: &'a [f32],
    pub n: usize,
    pub d: usize,
}

impl<'a> Rows<'a> {
    pub fn new(data: &'a [f32], n: usize, d: usize) -> Self {
        assert_eq!(data.len(), n * d, "matrix data does not match its shape");
        Rows { data, n, d }
    }

    #[inline]
    pub fn row(&self, i: usize) -> &'a [f32] {
        &self.data[i * self.d..(i + 1) * self.d]
    }
}

/// Squared L2 norm of every row.
pub fn row_norms(m: Rows<'_>) -> Vec<f32> {
    m.data.chunks_exact(m.d).map(dot_self).collect()
}

/// Lanes of the hand-unrolled reductions below: independent partial sums the compiler can
/// keep in several vector registers, summed pairwise at the end. The summation order is
/// fixed, so results do not depend on the instruction set the code runs on.
const LANES: usize = 16;

#[inline(always)]
fn reduce_lanes(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for t in 0..w {
            acc[t] += acc[t + w];
        }
    }
    acc[0]
}

#[inline(always)]
fn dot_self(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for t in 0..LANES {
            acc[t] += c[t] * c[t];
        }
    }
    reduce_lanes(acc) + tail
}

/// Calls `f(first_row, dots, out_block)` for consecutive blocks of rows, in parallel, where
/// `dots[i * k + j] = ‖c_j‖² − 2·x_i·c_j`, i.e. the squared distance minus `‖x_i‖²`.
/// `out` is split into per-block chunks of `per_row` values per row, so each block
/// writes only its own rows.
fn for_each_block<T: Send>(
    x: Rows<'_>,
    cents: Rows<'_>,
    cnorms: &[f32],
    out: &mut [T],
    per_row: usize,
    f: impl Fn(usize, &[f32], &mut [T]) + Sync,
) {
    let (d, k) = (x.d, cents.n);
    assert_eq!(cents.d, d);
    assert_eq!(out.len(), x.n * per_row);
    out.par_chunks_mut(BLOCK_ROWS * per_row)
        .enumerate()
        .for_each(|(b, out_block)| {
            let start = b * BLOCK_ROWS;
            let rows = out_block.len() / per_row;
            let xb = &x.data[start * d..(start + rows) * d];
            let mut dots: Vec<f32> = Vec::with_capacity(rows * k);
            for _ in 0..rows {
                dots.extend_from_slice(cnorms);
            }
            // SAFETY: dst is rows×k (row stride k), lhs is rows×d (row stride d), rhs is
            // the transposed centroid matrix d×k read with row stride 1 and column stride d;
            // every pointer covers exactly the extents given.
            unsafe {
                gemm::gemm(
                    rows,
                    k,
                    d,
                    dots.as_mut_ptr(),
                    1,
                    k as isize,
                    true,
                    xb.as_ptr(),
                    1,
                    d as isize,
                    cents.data.as_ptr(),
                    d as isize,
                    1,
                    1.0,
                    -2.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            f(start, &dots, out_block);
        });
}

/// Nearest centroid of every row: `(label, squared distance)`.
pub fn assign(x: Rows<'_>, cents: Rows<'_>) -> (Vec<u32>, Vec<f32>) {
    let k = cents.n;
    let cnorms = row_norms(cents);
    let mut best = vec![(0u32, 0f32); x.n];
    for_each_block(x, cents, &cnorms, &mut best, 1, |_, dots, out| {
        for (row, slot) in dots.chunks_exact(k).zip(out.iter_mut()) {
            *slot = argmin(row);
        }
    });
    // Add back ‖x‖² to turn `‖c‖² − 2x·c` into a squared distance.
    best.par_iter_mut()
        .zip(x.data.par_chunks_exact(x.d))
        .map(|((label, dist), xi)| (*label, (*dist + dot_self(xi)).max(0.0)))
        .unzip()
}

/// The `m` nearest centroids of every row, nearest first: `m` `(label, squared
/// distance)` pairs per row. Balanced assignment picks among these.
pub fn nearest_m(x: Rows<'_>, cents: Rows<'_>, m: usize) -> Vec<(u32, f32)> {
    let k = cents.n;
    let m = m.min(k);
    let cnorms = row_norms(cents);
    let mut out = vec![(0u32, 0f32); x.n * m];
    for_each_block(x, cents, &cnorms, &mut out, m, |_, dots, out| {
        let mut idx: Vec<u32> = (0..k as u32).collect();
        for (row, slot) in dots.chunks_exact(k).zip(out.chunks_exact_mut(m)) {
            idx.iter_mut().enumerate().for_each(|(j, v)| *v = j as u32);
            let cmp =
                |a: &u32, b: &u32| row[*a as usize].total_cmp(&row[*b as usize]).then(a.cmp(b));
            if m < k {
                idx.select_nth_unstable_by(m - 1, cmp);
            }
            idx[..m].sort_unstable_by(cmp);
            for (s, &j) in slot.iter_mut().zip(&idx[..m]) {
                *s = (j, row[j as usize]);
            }
        }
    });
    out.par_chunks_exact_mut(m)
        .zip(x.data.par_chunks_exact(x.d))
        .for_each(|(slot, xi)| {
            let n2 = dot_self(xi);
            for s in slot {
                s.1 = (s.1 + n2).max(0.0);
            }
        });
    out
}

#[inline]
fn argmin(row: &[f32]) -> (u32, f32) {
    let mut best = (0u32, f32::INFINITY);
    for (j, &v) in row.iter().enumerate() {
        if v < best.1 {
            best = (j as u32, v);
        }
    }
    best
}

/// A fitted k-means: `k` centroids of dimension `d`, row-major.
#[derive(Clone, Debug)]
pub struct Centroids {
    pub k: usize,
    pub d: usize,
    pub data: Vec<f32>,
}

impl Centroids {
    pub fn rows(&self) -> Rows<'_> {
        Rows::new(&self.data, self.k, self.d)
    }
}

/// Assigns the training rows each iteration; the plain nearest-centroid rule, or a
/// capacity-constrained one (see `quantize`).
pub type AssignFn<'f> = dyn Fn(Rows<'_>, Rows<'_>) -> Vec<u32> + Sync + 'f;

/// Fits k-means on `x` (sampling at most `max_points_per_centroid·k` rows). `assign_fn`
/// overrides the nearest-centroid rule inside Lloyd iterations (balanced k-means);
/// `None` is plain k-means.
pub fn fit(x: Rows<'_>, cfg: &KMeansConfig, assign_fn: Option<&AssignFn<'_>>) -> Centroids {
    let (n, d) = (x.n, x.d);
    let k = cfg.k.min(n).max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);

    // Training sample, kept in original row order so results do not depend on how the
    // sample was drawn beyond which rows it holds.
    let cap = cfg.max_points_per_centroid.saturating_mul(k).max(k);
    let train_buf: Vec<f32>;
    let train = if n > cap {
        let mut idx = sample(&mut rng, n, cap).into_vec();
        idx.sort_unstable();
        train_buf = idx.iter().flat_map(|&i| x.row(i).iter().copied()).collect();
        Rows::new(&train_buf, cap, d)
    } else {
        x
    };

    let mut cents = match cfg.init {
        Init::Random => init_random(train, k, &mut rng),
        Init::PlusPlus => init_plus_plus(train, k, &mut rng),
    };

    match assign_fn {
        Some(f) => {
            for _ in 0..cfg.iters {
                let labels = f(train, cents.rows());
                update(train, &labels, &mut cents, &mut rng);
            }
        }
        None => lloyd_bounded(train, &mut cents, cfg.iters, &mut rng),
    }
    cents
}

/// Best and second-best entry of a row of `‖c‖² − 2x·c`: `(label, best, second)`. The
/// label is the first minimum, as in [`argmin`].
#[inline]
fn top2(row: &[f32]) -> (u32, f32, f32) {
    let (mut b, mut bv, mut sv) = (0u32, f32::INFINITY, f32::INFINITY);
    for (j, &v) in row.iter().enumerate() {
        if v < bv {
            sv = bv;
            bv = v;
            b = j as u32;
        } else if v < sv {
            sv = v;
        }
    }
    (b, bv, sv)
}

use crate::simd::multiversion;

/// A row in doubt is compared directly against at most this many moved centroids; beyond
/// that it goes through the blocked product against all of them.
const DIRECT_MAX: usize = 32;

/// What one iteration's bound check needs to know about the centroids.
struct Step<'a> {
    x: Rows<'a>,
    cents: Rows<'a>,
    is_moved: &'a [bool],
    drift: &'a [f32],
    /// Half separation of every centroid.
    sep: &'a [f32],
    /// Largest drift, its centroid, second-largest drift.
    max_drift: (f32, usize, f32),
    /// Moved centroids by decreasing drift, and their drifts.
    by_drift: &'a [u32],
    drift_desc: &'a [f32],
}

multiversion!(fn check_rows(st: &Step<'_>, start: usize, labels: &mut [u32], own: &mut [f32], upper: &mut [f32], lower: &mut [f32]) -> Vec<u32> = check_rows_kernel);

/// Moves the bounds of rows `start..` by the drift and settles every row it can: by the
/// bounds, by tightening the upper bound, or by the distances to the few moved centroids
/// that could have come closer. Returns the rows left for a full recomputation.
#[inline(always)]
fn check_rows_kernel(
    st: &Step<'_>,
    start: usize,
    labels: &mut [u32],
    own: &mut [f32],
    upper: &mut [f32],
    lower: &mut [f32],
) -> Vec<u32> {
    let mut full = Vec::new();
    let (m1, a1, m2) = st.max_drift;
    for r in 0..labels.len() {
        let a = labels[r] as usize;
        let i = start + r;
        if st.is_moved[a] {
            own[r] = f32::NAN;
        }
        // Comparisons are strict, so that a tie (a row on a centroid, duplicate
        // centroids) is always resolved by distances, lowest index first.
        let u = upper[r] + st.drift[a];
        // `lp` bounds the distance to every other centroid where it was.
        let lp = lower[r];
        let l_eff = (lp - if a == a1 { m2 } else { m1 }).max(0.0);
        let m = st.sep[a].max(l_eff);
        if u < m {
            upper[r] = u;
            lower[r] = l_eff;
            continue;
        }
        let xi = st.x.row(i);
        if own[r].is_nan() {
            own[r] = sq_dist(xi, st.cents.row(a));
        }
        let u = (own[r] * (1.0 + BOUND_SLACK)).sqrt();
        upper[r] = u;
        if u < m {
            lower[r] = l_eff;
            continue;
        }
        // A centroid that did not move is no closer than `lp`, and no closer than the own
        // centroid when that one did not move either (it was the nearest). A moved one
        // can only have come closer than the own centroid if its drift exceeds `lp − u`.
        if st.is_moved[a] && u >= lp {
            full.push(i as u32);
            continue;
        }
        let gap = lp - u;
        let cnt = st.drift_desc.partition_point(|&p| p > gap);
        if cnt > DIRECT_MAX {
            full.push(i as u32);
            continue;
        }
        let mut low = lp;
        if let Some(&p) = st.drift_desc.get(cnt) {
            low = low.min(lp - p);
        }
        let (mut best, mut bv, mut sv) = (a, own[r], f32::INFINITY);
        for &j in &st.by_drift[..cnt] {
            let j = j as usize;
            if j == a {
                continue;
            }
            let v = sq_dist(xi, st.cents.row(j));
            // Ties go to the lower index, as in a full recomputation.
            if v < bv || (v == bv && j < best) {
                sv = sv.min(bv);
                best = j;
                bv = v;
            } else {
                sv = sv.min(v);
            }
        }
        labels[r] = best as u32;
        own[r] = bv;
        upper[r] = (bv * (1.0 + BOUND_SLACK)).sqrt();
        lower[r] = low.min((sv * (1.0 - BOUND_SLACK)).sqrt()).max(0.0);
    }
    full
}

/// Relative slack applied to every bound, far above the rounding error of the distance
/// products: a bound may only err on the side of recomputing.
const BOUND_SLACK: f32 = 1e-5;

/// Per training row: label, squared distance to its centroid (NaN once that centroid has
/// moved and the distance was not recomputed), an upper bound on the distance to its
/// centroid and a lower bound on the distance to every other centroid (Euclidean, not
/// squared). `lower` refers to the centroids of the previous iteration; the per-row check
/// applies this iteration's drift to both bounds.
struct Bounds {
    labels: Vec<u32>,
    own: Vec<f32>,
    upper: Vec<f32>,
    lower: Vec<f32>,
}

/// Gathers rows `idx` of `x` into one contiguous matrix.
fn gather(x: Rows<'_>, idx: &[u32]) -> Vec<f32> {
    let d = x.d;
    let mut buf = vec![0f32; idx.len() * d];
    buf.par_chunks_exact_mut(d)
        .zip(idx.par_iter())
        .for_each(|(dst, &i)| dst.copy_from_slice(x.row(i as usize)));
    buf
}

/// Best and second-best centroid of every row of `x` by the blocked product: `(label,
/// best, second)` in units of `‖c‖² − 2x·c` (add `‖x‖²` for squared distances).
fn top2_all(x: Rows<'_>, cents: Rows<'_>) -> Vec<(u32, f32, f32)> {
    let k = cents.n;
    let cnorms = row_norms(cents);
    let mut best = vec![(0u32, 0f32, 0f32); x.n];
    for_each_block(x, cents, &cnorms, &mut best, 1, |_, dots, out| {
        for (row, slot) in dots.chunks_exact(k).zip(out.iter_mut()) {
            *slot = top2(row);
        }
    });
    best
}

/// Recomputes label and bounds of rows `idx` (all rows for `None`) against every
/// centroid.
fn recompute_full(
    x: Rows<'_>,
    xnorms: &[f32],
    cents: Rows<'_>,
    idx: Option<&[u32]>,
    b: &mut Bounds,
) {
    let best = match idx {
        Some(idx) => {
            let buf = gather(x, idx);
            top2_all(Rows::new(&buf, idx.len(), x.d), cents)
        }
        None => top2_all(x, cents),
    };
    let cmax = row_norms(cents).into_iter().fold(0f32, f32::max);
    for (r, (l, bv, sv)) in best.into_iter().enumerate() {
        let i = idx.map_or(r, |idx| idx[r] as usize);
        let n2 = xnorms[i];
        let tol = BOUND_SLACK * (n2 + cmax);
        b.labels[i] = l;
        b.own[i] = (bv + n2).max(0.0);
        b.upper[i] = (bv + n2 + tol).max(0.0).sqrt();
        b.lower[i] = (sv + n2 - tol).max(0.0).sqrt();
    }
}

/// Half the distance from every centroid to its nearest other centroid, rounded down: a
/// row within that distance of its centroid cannot be closer to any other (Hamerly).
fn half_separation(cents: Rows<'_>) -> Vec<f32> {
    let k = cents.n;
    let cnorms = row_norms(cents);
    let cmax = cnorms.iter().copied().fold(0f32, f32::max);
    let mut s = vec![0f32; k];
    for_each_block(cents, cents, &cnorms, &mut s, 1, |start, dots, out| {
        for (r, (row, slot)) in dots.chunks_exact(k).zip(out.iter_mut()).enumerate() {
            let me = start + r;
            let m = row
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != me)
                .fold(f32::INFINITY, |m, (_, &v)| m.min(v));
            let tol = BOUND_SLACK * (cnorms[me] + cmax);
            *slot = 0.5 * (m + cnorms[me] - tol).max(0.0).sqrt();
        }
    });
    s
}

/// Plain Lloyd iterations giving the labels of recomputing every nearest centroid every
/// iteration (up to float ties), with most of that work skipped:
///
/// * Hamerly's bounds: a row whose upper bound (moved by its centroid's drift) stays below
///   its lower bound (moved by the largest other drift) or below half its centroid's
///   separation keeps its label without any product; otherwise the upper bound is
///   tightened with one exact distance.
/// * Rows still in doubt whose centroid did not move can only be taken by a centroid that
///   did move, so they are compared against the moved centroids only; the rows of moved
///   centroids are compared against all. Both go through the blocked product on gathered
///   rows.
/// * Once no centroid moves, later iterations would repeat the same labels and means, so
///   fitting stops.
///
/// Every step is per row or in a fixed order, so the result is independent of thread
/// scheduling.
fn lloyd_bounded(x: Rows<'_>, cents: &mut Centroids, iters: usize, rng: &mut ChaCha8Rng) {
    if iters == 0 {
        return;
    }
    let (n, d, k) = (x.n, x.d, cents.k);
    const CHUNK: usize = 4096;
    let xnorms = row_norms(x);
    let mut b = Bounds {
        labels: vec![0; n],
        own: vec![0.0; n],
        upper: vec![0.0; n],
        lower: vec![0.0; n],
    };
    recompute_full(x, &xnorms, cents.rows(), None, &mut b);
    let mut old = vec![0f32; k * d];
    // Cluster sums follow the labels: rebuilt when many rows changed cluster, otherwise
    // moved row by row, in row order.
    let (mut sums, mut counts) = cluster_sums(x, &b.labels, k);
    let mut prev = b.labels.clone();
    for it in 0..iters {
        if it > 0 {
            let changed: Vec<u32> = prev
                .par_chunks(CHUNK)
                .zip(b.labels.par_chunks(CHUNK))
                .enumerate()
                .map(|(ch, (p, l))| {
                    (0..p.len())
                        .filter(|&r| p[r] != l[r])
                        .map(|r| (ch * CHUNK + r) as u32)
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
                .concat();
            if changed.len() > n / 16 {
                (sums, counts) = cluster_sums(x, &b.labels, k);
            } else {
                for &i in &changed {
                    let i = i as usize;
                    let (from, to) = (prev[i] as usize, b.labels[i] as usize);
                    counts[from] -= 1;
                    counts[to] += 1;
                    for (t, &v) in x.row(i).iter().enumerate() {
                        sums[from * d + t] -= v as f64;
                        sums[to * d + t] += v as f64;
                    }
                }
            }
            prev.copy_from_slice(&b.labels);
        }
        old.copy_from_slice(&cents.data);
        set_means(&sums, counts.clone(), cents, rng);
        if it + 1 == iters {
            break;
        }
        let c = cents.rows();
        let is_moved: Vec<bool> = old
            .chunks_exact(d)
            .zip(c.data.chunks_exact(d))
            .map(|(o, c)| o != c)
            .collect();
        let moved: Vec<u32> = (0..k as u32).filter(|&j| is_moved[j as usize]).collect();
        if moved.is_empty() {
            // Same centroids give the same labels, hence the same centroids again.
            break;
        }
        // Drift moves the bounds: the own centroid by its drift, every other one by at
        // most the largest drift among them.
        let drift: Vec<f32> = old
            .par_chunks_exact(d)
            .zip(c.data.par_chunks_exact(d))
            .map(|(o, c)| sq_dist(o, c).sqrt() * (1.0 + BOUND_SLACK))
            .collect();
        let (mut m1, mut a1, mut m2) = (0f32, usize::MAX, 0f32);
        for (j, &p) in drift.iter().enumerate() {
            if p > m1 {
                m2 = m1;
                m1 = p;
                a1 = j;
            } else if p > m2 {
                m2 = p;
            }
        }
        let s = half_separation(c);
        let mut by_drift = moved.clone();
        by_drift.sort_by(|&p, &q| {
            drift[q as usize]
                .total_cmp(&drift[p as usize])
                .then(p.cmp(&q))
        });
        let drift_desc: Vec<f32> = by_drift.iter().map(|&j| drift[j as usize]).collect();
        let st = Step {
            x,
            cents: c,
            is_moved: &is_moved,
            drift: &drift,
            sep: &s,
            max_drift: (m1, a1, m2),
            by_drift: &by_drift,
            drift_desc: &drift_desc,
        };
        let full: Vec<u32> = b
            .labels
            .par_chunks_mut(CHUNK)
            .zip(b.own.par_chunks_mut(CHUNK))
            .zip(b.upper.par_chunks_mut(CHUNK))
            .zip(b.lower.par_chunks_mut(CHUNK))
            .enumerate()
            .map(|(ch, (((lab, own), up), lo))| check_rows(&st, ch * CHUNK, lab, own, up, lo))
            .collect::<Vec<_>>()
            .concat();
        if !full.is_empty() {
            recompute_full(x, &xnorms, c, Some(&full), &mut b);
        }
    }
}

fn init_random(x: Rows<'_>, k: usize, rng: &mut ChaCha8Rng) -> Centroids {
    let mut idx = sample(rng, x.n, k).into_vec();
    idx.sort_unstable();
    let data = idx.iter().flat_map(|&i| x.row(i).iter().copied()).collect();
    Centroids { k, d: x.d, data }
}

/// k-means++ on a sample of at most 32·k rows. Each new centre costs one pass of
/// distance updates over the sample, which is cheap at that size.
fn init_plus_plus(x: Rows<'_>, k: usize, rng: &mut ChaCha8Rng) -> Centroids {
    let m = (32 * k).min(x.n);
    let buf: Vec<f32>;
    let s = if m < x.n {
        let mut idx = sample(rng, x.n, m).into_vec();
        idx.sort_unstable();
        buf = idx.iter().flat_map(|&i| x.row(i).iter().copied()).collect();
        Rows::new(&buf, m, x.d)
    } else {
        x
    };
    let d = x.d;
    let mut data = Vec::with_capacity(k * d);
    let first = rng.gen_range(0..s.n);
    data.extend_from_slice(s.row(first));
    let mut dist: Vec<f32> = (0..s.n).map(|i| sq_dist(s.row(i), s.row(first))).collect();
    for c in 1..k {
        let total: f64 = dist.iter().map(|&v| v as f64).sum();
        let pick = if total > 0.0 {
            let mut r = rng.gen::<f64>() * total;
            let mut pick = s.n - 1;
            for (i, &v) in dist.iter().enumerate() {
                r -= v as f64;
                if r <= 0.0 && v > 0.0 {
                    pick = i;
                    break;
                }
            }
            pick
        } else {
            rng.gen_range(0..s.n)
        };
        data.extend_from_slice(s.row(pick));
        let cen = &data[c * d..(c + 1) * d];
        dist.par_iter_mut().enumerate().for_each(|(i, v)| {
            let nd = sq_dist(s.row(i), cen);
            if nd < *v {
                *v = nd;
            }
        });
    }
    Centroids { k, d, data }
}

#[inline(always)]
fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| (x - y) * (x - y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for t in 0..LANES {
            let v = x[t] - y[t];
            acc[t] += v * v;
        }
    }
    reduce_lanes(acc) + tail
}

/// Lloyd update: each centroid moves to the mean of its rows. Sums run in f64, per
/// fixed chunk of rows in parallel and then reduced in chunk order, so the result does
/// not depend on thread scheduling. Empty clusters are re-seeded by splitting the
/// largest cluster (faiss' rule): the empty one takes a slightly perturbed copy.
fn update(x: Rows<'_>, labels: &[u32], cents: &mut Centroids, rng: &mut ChaCha8Rng) {
    let (sums, counts) = cluster_sums(x, labels, cents.k);
    set_means(&sums, counts, cents, rng);
}

/// Per-cluster f64 sums of the rows and row counts.
fn cluster_sums(x: Rows<'_>, labels: &[u32], k: usize) -> (Vec<f64>, Vec<u64>) {
    let d = x.d;
    const CHUNK: usize = 8192;
    let partial: Vec<(Vec<f64>, Vec<u64>)> = labels
        .par_chunks(CHUNK)
        .enumerate()
        .map(|(c, lab)| {
            let mut sums = vec![0f64; k * d];
            let mut counts = vec![0u64; k];
            for (i, &l) in lab.iter().enumerate() {
                let l = l as usize;
                counts[l] += 1;
                let row = x.row(c * CHUNK + i);
                for (s, v) in sums[l * d..(l + 1) * d].iter_mut().zip(row) {
                    *s += *v as f64;
                }
            }
            (sums, counts)
        })
        .collect();
    let mut sums = vec![0f64; k * d];
    let mut counts = vec![0u64; k];
    for (s, c) in &partial {
        sums.iter_mut().zip(s).for_each(|(a, b)| *a += b);
        counts.iter_mut().zip(c).for_each(|(a, b)| *a += b);
    }
    (sums, counts)
}

/// Moves every centroid to the mean of its rows and re-seeds the empty ones.
fn set_means(sums: &[f64], mut counts: Vec<u64>, cents: &mut Centroids, rng: &mut ChaCha8Rng) {
    let (k, d) = (cents.k, cents.d);
    for j in 0..k {
        if counts[j] > 0 {
            let inv = 1.0 / counts[j] as f64;
            for t in 0..d {
                cents.data[j * d + t] = (sums[j * d + t] * inv) as f32;
            }
        }
    }
    // Re-seed empty clusters from the largest ones.
    for j in 0..k {
        if counts[j] > 0 {
            continue;
        }
        let big = (0..k)
            .max_by_key(|&c| (counts[c], std::cmp::Reverse(c)))
            .unwrap_or(0);
        if counts[big] < 2 {
            continue;
        }
        const EPS: f32 = 1.0 / 1024.0;
        for t in 0..d {
            let sign = if rng.gen::<bool>() { 1.0 } else { -1.0 };
            let v = cents.data[big * d + t];
            cents.data[j * d + t] = v * (1.0 + sign * EPS);
            cents.data[big * d + t] = v * (1.0 - sign * EPS);
        }
        counts[j] = counts[big] / 2;
        counts[big] -= counts[j];
    }
}

/// Mean squared reconstruction error `mean_i ‖x_i − c_{label_i}‖²` (sum over
/// dimensions, mean over rows; the figure faiss' peer reports).
pub fn mse(x: Rows<'_>, cents: Rows<'_>, labels: &[u32]) -> f64 {
    let total: f64 = (0..x.n)
        .into_par_iter()
        .map(|i| sq_dist(x.row(i), cents.row(labels[i] as usize)) as f64)
        .sum();
    total / x.n.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs(n_per: usize, centers: &[[f32; 2]], seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut v = Vec::new();
        for c in centers {
            for _ in 0..n_per {
                v.push(c[0] + rng.gen_range(-0.1..0.1));
                v.push(c[1] + rng.gen_range(-0.1..0.1));
            }
        }
        v
    }

    #[test]
    fn assign_matches_brute_force() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (n, k, d) = (1000, 37, 19);
        let x: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let c: Vec<f32> = (0..k * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let (xr, cr) = (Rows::new(&x, n, d), Rows::new(&c, k, d));
        let (labels, dist) = assign(xr, cr);
        let top = nearest_m(xr, cr, 5);
        for i in 0..n {
            let mut all: Vec<(f32, usize)> =
                (0..k).map(|j| (sq_dist(xr.row(i), cr.row(j)), j)).collect();
            all.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert_eq!(labels[i] as usize, all[0].1, "row {i}");
            assert!((dist[i] - all[0].0).abs() < 1e-4);
            for t in 0..5 {
                assert_eq!(top[i * 5 + t].0 as usize, all[t].1);
                assert!((top[i * 5 + t].1 - all[t].0).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn finds_separated_blobs() {
        let centers = [[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0], [5.0, -5.0]];
        let x = blobs(200, &centers, 3);
        let xr = Rows::new(&x, 800, 2);
        for init in [Init::Random, Init::PlusPlus] {
            let cfg = KMeansConfig {
                k: 4,
                iters: 10,
                seed: 7,
                max_points_per_centroid: 256,
                init,
            };
            let c = fit(xr, &cfg, None);
            let (labels, _) = assign(xr, c.rows());
            assert!(mse(xr, c.rows(), &labels) < 0.01, "{init:?}");
            // Every blob maps to one label.
            for b in 0..4 {
                let l = labels[b * 200];
                assert!(labels[b * 200..(b + 1) * 200].iter().all(|&v| v == l));
            }
        }
    }

    /// Plain Lloyd as it reads: every row assigned by [`assign`] every iteration.
    fn naive_fit(x: Rows<'_>, cfg: &KMeansConfig) -> Centroids {
        let k = cfg.k.min(x.n);
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        assert!(x.n <= cfg.max_points_per_centroid * k, "no sampling");
        let mut cents = match cfg.init {
            Init::Random => init_random(x, k, &mut rng),
            Init::PlusPlus => init_plus_plus(x, k, &mut rng),
        };
        for _ in 0..cfg.iters {
            let labels = assign(x, cents.rows()).0;
            update(x, &labels, &mut cents, &mut rng);
        }
        cents
    }

    #[test]
    fn bounded_lloyd_matches_naive() {
        // Overlapping Gaussian blobs, so that labels keep changing for several iterations.
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (n, d) = (3000, 24);
        let centers: Vec<f32> = (0..12 * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let gauss =
            |rng: &mut ChaCha8Rng| -> f32 { (0..6).map(|_| rng.gen_range(-0.5f32..0.5)).sum() };
        let x: Vec<f32> = (0..n)
            .flat_map(|i| {
                let c = (i * 7) % 12;
                (0..d)
                    .map(|t| centers[c * d + t] + 0.6 * gauss(&mut rng))
                    .collect::<Vec<_>>()
            })
            .collect();
        let x = Rows::new(&x, n, d);
        for (k, init) in [
            (40, Init::PlusPlus),
            (64, Init::Random),
            (7, Init::PlusPlus),
        ] {
            let cfg = KMeansConfig {
                k,
                iters: 20,
                seed: 5,
                max_points_per_centroid: n,
                init,
            };
            let fast = fit(x, &cfg, None);
            let slow = naive_fit(x, &cfg);
            let worst = fast
                .data
                .iter()
                .zip(&slow.data)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "k={k} {init:?}: centroids differ by {worst}");
            assert_eq!(
                assign(x, fast.rows()).0,
                assign(x, slow.rows()).0,
                "k={k} {init:?}"
            );
        }
    }

    #[test]
    fn bounded_lloyd_handles_duplicates_and_empty_clusters() {
        // 23 distinct rows for 30 centroids: duplicate centroids, empty clusters and
        // re-seeding every iteration. Distances between split centroids are at the
        // rounding error of the product form, so only quality is compared with the naive
        // loop.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let d = 24;
        let base: Vec<f32> = (0..23 * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let x: Vec<f32> = (0..400)
            .flat_map(|i| base[(i % 23) * d..(i % 23 + 1) * d].to_vec())
            .collect();
        let x = Rows::new(&x, 400, d);
        let cfg = KMeansConfig {
            k: 30,
            iters: 20,
            seed: 5,
            max_points_per_centroid: 256,
            init: Init::Random,
        };
        let fast = fit(x, &cfg, None);
        assert_eq!(fast.data, fit(x, &cfg, None).data);
        let slow = naive_fit(x, &cfg);
        let quality = |c: &Centroids| mse(x, c.rows(), &assign(x, c.rows()).0);
        let (qf, qs) = (quality(&fast), quality(&slow));
        assert!(qf < 1e-4 && qf <= 2.0 * qs + 1e-6, "{qf} vs {qs}");
    }

    #[test]
    fn deterministic_and_handles_k_above_n() {
        let x = blobs(5, &[[0.0, 0.0], [1.0, 1.0]], 5);
        let xr = Rows::new(&x, 10, 2);
        let cfg = KMeansConfig {
            k: 16,
            ..Default::default()
        };
        let a = fit(xr, &cfg, None);
        let b = fit(xr, &cfg, None);
        assert_eq!(a.k, 10);
        assert_eq!(a.data, b.data);
        let (labels, _) = assign(xr, a.rows());
        assert!(mse(xr, a.rows(), &labels) < 1e-12);
    }
}
