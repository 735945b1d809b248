//! Reproducible parameter initialisation. candle's CPU random generator cannot be seeded, so models are
//! built through a `VarBuilder` backend that creates each variable of a `VarMap` from its own
//! generator, seeded by the run seed and the variable's name: the same seed gives the same weights,
//! whatever order the modules are built in.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A `VarMap` whose missing variables are initialised deterministically.
struct SeededVarMap {
    vars: VarMap,
    seed: u64,
}

/// A `VarBuilder` that creates the model's variables in `vars`, initialised from `seed`.
pub fn seeded_var_builder(vars: &VarMap, seed: u64, device: &Device) -> VarBuilder<'static> {
    let backend = SeededVarMap {
        vars: vars.clone(),
        seed,
    };
    VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone())
}

/// FNV-1a, to turn a variable name into a seed component that does not depend on build order.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn sample(init: Init, shape: &Shape, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let n = shape.elem_count();
    let uniform = |rng: &mut ChaCha8Rng, lo: f64, up: f64| -> Vec<f32> {
        (0..n).map(|_| rng.random_range(lo..up) as f32).collect()
    };
    // Box–Muller; one normal per pair of uniforms keeps it simple.
    let normal = |rng: &mut ChaCha8Rng, mean: f64, std: f64| -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1: f64 = 1.0 - rng.random::<f64>();
                let u2: f64 = rng.random();
                (mean + std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos())
                    as f32
            })
            .collect()
    };
    match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Uniform { lo, up } if lo < up => uniform(rng, lo, up),
        Init::Uniform { lo, .. } => vec![lo as f32; n],
        Init::Randn { mean, stdev } => normal(rng, mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(rng, -bound, bound)
                }
                NormalOrUniform::Normal => normal(rng, 0.0, std),
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self.vars.data().lock().unwrap();
        if let Some(var) = data.get(name) {
            if var.shape() != &s {
                candle_core::bail!(
                    "variable `{name}` exists with shape {:?}, requested {:?}",
                    var.shape(),
                    s
                );
            }
            return Ok(var.as_tensor().clone());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ name_hash(name));
        let values = sample(h, &s, &mut rng);
        let var = Var::from_tensor(&Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?)?;
        let tensor = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        match self.vars.data().lock().unwrap().get(name) {
            Some(var) => Ok(var.as_tensor().clone()),
            None => candle_core::bail!("no variable `{name}`"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vars.data().lock().unwrap().contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_values_different_seed_different_values() -> Result<()> {
        let build = |seed| -> Result<Vec<f32>> {
            let vars = VarMap::new();
            let vb = seeded_var_builder(&vars, seed, &Device::Cpu);
            let w = vb.get_with_hints(
                (4, 3),
                "w",
                Init::Randn {
                    mean: 0.,
                    stdev: 1.,
                },
            )?;
            w.flatten_all()?.to_vec1()
        };
        assert_eq!(build(1)?, build(1)?);
        assert_ne!(build(1)?, build(2)?);
        Ok(())
    }
}
