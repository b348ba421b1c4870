//! The model files' [`Backend`] on the GPU: weights uploaded once from the loaded CPU model,
//! every operation one of this module's kernels, activations staying in GPU memory.

use candle_core::{DType, Tensor};
use candle_nn::Activation;

use super::{Gpu, GpuTensor};
use crate::error::{Error, Result};
use crate::models::backend::Backend;
use crate::models::linear::Linear;
use crate::models::norm::LayerNorm;

/// A `Linear`'s weight [out, in] and bias in GPU memory (f32: quantized and 16-bit weights are
/// widened at upload for now).
#[derive(Debug, Clone)]
pub struct GpuLinear {
    weight: GpuTensor,
    bias: Option<GpuTensor>,
}

#[derive(Debug, Clone)]
pub struct GpuLayerNorm {
    weight: GpuTensor,
    bias: GpuTensor,
    eps: f32,
}

impl Backend for Gpu {
    type Tensor = GpuTensor;
    type Linear = GpuLinear;
    type LayerNorm = GpuLayerNorm;
    type Error = Error;

    fn linear(&self, xs: &GpuTensor, layer: &GpuLinear, act: Option<&Activation>) -> Result<GpuTensor> {
        self.linear_activated(xs, &layer.weight, layer.bias.as_ref(), act)
    }

    fn layer_norm(&self, xs: &GpuTensor, norm: &GpuLayerNorm) -> Result<GpuTensor> {
        Gpu::layer_norm(self, xs, &norm.weight, &norm.bias, norm.eps)
    }

    fn add(&self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        Gpu::add(self, a, b)
    }

    fn cat_tokens(&self, parts: &[&GpuTensor]) -> Result<GpuTensor> {
        Gpu::cat_tokens(self, parts)
    }

    fn self_attention(&self, q: &GpuTensor, k: &GpuTensor, v: &GpuTensor, heads: usize) -> Result<GpuTensor> {
        let d = q.shape().last().copied().unwrap_or(0) / heads.max(1);
        self.attention(q, k, v, (heads, heads), 1.0 / (d.max(1) as f32).sqrt(), None)
    }

    /// One part, all tokens: the GPU's parallelism is within each kernel.
    fn by_tokens<const N: usize, F>(&self, inputs: &[&GpuTensor], f: F) -> Result<[GpuTensor; N]>
    where
        F: Fn(&[&GpuTensor]) -> Result<[GpuTensor; N]> + Sync + Send,
    {
        f(inputs)
    }

    fn tensor_from(&self, t: &Tensor) -> Result<GpuTensor> {
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        self.upload(&values, t.dims())
    }

    fn linear_from(&self, layer: &Linear) -> Result<GpuLinear> {
        Ok(GpuLinear { weight: self.tensor_from(&layer.weight_f32()?)?, bias: layer.bias().map(|b| self.tensor_from(b)).transpose()? })
    }

    fn layer_norm_from(&self, norm: &LayerNorm) -> Result<GpuLayerNorm> {
        let (weight, bias, eps) = norm.parts();
        Ok(GpuLayerNorm { weight: self.tensor_from(weight)?, bias: self.tensor_from(bias)?, eps })
    }
}
