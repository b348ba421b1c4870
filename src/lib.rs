//! wasmcap: image captioning that runs in the browser.
//!
//! image bytes → [`preprocess`] → pixel values → [`models::siglip`] → encoder states
//! → [`models::gpt2`] (cross-attention) → token ids → [`tokenizer`] → text.
//! [`captioner::Captioner`] strings these together; [`loading`] reads 🤗 model folders.

pub mod architecture;
pub mod beam;
pub mod bench;
pub mod captioner;
pub mod chat;
pub mod error;
pub mod fuzzing;
pub mod generation;
#[cfg(feature = "webgpu")]
pub mod gpu;
#[cfg(not(target_arch = "wasm32"))]
pub mod hub;
pub mod jpeg;
pub mod loading;
pub mod lora;
pub mod models;
pub mod parallel;
pub mod preprocess;
pub mod quantize;
pub mod rng;
pub mod sampling;
pub mod tokenizer;
pub mod torch_bin;
#[cfg(not(target_arch = "wasm32"))]
pub mod train;
#[cfg(target_arch = "wasm32")]
pub mod wasm;

pub use captioner::{BeamOptions, Caption, CaptionOptions, CaptionRun, Captioner, TokenEvent};
pub use error::{Error, Result};
