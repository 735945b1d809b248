use std::path::PathBuf;

/// Everything that can go wrong while reading or writing a dataset. Each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        /// Not `source`: the message already shows it, and `{:#}` would print it twice.
        error: std::io::Error,
    },
    /// Malformed or mistyped JSON; `field` is the JSON path (e.g. `annotations[12].bbox`).
    #[error("{path}: at `{field}` (line {line}, column {column}): {message}")]
    Json {
        path: PathBuf,
        field: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// Well-formed input whose content is inconsistent (unknown ids, bad sizes, ...).
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: cannot decode image: {message}")]
    Image { path: PathBuf, message: String },
    #[error("{mask}: annotation is {mask_width}x{mask_height} but its image {image} is {image_width}x{image_height}")]
    MaskSizeMismatch {
        mask: PathBuf,
        image: PathBuf,
        mask_width: u32,
        mask_height: u32,
        image_width: u32,
        image_height: u32,
    },
}

pub type Result<T, E = DatasetError> = std::result::Result<T, E>;

impl DatasetError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            error: source,
        }
    }

    pub(crate) fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn image(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Self::Image {
            path: path.into(),
            message: message.to_string(),
        }
    }
}
