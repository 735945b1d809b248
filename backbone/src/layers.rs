//! Building blocks shared by the backbone and the heads: convolution with fused bias and activation,
//! BatchNorm with PyTorch's key names and semantics, and BN folding.
use candle_core::{DType, Module, ModuleT, Result, Tensor};

use crate::ops::batch_norm::{tensor_channel_stats, BatchNormTrain};
use candle_nn::VarBuilder;

pub use crate::ops::{Activation, ConvConfig};

/// A convolution whose forward pass goes through [`crate::ops::conv2d`], where the native kernels live.
#[derive(Debug, Clone)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub config: ConvConfig,
}

impl Conv2d {
    /// Reads `weight` of shape (out, in / groups, kernel, kernel) and, when `bias`, `bias` of shape (out).
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        config: ConvConfig,
        bias: bool,
    ) -> Result<Self> {
        let fan_in = (in_channels / config.groups * kernel * kernel) as f64;
        let bound = 1.0 / fan_in.sqrt();
        let weight = vb.get_with_hints(
            (out_channels, in_channels / config.groups, kernel, kernel),
            "weight",
            candle_nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let bias = if bias {
            Some(vb.get_with_hints(
                out_channels,
                "bias",
                candle_nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            config,
        })
    }

    pub fn kernel_size(&self) -> usize {
        self.weight.dims()[2]
    }

    /// Convolution, bias and activation in one call.
    pub fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        crate::ops::conv2d(x, &self.weight, self.bias.as_ref(), &self.config, act)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Activation::None)
    }
}

/// BatchNorm over NCHW with PyTorch's keys (`weight`, `bias`, `running_mean`, `running_var`); training mode
/// normalises with batch statistics and updates the running ones with PyTorch's momentum convention.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    inner: candle_nn::BatchNorm,
}

impl BatchNorm2d {
    pub fn new(vb: VarBuilder, channels: usize, eps: f64, momentum: f64) -> Result<Self> {
        let config = candle_nn::BatchNormConfig {
            eps,
            remove_mean: true,
            affine: true,
            momentum,
        };
        Ok(Self {
            inner: candle_nn::batch_norm(channels, config, vb)?,
        })
    }

    /// Per-channel (scale, shift) of the eval-mode affine map: y = x·scale + shift.
    pub fn scale_shift(&self) -> Result<(Tensor, Tensor)> {
        let std = (self.inner.running_var().to_dtype(DType::F32)? + self.inner.eps())?.sqrt()?;
        let (gamma, beta) = self
            .inner
            .weight_and_bias()
            .expect("BatchNorm2d is always affine");
        let scale = gamma.div(&std)?;
        let shift = beta.sub(&self.inner.running_mean().mul(&scale)?)?;
        Ok((scale, shift))
    }

    pub fn channels(&self) -> usize {
        self.inner.running_mean().dims()[0]
    }

    /// Parameters and running statistics under PyTorch's key names.
    pub fn named_tensors(&self) -> Vec<(&'static str, Tensor)> {
        let (gamma, beta) = self
            .inner
            .weight_and_bias()
            .expect("BatchNorm2d is always affine");
        vec![
            ("weight", gamma.clone()),
            ("bias", beta.clone()),
            ("running_mean", self.inner.running_mean().clone()),
            ("running_var", self.inner.running_var().clone()),
        ]
    }
}

impl BatchNorm2d {
    pub(crate) fn gamma_beta(&self) -> (&Tensor, &Tensor) {
        self.inner
            .weight_and_bias()
            .expect("BatchNorm2d is always affine")
    }

    pub(crate) fn eps(&self) -> f64 {
        self.inner.eps()
    }

    /// Moves the running statistics towards a batch's (biased) mean and variance over `count`
    /// values per channel, as PyTorch does: momentum-weighted, with the unbiased variance.
    pub(crate) fn update_running_stats(&self, mean: &[f64], var: &[f64], count: f64) -> Result<()> {
        let m = self.inner.momentum();
        let update = |running: &Tensor, batch: &mut dyn Iterator<Item = f64>| -> Result<()> {
            let new: Vec<f32> = running
                .to_vec1::<f32>()?
                .iter()
                .zip(batch)
                .map(|(&o, b)| ((1.0 - m) * o as f64 + m * b) as f32)
                .collect();
            let len = new.len();
            candle_core::Var::from_tensor(running)?.set(&Tensor::from_vec(
                new,
                len,
                running.device(),
            )?)
        };
        update(self.inner.running_mean(), &mut mean.iter().copied())?;
        update(
            self.inner.running_var(),
            &mut var.iter().map(|v| v * count / (count - 1.0)),
        )
    }

    /// Training mode on CPU f32: batch statistics computed natively, one native normalisation op with
    /// its backward pass, running statistics updated as PyTorch does (unbiased variance).
    fn forward_train_native(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let (n, _, h, w) = x.dims4()?;
        let (mean, var) = tensor_channel_stats(&x)?;
        let eps = self.inner.eps();
        let op = BatchNormTrain {
            mean: mean.iter().map(|&v| v as f32).collect(),
            invstd: var
                .iter()
                .map(|&v| (1.0 / (v + eps).sqrt()) as f32)
                .collect(),
        };
        self.update_running_stats(&mean, &var, (n * h * w) as f64)?;
        let (gamma, beta) = self.gamma_beta();
        x.apply_op3(gamma, beta, op)
    }
}

impl ModuleT for BatchNorm2d {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let native = x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() == 4;
        match (train, native) {
            (true, true) => self.forward_train_native(x),
            (true, false) => self.inner.forward_t(x, true),
            (false, _) => {
                let (scale, shift) = self.scale_shift()?;
                let shape = (1, scale.dim(0)?, 1, 1);
                x.broadcast_mul(&scale.reshape(shape)?)?
                    .broadcast_add(&shift.reshape(shape)?)
            }
        }
    }
}

/// Folds an eval-mode BatchNorm into the convolution before it (exact up to float rounding).
pub fn fold_bn(conv: &Conv2d, bn: &BatchNorm2d) -> Result<Conv2d> {
    let (scale, shift) = bn.scale_shift()?;
    let weight = conv
        .weight
        .broadcast_mul(&scale.reshape((scale.dim(0)?, 1, 1, 1))?)?;
    let bias = match &conv.bias {
        Some(b) => (b.mul(&scale)? + shift)?,
        None => shift,
    };
    Ok(Conv2d {
        weight,
        bias: Some(bias),
        config: conv.config,
    })
}

/// Conv without bias → BatchNorm → activation (torchvision's `Conv2dNormActivation`), as the heads use
/// it; after [`ConvBnAct::fuse`] a single conv with bias and the activation fused into it.
#[derive(Debug, Clone)]
pub struct ConvBnAct {
    pub conv: Conv2d,
    pub bn: Option<BatchNorm2d>,
    pub act: Activation,
}

/// BatchNorm hyper-parameters of a [`ConvBnAct`].
#[derive(Debug, Clone, Copy)]
pub struct BnConfig {
    pub eps: f64,
    pub momentum: f64,
}

impl ConvBnAct {
    /// Reads the conv below `conv_vb` and, unless `fused`, the BatchNorm below `bn_vb`; a fused layer
    /// reads a conv bias instead.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        conv_vb: VarBuilder,
        bn_vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        config: ConvConfig,
        bn: BnConfig,
        act: Activation,
        fused: bool,
    ) -> Result<Self> {
        let conv = Conv2d::new(conv_vb, in_channels, out_channels, kernel, config, fused)?;
        let bn = if fused {
            None
        } else {
            Some(BatchNorm2d::new(bn_vb, out_channels, bn.eps, bn.momentum)?)
        };
        Ok(Self { conv, bn, act })
    }

    /// Folds the BatchNorm into the conv (exact in eval mode).
    pub fn fuse(&mut self) -> Result<()> {
        if let Some(bn) = self.bn.take() {
            self.conv = fold_bn(&self.conv, &bn)?;
        }
        Ok(())
    }

    pub fn is_fused(&self) -> bool {
        self.bn.is_none()
    }

    /// The layer with `conv` standing in for its own (same output channels), e.g. a cheaper equivalent.
    pub fn forward_with(&self, conv: &Conv2d, x: &Tensor, train: bool) -> Result<Tensor> {
        match &self.bn {
            None => conv.forward_act(x, self.act),
            Some(bn) => self.act.apply(&bn.forward_t(&conv.forward(x)?, train)?),
        }
    }

    /// Tensors under PyTorch's names: `{conv_key}.weight` (and `.bias` once fused), `{bn_key}.*`.
    pub fn push_named_tensors(
        &self,
        conv_key: &str,
        bn_key: &str,
        out: &mut Vec<(String, Tensor)>,
    ) {
        out.push((format!("{conv_key}.weight"), self.conv.weight.clone()));
        if let Some(bias) = &self.conv.bias {
            out.push((format!("{conv_key}.bias"), bias.clone()));
        }
        if let Some(bn) = &self.bn {
            out.extend(
                bn.named_tensors()
                    .into_iter()
                    .map(|(k, t)| (format!("{bn_key}.{k}"), t)),
            );
        }
    }
}

impl ModuleT for ConvBnAct {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_with(&self.conv, x, train)
    }
}
