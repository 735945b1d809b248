//! The per-epoch log: `metrics.csv` and `metrics.json` in the output folder, rewritten atomically
//! after every epoch from the history kept in the checkpoints (so a resumed run logs one history).

use std::path::Path;

use mobileone::checkpoint::write_atomic;

use crate::error::{Result, TrainError};
use crate::task::Validation;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    /// Optimizer steps done by the end of the epoch.
    pub step: u64,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    /// Mean training loss over the epoch's batches.
    pub train_loss: f64,
    pub images_per_s: f64,
    /// Training time of the epoch (validation excluded).
    pub seconds: f64,
    /// Wall time of the run at the end of the epoch's validation: training and validation of every
    /// epoch so far, summed (what "after 35 minutes" means when comparing runs).
    #[serde(default)]
    pub wall_seconds: f64,
    /// `None` in epochs without validation.
    pub validation: Option<Validation>,
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, bytes).map_err(|source| TrainError::Io {
        path: path.into(),
        error: source,
    })
}

/// Writes `metrics.csv` (one row per epoch, empty metric cells where there was no validation) and
/// `metrics.json` into `dir`.
pub fn write_logs(dir: &Path, metric_names: &[String], history: &[EpochRecord]) -> Result<()> {
    let mut csv = String::from("epoch,step,lr,train_loss,images_per_s,seconds,wall_seconds");
    for name in metric_names {
        csv.push(',');
        csv.push_str(name);
    }
    csv.push('\n');
    for r in history {
        csv.push_str(&format!(
            "{},{},{:.6e},{:.6},{:.3},{:.1},{:.1}",
            r.epoch, r.step, r.lr, r.train_loss, r.images_per_s, r.seconds, r.wall_seconds
        ));
        for name in metric_names {
            csv.push(',');
            if let Some(v) = r
                .validation
                .as_ref()
                .and_then(|v| v.values.iter().find(|(n, _)| n == name))
            {
                csv.push_str(&format!("{:.6}", v.1));
            }
        }
        csv.push('\n');
    }
    write(&dir.join("metrics.csv"), csv.as_bytes())?;
    let json = serde_json::to_vec_pretty(&serde_json::json!({ "epochs": history }))
        .expect("plain data serialises");
    write(&dir.join("metrics.json"), &json)
}
