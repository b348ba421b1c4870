//! Pure model maths: no I/O, no JS, no CLI. One file per model; module prefixes spell the
//! tensor names of `model.safetensors`.

pub mod attention;
pub mod gpt2;
pub mod linear;
pub mod llama;
pub mod llava;
pub mod siglip;
pub mod vision_encoder_decoder;
