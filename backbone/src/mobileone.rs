//! MobileOne (Vasu et al., "An Improved One millisecond Mobile Backbone", 2022) in timm's layout.
//!
//! Module paths mirror timm's `byobnet.py` keys: `stem.*`, `stages.{s}.{b}.*` (even `b` depthwise 3x3,
//! odd `b` pointwise 1x1), `conv_kxk.{j}.{conv,bn}`, `conv_scale.{conv,bn}`, `identity`, `attn.fc{1,2}`,
//! `reparam_conv` once fused, and `head.fc`.
use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

use crate::layers::{fold_bn, Activation, BatchNorm2d, Conv2d, ConvConfig};
use crate::ops::batch_norm::tensor_channel_stats;
use crate::ops::branch_merge::{BranchLayout, BranchMerge};

/// BatchNorm epsilon of every MobileOne BatchNorm (PyTorch's default).
pub(crate) const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

/// The five published sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    S0,
    S1,
    S2,
    S3,
    S4,
}

impl Variant {
    pub const ALL: [Variant; 5] = [
        Variant::S0,
        Variant::S1,
        Variant::S2,
        Variant::S3,
        Variant::S4,
    ];
}

impl FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().trim_start_matches("mobileone_") {
            "s0" => Ok(Variant::S0),
            "s1" => Ok(Variant::S1),
            "s2" => Ok(Variant::S2),
            "s3" => Ok(Variant::S3),
            "s4" => Ok(Variant::S4),
            _ => Err(format!(
                "unknown MobileOne variant `{s}` (expected s0, s1, s2, s3 or s4)"
            )),
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Variant::S0 => "s0",
            Variant::S1 => "s1",
            Variant::S2 => "s2",
            Variant::S3 => "s3",
            Variant::S4 => "s4",
        };
        f.write_str(name)
    }
}

/// Which parts of a model are stored in their deployed form: a reparameterised trunk
/// (`reparam_conv`), and heads whose BatchNorms are folded into conv biases. Decided per module, so a
/// checkpoint whose trunk was fine-tuned fused but whose heads still carry BatchNorm (what fine-tuning
/// a reparameterised timm trunk under torchvision's heads produces) loads as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Form {
    /// The trunk is reparameterised: one conv with bias per block.
    pub trunk_fused: bool,
    /// The heads' (and extra blocks') BatchNorms are folded into their convs.
    pub heads_fused: bool,
}

impl Form {
    /// Train-time multi-branch trunk, heads with BatchNorm.
    pub const TRAIN: Self = Self {
        trunk_fused: false,
        heads_fused: false,
    };
    /// Everything reparameterised and folded (what `fuse` produces).
    pub const FUSED: Self = Self {
        trunk_fused: true,
        heads_fused: true,
    };
    /// Reparameterised trunk (e.g. an ImageNet checkpoint fine-tuned as it is), heads with BatchNorm.
    pub const FUSED_TRUNK: Self = Self {
        trunk_fused: true,
        heads_fused: false,
    };

    pub fn is_fused(self) -> bool {
        self.trunk_fused && self.heads_fused
    }
}

/// Architecture hyper-parameters; the presets are the published S0–S4, other values build test models.
#[derive(Debug, Clone, PartialEq)]
pub struct MobileOneConfig {
    pub stem_channels: usize,
    pub stage_channels: [usize; 4],
    /// Number of (depthwise, pointwise) block pairs per stage.
    pub stage_blocks: [usize; 4],
    /// k, the number of over-parameterised 3x3 (or 1x1) conv branches per block.
    pub num_conv_branches: usize,
    /// How many of each stage's last block pairs carry squeeze-excitation.
    pub se_blocks: [usize; 4],
    /// ImageNet classifier width; `None` builds the trunk only.
    pub num_classes: Option<usize>,
}

impl MobileOneConfig {
    /// timm's `_mobileone_bcfg`: widths (64, 128, 256, 512) scaled per stage, stem = min(64, first width).
    fn scaled(width_factors: [f64; 4], num_conv_branches: usize, se_blocks: [usize; 4]) -> Self {
        let base = [64.0, 128.0, 256.0, 512.0];
        let stage_channels = [0, 1, 2, 3].map(|i| (base[i] * width_factors[i]) as usize);
        Self {
            stem_channels: stage_channels[0].min(64),
            stage_channels,
            stage_blocks: [2, 8, 10, 1],
            num_conv_branches,
            se_blocks,
            num_classes: Some(1000),
        }
    }

    pub fn s0() -> Self {
        Self::scaled([0.75, 1.0, 1.0, 2.0], 4, [0; 4])
    }
    pub fn s1() -> Self {
        Self::scaled([1.5, 1.5, 2.0, 2.5], 1, [0; 4])
    }
    pub fn s2() -> Self {
        Self::scaled([1.5, 2.0, 2.5, 4.0], 1, [0; 4])
    }
    pub fn s3() -> Self {
        Self::scaled([2.0, 2.5, 3.0, 4.0], 1, [0; 4])
    }
    pub fn s4() -> Self {
        Self::scaled([3.0, 3.5, 3.5, 4.0], 1, [0, 0, 5, 1])
    }

    pub fn from_variant(variant: Variant) -> Self {
        match variant {
            Variant::S0 => Self::s0(),
            Variant::S1 => Self::s1(),
            Variant::S2 => Self::s2(),
            Variant::S3 => Self::s3(),
            Variant::S4 => Self::s4(),
        }
    }

    pub fn with_num_classes(mut self, num_classes: Option<usize>) -> Self {
        self.num_classes = num_classes;
        self
    }

    /// Channels of the features at strides 2, 4, 8, 16, 32.
    pub fn feature_channels(&self) -> [usize; 5] {
        let c = self.stage_channels;
        [self.stem_channels, c[0], c[1], c[2], c[3]]
    }
}

/// Stride and dilation of each stage's layers for a given output stride, following torchvision's
/// `replace_stride_with_dilation`: a dilated stage's first layer loses its stride and keeps the previous
/// dilation, its later 3x3 layers use the new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StageGeometry {
    first_stride: usize,
    first_dilation: usize,
    dilation: usize,
}

fn stage_geometry(output_stride: usize) -> Result<[StageGeometry; 4]> {
    let dilated_stages = match output_stride {
        32 => 0,
        16 => 1,
        8 => 2,
        other => candle_core::bail!("output stride must be 32, 16 or 8, got {other}"),
    };
    let mut dilation = 1;
    Ok([0, 1, 2, 3].map(|s| {
        let previous = dilation;
        if s >= 4 - dilated_stages {
            dilation *= 2;
            StageGeometry {
                first_stride: 1,
                first_dilation: previous,
                dilation,
            }
        } else {
            StageGeometry {
                first_stride: 2,
                first_dilation: 1,
                dilation: 1,
            }
        }
    }))
}

/// A conv without bias followed by BatchNorm: one over-parameterised branch.
#[derive(Debug, Clone)]
pub struct ConvBn {
    pub conv: Conv2d,
    pub bn: BatchNorm2d,
}

impl ConvBn {
    fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        kernel: usize,
        config: ConvConfig,
    ) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(vb.pp("conv"), cin, cout, kernel, config, false)?,
            bn: BatchNorm2d::new(vb.pp("bn"), cout, BN_EPS, BN_MOMENTUM)?,
        })
    }
}

impl ModuleT for ConvBn {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            self.bn.forward_t(&self.conv.forward(x)?, true)
        } else {
            // Eval-mode BN is affine: folding it into the (small) kernel saves two passes over the output.
            fold_bn(&self.conv, &self.bn)?.forward(x)
        }
    }
}

/// Squeeze-excitation as timm's `SEModule`: mean → 1x1 (bias) → ReLU → 1x1 (bias) → sigmoid → scale.
#[derive(Debug, Clone)]
pub struct SqueezeExcite {
    pub fc1: Conv2d,
    pub fc2: Conv2d,
}

impl SqueezeExcite {
    fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        let reduced = se_reduced_channels(channels);
        Ok(Self {
            fc1: Conv2d::new(
                vb.pp("fc1"),
                channels,
                reduced,
                1,
                ConvConfig::default(),
                true,
            )?,
            fc2: Conv2d::new(
                vb.pp("fc2"),
                reduced,
                channels,
                1,
                ConvConfig::default(),
                true,
            )?,
        })
    }
}

/// timm's `make_divisible(channels / 16, 8, round_limit=0)`.
fn se_reduced_channels(channels: usize) -> usize {
    let v = channels as f64 / 16.0;
    ((v + 4.0) as usize / 8 * 8).max(8)
}

impl SqueezeExcite {
    /// `act(x · gate(x))` for x (N, C, H, W): the block's activation fused into the scaling pass.
    pub fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        use crate::ops::blocked::Excite;
        let gate = self.gate(&crate::ops::excite::plane_mean(x)?)?;
        crate::ops::excite::scale_planes(x, &gate, act)
    }
}

impl crate::ops::blocked::Excite for SqueezeExcite {
    fn gate(&self, means: &Tensor) -> Result<Tensor> {
        let s = self.fc1.forward_act(means, Activation::Relu)?;
        candle_nn::ops::sigmoid(&self.fc2.forward(&s)?)
    }
}

impl Module for SqueezeExcite {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Activation::None)
    }
}

/// Shape of one MobileOne block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub dilation: usize,
    /// Depthwise (groups = channels) when true, dense otherwise.
    pub depthwise: bool,
    pub num_conv_branches: usize,
    pub se: bool,
    /// Whether the BN identity branch exists: decided by the nominal (undilated) stride, so checkpoints
    /// trained at output stride 32 load into dilated models.
    pub identity: bool,
}

impl BlockSpec {
    fn conv_config(&self) -> ConvConfig {
        ConvConfig {
            stride: self.stride,
            padding: self.dilation * (self.kernel - 1) / 2,
            dilation: self.dilation,
            groups: if self.depthwise { self.in_channels } else { 1 },
        }
    }
}

/// One MobileOne block: k conv+BN branches, a 1x1 scale branch (3x3 blocks), a BN identity
/// (same shape, stride 1), optional SE, ReLU; or, once fused, a single `reparam_conv`.
#[derive(Debug, Clone)]
pub struct MobileOneBlock {
    pub spec: BlockSpec,
    pub conv_kxk: Vec<ConvBn>,
    pub conv_scale: Option<ConvBn>,
    pub identity: Option<BatchNorm2d>,
    pub reparam_conv: Option<Conv2d>,
    pub attn: Option<SqueezeExcite>,
    /// `reparam_conv`'s weights packed for the blocked 1x1 kernel, once (1x1 blocks, AVX2).
    packed: crate::ops::blocked::PackedPointwise,
}

impl MobileOneBlock {
    pub fn new(spec: BlockSpec, vb: VarBuilder) -> Result<Self> {
        let config = spec.conv_config();
        let conv_kxk = (0..spec.num_conv_branches)
            .map(|j| {
                ConvBn::new(
                    vb.pp("conv_kxk").pp(j),
                    spec.in_channels,
                    spec.out_channels,
                    spec.kernel,
                    config,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let conv_scale = if spec.kernel > 1 {
            let config = ConvConfig {
                padding: 0,
                dilation: 1,
                ..config
            };
            Some(ConvBn::new(
                vb.pp("conv_scale"),
                spec.in_channels,
                spec.out_channels,
                1,
                config,
            )?)
        } else {
            None
        };
        let identity = if spec.identity {
            Some(BatchNorm2d::new(
                vb.pp("identity"),
                spec.out_channels,
                BN_EPS,
                BN_MOMENTUM,
            )?)
        } else {
            None
        };
        Ok(Self {
            spec,
            conv_kxk,
            conv_scale,
            identity,
            reparam_conv: None,
            attn: Self::attn(spec, &vb)?,
            packed: Default::default(),
        })
    }

    pub fn new_fused(spec: BlockSpec, vb: VarBuilder) -> Result<Self> {
        let conv = Conv2d::new(
            vb.pp("reparam_conv"),
            spec.in_channels,
            spec.out_channels,
            spec.kernel,
            spec.conv_config(),
            true,
        )?;
        Ok(Self {
            spec,
            conv_kxk: vec![],
            conv_scale: None,
            identity: None,
            reparam_conv: Some(conv),
            attn: Self::attn(spec, &vb)?,
            packed: Default::default(),
        })
    }

    fn attn(spec: BlockSpec, vb: &VarBuilder) -> Result<Option<SqueezeExcite>> {
        spec.se
            .then(|| SqueezeExcite::new(vb.pp("attn"), spec.out_channels))
            .transpose()
    }

    /// Sum of every branch, folded into one kernel and bias (Apple's `_get_kernel_bias`). Eval-mode exact.
    pub fn fused_kernel_bias(&self) -> Result<(Tensor, Tensor)> {
        let mut kernel: Option<Tensor> = None;
        let mut bias: Option<Tensor> = None;
        let mut add = |k: Tensor, b: Tensor| -> Result<()> {
            kernel = Some(match kernel.take() {
                Some(acc) => (acc + k)?,
                None => k,
            });
            bias = Some(match bias.take() {
                Some(acc) => (acc + b)?,
                None => b,
            });
            Ok(())
        };
        let pad = self.spec.kernel / 2;
        if let Some(scale) = &self.conv_scale {
            let folded = fold_bn(&scale.conv, &scale.bn)?;
            let k = folded
                .weight
                .pad_with_zeros(2, pad, pad)?
                .pad_with_zeros(3, pad, pad)?;
            add(k, folded.bias.expect("fold_bn sets a bias"))?;
        }
        if let Some(bn) = &self.identity {
            let id = Conv2d {
                weight: self.identity_kernel(bn.channels())?,
                bias: None,
                config: self.spec.conv_config(),
            };
            let folded = fold_bn(&id, bn)?;
            add(folded.weight, folded.bias.expect("fold_bn sets a bias"))?;
        }
        for branch in &self.conv_kxk {
            let folded = fold_bn(&branch.conv, &branch.bn)?;
            add(folded.weight, folded.bias.expect("fold_bn sets a bias"))?;
        }
        match (kernel, bias) {
            (Some(k), Some(b)) => Ok((k, b)),
            _ => candle_core::bail!("block has no branch to fuse"),
        }
    }

    /// Identity as a convolution: 1 at [i, i mod (in / groups), centre].
    fn identity_kernel(&self, channels: usize) -> Result<Tensor> {
        let k = self.spec.kernel;
        let in_per_group = if self.spec.depthwise {
            1
        } else {
            self.spec.in_channels
        };
        let mut data = vec![0f32; channels * in_per_group * k * k];
        for i in 0..channels {
            data[((i * in_per_group + i % in_per_group) * k + k / 2) * k + k / 2] = 1.0;
        }
        let device = self
            .conv_kxk
            .first()
            .map(|b| b.conv.weight.device().clone())
            .unwrap_or(Device::Cpu);
        Tensor::from_vec(data, (channels, in_per_group, k, k), &device)
    }

    /// Replaces the branches by one conv with bias. A no-op on a fused block.
    pub fn reparameterize(&mut self) -> Result<()> {
        if self.reparam_conv.is_some() {
            return Ok(());
        }
        let (weight, bias) = self.fused_kernel_bias()?;
        self.reparam_conv = Some(Conv2d {
            weight,
            bias: Some(bias),
            config: self.spec.conv_config(),
        });
        self.conv_kxk.clear();
        self.conv_scale = None;
        self.identity = None;
        Ok(())
    }

    pub fn is_fused(&self) -> bool {
        self.reparam_conv.is_some()
    }

    /// Training-mode forward on the native CPU ops: every conv branch (the scale branch's 1x1
    /// kernel zero-padded to KxK) in one convolution, then one op for all BatchNorms, the sum and
    /// the ReLU. Same values and gradients as the branch-by-branch form, a fraction of the passes.
    fn forward_train_merged(&self, x: &Tensor) -> Result<Tensor> {
        let spec = &self.spec;
        let pad = spec.kernel / 2;
        let mut weights = Vec::new();
        let mut norms = Vec::new();
        for branch in &self.conv_kxk {
            weights.push(branch.conv.weight.clone());
            norms.push(&branch.bn);
        }
        if let Some(scale) = &self.conv_scale {
            weights.push(
                scale
                    .conv
                    .weight
                    .pad_with_zeros(2, pad, pad)?
                    .pad_with_zeros(3, pad, pad)?,
            );
            norms.push(&scale.bn);
        }
        let branches = weights.len();
        let channels = spec.out_channels;
        let (weight, layout) = if spec.depthwise {
            let k = spec.kernel;
            let stacked = Tensor::stack(&weights, 1)?.reshape((channels * branches, 1, k, k))?;
            (stacked, BranchLayout::ChannelMajor)
        } else {
            (Tensor::cat(&weights, 0)?, BranchLayout::BranchMajor)
        };
        let z = crate::ops::conv2d(x, &weight, None, &spec.conv_config(), Activation::None)?;

        let (n, _, h, w) = z.dims4()?;
        let count = (n * h * w) as f64;
        let (z_mean, z_var) = tensor_channel_stats(&z)?;
        let z_channel = |b: usize, c: usize| match layout {
            BranchLayout::BranchMajor => b * channels + c,
            BranchLayout::ChannelMajor => c * branches + b,
        };
        let (mut mean, mut invstd) = (Vec::new(), Vec::new());
        // Each BN moves its running statistics and hands the op its batch mean and 1/std.
        let mut record = |bn: &BatchNorm2d, batch_mean: &[f64], batch_var: &[f64]| -> Result<()> {
            bn.update_running_stats(batch_mean, batch_var, count)?;
            mean.extend(batch_mean.iter().map(|&m| m as f32));
            invstd.extend(
                batch_var
                    .iter()
                    .map(|&v| (1.0 / (v + bn.eps()).sqrt()) as f32),
            );
            Ok(())
        };
        for (b, bn) in norms.iter().enumerate() {
            let batch_mean: Vec<f64> = (0..channels).map(|c| z_mean[z_channel(b, c)]).collect();
            let batch_var: Vec<f64> = (0..channels).map(|c| z_var[z_channel(b, c)]).collect();
            record(bn, &batch_mean, &batch_var)?;
        }
        let x = x.contiguous()?;
        if let Some(bn) = &self.identity {
            let (batch_mean, batch_var) = tensor_channel_stats(&x)?;
            record(bn, &batch_mean, &batch_var)?;
            norms.push(bn);
        }
        let (gammas, betas): (Vec<Tensor>, Vec<Tensor>) = norms
            .iter()
            .map(|bn| {
                let (g, b) = bn.gamma_beta();
                (g.clone(), b.clone())
            })
            .unzip();
        let params = Tensor::cat(&[Tensor::cat(&gammas, 0)?, Tensor::cat(&betas, 0)?], 0)?;
        let op = BranchMerge {
            branches,
            channels,
            layout,
            identity: self.identity.is_some(),
            act: if self.attn.is_some() {
                Activation::None
            } else {
                Activation::Relu
            },
            mean,
            invstd,
        };
        let merged = if self.identity.is_some() {
            z.apply_op3(&x, &params, op)?
        } else {
            z.apply_op2(&params, op)?
        };
        match &self.attn {
            Some(se) => se.forward_act(&merged, Activation::Relu),
            None => Ok(merged),
        }
    }
}

/// A reparameterised depthwise block and the reparameterised block after it, neither with
/// squeeze-excitation, as [`ops::panels::depthwise_then_pointwise`]'s two (weight, bias, config)
/// triples (which runs any other pair as its two convolutions).
///
/// [`ops::panels::depthwise_then_pointwise`]: crate::ops::panels::depthwise_then_pointwise
#[allow(clippy::type_complexity)]
fn fused_pair<'a>(
    first: &'a MobileOneBlock,
    second: &'a MobileOneBlock,
) -> Option<(
    (&'a Tensor, &'a Tensor, &'a ConvConfig),
    (&'a Tensor, &'a Tensor, &'a ConvConfig),
)> {
    if first.attn.is_some() || second.attn.is_some() {
        return None;
    }
    let (a, b) = (first.reparam_conv.as_ref()?, second.reparam_conv.as_ref()?);
    (a.config.groups > 1 && b.config.groups == 1).then_some((
        (&a.weight, a.bias.as_ref()?, &a.config),
        (&b.weight, b.bias.as_ref()?, &b.config),
    ))
}

/// The leading reparameterised blocks of a stage, up to the first that cannot (a dilated or other
/// geometry), as the layers of a blocked run ([`crate::ops::blocked`]): 3x3 depthwise (padding 1,
/// no dilation) and 1x1 (stride 1) convolutions, each with its bias and squeeze-excitation.
fn blocked_layers(blocks: &[MobileOneBlock]) -> Vec<crate::ops::blocked::BlockedLayer<'_>> {
    use crate::ops::blocked::BlockedLayer;
    blocks
        .iter()
        .map_while(|block| {
            let conv = block.reparam_conv.as_ref()?;
            let excite = block
                .attn
                .as_ref()
                .map(|se| se as &dyn crate::ops::blocked::Excite);
            let (weight, bias, cfg) = (&conv.weight, conv.bias.as_ref()?, &conv.config);
            let kernel = weight.dims().get(2).copied()?;
            match (cfg.groups > 1, kernel) {
                (true, 3) if cfg.padding == 1 && cfg.dilation == 1 => {
                    Some(BlockedLayer::Depthwise {
                        weight,
                        bias,
                        stride: cfg.stride,
                        excite,
                    })
                }
                (false, 1) if cfg.stride == 1 && cfg.padding == 0 => {
                    Some(BlockedLayer::Pointwise {
                        weight,
                        bias,
                        packed: &block.packed,
                        excite,
                    })
                }
                _ => None,
            }
        })
        .collect()
}

/// The channels after and the layers of `blocks`' part of a blocked run entered with `c` channels:
/// their [`blocked_layers`], two at least to start a run, one at least to join a run already
/// `pending`; `None` where they cannot.
fn run_layers(
    c: usize,
    blocks: &[MobileOneBlock],
    pending: bool,
) -> Option<(usize, Vec<crate::ops::blocked::BlockedLayer<'_>>)> {
    let layers = blocked_layers(blocks);
    let least = if pending { 1 } else { 2 };
    (layers.len() >= least)
        .then(|| Some((crate::ops::blocked::channels_after(c, &layers)?, layers)))
        .flatten()
}

impl ModuleT for MobileOneBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if let Some(conv) = &self.reparam_conv {
            return match &self.attn {
                None => conv.forward_act(x, Activation::Relu),
                Some(se) => se.forward_act(&conv.forward(x)?, Activation::Relu),
            };
        }
        let native = x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() == 4;
        if train && native {
            return self.forward_train_merged(x);
        }
        let mut out = match &self.conv_scale {
            Some(scale) => Some(scale.forward_t(x, train)?),
            None => None,
        };
        for branch in &self.conv_kxk {
            let y = branch.forward_t(x, train)?;
            out = Some(match out {
                Some(acc) => (acc + y)?,
                None => y,
            });
        }
        let mut out = out.expect("a MobileOne block has at least one conv branch");
        if let Some(bn) = &self.identity {
            out = (out + bn.forward_t(x, train)?)?;
        }
        match &self.attn {
            Some(se) => se.forward_act(&out, Activation::Relu),
            None => out.relu(),
        }
    }
}

/// timm's `ClassifierHead` for MobileOne: global average pool and `fc`.
#[derive(Debug, Clone)]
pub struct ClassifierHead {
    pub fc: candle_nn::Linear,
}

impl Module for ClassifierHead {
    /// Features (N, C, H, W) → logits (N, classes). The pooled batch is multiplied as one image of
    /// N positions by the native 1x1 kernel, which reads the fc weight once for the whole batch
    /// (candle's `Linear` took 2.2 ms at batch 8 for S0's 1024 → 1000, the kernel 0.1 ms).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let pooled = crate::ops::excite::plane_mean(x)?;
        let (n, c, _, _) = pooled.dims4()?;
        let columns = pooled.reshape((n, c))?.t()?.reshape((1, c, 1, n))?;
        let weight = self.fc.weight();
        let classes = weight.dim(0)?;
        let logits = crate::ops::conv2d(
            &columns,
            &weight.reshape((classes, c, 1, 1))?,
            self.fc.bias(),
            &ConvConfig::default(),
            Activation::None,
        )?;
        logits.reshape((classes, n))?.t()?.contiguous()
    }
}

/// The network: stem (stride 2), four stages (strides 4–32 unless dilated), optional classifier.
#[derive(Debug, Clone)]
pub struct MobileOne {
    pub config: MobileOneConfig,
    pub output_stride: usize,
    pub stem: MobileOneBlock,
    pub stages: Vec<Vec<MobileOneBlock>>,
    pub head: Option<ClassifierHead>,
}

impl MobileOne {
    /// Layer shapes for `config` at `output_stride`, in `stem`, `stages.{s}.{b}` order.
    pub fn block_specs(
        config: &MobileOneConfig,
        output_stride: usize,
    ) -> Result<(BlockSpec, Vec<Vec<BlockSpec>>)> {
        let stem = BlockSpec {
            in_channels: 3,
            out_channels: config.stem_channels,
            kernel: 3,
            stride: 2,
            dilation: 1,
            depthwise: false,
            num_conv_branches: 1,
            se: false,
            identity: false,
        };
        let geometry = stage_geometry(output_stride)?;
        let mut channels = config.stem_channels;
        let mut stages = Vec::with_capacity(4);
        for (s, g) in geometry.into_iter().enumerate() {
            let out = config.stage_channels[s];
            let n = config.stage_blocks[s];
            let mut blocks = Vec::with_capacity(2 * n);
            for i in 0..n {
                let first = i == 0;
                let se = i + config.se_blocks[s] >= n;
                blocks.push(BlockSpec {
                    in_channels: channels,
                    out_channels: channels,
                    kernel: 3,
                    stride: if first { g.first_stride } else { 1 },
                    dilation: if first { g.first_dilation } else { g.dilation },
                    depthwise: true,
                    num_conv_branches: config.num_conv_branches,
                    se,
                    identity: !first,
                });
                blocks.push(BlockSpec {
                    in_channels: channels,
                    out_channels: out,
                    kernel: 1,
                    stride: 1,
                    dilation: 1,
                    depthwise: false,
                    num_conv_branches: config.num_conv_branches,
                    se,
                    identity: channels == out,
                });
                channels = out;
            }
            stages.push(blocks);
        }
        Ok((stem, stages))
    }

    fn build(
        config: &MobileOneConfig,
        output_stride: usize,
        vb: VarBuilder,
        block: fn(BlockSpec, VarBuilder) -> Result<MobileOneBlock>,
    ) -> Result<Self> {
        let (stem_spec, stage_specs) = Self::block_specs(config, output_stride)?;
        let stem = block(stem_spec, vb.pp("stem"))?;
        let stages = stage_specs
            .into_iter()
            .enumerate()
            .map(|(s, specs)| {
                let vb = vb.pp("stages").pp(s);
                specs
                    .into_iter()
                    .enumerate()
                    .map(|(b, spec)| block(spec, vb.pp(b)))
                    .collect()
            })
            .collect::<Result<Vec<_>>>()?;
        let head = match config.num_classes {
            Some(n) => Some(ClassifierHead {
                fc: candle_nn::linear(config.stage_channels[3], n, vb.pp("head").pp("fc"))?,
            }),
            None => None,
        };
        Ok(Self {
            config: config.clone(),
            output_stride,
            stem,
            stages,
            head,
        })
    }

    /// Train-time multi-branch form, reading timm's keys below `vb`.
    pub fn new(config: &MobileOneConfig, output_stride: usize, vb: VarBuilder) -> Result<Self> {
        Self::build(config, output_stride, vb, MobileOneBlock::new)
    }

    /// Reparameterised form, reading `reparam_conv.{weight,bias}` keys below `vb`.
    pub fn new_fused(
        config: &MobileOneConfig,
        output_stride: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Self::build(config, output_stride, vb, MobileOneBlock::new_fused)
    }

    pub fn feature_channels(&self) -> [usize; 5] {
        self.config.feature_channels()
    }

    /// Features at strides 2, 4, 8, 16, 32 (timm `features_only` order; dilated stages keep the resolution
    /// of the output stride). `train` selects BatchNorm's batch statistics.
    pub fn forward_features(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        self.forward_features_at(x, train, &[0, 1, 2, 3, 4])
    }

    /// The features of [`forward_features`](Self::forward_features) at the levels `out_indices`
    /// (ascending, 0–4; timm's `out_indices`), computing no stage past the last one asked for.
    /// Without level 0, an inference pass (`!train`) of the reparameterised network runs the stem
    /// and the first (stride-2 depthwise) block as one pass
    /// ([`ops::stem::dense_then_depthwise`](crate::ops::stem::dense_then_depthwise)), so the
    /// stem's output, the largest activation, never reaches memory. An inference pass over a
    /// batch of at least as many images as threads, on the CPU, deals the images out to the
    /// threads, each image through the whole trunk on one thread.
    ///
    /// # Errors
    /// When `out_indices` is not ascending within 0–4, or a layer fails.
    pub fn forward_features_at(
        &self,
        x: &Tensor,
        train: bool,
        out_indices: &[usize],
    ) -> Result<Vec<Tensor>> {
        if out_indices.windows(2).any(|p| p[0] >= p[1]) || out_indices.iter().any(|&i| i > 4) {
            candle_core::bail!("out_indices {out_indices:?}: expected ascending levels within 0-4");
        }
        if out_indices.is_empty() {
            return Ok(Vec::new());
        }
        let threads = crate::ops::current_threads();
        if !train && threads > 1 && x.dim(0)? >= threads && x.device().is_cpu() {
            return self.forward_image_by_image(x, out_indices, threads);
        }
        self.forward_levels(x, train, out_indices)
    }

    /// An inference pass image by image, the images dealt out to the `threads` threads of the
    /// kernels' pool (a thread that runs out of images takes another's), each GEMM of an image in
    /// one tile ([`ops::one_tile_per_image`](crate::ops::one_tile_per_image)), as many images as
    /// fill every thread equally; the rest (fewer than `threads`) after them as one batch, each
    /// layer split between the threads (else, with 3 images on 2 threads, one thread would take
    /// two images and the other one). The features of each level concatenated back into (N, C,
    /// H, W). A layer over the whole batch had every thread work on every layer, its activations
    /// (4 MB at 640 × 14x14, batch 8) passing between the cores through L3 from one layer to the
    /// next; one image's stay in its core's L2. Two threads, batch 8, median of three alternating
    /// rounds' medians: the batch as one against one run of four images per thread, AVX2 S2 111.0
    /// -> 106.8 ms, S3 161.0 -> 158.5, AVX-512 S3 161.4 -> 153.5, S4 250.7 -> 240.7 (S0 within
    /// noise); that against image by image, AVX2 S1 71.0 -> 68.0, S3 154.2 -> 150.0, AVX-512
    /// level (S1 68.2 and 68.0, S3 148.1 and 150.4).
    fn forward_image_by_image(
        &self,
        x: &Tensor,
        out_indices: &[usize],
        threads: usize,
    ) -> Result<Vec<Tensor>> {
        use rayon::prelude::*;
        let images = x.dim(0)?;
        let dealt = images / threads * threads;
        let mut runs = (0..dealt)
            .into_par_iter()
            .map(|i| {
                crate::ops::one_tile_per_image(|| {
                    self.forward_levels(&x.narrow(0, i, 1)?, false, out_indices)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if dealt < images {
            let rest = x.narrow(0, dealt, images - dealt)?;
            runs.push(self.forward_levels(&rest, false, out_indices)?);
        }
        (0..out_indices.len())
            .map(|level| Tensor::cat(&runs.iter().map(|run| &run[level]).collect::<Vec<_>>(), 0))
            .collect()
    }

    /// [`forward_features_at`](Self::forward_features_at) on one batch, `out_indices` checked.
    fn forward_levels(
        &self,
        x: &Tensor,
        train: bool,
        out_indices: &[usize],
    ) -> Result<Vec<Tensor>> {
        let Some(&last) = out_indices.last() else {
            return Ok(Vec::new());
        };
        let mut features = Vec::with_capacity(out_indices.len());
        let fused = if !train && out_indices[0] > 0 {
            self.fused_entry()
        } else {
            None
        };
        use crate::ops::blocked;
        use crate::ops::stem::{dense_then_depthwise_blocked, Output};
        // The stem's output, blocked, when the first stage's blocks start a blocked run: the first
        // run's input instead of `x`, which stays the image until that run ends.
        let mut start = None;
        let (mut x, skip) = match fused {
            Some((stem, first)) => {
                let stage = self.stages.first().map_or(&[][..], |stage| &stage[1..]);
                let starts_run =
                    blocked::enabled(x) && run_layers(stem.0.dim(0)?, stage, false).is_some();
                let y = match starts_run {
                    true => dense_then_depthwise_blocked(x, stem, first, Activation::Relu)?,
                    false => Output::Planes(crate::ops::stem::dense_then_depthwise(
                        x,
                        stem,
                        first,
                        Activation::Relu,
                    )?),
                };
                match y {
                    Output::Planes(y) => (y, 1),
                    Output::Blocked(y) => {
                        start = Some(y);
                        (x.clone(), 1)
                    }
                }
            }
            None => {
                let x = self.stem.forward_t(x, train)?;
                if out_indices[0] == 0 {
                    features.push(x.clone());
                }
                (x, 0)
            }
        };
        // The channels entering a pending blocked run (None once a stage could not join one).
        let blocked_entry = |x: &Tensor| {
            (!train && blocked::enabled(x))
                .then(|| x.dim(1))
                .transpose()
        };
        let mut blocked_channels = match &start {
            Some(y) => Some(y.channels()),
            None => blocked_entry(&x)?,
        };
        let mut pending = Vec::new();
        let device = x.device().clone();
        // Ends the pending run: its input is the blocked stem output if there is one, else `x`.
        let mut flush = |x: &Tensor, pending: &mut Vec<_>| -> Result<Tensor> {
            let input = match start.take() {
                Some(y) => blocked::Input::Blocked(y),
                None => blocked::Input::Planes(x),
            };
            blocked::run(input, &std::mem::take(pending), Activation::Relu, &device)
        };
        for (s, stage) in self.stages.iter().enumerate().take(last) {
            let first = if s == 0 { skip } else { 0 };
            let blocks = &stage[first..];
            // Stages that can run blocked join one run, converted from and back to planes once, up
            // to a stage whose features are asked for or that cannot run blocked to its end.
            let layers = blocked_channels.and_then(|c| run_layers(c, blocks, !pending.is_empty()));
            let mut i = 0;
            if let Some((c_out, layers)) = layers {
                i = layers.len();
                pending.extend(layers);
                blocked_channels = Some(c_out);
                if i == blocks.len() && !out_indices.contains(&(s + 1)) {
                    continue;
                }
            }
            if !pending.is_empty() {
                x = flush(&x, &mut pending)?;
            }
            while i < blocks.len() {
                let pair = match (train, blocks.get(i + 1)) {
                    (false, Some(next)) => fused_pair(&blocks[i], next),
                    _ => None,
                };
                x = match pair {
                    Some((depthwise, pointwise)) => {
                        i += 2;
                        crate::ops::panels::depthwise_then_pointwise(
                            &x,
                            depthwise,
                            pointwise,
                            Activation::Relu,
                        )?
                    }
                    None => {
                        i += 1;
                        blocks[i - 1].forward_t(&x, train)?
                    }
                };
            }
            if out_indices.contains(&(s + 1)) {
                features.push(x.clone());
            }
            blocked_channels = blocked_entry(&x)?;
        }
        Ok(features)
    }

    /// The reparameterised stem and first block as [`ops::stem::dense_then_depthwise`]'s two
    /// (weight, bias, geometry) triples: both plain conv + ReLU (no squeeze-excitation). Whether
    /// their geometry runs as one pass the op decides; otherwise it runs them one after the other.
    ///
    /// [`ops::stem::dense_then_depthwise`]: crate::ops::stem::dense_then_depthwise
    #[allow(clippy::type_complexity)]
    fn fused_entry(
        &self,
    ) -> Option<(
        (&Tensor, &Tensor, &ConvConfig),
        (&Tensor, &Tensor, &ConvConfig),
    )> {
        let first = self.stages.first()?.first()?;
        if self.stem.attn.is_some() || first.attn.is_some() {
            return None;
        }
        let (stem, block) = (
            self.stem.reparam_conv.as_ref()?,
            first.reparam_conv.as_ref()?,
        );
        Some((
            (&stem.weight, stem.bias.as_ref()?, &stem.config),
            (&block.weight, block.bias.as_ref()?, &block.config),
        ))
    }

    /// Class logits from the stride-32 features; `None` when built without a classifier.
    pub fn forward_head(&self, features: &Tensor) -> Result<Option<Tensor>> {
        self.head.as_ref().map(|h| h.forward(features)).transpose()
    }

    pub fn blocks(&self) -> impl Iterator<Item = &MobileOneBlock> {
        std::iter::once(&self.stem).chain(self.stages.iter().flatten())
    }

    fn blocks_mut(&mut self) -> impl Iterator<Item = &mut MobileOneBlock> {
        std::iter::once(&mut self.stem).chain(self.stages.iter_mut().flatten())
    }

    /// Folds every block into a single conv (exact in eval mode).
    pub fn reparameterize(&mut self) -> Result<()> {
        self.blocks_mut()
            .try_for_each(MobileOneBlock::reparameterize)
    }

    pub fn is_fused(&self) -> bool {
        self.blocks().all(MobileOneBlock::is_fused)
    }

    /// All tensors of the model under timm's names (fused or not), e.g. to save it.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        let blocks = std::iter::once(("stem".to_string(), &self.stem)).chain(
            self.stages.iter().enumerate().flat_map(|(s, st)| {
                st.iter()
                    .enumerate()
                    .map(move |(b, blk)| (format!("stages.{s}.{b}"), blk))
            }),
        );
        for (prefix, block) in blocks {
            block.push_named_tensors(&prefix, &mut out);
        }
        if let Some(head) = &self.head {
            out.push(("head.fc.weight".into(), head.fc.weight().clone()));
            if let Some(b) = head.fc.bias() {
                out.push(("head.fc.bias".into(), b.clone()));
            }
        }
        out
    }
}

impl MobileOneBlock {
    fn push_named_tensors(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        let conv = |out: &mut Vec<(String, Tensor)>, name: String, c: &Conv2d| {
            out.push((format!("{name}.weight"), c.weight.clone()));
            if let Some(b) = &c.bias {
                out.push((format!("{name}.bias"), b.clone()));
            }
        };
        let bn = |out: &mut Vec<(String, Tensor)>, name: String, bn: &BatchNorm2d| {
            out.extend(
                bn.named_tensors()
                    .into_iter()
                    .map(|(k, t)| (format!("{name}.{k}"), t)),
            );
        };
        if let Some(c) = &self.reparam_conv {
            conv(out, format!("{prefix}.reparam_conv"), c);
        }
        for (j, branch) in self.conv_kxk.iter().enumerate() {
            conv(out, format!("{prefix}.conv_kxk.{j}.conv"), &branch.conv);
            bn(out, format!("{prefix}.conv_kxk.{j}.bn"), &branch.bn);
        }
        if let Some(branch) = &self.conv_scale {
            conv(out, format!("{prefix}.conv_scale.conv"), &branch.conv);
            bn(out, format!("{prefix}.conv_scale.bn"), &branch.bn);
        }
        if let Some(id) = &self.identity {
            bn(out, format!("{prefix}.identity"), id);
        }
        if let Some(se) = &self.attn {
            conv(out, format!("{prefix}.attn.fc1"), &se.fc1);
            conv(out, format!("{prefix}.attn.fc2"), &se.fc2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_published_channels() {
        assert_eq!(
            MobileOneConfig::s0().feature_channels(),
            [48, 48, 128, 256, 1024]
        );
        assert_eq!(
            MobileOneConfig::s1().feature_channels(),
            [64, 96, 192, 512, 1280]
        );
        assert_eq!(
            MobileOneConfig::s2().feature_channels(),
            [64, 96, 256, 640, 2048]
        );
        assert_eq!(
            MobileOneConfig::s3().feature_channels(),
            [64, 128, 320, 768, 2048]
        );
        assert_eq!(
            MobileOneConfig::s4().feature_channels(),
            [64, 192, 448, 896, 2048]
        );
    }

    #[test]
    fn se_reduction_follows_timm_make_divisible() {
        assert_eq!(se_reduced_channels(896), 56);
        assert_eq!(se_reduced_channels(2048), 128);
        assert_eq!(se_reduced_channels(64), 8);
    }

    #[test]
    fn dilation_follows_torchvision_convention() {
        let g = stage_geometry(8).unwrap();
        assert_eq!(
            g[1],
            StageGeometry {
                first_stride: 2,
                first_dilation: 1,
                dilation: 1
            }
        );
        assert_eq!(
            g[2],
            StageGeometry {
                first_stride: 1,
                first_dilation: 1,
                dilation: 2
            }
        );
        assert_eq!(
            g[3],
            StageGeometry {
                first_stride: 1,
                first_dilation: 2,
                dilation: 4
            }
        );
        assert!(stage_geometry(4).is_err());
    }
}
