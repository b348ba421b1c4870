//! The native trainer (`bin/train`): datasets, the trainable model built on `crate::models`,
//! AdamW, the training loop with checkpoints, metrics and the exported HF folder.

pub mod data;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod plot;
pub mod run;
