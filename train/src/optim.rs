//! Optimizers with PyTorch's update rules and state that can be saved and restored exactly:
//! SGD with momentum (`torch.optim.SGD`) and AdamW (`torch.optim.AdamW`), plus global-norm gradient
//! clipping (`clip_grad_norm_`). candle's own optimizers keep their state private, so `--resume`
//! could not continue them exactly.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// SGD with (heavy-ball) momentum.
    Sgd {
        momentum: f64,
    },
    AdamW {
        beta1: f64,
        beta2: f64,
        eps: f64,
    },
}

impl OptimizerKind {
    pub const SGD: Self = Self::Sgd { momentum: 0.9 };
    pub const ADAMW: Self = Self::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    };

    pub fn name(&self) -> &'static str {
        match self {
            Self::Sgd { .. } => "sgd",
            Self::AdamW { .. } => "adamw",
        }
    }
}

impl FromStr for OptimizerKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "sgd" => Ok(Self::SGD),
            "adamw" => Ok(Self::ADAMW),
            _ => Err(format!("unknown optimizer `{s}` (expected sgd or adamw)")),
        }
    }
}

/// A trainable tensor, whether weight decay applies to it, and its learning rate as a multiple of the
/// schedule's (PyTorch's parameter groups: a pretrained trunk learns slower than fresh heads).
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
    pub decay: bool,
    pub lr_scale: f64,
}

/// Trainable parameters of a `VarMap`, sorted by name: everything but BatchNorm running statistics.
/// Weight decay applies to conv and linear weights only (rank ≥ 2), not to biases or BN affine
/// parameters, the usual practice for BN networks (torchvision's `norm_weight_decay=0`). Parameters whose
/// name starts with `slow_prefix` learn at `slow_lr_scale` times the schedule's rate.
pub fn trainable_params(
    vars: &candle_nn::VarMap,
    slow_prefix: &str,
    slow_lr_scale: f64,
) -> Vec<Param> {
    let data = vars.data().lock().unwrap();
    let mut params: Vec<Param> = data
        .iter()
        .filter(|(name, _)| !name.ends_with("running_mean") && !name.ends_with("running_var"))
        .map(|(name, var)| Param {
            name: name.clone(),
            var: var.clone(),
            decay: var.rank() >= 2,
            lr_scale: if name.starts_with(slow_prefix) {
                slow_lr_scale
            } else {
                1.0
            },
        })
        .collect();
    params.sort_by(|a, b| a.name.cmp(&b.name));
    params
}

/// Global L2 norm of the gradients of `params` (missing gradients count as zero).
pub fn grad_norm(params: &[Param], grads: &GradStore) -> Result<f64> {
    let mut total = 0f64;
    for p in params {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            total += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    Ok(total.sqrt())
}

/// Optimizer state: one or two buffers per parameter and the step count.
pub struct Optimizer {
    pub kind: OptimizerKind,
    params: Vec<Param>,
    /// `momentum_buffer` (SGD) or `exp_avg` (AdamW), by parameter name.
    first: HashMap<String, Tensor>,
    /// `exp_avg_sq` (AdamW).
    second: HashMap<String, Tensor>,
    pub steps: u64,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, params: Vec<Param>) -> Self {
        Self {
            kind,
            params,
            first: HashMap::new(),
            second: HashMap::new(),
            steps: 0,
        }
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// One update with learning rate `lr` and weight decay `weight_decay`; gradients are multiplied by
    /// `grad_scale` first (gradient clipping). Parameters without a gradient are left alone.
    pub fn step(
        &mut self,
        grads: &GradStore,
        lr: f64,
        weight_decay: f64,
        grad_scale: f64,
    ) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        for p in &self.params {
            let Some(grad) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            // Gradients of custom ops can carry autograd history (they are computed from tracked
            // inputs); state kept across steps must not, or it holds every step's graph alive.
            let grad = grad.detach();
            let grad = if grad_scale != 1.0 {
                (grad * grad_scale)?
            } else {
                grad
            };
            let value = p.var.as_tensor().detach();
            let wd = if p.decay { weight_decay } else { 0.0 };
            let lr = lr * p.lr_scale;
            let updated = match self.kind {
                OptimizerKind::Sgd { momentum } => {
                    // torch.optim.SGD: g += wd·p; buf = momentum·buf + g (buf = g at first); p -= lr·buf.
                    let grad = if wd != 0.0 {
                        (grad + (&value * wd)?)?
                    } else {
                        grad
                    };
                    let buf = match self.first.get(&p.name) {
                        Some(buf) => ((buf * momentum)? + grad)?,
                        None => grad,
                    };
                    let next = (&value - (&buf * lr)?)?;
                    self.first.insert(p.name.clone(), buf);
                    next
                }
                OptimizerKind::AdamW { beta1, beta2, eps } => {
                    // torch.optim.AdamW: p *= 1 - lr·wd; then Adam with bias correction.
                    let value = if wd != 0.0 {
                        (&value * (1.0 - lr * wd))?
                    } else {
                        value
                    };
                    let m = match self.first.get(&p.name) {
                        Some(m) => ((m * beta1)? + (&grad * (1.0 - beta1))?)?,
                        None => (&grad * (1.0 - beta1))?,
                    };
                    let v = match self.second.get(&p.name) {
                        Some(v) => ((v * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?,
                        None => (grad.sqr()? * (1.0 - beta2))?,
                    };
                    let bias1 = 1.0 - beta1.powi(t);
                    let bias2 = 1.0 - beta2.powi(t);
                    let denom = ((&v / bias2)?.sqrt()? + eps)?;
                    let next = (&value - ((&m / denom)? * (lr / bias1))?)?;
                    self.first.insert(p.name.clone(), m);
                    self.second.insert(p.name.clone(), v);
                    next
                }
            };
            p.var.set(&updated)?;
        }
        Ok(())
    }

    /// The state as named tensors (`{prefix}{buffer}.{param}`), for a checkpoint; the step count and
    /// hyper-parameters travel in the metadata.
    pub fn state_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let (first, second) = match self.kind {
            OptimizerKind::Sgd { .. } => ("momentum_buffer", "unused"),
            OptimizerKind::AdamW { .. } => ("exp_avg", "exp_avg_sq"),
        };
        let sorted = |m: &HashMap<String, Tensor>| -> BTreeMap<String, Tensor> {
            m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let mut out: Vec<(String, Tensor)> = sorted(&self.first)
            .into_iter()
            .map(|(k, t)| (format!("{prefix}{first}.{k}"), t))
            .collect();
        out.extend(
            sorted(&self.second)
                .into_iter()
                .map(|(k, t)| (format!("{prefix}{second}.{k}"), t)),
        );
        out
    }

    /// Restores buffers written by [`Optimizer::state_tensors`]; every buffer must belong to a
    /// parameter of the same shape.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        prefix: &str,
        steps: u64,
    ) -> std::result::Result<(), String> {
        let shapes: HashMap<&str, &candle_core::Shape> = self
            .params
            .iter()
            .map(|p| (p.name.as_str(), p.var.shape()))
            .collect();
        let (first, second) = match self.kind {
            OptimizerKind::Sgd { .. } => ("momentum_buffer.", None),
            OptimizerKind::AdamW { .. } => ("exp_avg.", Some("exp_avg_sq.")),
        };
        self.first.clear();
        self.second.clear();
        for (key, tensor) in tensors {
            let Some(rest) = key.strip_prefix(prefix) else {
                continue;
            };
            let (target, name) = if let Some(name) = rest.strip_prefix(first) {
                (&mut self.first, name)
            } else if let Some(name) = second.and_then(|s| rest.strip_prefix(s)) {
                (&mut self.second, name)
            } else {
                return Err(format!(
                    "optimizer state `{key}` does not belong to a {} optimizer",
                    self.kind.name()
                ));
            };
            match shapes.get(name) {
                Some(&shape) if shape == tensor.shape() => {
                    target.insert(name.to_string(), tensor.clone());
                }
                Some(&shape) => {
                    return Err(format!(
                        "optimizer state `{key}` has shape {:?}, the parameter {:?}",
                        tensor.dims(),
                        shape.dims()
                    ))
                }
                None => return Err(format!("optimizer state `{key}` names no parameter")),
            }
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn quadratic_steps(kind: OptimizerKind, wd: f64) -> Result<Vec<f32>> {
        let var = Var::new(&[1.0f32, -2.0], &Device::Cpu)?;
        let params = vec![Param {
            name: "w".into(),
            var: var.clone(),
            decay: true,
            lr_scale: 1.0,
        }];
        let mut opt = Optimizer::new(kind, params);
        let mut trace = Vec::new();
        for _ in 0..3 {
            let loss = var.as_tensor().sqr()?.sum_all()?;
            opt.step(&loss.backward()?, 0.1, wd, 1.0)?;
            trace.extend(var.as_tensor().to_vec1::<f32>()?);
        }
        Ok(trace)
    }

    /// `w = [1, -2]`, loss `sum(w²)`, three steps at lr 0.1, against `torch.optim.SGD`'s documented rule.
    #[test]
    fn sgd_momentum_matches_torch() -> Result<()> {
        // g = 2w (+ wd w); buf = 0.9 buf + g; w -= 0.1 buf.
        let trace = quadratic_steps(OptimizerKind::SGD, 0.0)?;
        let mut w = [1.0f64, -2.0];
        let mut buf = [0.0f64; 2];
        let mut want = Vec::new();
        for step in 0..3 {
            for i in 0..2 {
                let g = 2.0 * w[i];
                buf[i] = if step == 0 { g } else { 0.9 * buf[i] + g };
                w[i] -= 0.1 * buf[i];
                want.push(w[i] as f32);
            }
        }
        for (a, b) in trace.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{trace:?} vs {want:?}");
        }
        Ok(())
    }

    #[test]
    fn adamw_first_step_moves_by_lr() -> Result<()> {
        // Adam's first step is lr·sign(g) (up to eps); decoupled decay scales w by 1 - lr·wd first.
        let trace = quadratic_steps(OptimizerKind::ADAMW, 0.5)?;
        let want = [1.0 * (1.0 - 0.05) - 0.1, -2.0 * (1.0 - 0.05) + 0.1];
        assert!((trace[0] - want[0] as f32).abs() < 1e-5, "{trace:?}");
        assert!((trace[1] - want[1] as f32).abs() < 1e-5, "{trace:?}");
        Ok(())
    }
}
