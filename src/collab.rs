//! Collaborative item vectors: what the interactions say about items, so that SID
//! prefixes can follow what users take together and not only what the texts say.
//!
//! Text embeddings put items that are described alike side by side; items that are
//! bought together but described differently land in different branches of the code
//! tree, and what a model learns about one does not carry to the other. These vectors
//! are the classic factorisation of co-occurrence: positive pointwise mutual information
//! (PPMI) of items that occur within `window` positions of each other in users'
//! sequences (weight 1/distance), factorised by a truncated eigendecomposition
//! (Levy & Goldberg: skip-gram with negative sampling factorises a shifted PMI matrix),
//! each item's row `u_i · sqrt(|λ|)`. Deterministic: a seeded start, fixed-order
//! arithmetic.
//!
//! Only the caller decides which interactions go in; `sidrec tokenize` passes the
//! leave-one-out training parts (every user's items but the last two), so the codes
//! never see an evaluation target.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

/// How the collaborative vectors are built.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CollabConfig {
    /// Dimensions kept (the largest eigenvalues by magnitude).
    pub dim: usize,
    /// Items at most this many positions apart co-occur (weight 1/distance).
    pub window: usize,
    /// Subspace iterations of the eigensolver.
    pub iters: usize,
    /// Seed of the solver's random start.
    pub seed: u64,
}

impl Default for CollabConfig {
    fn default() -> Self {
        CollabConfig {
            dim: 64,
            window: 3,
            iters: 12,
            seed: 0,
        }
    }
}

#[derive(Debug, Error)]
pub enum CollabError {
    #[error("collaborative vectors: --collab-dim must be at least 1")]
    ZeroDim,
    #[error("collaborative vectors: --collab-window must be at least 1")]
    ZeroWindow,
    #[error(
        "collaborative vectors: item index {item} in a sequence, but the catalog has {n} items"
    )]
    ItemOutOfRange { item: u32, n: usize },
    #[error(
        "collaborative vectors: no two items co-occur within {window} positions in any sequence"
    )]
    NoCooccurrence { window: usize },
}

/// The PPMI matrix as compressed sparse rows (symmetric).
struct Csr {
    n: usize,
    start: Vec<usize>,
    col: Vec<u32>,
    val: Vec<f64>,
}

impl Csr {
    /// `y = M · x` for a dense `[n, k]` row-major `x`.
    fn mul(&self, x: &[f64], k: usize) -> Vec<f64> {
        let mut y = vec![0.0; self.n * k];
        for r in 0..self.n {
            let out = &mut y[r * k..(r + 1) * k];
            for e in self.start[r]..self.start[r + 1] {
                let v = self.val[e];
                let c = self.col[e] as usize;
                for (o, xi) in out.iter_mut().zip(&x[c * k..(c + 1) * k]) {
                    *o += v * xi;
                }
            }
        }
        y
    }
}

/// What building the vectors found, for the tokenize report.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CollabStats {
    /// Items with at least one positive PPMI entry (the rest get a zero vector).
    pub items_covered: usize,
    /// Non-zero PPMI entries.
    pub nonzeros: usize,
    /// The kept eigenvalues, largest magnitude first.
    pub eigenvalues: Vec<f64>,
}

/// Row-major `[n_items, dim]` vectors (dim capped at the number of covered items) and
/// what was found. Items that co-occur with nothing get zeros.
pub fn vectors(
    seqs: &[Vec<u32>],
    n_items: usize,
    cfg: &CollabConfig,
) -> Result<(Vec<f32>, usize, CollabStats), CollabError> {
    if cfg.dim == 0 {
        return Err(CollabError::ZeroDim);
    }
    if cfg.window == 0 {
        return Err(CollabError::ZeroWindow);
    }
    let m = ppmi(seqs, n_items, cfg.window)?;
    let covered = (0..n_items)
        .filter(|&r| m.start[r + 1] > m.start[r])
        .count();
    if m.val.is_empty() {
        return Err(CollabError::NoCooccurrence { window: cfg.window });
    }
    let dim = cfg.dim.min(covered).max(1);
    // Oversampling makes the top `dim` converge in few iterations.
    let k = (dim + 8).min(n_items);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut q: Vec<f64> = (0..n_items * k)
        .map(|_| standard_normal(&mut rng))
        .collect();
    orthonormalize(&mut q, n_items, k);
    for _ in 0..cfg.iters {
        q = m.mul(&q, k);
        orthonormalize(&mut q, n_items, k);
    }
    // Rayleigh–Ritz: B = Qᵀ M Q, eigenvectors of B rotate Q onto M's eigenvectors.
    let mq = m.mul(&q, k);
    let mut b = vec![0.0; k * k];
    for r in 0..n_items {
        let qr = &q[r * k..(r + 1) * k];
        let mr = &mq[r * k..(r + 1) * k];
        for i in 0..k {
            for j in 0..k {
                b[i * k + j] += qr[i] * mr[j];
            }
        }
    }
    for i in 0..k {
        for j in 0..i {
            let s = 0.5 * (b[i * k + j] + b[j * k + i]);
            b[i * k + j] = s;
            b[j * k + i] = s;
        }
    }
    let (lambda, v) = jacobi_eigen(&mut b, k);
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &c| lambda[c].abs().total_cmp(&lambda[a].abs()).then(a.cmp(&c)));
    order.truncate(dim);
    let mut out = vec![0f32; n_items * dim];
    for r in 0..n_items {
        let qr = &q[r * k..(r + 1) * k];
        for (o, &e) in order.iter().enumerate() {
            let mut s = 0.0;
            for i in 0..k {
                s += qr[i] * v[i * k + e];
            }
            out[r * dim + o] = (s * lambda[e].abs().sqrt()) as f32;
        }
    }
    let stats = CollabStats {
        items_covered: covered,
        nonzeros: m.val.len(),
        eigenvalues: order.iter().map(|&e| lambda[e]).collect(),
    };
    Ok((out, dim, stats))
}

/// Symmetric co-occurrence within `window` positions (weight 1/distance, an item with
/// itself ignored), then `max(0, log(c_ab · T / (c_a · c_b)))`.
fn ppmi(seqs: &[Vec<u32>], n: usize, window: usize) -> Result<Csr, CollabError> {
    let successors = crate::interactions::windowed_successors(seqs, n, window)
        .map_err(|item| CollabError::ItemOutOfRange { item, n })?;
    // Both directions; an item with itself does not count.
    let mut rows: Vec<BTreeMap<u32, f64>> = vec![BTreeMap::new(); n];
    for (a, succ) in successors.iter().enumerate() {
        for (&b, &c) in succ {
            if b as usize != a {
                *rows[a].entry(b).or_insert(0.0) += c;
                *rows[b as usize].entry(a as u32).or_insert(0.0) += c;
            }
        }
    }
    let sums: Vec<f64> = rows.iter().map(|r| r.values().sum()).collect();
    let total: f64 = sums.iter().sum();
    let mut csr = Csr {
        n,
        start: vec![0],
        col: Vec::new(),
        val: Vec::new(),
    };
    for (a, row) in rows.iter().enumerate() {
        for (&b, &c) in row {
            let pmi = (c * total / (sums[a] * sums[b as usize])).ln();
            if pmi > 0.0 {
                csr.col.push(b);
                csr.val.push(pmi);
            }
        }
        csr.start.push(csr.col.len());
    }
    Ok(csr)
}

/// One standard normal draw (Box–Muller), so the start needs no extra crate.
fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Modified Gram–Schmidt on the `k` columns of a row-major `[n, k]` matrix. A column
/// that collapses (rank deficiency) is left at zero.
fn orthonormalize(x: &mut [f64], n: usize, k: usize) {
    for j in 0..k {
        for p in 0..j {
            let dot: f64 = (0..n).map(|r| x[r * k + j] * x[r * k + p]).sum();
            for r in 0..n {
                x[r * k + j] -= dot * x[r * k + p];
            }
        }
        let norm = (0..n).map(|r| x[r * k + j].powi(2)).sum::<f64>().sqrt();
        let inv = if norm > 1e-12 { 1.0 / norm } else { 0.0 };
        for r in 0..n {
            x[r * k + j] *= inv;
        }
    }
}

/// Cyclic Jacobi eigendecomposition of a symmetric `[k, k]` matrix (destroyed). Returns
/// the eigenvalues and the eigenvectors as the columns of a row-major `[k, k]` matrix.
fn jacobi_eigen(a: &mut [f64], k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0.0; k * k];
    for i in 0..k {
        v[i * k + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..k)
            .flat_map(|i| (0..k).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * k + j].powi(2))
            .sum();
        let diag: f64 = (0..k).map(|i| a[i * k + i].powi(2)).sum();
        if off <= 1e-24 * diag.max(1e-300) {
            break;
        }
        for p in 0..k {
            for q in p + 1..k {
                let apq = a[p * k + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * k + q] - a[p * k + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for r in 0..k {
                    let arp = a[r * k + p];
                    let arq = a[r * k + q];
                    a[r * k + p] = c * arp - s * arq;
                    a[r * k + q] = s * arp + c * arq;
                }
                for r in 0..k {
                    let apr = a[p * k + r];
                    let aqr = a[q * k + r];
                    a[p * k + r] = c * apr - s * aqr;
                    a[q * k + r] = s * apr + c * aqr;
                }
                for r in 0..k {
                    let vrp = v[r * k + p];
                    let vrq = v[r * k + q];
                    v[r * k + p] = c * vrp - s * vrq;
                    v[r * k + q] = s * vrp + c * vrq;
                }
            }
        }
    }
    ((0..k).map(|i| a[i * k + i]).collect(), v)
}

/// Joins text and collaborative vectors into one row per item for residual k-means:
/// each part L2-normalised per row (a zero row stays zero), scaled by `sqrt(1 − w)` and
/// `sqrt(w)`, so `w` is the collaborative share of every squared distance.
pub fn combine(text: &[f32], text_d: usize, collab: &[f32], collab_d: usize, w: f32) -> Vec<f32> {
    let n = text.len() / text_d.max(1);
    let (wt, wc) = ((1.0 - w).max(0.0).sqrt(), w.max(0.0).sqrt());
    let mut out = Vec::with_capacity(n * (text_d + collab_d));
    for i in 0..n {
        for (part, d, scale) in [(text, text_d, wt), (collab, collab_d, wc)] {
            let row = &part[i * d..(i + 1) * d];
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            let s = if norm > 0.0 { scale / norm } else { 0.0 };
            out.extend(row.iter().map(|x| x * s));
        }
    }
    out
}
