//! Differentiable softmax, log-softmax, RMSNorm and RoPE built from basic tensor ops.
//!
//! candle's fused versions (`candle_nn::ops::softmax_last_dim`, `candle_nn::ops::rms_norm`,
//! `candle_nn::rotary_emb::rope`) are custom ops registered without a backward pass: a loss
//! computed through them silently stops the gradient (the weights before them get none).
//! Training needs every step of the forward to be differentiable, so these functions are
//! written with ops that candle's autograd knows (`exp`, `sum_keepdim`, `broadcast_*`,
//! `narrow`, `cat`, ...). They are slower than the fused kernels but agree with them to
//! float rounding (tested below).
//!
//! Where no gradient can flow (no input is tracked by autograd: decoding, validation on a
//! detached view) and the data is f32, [`rms_norm`] and [`rope`] hand over to the fused kernels: the composed
//! versions are seven and ten candle operations each, and on SmolLM2 their dispatch was
//! about a quarter of a beam step (docs/benchmarks.md, "Decoding").

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;

/// Softmax over the last dimension: `exp(x - max) / sum(exp(x - max))`.
///
/// The row maximum is detached: softmax is invariant to a per-row shift, so the exact
/// gradient does not depend on it and detaching saves a backward pass through `max`.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let num = xs.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(D::Minus1)?;
    num.broadcast_div(&den)
}

/// Log-softmax over the last dimension: `x - max - log(sum(exp(x - max)))`.
///
/// Used by the loss instead of `softmax(..).log()`, which underflows to `-inf` for
/// unlikely tokens. The detached maximum is exact for the same reason as in
/// [`softmax_last_dim`].
pub fn log_softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let diff = xs.broadcast_sub(&max)?;
    let log_sum = diff.exp()?.sum_keepdim(D::Minus1)?.log()?;
    diff.broadcast_sub(&log_sum)
}

/// RMSNorm over the last dimension: `x * (mean(x²) + eps)^-1/2 * weight`.
///
/// `weight` has the size of the last dimension of `xs`.
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let hidden = xs.dim(D::Minus1)?;
    let w = weight.dims1()?;
    if w != hidden {
        candle_core::bail!(
            "rms_norm: weight of size {w} for a last dimension of {hidden} ({:?})",
            xs.shape()
        );
    }
    if xs.dtype() == DType::F32 && !xs.track_op() && !weight.track_op() {
        return candle_nn::ops::rms_norm(&xs.contiguous()?, weight, eps as f32);
    }
    let inv_rms = xs
        .sqr()?
        .mean_keepdim(D::Minus1)?
        .affine(1.0, eps)?
        .sqrt()?
        .recip()?;
    xs.broadcast_mul(&inv_rms)?.broadcast_mul(weight)
}

/// `[-x2, x1]` for `x = [x1, x2]` split in halves along the last dimension: the
/// Hugging Face ("rotate half", non-interleaved) RoPE layout.
pub fn rotate_half(xs: &Tensor) -> Result<Tensor> {
    let d = xs.dim(D::Minus1)?;
    let half = d / 2;
    let x1 = xs.narrow(D::Minus1, 0, half)?;
    let x2 = xs.narrow(D::Minus1, half, d - half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// Rotary position embedding in the Hugging Face layout: `x * cos + rotate_half(x) * sin`.
///
/// `xs` is `[batch, heads, seq, head_dim]`; `cos` and `sin` are `[seq, head_dim / 2]` (one
/// angle per frequency, the layout `candle_nn::rotary_emb::rope` takes), already narrowed to
/// the positions of `xs`. The tables are constants, so only `xs` receives a gradient.
pub fn rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_b, _h, seq, head_dim) = xs.dims4()?;
    let (cs, cd) = cos.dims2()?;
    let (ss, sd) = sin.dims2()?;
    if cs != seq || ss != seq || cd * 2 != head_dim || sd * 2 != head_dim {
        candle_core::bail!(
            "rope: tables {:?} / {:?} do not fit input {:?}",
            cos.shape(),
            sin.shape(),
            xs.shape()
        );
    }
    if xs.dtype() == DType::F32 && !xs.track_op() {
        return candle_nn::rotary_emb::rope(
            &xs.contiguous()?,
            &cos.contiguous()?,
            &sin.contiguous()?,
        );
    }
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.reshape((1, 1, seq, head_dim))?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.reshape((1, 1, seq, head_dim))?;
    xs.broadcast_mul(&cos)? + rotate_half(xs)?.broadcast_mul(&sin)?
}

/// Weighted negative log-likelihood of `targets` under `logits` `[n, vocab]`:
/// `Σᵢ wᵢ · (logsumexp(logitsᵢ) − logitsᵢ[targetsᵢ])`, a scalar, differentiable in `logits`.
///
/// One fused pass forward and one backward (`wᵢ · (softmaxᵢ − onehotᵢ)`), instead of the
/// dozen passes `log_softmax` + `gather` + their gradients make over the logits. The
/// logits are the largest tensor of a training step (`batch × seq × vocab`: 100 MB for
/// SmolLM2 at 8 × 64), so this is where the fusion pays (docs/benchmarks.md, "Training throughput").
/// Rows with weight 0 cost nothing backward. f32 and f64.
pub fn weighted_nll(logits: &Tensor, targets: &[u32], weights: &[f32]) -> Result<Tensor> {
    let n = logits.dims2()?.0;
    if targets.len() != n || weights.len() != n {
        candle_core::bail!(
            "weighted_nll: {} targets and {} weights for {n} rows",
            targets.len(),
            weights.len()
        );
    }
    let offsets: Vec<usize> = (0..=n).collect();
    soft_nll(logits, &offsets, targets, weights)
}

/// Cross-entropy against sparse soft targets: row `i` of `logits` `[n, vocab]` has the
/// targets `targets[offsets[i]..offsets[i + 1]]` with weights from the same range of
/// `weights`, and the result is `Σᵢ Σₖ wᵢₖ · (logsumexp(logitsᵢ) − logitsᵢ[tᵢₖ])`, a scalar.
/// With one target per row it is [`weighted_nll`]; with several it trains towards a
/// distribution (a teacher's, mixed with the observed token) in the same single fused
/// pass, whose backward is `(Σₖ wᵢₖ) · softmaxᵢ − Σₖ wᵢₖ · onehot(tᵢₖ)`. `offsets` has
/// `n + 1` non-decreasing entries starting at 0 and ending at `targets.len()`.
pub fn soft_nll(
    logits: &Tensor,
    offsets: &[usize],
    targets: &[u32],
    weights: &[f32],
) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    let well_formed = offsets.len() == n + 1
        && offsets.first() == Some(&0)
        && offsets.last() == Some(&targets.len())
        && offsets.windows(2).all(|w| w[0] <= w[1]);
    if !well_formed || weights.len() != targets.len() {
        candle_core::bail!(
            "soft_nll: {} offsets, {} targets and {} weights for {n} rows",
            offsets.len(),
            targets.len(),
            weights.len()
        );
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("soft_nll: target {t} outside a vocabulary of {v}");
    }
    let op = Nll {
        offsets: Arc::new(offsets.to_vec()),
        targets: Arc::new(targets.to_vec()),
        weights: Arc::new(weights.to_vec()),
    };
    // Output `[n, 2]`: the weighted loss of each row and its logsumexp, which the
    // backward pass reads back instead of recomputing it.
    let rows = logits.contiguous()?.apply_op1(op)?;
    rows.narrow(1, 0, 1)?.sum_all()
}

/// The fused op behind [`soft_nll`]: targets of row `i` are `offsets[i]..offsets[i + 1]`.
struct Nll {
    offsets: Arc<Vec<usize>>,
    targets: Arc<Vec<u32>>,
    weights: Arc<Vec<f32>>,
}

/// The float types the fused ops run in.
trait Real: candle_core::WithDType + num_traits::Float + Send + Sync {}
impl Real for f32 {}
impl Real for f64 {}

fn contiguous_slice<'a, T: candle_core::WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&storage.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("fused op: the input must be contiguous"),
    }
}

impl Nll {
    /// Row `i`'s `(target, weight)` pairs.
    fn row(&self, i: usize) -> impl Iterator<Item = (usize, f64)> + '_ {
        let r = self.offsets[i]..self.offsets[i + 1];
        self.targets[r.clone()]
            .iter()
            .zip(&self.weights[r])
            .map(|(&t, &w)| (t as usize, f64::from(w)))
    }

    fn forward<T: Real>(&self, x: &[T], v: usize) -> Vec<T> {
        let n = self.offsets.len() - 1;
        let mut out = vec![T::zero(); n * 2];
        out.par_chunks_mut(2)
            .zip(x.par_chunks(v))
            .enumerate()
            .for_each(|(i, (o, row))| {
                let max = row
                    .iter()
                    .copied()
                    .fold(T::neg_infinity(), num_traits::Float::max);
                let sum = row.iter().fold(T::zero(), |s, &z| s + (z - max).exp());
                let lse = max + sum.ln();
                o[0] = self
                    .row(i)
                    .filter(|&(_, w)| w != 0.0)
                    .fold(T::zero(), |s, (t, w)| s + T::from_f64(w) * (lse - row[t]));
                o[1] = lse;
            });
        out
    }

    fn backward<T: Real>(&self, x: &[T], res: &[T], grad: &[T], v: usize) -> Vec<T> {
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .enumerate()
            .for_each(|(i, (o, row))| {
                let total: f64 = self.row(i).map(|(_, w)| w).sum();
                let g = grad[2 * i];
                if total == 0.0 || g == T::zero() {
                    return;
                }
                let lse = res[2 * i + 1];
                let gt = g * T::from_f64(total);
                for (oj, &z) in o.iter_mut().zip(row) {
                    *oj = gt * (z - lse).exp();
                }
                for (t, w) in self.row(i) {
                    o[t] -= g * T::from_f64(w);
                }
            });
        out
    }
}

impl CustomOp1 for Nll {
    fn name(&self) -> &'static str {
        "soft-nll"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, v) = layout.shape().dims2()?;
        let out = match storage {
            CpuStorage::F32(_) => {
                CpuStorage::F32(self.forward(contiguous_slice::<f32>(storage, layout)?, v))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(self.forward(contiguous_slice::<f64>(storage, layout)?, v))
            }
            _ => candle_core::bail!("soft_nll: logits must be f32 or f64"),
        };
        Ok((out, Shape::from((n, 2))))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (n, v) = arg.dims2()?;
        let grad_res = grad_res.contiguous()?;
        let res = res.contiguous()?;
        let (xs, xl) = arg.storage_and_layout();
        let (rs, rl) = res.storage_and_layout();
        let (gs, gl) = grad_res.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(rs), Storage::Cpu(gs)) = (&*xs, &*rs, &*gs) else {
            candle_core::bail!("soft_nll: CPU only");
        };
        let dev = arg.device();
        let grad = match xs {
            CpuStorage::F32(_) => Tensor::from_vec(
                self.backward(
                    contiguous_slice::<f32>(xs, xl)?,
                    contiguous_slice::<f32>(rs, rl)?,
                    contiguous_slice::<f32>(gs, gl)?,
                    v,
                ),
                (n, v),
                dev,
            )?,
            CpuStorage::F64(_) => Tensor::from_vec(
                self.backward(
                    contiguous_slice::<f64>(xs, xl)?,
                    contiguous_slice::<f64>(rs, rl)?,
                    contiguous_slice::<f64>(gs, gl)?,
                    v,
                ),
                (n, v),
                dev,
            )?,
            _ => candle_core::bail!("soft_nll: logits must be f32 or f64"),
        };
        Ok(Some(grad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn rope_tables(seq: usize, head_dim: usize, dtype: DType) -> (Tensor, Tensor) {
        let dev = Device::Cpu;
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(seq * half);
        let mut sin = Vec::with_capacity(seq * half);
        for p in 0..seq {
            for i in 0..half {
                let inv = 1.0 / 10_000f64.powf(2.0 * i as f64 / head_dim as f64);
                cos.push((p as f64 * inv).cos());
                sin.push((p as f64 * inv).sin());
            }
        }
        let cos = Tensor::from_vec(cos, (seq, half), &dev).unwrap();
        let sin = Tensor::from_vec(sin, (seq, half), &dev).unwrap();
        (cos.to_dtype(dtype).unwrap(), sin.to_dtype(dtype).unwrap())
    }

    #[test]
    fn softmax_matches_candle_fused() {
        let x = Tensor::randn(0f32, 3.0, (3, 5, 17), &Device::Cpu).unwrap();
        let ours = softmax_last_dim(&x).unwrap();
        let fused = candle_nn::ops::softmax_last_dim(&x).unwrap();
        assert!(max_abs_diff(&ours, &fused) < 1e-5);
        let ours = log_softmax_last_dim(&x).unwrap();
        let reference = candle_nn::ops::log_softmax(&x, D::Minus1).unwrap();
        assert!(max_abs_diff(&ours, &reference) < 1e-5);
    }

    #[test]
    fn rms_norm_matches_candle_fused() {
        let x = Tensor::randn(0f32, 2.0, (2, 7, 64), &Device::Cpu).unwrap();
        let w = Tensor::randn(1f32, 0.5, 64, &Device::Cpu).unwrap();
        // A tracked input takes the composed (differentiable) path, a plain one the fused.
        let tracked = Var::from_tensor(&x).unwrap();
        let ours = rms_norm(tracked.as_tensor(), &w, 1e-5).unwrap();
        assert!(ours.track_op());
        let fused = candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap();
        assert!(max_abs_diff(&ours, &fused) < 1e-5);
        assert!(max_abs_diff(&rms_norm(&x, &w, 1e-5).unwrap(), &fused) == 0.0);
        assert!(rms_norm(&x, &w.narrow(0, 0, 10).unwrap(), 1e-5).is_err());
    }

    #[test]
    fn rope_matches_candle_fused() {
        let x = Tensor::randn(0f32, 1.0, (2, 3, 9, 16), &Device::Cpu).unwrap();
        let (cos, sin) = rope_tables(9, 16, DType::F32);
        let tracked = Var::from_tensor(&x).unwrap();
        let ours = rope(tracked.as_tensor(), &cos, &sin).unwrap();
        assert!(ours.track_op());
        let fused = candle_nn::rotary_emb::rope(&x, &cos, &sin).unwrap();
        assert!(max_abs_diff(&ours, &fused) < 1e-5);
        // A non-contiguous input (the decoder feeds transposed q/k) gives the same result,
        // on both paths.
        let xt = x
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        assert!(!xt.is_contiguous());
        assert!(max_abs_diff(&rope(&xt, &cos, &sin).unwrap(), &fused) == 0.0);
        let xt_tracked = Var::from_tensor(&xt).unwrap();
        let xt_tracked = xt_tracked
            .as_tensor()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        assert!(!xt_tracked.is_contiguous() && xt_tracked.track_op());
        assert!(max_abs_diff(&rope(&xt_tracked, &cos, &sin).unwrap(), &fused) < 1e-5);
    }

    /// Compares the autograd gradient of `sum(f(x) * probe)` with central finite
    /// differences, in f64 so that the check is tight.
    fn check_grad(x0: &Tensor, f: &dyn Fn(&Tensor) -> Tensor) {
        let x = Var::from_tensor(x0).unwrap();
        let y = f(x.as_tensor());
        let probe = Tensor::randn(0f64, 1.0, y.shape(), &Device::Cpu).unwrap();
        let loss = (y * &probe).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let g = grads
            .get(x.as_tensor())
            .expect("no gradient reached the input");
        let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let base = x0.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let eval = |v: &[f64]| -> f64 {
            let t = Tensor::from_slice(v, x0.shape(), &Device::Cpu).unwrap();
            (f(&t) * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let h = 1e-6;
        for i in 0..base.len() {
            let mut p = base.clone();
            p[i] += h;
            let mut m = base.clone();
            m[i] -= h;
            let numeric = (eval(&p) - eval(&m)) / (2.0 * h);
            assert!(
                (numeric - g[i]).abs() < 1e-6 * (1.0 + numeric.abs()),
                "element {i}: autograd {} vs finite differences {numeric}",
                g[i]
            );
        }
    }

    #[test]
    fn softmax_gradient_is_exact() {
        let x = Tensor::randn(0f64, 2.0, (2, 3, 5), &Device::Cpu).unwrap();
        check_grad(&x, &|t| softmax_last_dim(t).unwrap());
        check_grad(&x, &|t| log_softmax_last_dim(t).unwrap());
    }

    #[test]
    fn rms_norm_gradient_is_exact() {
        let x = Tensor::randn(0f64, 1.0, (2, 3, 6), &Device::Cpu).unwrap();
        let w = Tensor::randn(1f64, 0.3, 6, &Device::Cpu).unwrap();
        check_grad(&x, &|t| rms_norm(t, &w, 1e-5).unwrap());
        // The weight gets its gradient too.
        check_grad(&w, &|t| rms_norm(&x, t, 1e-5).unwrap());
    }

    #[test]
    fn rope_gradient_is_exact() {
        let x = Tensor::randn(0f64, 1.0, (1, 2, 3, 8), &Device::Cpu).unwrap();
        let (cos, sin) = rope_tables(3, 8, DType::F64);
        check_grad(&x, &|t| rope(t, &cos, &sin).unwrap());
    }
    #[test]
    fn weighted_nll_matches_log_softmax_and_its_gradient_is_exact() {
        let x = Tensor::randn(0f64, 2.0, (4, 7), &Device::Cpu).unwrap();
        let targets = [3u32, 0, 6, 2];
        let weights = [0.5f32, 0.0, 0.25, 0.25];
        let ours = weighted_nll(&x, &targets, &weights)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let logp = log_softmax_last_dim(&x).unwrap().to_vec2::<f64>().unwrap();
        let expected: f64 = (0..4)
            .map(|i| -f64::from(weights[i]) * logp[i][targets[i] as usize])
            .sum();
        assert!((ours - expected).abs() < 1e-12, "{ours} vs {expected}");
        check_grad(&x, &|t| {
            weighted_nll(t, &targets, &weights)
                .unwrap()
                .reshape((1, 1))
                .unwrap()
        });
        // f32 agrees with the f64 result, and bad targets are refused.
        let x32 = x.to_dtype(DType::F32).unwrap();
        let l32 = weighted_nll(&x32, &targets, &weights)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((f64::from(l32) - expected).abs() < 1e-5);
        assert!(weighted_nll(&x, &[7, 0, 0, 0], &weights).is_err());
        assert!(weighted_nll(&x, &targets[..3], &weights[..3]).is_err());
    }

    #[test]
    fn soft_nll_is_the_weighted_sum_of_its_targets_and_its_gradient_is_exact() {
        let x = Tensor::randn(0f64, 2.0, (3, 6), &Device::Cpu).unwrap();
        // Row 0: a teacher's three tokens; row 1: nothing; row 2: one token.
        let offsets = [0usize, 3, 3, 4];
        let targets = [1u32, 4, 1, 5];
        let weights = [0.3f32, 0.2, 0.1, 0.4];
        let ours = soft_nll(&x, &offsets, &targets, &weights)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let logp = log_softmax_last_dim(&x).unwrap().to_vec2::<f64>().unwrap();
        let expected = -(0.3 * logp[0][1] + 0.2 * logp[0][4] + 0.1 * logp[0][1]) - 0.4 * logp[2][5];
        assert!((ours - expected).abs() < 1e-6, "{ours} vs {expected}");
        check_grad(&x, &|t| {
            soft_nll(t, &offsets, &targets, &weights)
                .unwrap()
                .reshape((1, 1))
                .unwrap()
        });
        // Malformed offsets are refused.
        assert!(soft_nll(&x, &[0, 3, 4], &targets, &weights).is_err());
        assert!(soft_nll(&x, &[0, 3, 2, 4], &targets, &weights).is_err());
        assert!(soft_nll(&x, &[1, 3, 3, 4], &targets, &weights).is_err());
        assert!(soft_nll(&x, &offsets, &targets, &weights[..3]).is_err());
    }
}
