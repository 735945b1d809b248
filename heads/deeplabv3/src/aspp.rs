//! Building blocks of torchvision's DeepLabV3 head (`models/segmentation/deeplabv3.py` and `fcn.py`),
//! with the same module indices so checkpoint keys match.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use mobileone::layers::{Activation, BnConfig, Conv2d, ConvBnAct, ConvConfig};

use mobileone::resize::resize_bilinear;

/// PyTorch's `nn.BatchNorm2d` defaults, which torchvision's segmentation heads keep.
const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

/// Conv (no bias) → BatchNorm → ReLU; after [`ConvBnRelu::fuse`] a single conv with bias and fused ReLU.
/// Runs dilated 3x3 convs whose taps all fall in the padding as their centre tap.
#[derive(Debug, Clone)]
pub struct ConvBnRelu(ConvBnAct);

impl ConvBnRelu {
    /// Reads the conv below `vb.pp(conv_key)` and the BatchNorm below `vb.pp(bn_key)`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: &VarBuilder,
        conv_key: &str,
        bn_key: &str,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        dilation: usize,
        fused: bool,
    ) -> Result<Self> {
        let config = ConvConfig {
            padding: dilation * (kernel / 2),
            dilation,
            ..ConvConfig::default()
        };
        let bn = BnConfig {
            eps: BN_EPS,
            momentum: BN_MOMENTUM,
        };
        Ok(Self(ConvBnAct::new(
            vb.pp(conv_key),
            vb.pp(bn_key),
            in_channels,
            out_channels,
            kernel,
            config,
            bn,
            Activation::Relu,
            fused,
        )?))
    }

    /// Folds the BatchNorm into the conv (exact in eval mode).
    pub fn fuse(&mut self) -> Result<()> {
        self.0.fuse()
    }

    pub fn is_fused(&self) -> bool {
        self.0.is_fused()
    }

    /// Tensors under PyTorch's names: `{conv_key}.weight` (and `.bias` once fused), `{bn_key}.*`.
    pub fn named_tensors(&self, conv_key: &str, bn_key: &str, out: &mut Vec<(String, Tensor)>) {
        self.0.push_named_tensors(conv_key, bn_key, out)
    }

    /// The conv to run on an `height`×`width` map: when the dilation reaches past the map in both
    /// directions every off-centre tap reads zero padding, so the centre tap alone (a 1x1 conv) gives the
    /// same result at a ninth of the cost; ASPP's rate-24/36 branches often are in that case.
    fn conv_for(&self, height: usize, width: usize) -> Result<std::borrow::Cow<'_, Conv2d>> {
        let conv = &self.0.conv;
        let config = conv.config;
        let kernel = conv.kernel_size();
        let reach = config.dilation * (kernel / 2);
        if kernel == 1 || config.stride != 1 || config.padding != reach || reach < height.max(width)
        {
            return Ok(std::borrow::Cow::Borrowed(conv));
        }
        let centre = kernel / 2;
        Ok(std::borrow::Cow::Owned(Conv2d {
            weight: conv
                .weight
                .narrow(2, centre, 1)?
                .narrow(3, centre, 1)?
                .contiguous()?,
            bias: conv.bias.clone(),
            config: ConvConfig {
                groups: config.groups,
                ..ConvConfig::default()
            },
        }))
    }
}

impl ModuleT for ConvBnRelu {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, _, height, width) = x.dims4()?;
        let conv = self.conv_for(height, width)?;
        self.0.forward_with(&conv, x, train)
    }
}

pub(crate) fn push_conv(out: &mut Vec<(String, Tensor)>, key: &str, conv: &Conv2d) {
    out.push((format!("{key}.weight"), conv.weight.clone()));
    if let Some(bias) = &conv.bias {
        out.push((format!("{key}.bias"), bias.clone()));
    }
}

fn dropout(x: Tensor, rate: f32, train: bool) -> Result<Tensor> {
    if train {
        crate::dropout::dropout(&x, rate)
    } else {
        Ok(x)
    }
}

/// Atrous spatial pyramid pooling: `convs.0` 1x1, `convs.{1,2,3}` dilated 3x3, `convs.4` image pooling
/// (conv at index 1, BN at 2), concatenated and projected (`project.{0,1}`) to 256 channels.
#[derive(Debug, Clone)]
pub struct Aspp {
    branches: Vec<ConvBnRelu>,
    pooling: ConvBnRelu,
    project: ConvBnRelu,
}

impl Aspp {
    /// `channels` is the width of every branch and of the projection (256 in torchvision).
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        channels: usize,
        rates: &[usize],
        fused: bool,
    ) -> Result<Self> {
        let convs = vb.pp("convs");
        let mut branches = vec![ConvBnRelu::new(
            &convs,
            "0.0",
            "0.1",
            in_channels,
            channels,
            1,
            1,
            fused,
        )?];
        for (i, &rate) in rates.iter().enumerate() {
            let (conv, bn) = (format!("{}.0", i + 1), format!("{}.1", i + 1));
            branches.push(ConvBnRelu::new(
                &convs,
                &conv,
                &bn,
                in_channels,
                channels,
                3,
                rate,
                fused,
            )?);
        }
        let pool = format!("{}", rates.len() + 1);
        let pooling = ConvBnRelu::new(
            &convs.pp(&pool),
            "1",
            "2",
            in_channels,
            channels,
            1,
            1,
            fused,
        )?;
        let concatenated = (rates.len() + 2) * channels;
        let project = ConvBnRelu::new(
            &vb.pp("project"),
            "0",
            "1",
            concatenated,
            channels,
            1,
            1,
            fused,
        )?;
        Ok(Self {
            branches,
            pooling,
            project,
        })
    }

    fn layers_mut(&mut self) -> impl Iterator<Item = &mut ConvBnRelu> {
        self.branches
            .iter_mut()
            .chain([&mut self.pooling, &mut self.project])
    }

    pub fn fuse(&mut self) -> Result<()> {
        self.layers_mut().try_for_each(ConvBnRelu::fuse)
    }

    pub fn named_tensors(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        for (i, branch) in self.branches.iter().enumerate() {
            branch.named_tensors(
                &format!("{prefix}.convs.{i}.0"),
                &format!("{prefix}.convs.{i}.1"),
                out,
            );
        }
        let pool = format!("{prefix}.convs.{}", self.branches.len());
        self.pooling
            .named_tensors(&format!("{pool}.1"), &format!("{pool}.2"), out);
        self.project.named_tensors(
            &format!("{prefix}.project.0"),
            &format!("{prefix}.project.1"),
            out,
        );
    }
}

impl ModuleT for Aspp {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        if train && n == 1 {
            // The pooled map has one value per channel: batch statistics need more than one image.
            candle_core::bail!(
                "training DeepLabV3 needs batches of at least 2 images (ASPP pooling BatchNorm)"
            );
        }
        let mut outputs = self
            .branches
            .iter()
            .map(|b| b.forward_t(x, train))
            .collect::<Result<Vec<_>>>()?;
        // adaptive_avg_pool2d(1), then torchvision resizes the 1x1 map back bilinearly.
        let pooled = x.reshape((n, c, h * w))?.mean_keepdim(2)?.unsqueeze(3)?;
        let pooled = self.pooling.forward_t(&pooled, train)?;
        outputs.push(resize_bilinear(&pooled, h, w)?);
        let projected = self.project.forward_t(&Tensor::cat(&outputs, 1)?, train)?;
        dropout(projected, 0.5, train)
    }
}

/// torchvision's `DeepLabHead`: ASPP (`0`), 3x3 conv (`1`) + BN (`2`) + ReLU, 1x1 classifier with bias (`4`);
/// every layer is `channels` wide (torchvision fixes 256).
#[derive(Debug, Clone)]
pub struct DeepLabHead {
    aspp: Aspp,
    refine: ConvBnRelu,
    classifier: Conv2d,
}

impl DeepLabHead {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        channels: usize,
        num_classes: usize,
        rates: &[usize],
        fused: bool,
    ) -> Result<Self> {
        Ok(Self {
            aspp: Aspp::new(vb.pp("0"), in_channels, channels, rates, fused)?,
            refine: ConvBnRelu::new(&vb, "1", "2", channels, channels, 3, 1, fused)?,
            classifier: Conv2d::new(
                vb.pp("4"),
                channels,
                num_classes,
                1,
                ConvConfig::default(),
                true,
            )?,
        })
    }

    pub fn fuse(&mut self) -> Result<()> {
        self.aspp.fuse()?;
        self.refine.fuse()
    }

    pub fn is_fused(&self) -> bool {
        self.refine.is_fused()
    }

    pub fn named_tensors(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        self.aspp.named_tensors(&format!("{prefix}.0"), out);
        self.refine
            .named_tensors(&format!("{prefix}.1"), &format!("{prefix}.2"), out);
        push_conv(out, &format!("{prefix}.4"), &self.classifier);
    }
}

impl ModuleT for DeepLabHead {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.aspp.forward_t(x, train)?;
        let x = self.refine.forward_t(&x, train)?;
        self.classifier.forward(&x)
    }
}

/// torchvision's `FCNHead`, the auxiliary classifier: 3x3 conv to in/4 (`0`) + BN (`1`) + ReLU,
/// Dropout(0.1), 1x1 classifier with bias (`4`).
#[derive(Debug, Clone)]
pub struct FcnHead {
    hidden: ConvBnRelu,
    classifier: Conv2d,
}

impl FcnHead {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        num_classes: usize,
        fused: bool,
    ) -> Result<Self> {
        let inter = in_channels / 4;
        Ok(Self {
            hidden: ConvBnRelu::new(&vb, "0", "1", in_channels, inter, 3, 1, fused)?,
            classifier: Conv2d::new(
                vb.pp("4"),
                inter,
                num_classes,
                1,
                ConvConfig::default(),
                true,
            )?,
        })
    }

    pub fn fuse(&mut self) -> Result<()> {
        self.hidden.fuse()
    }

    pub fn named_tensors(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        self.hidden
            .named_tensors(&format!("{prefix}.0"), &format!("{prefix}.1"), out);
        push_conv(out, &format!("{prefix}.4"), &self.classifier);
    }
}

impl ModuleT for FcnHead {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = dropout(self.hidden.forward_t(x, train)?, 0.1, train)?;
        self.classifier.forward(&x)
    }
}
