//! Training throughput of the train-time models on random data: forward (BN in training mode),
//! backward and optimizer step timed separately.
//!
//! `cargo run --release -p mobileone-train --example throughput -- [det|seg|trunk] [size] [batch] [steps]`
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use mobileone::{MobileOne, MobileOneConfig, Variant};
use mobileone_train::init::seeded_var_builder;
use mobileone_train::optim::{trainable_params, Optimizer, OptimizerKind};
use ssdlite::{SsdDetector, SsdLiteConfig, Target};

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let what = args.get(1).map_or("det", String::as_str).to_string();
    let size: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(160);
    let batch: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(8);
    let steps: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(3);
    let device = Device::Cpu;
    let vars = VarMap::new();
    let vb = seeded_var_builder(&vars, 0, &device);
    let x = Tensor::randn(0f32, 1.0, (batch, 3, size, size), &device)?;
    // One value per run: its size does not matter.
    #[allow(clippy::large_enum_variant)]
    enum Model {
        Trunk(MobileOne),
        Det(SsdDetector),
        Seg(deeplabv3::DeepLabV3),
    }
    let model = match what.as_str() {
        "trunk" => Model::Trunk(MobileOne::new(
            &MobileOneConfig::s0().with_num_classes(None),
            32,
            vb,
        )?),
        "det" => {
            let mut cfg = SsdLiteConfig::new(Variant::S0, 8);
            cfg.image_size = size;
            Model::Det(SsdDetector::new(&cfg, mobileone::Form::TRAIN, vb)?)
        }
        _ => Model::Seg(deeplabv3::DeepLabV3::new(
            &deeplabv3::DeepLabConfig::new(Variant::S0, 8, 16),
            vb,
        )?),
    };
    let targets: Vec<Target> = (0..batch)
        .map(|_| Target {
            boxes: vec![[10.0, 12.0, size as f32 / 2.0, size as f32 / 2.0 + 5.0]],
            labels: vec![3],
        })
        .collect();
    let labels = Tensor::zeros((batch, size, size), DType::U32, &device)?;
    let mut opt = Optimizer::new(OptimizerKind::SGD, trainable_params(&vars, "", 1.0));
    for step in 0..steps {
        let t0 = Instant::now();
        let loss = match &model {
            Model::Trunk(m) => m.forward_features(&x, true)?[4].sqr()?.mean_all()?,
            Model::Det(m) => m.forward_loss(&x, &targets)?.total()?,
            Model::Seg(m) => {
                let out = m.forward_t(&x, true)?;
                deeplabv3::segmentation_loss(&out.logits, None, &labels, 0.5)?
            }
        };
        let _ = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&grads, 1e-3, 0.0, 1.0)?;
        let t3 = Instant::now();
        let total = (t3 - t0).as_secs_f64();
        let rss_mb = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |pages| pages * 4096 / (1 << 20));
        println!(
            "{what} step {step}: forward {:.3} s, backward {:.3} s, optimizer {:.3} s, {:.2} img/s, rss {rss_mb} MiB",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64(),
            batch as f64 / total
        );
    }
    Ok(())
}
