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
//! splitting the largest one. Results are a pure function of the input and the seed: the
//! row blocks are independent, and every reduction runs in a fixed order.

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

#[inline]
fn dot_self(x: &[f32]) -> f32 {
    x.iter().map(|v| v * v).sum()
}

/// Calls `f(first_row, block, dots)` for consecutive blocks of rows, in parallel, where
/// `dots[i * k + j] = ‖c_j‖² − 2·x_i·c_j`, i.e. the squared distance minus `‖x_i‖²`.
/// `out` is split into per-block chunks of `per_row` values per row, so each block
/// writes only its own rows.
fn for_each_block<T: Send>(
    x: Rows<'_>,
    cents: Rows<'_>,
    cnorms: &[f32],
    out: &mut [T],
    per_row: usize,
    f: impl Fn(&[f32], &mut [T]) + Sync,
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
            f(&dots, out_block);
        });
}

/// Nearest centroid of every row: `(label, squared distance)`.
pub fn assign(x: Rows<'_>, cents: Rows<'_>) -> (Vec<u32>, Vec<f32>) {
    let k = cents.n;
    let cnorms = row_norms(cents);
    let mut best = vec![(0u32, 0f32); x.n];
    for_each_block(x, cents, &cnorms, &mut best, 1, |dots, out| {
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
    for_each_block(x, cents, &cnorms, &mut out, m, |dots, out| {
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

    let mut labels: Vec<u32>;
    for _ in 0..cfg.iters {
        labels = match assign_fn {
            Some(f) => f(train, cents.rows()),
            None => assign(train, cents.rows()).0,
        };
        update(train, &labels, &mut cents, &mut rng);
    }
    cents
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

#[inline]
fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Lloyd update: each centroid moves to the mean of its rows. Sums run in f64, per
/// fixed chunk of rows in parallel and then reduced in chunk order, so the result does
/// not depend on thread scheduling. Empty clusters are re-seeded by splitting the
/// largest cluster (faiss' rule): the empty one takes a slightly perturbed copy.
fn update(x: Rows<'_>, labels: &[u32], cents: &mut Centroids, rng: &mut ChaCha8Rng) {
    let (k, d) = (cents.k, cents.d);
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
