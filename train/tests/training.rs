//! The training loop end to end on a tiny synthetic set: steps reduce the loss, an interrupted and
//! resumed run ends with exactly the weights of an uninterrupted one, a non-finite loss stops the run
//! without touching the last good checkpoint, and the fused export loads for inference.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use mobileone::Variant;
use mobileone_datasets::synth::{write_dataset, SynthConfig};
use mobileone_train::{
    Augment, DatasetKind, OptimizerKind, Outcome, RunSettings, TaskKind, TrainError, Trainer,
};

/// Element-wise ops on the calling thread, as the `train` binary runs them (candle's spin-waiting pool
/// beside the kernels' pool oversubscribes small machines). Set before the first candle op.
fn single_threaded_elementwise() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("CANDLE_NUM_THREADS", "1"));
}

fn synth(dir: &Path) {
    let config = SynthConfig {
        images: 10,
        seed: 3,
        size: 48,
        val_fraction: 0.2,
        ..SynthConfig::default()
    };
    write_dataset(dir, &config, &|| {}).unwrap();
}

fn settings(task: TaskKind, root: &Path) -> RunSettings {
    RunSettings {
        task,
        dataset: DatasetKind::Synth,
        data_root: root.to_path_buf(),
        variant: Variant::S0,
        init_backbone: None,
        epochs: 1,
        batch_size: 2,
        image_size: 48,
        lr: 1e-3,
        optimizer: OptimizerKind::ADAMW,
        weight_decay: 0.01,
        weight_decay_end: None,
        warmup_epochs: 0.0,
        clip_grad: Some(5.0),
        seed: 5,
        workers: 1,
        val_every: 1,
        augment: Augment::Flip,
        aux_loss: task == TaskKind::Seg,
        output_stride: 16,
        // A narrow head keeps the segmentation tests fast.
        head_channels: 32,
        atrous_rates: vec![12, 24, 36],
        fused_trunk: false,
        branches_from_fused: false,
        backbone_lr_mult: 1.0,
        dataset_config: None,
        val_split: "val".into(),
    }
}

fn first_batch(trainer: &Trainer) -> mobileone_datasets::Batch {
    trainer
        .task()
        .train_loader()
        .epoch(0)
        .next()
        .unwrap()
        .unwrap()
}

#[test]
fn steps_reduce_the_loss_on_a_fixed_batch() {
    single_threaded_elementwise();
    let data = tempfile::tempdir().unwrap();
    synth(data.path());
    for task in [TaskKind::Det, TaskKind::Seg] {
        let out = tempfile::tempdir().unwrap();
        let mut trainer = Trainer::new(settings(task, data.path()), out.path(), None).unwrap();
        let batch = first_batch(&trainer);
        let first = trainer.step(&batch).unwrap();
        trainer.step(&batch).unwrap();
        let third = trainer.step(&batch).unwrap();
        assert!(third < first, "{task:?}: loss {first} -> {third}");
    }
}

fn tensors(path: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    mobileone::checkpoint::load(path).unwrap().tensors
}

#[test]
fn resume_continues_exactly_and_the_export_loads() {
    single_threaded_elementwise();
    let data = tempfile::tempdir().unwrap();
    synth(data.path());
    let run = settings(TaskKind::Det, data.path());
    let stop = AtomicBool::new(false);

    let whole = tempfile::tempdir().unwrap();
    let mut trainer = Trainer::new(run.clone(), whole.path(), None).unwrap();
    assert_eq!(trainer.steps_per_epoch(), 4);
    let outcome = trainer.run(&stop).unwrap();
    assert!(matches!(outcome, Outcome::Finished { .. }), "{outcome:?}");
    let whole_history = trainer.history().to_vec();

    let parts = tempfile::tempdir().unwrap();
    let mut trainer = Trainer::new(run.clone(), parts.path(), None).unwrap();
    trainer.stop_after_steps = Some(2);
    let last = match trainer.run(&stop).unwrap() {
        Outcome::Interrupted { checkpoint } => checkpoint,
        other => panic!("expected an interruption, got {other:?}"),
    };
    let mut trainer = Trainer::new(run.clone(), parts.path(), Some(&last)).unwrap();
    assert_eq!(trainer.global_step(), 2);
    trainer.run(&stop).unwrap();

    // Same losses, same metrics, bit-identical weights, optimizer state and running statistics.
    let strip = |h: &[mobileone_train::metrics::EpochRecord]| {
        h.iter()
            .map(|r| (r.epoch, r.step, r.train_loss, r.validation.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&whole_history), strip(trainer.history()));
    let (a, b) = (
        tensors(&whole.path().join("last.safetensors")),
        tensors(&parts.path().join("last.safetensors")),
    );
    assert_eq!(a.len(), b.len());
    assert!(a.keys().any(|k| k.starts_with("optimizer.exp_avg_sq.")));
    assert!(a.keys().any(|k| k.ends_with("running_var")));
    for (key, t) in &a {
        let (x, y) = (
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b[key].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(x == y, "{key} differs after resume");
    }

    // Settings that change the result refuse to resume.
    let mut other = run.clone();
    other.lr = 2e-3;
    let err = Trainer::new(other, parts.path(), Some(&last))
        .err()
        .unwrap();
    assert!(err.to_string().contains("lr"), "{err}");

    // The fused export and the training checkpoint both load as detectors.
    let device = candle_core::Device::Cpu;
    for name in ["fused.safetensors", "last.safetensors"] {
        let (detector, labels) = ssdlite::SsdDetector::load(
            &whole.path().join(name),
            &ssdlite::Overrides::default(),
            &device,
        )
        .unwrap();
        assert_eq!(detector.is_fused(), name == "fused.safetensors");
        assert_eq!(labels.names.len(), 8);
        assert_eq!(labels.names[1], "circle");
    }
    for file in [
        "metrics.csv",
        "metrics.json",
        "curves.png",
        "best.safetensors",
    ] {
        assert!(whole.path().join(file).is_file(), "{file} missing");
    }
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_good_checkpoint() {
    single_threaded_elementwise();
    let data = tempfile::tempdir().unwrap();
    synth(data.path());
    let mut run = settings(TaskKind::Seg, data.path());
    // A huge learning rate with SGD blows the weights up after the first step.
    run.optimizer = OptimizerKind::SGD;
    run.lr = 1e30;
    run.clip_grad = None;
    let out = tempfile::tempdir().unwrap();
    let mut trainer = Trainer::new(run, out.path(), None).unwrap();
    let last = out.path().join("last.safetensors");
    trainer.save(&last).unwrap();
    let before = std::fs::read(&last).unwrap();
    let err = trainer.run(&AtomicBool::new(false)).unwrap_err();
    assert!(matches!(err, TrainError::NonFinite { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("last good checkpoint"), "{message}");
    assert!(message.contains("last.safetensors"), "{message}");
    assert_eq!(std::fs::read(&last).unwrap(), before);
}

#[test]
fn seg_head_settings_reach_the_checkpoints_and_guard_resume() {
    single_threaded_elementwise();
    let data = tempfile::tempdir().unwrap();
    synth(data.path());
    let mut run = settings(TaskKind::Seg, data.path());
    run.head_channels = 16;
    run.atrous_rates = vec![1, 2, 3];
    let out = tempfile::tempdir().unwrap();
    let trainer = Trainer::new(run.clone(), out.path(), None).unwrap();
    let (last, fused) = (
        out.path().join("last.safetensors"),
        out.path().join("fused.safetensors"),
    );
    trainer.save(&last).unwrap();
    trainer.export_fused(&fused).unwrap();

    // `segment` rebuilds the same head from either file.
    for path in [&last, &fused] {
        let (_, spec) = deeplabv3::load(
            path,
            &deeplabv3::Overrides::default(),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert_eq!(spec.config.head_channels, 16, "{}", path.display());
        assert_eq!(
            spec.config.atrous_rates,
            vec![1, 2, 3],
            "{}",
            path.display()
        );
    }

    // A resume with another head is refused, naming the setting.
    let mut wider = run.clone();
    wider.head_channels = 24;
    let err = Trainer::new(wider, out.path(), Some(&last)).err().unwrap();
    assert!(err.to_string().contains("head_channels"), "{err}");
    let mut rates = run.clone();
    rates.atrous_rates = vec![2, 4, 6];
    let err = Trainer::new(rates, out.path(), Some(&last)).err().unwrap();
    assert!(err.to_string().contains("atrous_rates"), "{err}");
    Trainer::new(run, out.path(), Some(&last)).unwrap();

    // Bad rates are a configuration error, not a panic.
    let mut bad = settings(TaskKind::Seg, data.path());
    bad.atrous_rates = vec![6, 12];
    let err = Trainer::new(bad, out.path(), None).err().unwrap();
    assert!(err.to_string().contains("atrous rates"), "{err}");
}
