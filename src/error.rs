//! One error type for every path a user's data reaches. Each variant names what is wrong
//! (the file, the tensor, both shapes) so the message is actionable from JS as well.

use std::fmt;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{file}: missing tensor `{name}`")]
    MissingTensor { file: String, name: String },

    #[error("{file}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch { file: String, name: String, expected: Vec<usize>, found: Vec<usize> },

    #[error("{file}: not a valid safetensors file ({reason})")]
    Safetensors { file: String, reason: String },

    #[error("{file}: not a valid PyTorch checkpoint ({reason})")]
    TorchCheckpoint { file: String, reason: String },

    #[error("{file}: invalid configuration: {reason}")]
    Config { file: String, reason: String },

    /// A streamed checkpoint (`loading::StreamedCheckpoint`) refusing a call: weights that are
    /// not a weights file, a file opened twice, a chunk of a file not opened or past what the
    /// platform addresses, or any chunk after one was refused.
    #[error("{file}: {reason}")]
    Stream { file: String, reason: String },

    #[error("missing file `{0}`")]
    MissingFile(String),

    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },

    #[error("image: {0}")]
    Image(String),

    /// The GPU backend (`gpu`): no adapter, a limit the device lacks, a lost device.
    #[error("GPU: {0}")]
    Gpu(String),

    #[error("tokenizer.json: {0}")]
    Tokenizer(String),

    #[error("generation: {0}")]
    Generation(String),

    #[error("model computation failed: {0}")]
    Compute(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn config(file: &str, reason: impl fmt::Display) -> Self {
        Error::Config { file: file.to_string(), reason: reason.to_string() }
    }
}

/// candle reports a missing or misshapen weight as its own error, possibly wrapped in
/// backtrace/context layers; we peel those off so the user sees which tensor and which shapes.
pub(crate) fn from_candle_weights(file: &str, err: candle_core::Error) -> Error {
    use candle_core::Error as E;
    match err {
        E::WithBacktrace { inner, .. } => from_candle_weights(file, *inner),
        E::Context { inner, .. } => from_candle_weights(file, *inner),
        E::CannotFindTensor { path } => Error::MissingTensor { file: file.to_string(), name: path },
        E::UnexpectedShape { msg, expected, got } => Error::ShapeMismatch {
            file: file.to_string(),
            name: msg.trim_start_matches("shape mismatch for ").to_string(),
            expected: expected.dims().to_vec(),
            found: got.dims().to_vec(),
        },
        other => Error::Compute(other.to_string()),
    }
}

impl From<candle_core::Error> for Error {
    fn from(err: candle_core::Error) -> Self {
        Error::Compute(err.to_string())
    }
}
