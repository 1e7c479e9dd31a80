//! AdamW with a warmup + cosine schedule and global-norm gradient clipping.
//!
//! Written here rather than taken from `candle_nn::AdamW` because `--resume` must restore
//! the optimiser exactly: the first and second moments of every parameter are part of a
//! checkpoint, and candle's optimiser keeps them private.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{backprop::GradStore, DType, Result, Tensor, Var};

/// AdamW hyper-parameters.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Learning rate at `step` (0-based) of `total`: linear warmup over `warmup` steps to
/// `peak`, then cosine decay to `peak · min_ratio`.
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64, min_ratio: f64) -> f64 {
    if warmup > 0 && step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let t = ((step - warmup.min(step)) as f64 / span as f64).min(1.0);
    let floor = peak * min_ratio;
    floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

/// AdamW over named parameters.
pub struct AdamW {
    pub cfg: AdamWConfig,
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Steps taken (for bias correction).
    pub t: usize,
}

impl AdamW {
    /// Parameters are sorted by name so the optimiser state has a fixed order.
    pub fn new(mut params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let m = params
            .iter()
            .map(|(_, p)| p.as_tensor().zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(AdamW {
            cfg,
            params,
            m,
            v,
            t: 0,
        })
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Global L2 norm of the gradients of this optimiser's parameters.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sum = 0f64;
        for (_, p) in &self.params {
            if let Some(g) = grads.get(p.as_tensor()) {
                sum += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
            }
        }
        Ok(sum.sqrt())
    }

    /// One update with learning rate `lr`; gradients are scaled so their global norm is
    /// at most `clip` (when given). Returns the norm before clipping.
    pub fn step(&mut self, grads: &GradStore, lr: f64, clip: Option<f64>) -> Result<f64> {
        let norm = self.grad_norm(grads)?;
        let scale = match clip {
            Some(c) if norm > c && norm > 0.0 => c / norm,
            _ => 1.0,
        };
        self.t += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        for (i, (_, p)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(p.as_tensor()) else {
                continue;
            };
            let g = if scale != 1.0 {
                (g * scale)?
            } else {
                g.clone()
            };
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let mhat = (&m / bc1)?;
            let vhat = (&v / bc2)?;
            let update = (mhat / (vhat.sqrt()? + self.cfg.eps)?)?;
            let theta = p.as_tensor();
            let decayed = (theta * (1.0 - lr * self.cfg.weight_decay))?;
            p.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(norm)
    }

    /// The optimiser state as named tensors (`m.NAME`, `v.NAME`, and `step`).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out.insert(
            "step".to_string(),
            Tensor::new(&[self.t as u32], &candle_core::Device::Cpu)?,
        );
        Ok(out)
    }

    /// Restores a state written by [`AdamW::state`]; missing moments are an error (the
    /// checkpoint belongs to another model or training mode).
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        for (i, (name, p)) in self.params.iter().enumerate() {
            let get = |k: String| {
                state
                    .get(&k)
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint lacks {k}")))
            };
            let m = get(format!("m.{name}"))?;
            let v = get(format!("v.{name}"))?;
            if m.dims() != p.dims() || v.dims() != p.dims() {
                return Err(candle_core::Error::Msg(format!(
                    "checkpoint moments of {name} have shape {:?}, the parameter {:?}",
                    m.dims(),
                    p.dims()
                )));
            }
            self.m[i] = m;
            self.v[i] = v;
        }
        if let Some(s) = state.get("step") {
            self.t = s.to_vec1::<u32>()?.first().copied().unwrap_or(0) as usize;
        }
        Ok(())
    }

    /// Saves the state to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        candle_core::safetensors::save(&self.state()?, path)
    }

    /// Loads a state saved by [`AdamW::save`].
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let state = candle_core::safetensors::load(path, &candle_core::Device::Cpu)?;
        self.load_state(&state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays() {
        let lr: Vec<f64> = (0..100).map(|s| lr_at(s, 100, 10, 1.0, 0.1)).collect();
        assert!((lr[0] - 0.1).abs() < 1e-12);
        assert!((lr[9] - 1.0).abs() < 1e-12);
        assert!(lr[10] > lr[50] && lr[50] > lr[99]);
        assert!(lr[99] >= 0.1 - 1e-12);
    }

    #[test]
    fn minimises_a_quadratic_and_clips() -> Result<()> {
        let x = Var::from_tensor(&Tensor::new(&[3f32, -2.0], &Device::Cpu)?)?;
        let mut opt = AdamW::new(
            vec![("x".into(), x.clone())],
            AdamWConfig {
                lr: 0.1,
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        for _ in 0..200 {
            let loss = x.as_tensor().sqr()?.sum_all()?;
            let grads = loss.backward()?;
            let norm = opt.step(&grads, 0.1, Some(1.0))?;
            assert!(norm.is_finite());
        }
        let v = x.as_tensor().to_vec1::<f32>()?;
        assert!(v.iter().all(|a| a.abs() < 0.05), "{v:?}");
        Ok(())
    }

    #[test]
    fn state_round_trips() -> Result<()> {
        let x = Var::from_tensor(&Tensor::new(&[1f32, 2.0], &Device::Cpu)?)?;
        let mut a = AdamW::new(vec![("x".into(), x.clone())], AdamWConfig::default())?;
        let grads = x.as_tensor().sqr()?.sum_all()?.backward()?;
        a.step(&grads, 0.01, None)?;
        let dir = tempfile::tempdir().map_err(candle_core::Error::wrap)?;
        let p = dir.path().join("opt.safetensors");
        a.save(&p)?;
        let y = Var::from_tensor(&Tensor::new(&[1f32, 2.0], &Device::Cpu)?)?;
        let mut b = AdamW::new(vec![("x".into(), y)], AdamWConfig::default())?;
        b.load(&p)?;
        assert_eq!(b.t, 1);
        assert_eq!(
            a.state()?["m.x"].to_vec1::<f32>()?,
            b.state()?["m.x"].to_vec1::<f32>()?
        );
        Ok(())
    }
}
