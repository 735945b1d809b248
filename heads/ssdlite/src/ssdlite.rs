//! SSDLite building blocks with torchvision's key names (`ssdlite.py`): extra feature blocks and the
//! separable prediction heads. Every conv goes through `mobileone::layers` so the native kernels apply.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use mobileone::layers::{Activation, BnConfig, Conv2d, ConvBnAct, ConvConfig};

/// BatchNorm of SSDLite's heads and extra blocks: `partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)`.
pub const BN_EPS: f64 = 0.001;
pub const BN_MOMENTUM: f64 = 0.03;

/// torchvision's `Conv2dNormActivation` with ReLU6 (keys `0` conv without bias, `1` BN; once fused,
/// `0.weight` and `0.bias`).
fn conv_bn_relu6(
    vb: VarBuilder,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    groups: usize,
    fused: bool,
) -> Result<ConvBnAct> {
    let config = ConvConfig {
        stride,
        padding: (kernel - 1) / 2,
        dilation: 1,
        groups,
    };
    let bn = BnConfig {
        eps: BN_EPS,
        momentum: BN_MOMENTUM,
    };
    ConvBnAct::new(
        vb.pp("0"),
        vb.pp("1"),
        in_channels,
        out_channels,
        kernel,
        config,
        bn,
        Activation::Relu6,
        fused,
    )
}

fn push_conv_bn(layer: &ConvBnAct, prefix: &str, out: &mut Vec<(String, Tensor)>) {
    layer.push_named_tensors(&format!("{prefix}.0"), &format!("{prefix}.1"), out);
}

/// `_extra_block`: 1x1 to half the output width, depthwise 3x3 stride 2, 1x1 to the output width.
#[derive(Debug, Clone)]
pub struct ExtraBlock {
    pub layers: [ConvBnAct; 3],
}

impl ExtraBlock {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        fused: bool,
    ) -> Result<Self> {
        let mid = out_channels / 2;
        Ok(Self {
            layers: [
                conv_bn_relu6(vb.pp("0"), in_channels, mid, 1, 1, 1, fused)?,
                conv_bn_relu6(vb.pp("1"), mid, mid, 3, 2, mid, fused)?,
                conv_bn_relu6(vb.pp("2"), mid, out_channels, 1, 1, 1, fused)?,
            ],
        })
    }

    pub fn fuse(&mut self) -> Result<()> {
        self.layers.iter_mut().try_for_each(ConvBnAct::fuse)
    }

    pub fn push_named_tensors(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        for (i, layer) in self.layers.iter().enumerate() {
            push_conv_bn(layer, &format!("{prefix}.{i}"), out);
        }
    }
}

impl ModuleT for ExtraBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.layers
            .iter()
            .try_fold(x.clone(), |x, layer| layer.forward_t(&x, train))
    }
}

/// `_prediction_block`: depthwise 3x3 + BN + ReLU6 (key `0`), then a 1x1 conv with bias (key `1`).
#[derive(Debug, Clone)]
pub struct PredictionBlock {
    pub depthwise: ConvBnAct,
    pub projection: Conv2d,
}

impl PredictionBlock {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        fused: bool,
    ) -> Result<Self> {
        Ok(Self {
            depthwise: conv_bn_relu6(
                vb.pp("0"),
                in_channels,
                in_channels,
                3,
                1,
                in_channels,
                fused,
            )?,
            projection: Conv2d::new(
                vb.pp("1"),
                in_channels,
                out_channels,
                1,
                ConvConfig::default(),
                true,
            )?,
        })
    }
}

impl ModuleT for PredictionBlock {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.projection
            .forward(&self.depthwise.forward_t(x, train)?)
    }
}

/// `SSDScoringHead`: one prediction block per level; outputs `(N, Σ H·W·A, columns)` ordered
/// level → y → x → anchor.
#[derive(Debug, Clone)]
pub struct ScoringHead {
    pub module_list: Vec<PredictionBlock>,
    pub num_columns: usize,
}

impl ScoringHead {
    pub fn new(
        vb: VarBuilder,
        in_channels: &[usize],
        num_anchors: &[usize],
        num_columns: usize,
        fused: bool,
    ) -> Result<Self> {
        let vb = vb.pp("module_list");
        let module_list = in_channels
            .iter()
            .zip(num_anchors)
            .enumerate()
            .map(|(i, (&c, &a))| PredictionBlock::new(vb.pp(i), c, a * num_columns, fused))
            .collect::<Result<_>>()?;
        Ok(Self {
            module_list,
            num_columns,
        })
    }

    pub fn forward_t(&self, features: &[Tensor], train: bool) -> Result<Tensor> {
        let outputs = features
            .iter()
            .zip(&self.module_list)
            .map(|(f, block)| {
                let y = block.forward_t(f, train)?;
                // (N, A·K, H, W) → (N, H, W, A·K) → (N, H·W·A, K), as torchvision's
                // view / permute / reshape.
                let n = y.dim(0)?;
                mobileone::ops::layout::channels_last(&y)?.reshape((n, (), self.num_columns))
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&outputs, 1)
    }

    pub fn fuse(&mut self) -> Result<()> {
        self.module_list
            .iter_mut()
            .try_for_each(|b| b.depthwise.fuse())
    }

    pub fn push_named_tensors(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        for (i, block) in self.module_list.iter().enumerate() {
            push_conv_bn(
                &block.depthwise,
                &format!("{prefix}.module_list.{i}.0"),
                out,
            );
            out.push((
                format!("{prefix}.module_list.{i}.1.weight"),
                block.projection.weight.clone(),
            ));
            if let Some(b) = &block.projection.bias {
                out.push((format!("{prefix}.module_list.{i}.1.bias"), b.clone()));
            }
        }
    }
}

/// `SSDLiteHead`: class logits (`num_classes` columns) and box regression (4 columns).
#[derive(Debug, Clone)]
pub struct SsdLiteHead {
    pub classification_head: ScoringHead,
    pub regression_head: ScoringHead,
}

impl SsdLiteHead {
    pub fn new(
        vb: VarBuilder,
        in_channels: &[usize],
        num_anchors: &[usize],
        num_classes: usize,
        fused: bool,
    ) -> Result<Self> {
        Ok(Self {
            classification_head: ScoringHead::new(
                vb.pp("classification_head"),
                in_channels,
                num_anchors,
                num_classes,
                fused,
            )?,
            regression_head: ScoringHead::new(
                vb.pp("regression_head"),
                in_channels,
                num_anchors,
                4,
                fused,
            )?,
        })
    }

    /// `(cls_logits, bbox_regression)`.
    pub fn forward_t(&self, features: &[Tensor], train: bool) -> Result<(Tensor, Tensor)> {
        Ok((
            self.classification_head.forward_t(features, train)?,
            self.regression_head.forward_t(features, train)?,
        ))
    }

    pub fn fuse(&mut self) -> Result<()> {
        self.classification_head.fuse()?;
        self.regression_head.fuse()
    }

    pub fn push_named_tensors(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        self.classification_head
            .push_named_tensors(&format!("{prefix}.classification_head"), out);
        self.regression_head
            .push_named_tensors(&format!("{prefix}.regression_head"), out);
    }
}
