//! Custom candle ops with hand-written backward passes, for the two places where candle's autograd
//! would waste memory:
//! - [`FrozenMatmul`]: `x @ Wᵀ` with a frozen (dense or ggml-quantized) weight. Candle's own matmul
//!   backward always computes the weight's gradient too, and keeps it in the `GradStore` even when
//!   the weight is not a variable: under LoRA that is a full model's worth of useless gradients. This
//!   op returns only the input's gradient, and keeps only the (possibly quantized) weight alive.
//! - [`chunked_cross_entropy`]: the next-token loss computed a chunk of rows at a time, in forward
//!   and again in backward, so the batch × seq × vocab fp32 logits never exist at once.

use super::model::wide;
use candle_core::backend::BackendStorage;
use candle_core::quantized::QTensor;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, D, DType, Layout, Result, Shape, Storage, Tensor,
};
use std::sync::Arc;

/// A frozen weight `[out, in]`.
#[derive(Clone)]
pub enum FrozenWeight {
    /// Stored in the compute dtype.
    Dense(Tensor),
    /// Stored as ggml blocks; its matmul quantizes activations too, as ggml does.
    Quantized(Arc<QTensor>),
}

impl FrozenWeight {
    pub fn storage_bytes(&self) -> u64 {
        match self {
            FrozenWeight::Dense(t) => (t.elem_count() * t.dtype().size_in_bytes()) as u64,
            FrozenWeight::Quantized(q) => q.storage_size_in_bytes() as u64,
        }
    }

    pub fn dims(&self) -> (usize, usize) {
        let shape = match self {
            FrozenWeight::Dense(t) => t.shape().clone(),
            FrozenWeight::Quantized(q) => q.shape().clone(),
        };
        let d = shape.dims();
        (d[0], d[1])
    }

    /// The weight as a dense tensor of `dtype` (a copy for quantized weights).
    pub fn dense(&self, dtype: DType) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(t) => t.to_dtype(dtype),
            FrozenWeight::Quantized(q) => q.dequantize(&q.device())?.to_dtype(dtype),
        }
    }

    /// `x @ Wᵀ` for `x` of shape `[n, in]`, with a backward pass for `x` only.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => {
                let x = x.contiguous()?;
                x.apply_op1(FrozenMatmul {
                    weight: self.clone(),
                    compute: w.dtype(),
                })
            }
            FrozenWeight::Quantized(_) => {
                // ggml's CPU kernels take f32 activations.
                let dtype = x.dtype();
                let x = x.to_dtype(DType::F32)?.contiguous()?;
                x.apply_op1(FrozenMatmul {
                    weight: self.clone(),
                    compute: DType::F32,
                })?
                .to_dtype(dtype)
            }
        }
    }
}

/// See the module docs.
pub struct FrozenMatmul {
    weight: FrozenWeight,
    compute: DType,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        match &self.weight {
            FrozenWeight::Quantized(q) => q.as_ref().cpu_fwd(storage, layout),
            FrozenWeight::Dense(w) => {
                let (n, k) = layout.shape().dims2()?;
                let wt = w.t()?;
                let (out, k2) = w.dims2()?;
                if k != k2 {
                    candle_core::bail!(
                        "frozen matmul: input has {k} features, weight expects {k2}"
                    );
                }
                let (w_storage, w_layout) = wt.storage_and_layout();
                let Storage::Cpu(w_cpu) = &*w_storage else {
                    candle_core::bail!("frozen matmul: weight and input on different devices")
                };
                let result = storage.matmul(w_cpu, (1, n, out, k), layout, w_layout)?;
                Ok((result, Shape::from((n, out))))
            }
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        match &self.weight {
            FrozenWeight::Quantized(q) => q.as_ref().cuda_fwd(storage, layout),
            FrozenWeight::Dense(w) => {
                let (n, k) = layout.shape().dims2()?;
                let wt = w.t()?;
                let (out, _) = w.dims2()?;
                let (w_storage, w_layout) = wt.storage_and_layout();
                let Storage::Cuda(w_cuda) = &*w_storage else {
                    candle_core::bail!("frozen matmul: weight and input on different devices")
                };
                let result = storage.matmul(w_cuda, (1, n, out, k), layout, w_layout)?;
                Ok((result, Shape::from((n, out))))
            }
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // y = x Wᵀ  ⇒  dx = dy W. The quantized weight is dequantized for this product only.
        let w = match &self.weight {
            FrozenWeight::Dense(w) => w.clone(),
            FrozenWeight::Quantized(q) => q.dequantize(grad.device())?.to_dtype(self.compute)?,
        };
        Ok(Some(grad.to_dtype(w.dtype())?.matmul(&w)?))
    }
}

/// Targets and weights of one loss evaluation.
#[derive(Clone)]
pub struct LossTargets {
    /// Next-token ids, `[n]` u32.
    pub ids: Tensor,
    /// Per-row weight, `[n]` f32: 1 for counted tokens, 0 for padding and prompt tokens.
    pub mask: Tensor,
    /// The loss is `Σ mask · nll / normalizer`; the normalizer is the counted tokens of the whole
    /// optimizer step, so accumulated micro-batches sum to the loss of one big batch.
    pub normalizer: f64,
}

/// `Σ_rows mask · (logsumexp(logits) − logits[target])` for `logits = h Wᵀ` computed in fp32,
/// rows `[start, start + len)`. Returns the sum and, when asked, the probabilities' gradient.
fn chunk_nll(
    h: &Tensor,
    w: &Tensor,
    targets: &LossTargets,
    start: usize,
    len: usize,
) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let h_chunk = h.narrow(0, start, len)?;
    let logits = h_chunk
        .matmul(&w.t()?)?
        .to_dtype(super::model::wide(h.dtype()))?;
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let exp = shifted.exp()?;
    let sum_exp = exp.sum_keepdim(D::Minus1)?;
    let ids = targets.ids.narrow(0, start, len)?.unsqueeze(1)?;
    let target_shifted = shifted.gather(&ids, 1)?;
    let nll = (sum_exp.log()? - target_shifted)?.squeeze(1)?;
    let mask = targets
        .mask
        .narrow(0, start, len)?
        .to_dtype(wide(h.dtype()))?;
    Ok((nll, mask, exp.broadcast_div(&sum_exp)?, ids))
}

struct ChunkedCrossEntropy {
    targets: LossTargets,
    chunk: usize,
    value: f64,
    /// f32, or f64 for an f64 model.
    dtype: DType,
    weight_trainable: bool,
}

impl CustomOp2 for ChunkedCrossEntropy {
    fn name(&self) -> &'static str {
        "chunked-cross-entropy"
    }

    // The value was computed chunk by chunk (with tensor ops) before the op was applied; the op's
    // forward only hands it to the graph, so that backward can recompute chunk by chunk.
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let storage = match self.dtype {
            DType::F64 => CpuStorage::F64(vec![self.value]),
            _ => CpuStorage::F32(vec![self.value as f32]),
        };
        Ok((storage, Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendDevice;
        let storage = s1.device().storage_from_slice(&[self.value as f32])?;
        Ok((storage, Shape::from(())))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let upstream = grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let n = h.dim(0)?;
        let vocab = w.dim(0)?;
        let mut grad_h = Vec::new();
        let mut grad_w: Option<Tensor> = None;
        let mut start = 0;
        while start < n {
            let len = self.chunk.min(n - start);
            let (_, mask, probs, ids) = chunk_nll(h, w, &self.targets, start, len)?;
            // d nll / d logits = softmax − one_hot(target), weighted per row.
            let one_hot = Tensor::arange(0u32, vocab as u32, h.device())?
                .unsqueeze(0)?
                .broadcast_eq(&ids)?
                .to_dtype(wide(h.dtype()))?;
            let row_scale = (mask * (upstream / self.targets.normalizer))?.unsqueeze(1)?;
            let d_logits = (probs - one_hot)?
                .broadcast_mul(&row_scale)?
                .to_dtype(h.dtype())?;
            grad_h.push(d_logits.matmul(w)?);
            if self.weight_trainable {
                let h_chunk = h.narrow(0, start, len)?;
                let gw = d_logits.t()?.matmul(&h_chunk)?.to_dtype(wide(h.dtype()))?;
                grad_w = Some(match grad_w {
                    Some(total) => (total + gw)?,
                    None => gw,
                });
            }
            start += len;
        }
        let grad_h = Tensor::cat(&grad_h, 0)?;
        let grad_w = grad_w.map(|g| g.to_dtype(w.dtype())).transpose()?;
        Ok((Some(grad_h), grad_w))
    }
}

/// Mean next-token loss of `h Wᵀ` (`h`: `[n, hidden]`, `w`: `[vocab, hidden]`), `chunk` rows at a
/// time. `weight_trainable` says whether `w` needs a gradient (false for a frozen head under LoRA).
pub fn chunked_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &LossTargets,
    chunk: usize,
    weight_trainable: bool,
) -> Result<Tensor> {
    let n = h.dim(0)?;
    let (h_detached, w_detached) = (h.detach(), w.detach());
    let mut total = 0f64;
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let (nll, mask, _, _) = chunk_nll(&h_detached, &w_detached, targets, start, len)?;
        total += (nll * mask)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        start += len;
    }
    let op = ChunkedCrossEntropy {
        targets: targets.clone(),
        chunk,
        value: total / targets.normalizer,
        dtype: wide(h.dtype()),
        weight_trainable,
    };
    h.apply_op2(w, op)
}

/// The same loss with candle's autograd over the full fp32 logits (what Hugging Face does).
pub fn full_cross_entropy(logits: &Tensor, targets: &LossTargets) -> Result<Tensor> {
    let dtype = wide(logits.dtype());
    let log_probs = candle_nn::ops::log_softmax(&logits.to_dtype(dtype)?, D::Minus1)?;
    let picked = log_probs
        .gather(&targets.ids.unsqueeze(1)?, 1)?
        .squeeze(1)?;
    let total = (picked * targets.mask.to_dtype(dtype)?)?.sum_all()?;
    total.affine(-1.0 / targets.normalizer, 0.0)
}
