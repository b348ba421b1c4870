//! AdamW (PyTorch's `torch.optim.AdamW`: decoupled weight decay, bias-corrected moments),
//! warmup + cosine learning rate (transformers' `get_cosine_schedule_with_warmup`) and global
//! gradient-norm clipping. Ours rather than candle's `AdamW` because a resumed run needs the
//! moments saved and restored exactly.

use std::collections::HashMap;

use candle_core::{backprop::GradStore, DType, Result, Tensor, Var};

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// One trainable parameter: its checkpoint name, the variable, and whether weight decay applies
/// (not to biases and norm gains, as transformers' Trainer does).
pub struct Param {
    pub name: String,
    pub var: Var,
    pub decay: bool,
}

pub struct AdamW {
    config: AdamWConfig,
    /// First and second moments by parameter name (f32, on the parameter's device).
    moments: HashMap<String, (Tensor, Tensor)>,
    /// f32 master values of the parameters whose variable holds a lower precision (`--dtype
    /// bf16`): the update runs on these, the variable gets them rounded. Empty in f32.
    masters: HashMap<String, Tensor>,
    pub step: usize,
}

impl AdamW {
    pub fn new(config: AdamWConfig, params: &[Param]) -> Result<Self> {
        let zeros = |p: &Param| Tensor::zeros(p.var.shape(), DType::F32, p.var.device());
        let moments = params.iter().map(|p| Ok((p.name.clone(), (zeros(p)?, zeros(p)?)))).collect::<Result<_>>()?;
        let masters = params
            .iter()
            .filter(|p| p.var.dtype() != DType::F32)
            .map(|p| Ok((p.name.clone(), p.var.as_tensor().detach().to_dtype(DType::F32)?)))
            .collect::<Result<_>>()?;
        Ok(Self { config, moments, masters, step: 0 })
    }

    /// One update with learning rate `lr` from the gradients in `grads` (already averaged over
    /// the accumulated micro-batches and clipped).
    pub fn update(&mut self, params: &[Param], grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let (bias1, bias2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for p in params {
            let Some(g) = grads.get(&p.name) else { continue };
            let Some((m, v)) = self.moments.get_mut(&p.name) else { continue };
            *m = ((&*m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let master = self.masters.get_mut(&p.name);
            let mut theta = match &master {
                Some(master) => (*master).clone(),
                None => p.var.as_tensor().detach(),
            };
            if p.decay && c.weight_decay > 0.0 {
                theta = (theta * (1.0 - lr * c.weight_decay))?;
            }
            let step = ((&*m / bias1)? / ((&*v / bias2)?.sqrt()? + c.eps)?)?;
            let updated = (theta - (step * lr)?)?;
            match master {
                Some(master) => {
                    p.var.set(&updated.to_dtype(p.var.dtype())?)?;
                    *master = updated;
                }
                None => p.var.set(&updated)?,
            }
        }
        Ok(())
    }

    /// Moments as named tensors (`m.NAME`, `v.NAME`; `master.NAME` in bf16) for a checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (name, (m, v)) in &self.moments {
            out.insert(format!("m.{name}"), m.clone());
            out.insert(format!("v.{name}"), v.clone());
        }
        for (name, master) in &self.masters {
            out.insert(format!("master.{name}"), master.clone());
        }
        out
    }

    /// The f32 master values (bf16 runs; empty in f32), by parameter name.
    pub fn masters(&self) -> &HashMap<String, Tensor> {
        &self.masters
    }

    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: usize) -> std::result::Result<(), String> {
        for (name, (m, v)) in self.moments.iter_mut() {
            let get = |key: String, like: &Tensor| -> std::result::Result<Tensor, String> {
                let t = tensors.get(&key).ok_or_else(|| format!("optimizer state has no `{key}`"))?;
                if t.dims() != like.dims() {
                    return Err(format!("optimizer state `{key}` has shape {:?}, the parameter {:?}", t.dims(), like.dims()));
                }
                t.to_device(like.device()).map_err(|e| format!("optimizer state `{key}`: {e}"))
            };
            *m = get(format!("m.{name}"), m)?;
            *v = get(format!("v.{name}"), v)?;
        }
        for (name, master) in self.masters.iter_mut() {
            // A checkpoint of an f32 run has no masters: its parameters are the f32 values.
            let key = if tensors.contains_key(&format!("master.{name}")) { format!("master.{name}") } else { name.clone() };
            if let Some(t) = tensors.get(&key) {
                *master = t.to_dtype(DType::F32).and_then(|t| t.to_device(master.device())).map_err(|e| format!("`{key}`: {e}"))?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Linear warmup over `warmup` steps, then cosine decay to 0 at `total` steps.
pub fn learning_rate(base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    base * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
}

/// Gradients of `params` from one backward pass, by parameter name, in f32 (bf16 gradients are
/// accumulated and clipped in f32). Detached: a gradient still holds the graph it came from, and
/// moments built from it would chain every step's graph.
pub fn named_grads(params: &[Param], grads: &GradStore) -> Result<HashMap<String, Tensor>> {
    params.iter().filter_map(|p| grads.get(p.var.as_tensor()).map(|g| Ok((p.name.clone(), g.detach().to_dtype(DType::F32)?)))).collect()
}

/// Adds `more` into `sum` (gradient accumulation).
pub fn accumulate(sum: &mut HashMap<String, Tensor>, more: HashMap<String, Tensor>) -> Result<()> {
    for (name, g) in more {
        let total = match sum.remove(&name) {
            Some(s) => (s + g)?,
            None => g,
        };
        sum.insert(name, total);
    }
    Ok(())
}

/// Scales all gradients so their global L2 norm is at most `max_norm` (torch's
/// `clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    match grads.values().next().map(|g| g.device().clone()) {
        Some(device) if !device.is_cpu() => {
            // One read back from the GPU instead of one per tensor: the squares summed there.
            let sums = grads.values().map(|g| g.sqr()?.sum_all()?.to_dtype(DType::F64)).collect::<Result<Vec<_>>>()?;
            sq = Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f64>()?;
        }
        _ => {
            for g in grads.values() {
                sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert_eq!(learning_rate(1.0, 0, 10, 110), 0.0);
        assert!((learning_rate(1.0, 5, 10, 110) - 0.5).abs() < 1e-12);
        assert!((learning_rate(1.0, 10, 10, 110) - 1.0).abs() < 1e-12);
        assert!((learning_rate(1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert!(learning_rate(1.0, 110, 10, 110).abs() < 1e-12);
    }

    #[test]
    fn adamw_matches_a_hand_computed_step() -> Result<()> {
        // PyTorch AdamW, one step from p = [1, -2], g = [0.5, 0.25], lr 0.1, wd 0.01:
        // p ← p·(1 − lr·wd); m̂ = g, v̂ = g² ⇒ step = g/(|g| + eps) ≈ sign(g).
        let var = Var::new(&[1f32, -2.0], &Device::Cpu)?;
        let params = vec![Param { name: "w".into(), var: var.clone(), decay: true }];
        let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.01, ..Default::default() }, &params)?;
        let grads = HashMap::from([("w".to_string(), Tensor::new(&[0.5f32, 0.25], &Device::Cpu)?)]);
        opt.update(&params, &grads, 0.1)?;
        let got = var.as_tensor().to_vec1::<f32>()?;
        let want = [1.0 * (1.0 - 0.001) - 0.1, -2.0 * (1.0 - 0.001) - 0.1];
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        Ok(())
    }

    #[test]
    fn clipping_bounds_the_global_norm() -> Result<()> {
        let mut grads =
            HashMap::from([("a".to_string(), Tensor::new(&[3f32], &Device::Cpu)?), ("b".to_string(), Tensor::new(&[4f32], &Device::Cpu)?)]);
        let norm = clip_grad_norm(&mut grads, 1.0)?;
        assert!((norm - 5.0).abs() < 1e-6);
        let a = grads["a"].to_vec1::<f32>()?[0];
        assert!((a - 0.6).abs() < 1e-4, "{a}");
        Ok(())
    }
}
