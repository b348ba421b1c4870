//! Data-parallel training over the GPUs of one host (`train --gpus N`, built with
//! `--features nccl`): one thread per GPU, each with a full replica of the model built from the
//! same seed, each computing the loss of its share of every batch; before each update the
//! gradients are summed over the GPUs with one NCCL all-reduce (every gradient flattened into one
//! f32 buffer), so every replica takes the same AdamW step and stays equal to the others.
//! `run::train` drives the threads; this file holds the NCCL side.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::optim::Param;
use crate::error::{Error, Result};

/// The error for `--gpus N` on a binary without NCCL.
pub fn needs_nccl() -> Error {
    Error::config(
        "--gpus",
        "data-parallel training needs a binary built with NCCL: `cargo build --release --features nccl --bin train` (see bench/TRAINING.md)",
    )
}

#[cfg(feature = "nccl")]
mod imp {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{CustomOp1, Device, Layout, Shape, Tensor};

    use crate::error::{Error, Result};

    /// The rendezvous of one group of GPUs (NCCL's unique id), made once and copied to each rank.
    #[derive(Clone, Copy)]
    pub struct GroupId(Id);
    // SAFETY: 128 plain bytes.
    unsafe impl Send for GroupId {}

    pub fn group_id() -> Result<GroupId> {
        Id::new().map(GroupId).map_err(|e| Error::Compute(format!("NCCL: could not make a group id ({e:?})")))
    }

    /// This rank's NCCL communicator. Used only from the thread that made it (whose CUDA stream
    /// it enqueues on).
    pub struct Nccl(Comm);
    // SAFETY: candle's CustomOp1 needs Send + Sync; the communicator is only ever used by the
    // thread that owns the replica (one op at a time on its stream).
    unsafe impl Send for Nccl {}
    unsafe impl Sync for Nccl {}

    impl Nccl {
        /// Joins the group: blocks until every rank has called it.
        pub fn join(device: &Device, rank: usize, world: usize, id: GroupId) -> Result<Self> {
            let cuda = device.as_cuda_device()?;
            Comm::from_rank(cuda.cuda_stream(), rank, world, id.0)
                .map(Nccl)
                .map_err(|e| Error::Compute(format!("NCCL: rank {rank} of {world} could not join ({e:?})")))
        }

        /// The element-wise sum of `t` (f32) over the ranks.
        pub fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
            Ok(t.contiguous()?.apply_op1_no_bwd(self)?)
        }
    }

    impl CustomOp1 for Nccl {
        fn name(&self) -> &'static str {
            "nccl-all-reduce-sum"
        }

        fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("the NCCL all-reduce runs on CUDA tensors only")
        }

        fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let Some((start, end)) = l.contiguous_offsets() else { candle_core::bail!("all-reduce of a non-contiguous tensor") };
            let dev = s.device().clone();
            let src = s.as_cuda_slice::<f32>()?.slice(start..end);
            // SAFETY: every element is written by the all-reduce before anything reads it.
            let mut dst = unsafe { dev.alloc::<f32>(end - start)? };
            self.0.all_reduce(&src, &mut dst, &ReduceOp::Sum).map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
            Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
        }
    }
}

#[cfg(not(feature = "nccl"))]
mod imp {
    use candle_core::{Device, Tensor};

    use crate::error::Result;

    #[derive(Clone, Copy)]
    pub struct GroupId;

    pub fn group_id() -> Result<GroupId> {
        Err(super::needs_nccl())
    }

    pub struct Nccl;

    impl Nccl {
        pub fn join(_: &Device, _: usize, _: usize, _: GroupId) -> Result<Self> {
            Err(super::needs_nccl())
        }

        pub fn all_reduce_sum(&self, _: &Tensor) -> Result<Tensor> {
            Err(super::needs_nccl())
        }
    }
}

pub use imp::{group_id, GroupId, Nccl};

/// Sums the gradients of `params` over the ranks, in place: one flat f32 buffer, one all-reduce.
/// A parameter without a gradient here (a rank whose share of the batch was empty) counts zeros.
pub fn all_reduce_grads(nccl: &Nccl, params: &[Param], grads: &mut HashMap<String, Tensor>, device: &Device) -> Result<()> {
    let parts = params
        .iter()
        .map(|p| match grads.get(&p.name) {
            Some(g) => Ok(g.flatten_all()?),
            None => Ok(Tensor::zeros(p.var.elem_count(), DType::F32, device)?),
        })
        .collect::<Result<Vec<_>>>()?;
    let summed = nccl.all_reduce_sum(&Tensor::cat(&parts, 0)?)?;
    let mut offset = 0;
    for p in params {
        let n = p.var.elem_count();
        grads.insert(p.name.clone(), summed.narrow(0, offset, n)?.reshape(p.var.shape())?);
        offset += n;
    }
    Ok(())
}

/// Rank `rank`'s share of a batch of `len` examples: a contiguous slice, sizes differing by at
/// most one.
pub fn shard(len: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    (rank * len / world)..((rank + 1) * len / world)
}

#[cfg(test)]
mod tests {
    use super::shard;

    #[test]
    fn shards_cover_the_batch_once() {
        for len in 0..20 {
            for world in 1..5 {
                let covered: Vec<usize> = (0..world).flat_map(|r| shard(len, r, world)).collect();
                assert_eq!(covered, (0..len).collect::<Vec<_>>());
            }
        }
    }
}
