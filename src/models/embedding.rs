//! Token and position embeddings: a table looked up by id, held as the checkpoint stores it
//! where that is f16 or bf16 (a vocabulary is the largest matrix of a small decoder: GPT-2's
//! 50257 × 768), the rows it returns widened to f32.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct Embedding {
    table: Tensor,
    /// The table is 16-bit as stored, and lookups are widened to f32.
    widen: bool,
}

impl Embedding {
    pub fn new(table: Tensor) -> Self {
        Self { table, widen: false }
    }

    /// The table `[n, dim]`, in the dtype it is held in.
    pub fn embeddings(&self) -> &Tensor {
        &self.table
    }

    pub fn is_16bit(&self) -> bool {
        self.widen
    }
}

impl Module for Embedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let mut shape = ids.dims().to_vec();
        shape.push(self.table.dim(1)?);
        let rows = self.table.index_select(&ids.flatten_all()?, 0)?;
        let rows = if self.widen { rows.to_dtype(DType::F32)? } else { rows };
        rows.reshape(shape)
    }
}

/// `weight` `[n, dim]` of `vb`: 16-bit where the checkpoint stores it so, else f32.
pub fn embedding(n: usize, dim: usize, vb: VarBuilder) -> Result<Embedding> {
    Ok(match super::linear::stored_16bit(&vb, "weight", (n, dim))? {
        Some(table) => Embedding { table, widen: true },
        None => Embedding::new(vb.get((n, dim), "weight")?),
    })
}
