//! LayerNorm and RMSNorm as the checkpoints store them (`weight`, `bias`). Inference uses
//! candle's fused CPU kernels; those have no backward pass, so when autograd is recording
//! (training) the same maths runs as composed tensor ops.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::tracks_grad;

#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    /// (weight, bias, eps), for a backend that holds them its own way.
    pub fn parts(&self) -> (&Tensor, &Tensor, f32) {
        (&self.weight, &self.bias, self.eps)
    }
}

pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: vb.get_with_hints(size, "weight", Init::Const(1.))?,
        bias: vb.get_with_hints(size, "bias", Init::Const(0.))?,
        eps: eps as f32,
    })
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if tracks_grad(&[xs, &self.weight, &self.bias]) {
            candle_nn::ops::layer_norm_slow(xs, &self.weight, &self.bias, self.eps)
        } else {
            candle_nn::ops::layer_norm(&xs.contiguous()?, &self.weight, &self.bias, self.eps)
        }
    }
}

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// (weight, eps), for a backend that holds them its own way.
    pub fn parts(&self) -> (&Tensor, f32) {
        (&self.weight, self.eps)
    }
}

pub fn rms_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<RmsNorm> {
    Ok(RmsNorm { weight: vb.get_with_hints(size, "weight", Init::Const(1.))?, eps: eps as f32 })
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if tracks_grad(&[xs, &self.weight]) {
            candle_nn::ops::rms_norm_slow(xs, &self.weight, self.eps)
        } else {
            candle_nn::ops::rms_norm(&xs.contiguous()?, &self.weight, self.eps)
        }
    }
}
