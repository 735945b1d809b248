use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Dataset(#[from] mobileone_datasets::DatasetError),
    #[error(transparent)]
    Checkpoint(#[from] mobileone::CheckpointError),
    #[error("{}: {message}", .path.display())]
    Resume { path: PathBuf, message: String },
    #[error("cannot write {}: {error}", .path.display())]
    Io {
        path: PathBuf,
        /// Not `source`: the message already shows it, and `{:#}` would print it twice.
        error: std::io::Error,
    },
    #[error("validation failed: {0}")]
    Eval(String),
    #[error("cannot draw the curves: {0}")]
    Plot(String),
    #[error(
        "the {what} became {value} at epoch {epoch}, step {step}: stopped; the last good checkpoint is {}",
        .last_good.as_ref().map_or("none (no checkpoint was written yet)".into(), |p| p.display().to_string())
    )]
    NonFinite {
        what: &'static str,
        value: f64,
        epoch: usize,
        step: u64,
        last_good: Option<PathBuf>,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, TrainError>;
