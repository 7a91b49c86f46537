//! Custom candle ops with hand-written backward passes. Candle's autograd computes a gradient for
//! every operand of every op, constants and frozen weights included, and keeps those until the step
//! ends; and candle-nn's fused kernels have no backward at all. These ops fix both:
//! - [`FrozenWeight::matmul_t`]: `x Wᵀ` with a frozen (dense or ggml-quantized) weight, returning
//!   only the input's gradient (under LoRA, candle's matmul would compute and keep a full model's
//!   worth of weight gradients).
//! - [`causal_softmax`], [`rope`], [`rms_norm`]: candle-nn's fast kernels with exact backward passes,
//!   keeping masks and tables out of the graph.
//! - [`causal_attention`]: attention as one op that keeps q, k and v only and recomputes its
//!   probabilities in backward.
//! - [`chunked_cross_entropy`]: the next-token loss computed a chunk of rows at a time, in forward
//!   and again in backward, so the batch × seq × vocab fp32 logits never exist at once.

use super::kernels::{Elem, RowOp};
use super::matmul::{Causal, causal_product, matmul as mm};
use super::model::wide;
use candle_core::backend::BackendStorage;
use candle_core::quantized::QTensor;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Storage, Tensor,
};
use std::sync::Arc;

/// An op on `x` whose forward value was computed beforehand (with candle's fast kernels, on detached
/// inputs) and whose backward is `backward(x, output, output_grad)`. This gives fused kernels a
/// gradient, and keeps constants (masks, rotary tables, frozen weights) out of the autograd graph:
/// candle's own backward stores a gradient for every operand of a binary op, constants included,
/// until the step ends. With one, two or three inputs (`CustomOp1`, `CustomOp2`, `CustomOp3`), as
/// the backward closure's arguments say.
struct Precomputed<F> {
    name: &'static str,
    value: std::sync::Mutex<Option<Tensor>>,
    backward: F,
}

impl<F> Precomputed<F> {
    fn new(name: &'static str, value: Tensor, backward: F) -> Result<Self> {
        Ok(Self {
            name,
            value: std::sync::Mutex::new(Some(value.contiguous()?)),
            backward,
        })
    }
}

fn take_value(value: &std::sync::Mutex<Option<Tensor>>, name: &str) -> Result<Tensor> {
    value
        .lock()
        .map_err(|_| candle_core::Error::Msg(format!("{name}: lock poisoned")))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg(format!("{name}: forward ran twice")))
}

/// A precomputed value as a CPU op's output: its own storage, moved, where nothing else holds the
/// value and it starts its storage contiguously (a fresh kernel's output, as every fused op's
/// value is); otherwise a copy. Moving it saves a pass over the output and a second buffer of its
/// size while the op runs.
fn cpu_value(t: Tensor) -> Result<(CpuStorage, Shape)> {
    if !(t.is_contiguous() && t.layout().start_offset() == 0) {
        return cpu_copy(&t);
    }
    let shape = t.shape().clone();
    match t.into_storage() {
        Ok((Storage::Cpu(c), _)) => Ok((c, shape)),
        Ok(_) => candle_core::bail!("precomputed value is not on the CPU"),
        Err(t) => cpu_copy(&t),
    }
}

fn cpu_copy(t: &Tensor) -> Result<(CpuStorage, Shape)> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(c) => Ok((c.try_clone(layout)?, layout.shape().clone())),
        _ => candle_core::bail!("precomputed value is not on the CPU"),
    }
}

#[cfg(feature = "cuda")]
fn cuda_copy(t: &Tensor) -> Result<(candle_core::CudaStorage, Shape)> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cuda(c) => Ok((c.try_clone(layout)?, layout.shape().clone())),
        _ => candle_core::bail!("precomputed value is not on the GPU"),
    }
}

impl<F> CustomOp1 for Precomputed<F>
where
    F: Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_value(take_value(&self.value, self.name)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_copy(&take_value(&self.value, self.name)?)
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // Detached: an argument that is a variable (or derives from one) would make every tensor
        // of the backward formula record a graph, and the gradient would hold them all alive.
        (self.backward)(&arg.detach(), &res.detach(), &grad.detach()).map(Some)
    }
}

/// Frees the data of `t` (CPU only; elsewhere nothing), keeping its shape and its place in the
/// autograd graph. candle's graph keeps every op's inputs alive until backward has passed them,
/// whether or not their backward formula reads them; PyTorch's autograd keeps only the tensors a
/// formula saves. A training forward pass releases, right after their last use, the activations
/// that only such graph nodes still hold and no backward formula reads: the outputs of products
/// and norms consumed by a sum, RoPE or a frozen product (whose backward needs only the weight).
///
/// The caller guarantees that nothing reads `t` (or a view of its storage) again; a memtune kernel
/// or product that is handed one anyway fails with an error (its data is empty), and candle's own
/// CPU ops panic on the out-of-range slice.
pub fn release(t: &Tensor) -> Result<()> {
    if crate::engine::cpu_paths(t.device()) {
        t.inplace_op1(&Release)?;
    }
    Ok(())
}

struct Release;

impl candle_core::InplaceOp1 for Release {
    fn name(&self) -> &'static str {
        "release"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _: &Layout) -> Result<()> {
        match storage {
            CpuStorage::F32(v) => *v = Vec::new(),
            CpuStorage::BF16(v) => *v = Vec::new(),
            CpuStorage::F16(v) => *v = Vec::new(),
            CpuStorage::F64(v) => *v = Vec::new(),
            _ => {}
        }
        Ok(())
    }
}

/// `value` as the output of an op on `x` with gradient `backward(x, value, dvalue)`.
pub fn with_backward<F>(
    x: &Tensor,
    value: Tensor,
    name: &'static str,
    backward: F,
) -> Result<Tensor>
where
    F: Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    x.apply_op1(Precomputed::new(name, value, backward)?)
}

impl<F> CustomOp2 for Precomputed<F>
where
    F: Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor)> + Send + Sync,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_value(take_value(&self.value, self.name)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_copy(&take_value(&self.value, self.name)?)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (ga, gb) = (self.backward)(&a.detach(), &b.detach(), &res.detach(), &grad.detach())?;
        Ok((Some(ga), Some(gb)))
    }
}

/// Two-input version of [`with_backward`].
pub fn with_backward2<F>(
    a: &Tensor,
    b: &Tensor,
    value: Tensor,
    name: &'static str,
    backward: F,
) -> Result<Tensor>
where
    F: Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor)> + Send + Sync + 'static,
{
    a.apply_op2(b, Precomputed::new(name, value, backward)?)
}

/// The gradients of a three-input op, each `None` where that input is not tracked.
type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// Which of a three-input op's inputs backward must give a gradient for (the tracked ones).
pub type Wanted3 = [bool; 3];

impl<F> CustomOp3 for Precomputed<F>
where
    F: Fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor, Wanted3) -> Result<Grads3> + Send + Sync,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_value(take_value(&self.value, self.name)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda_copy(&take_value(&self.value, self.name)?)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let wanted = [a.track_op(), b.track_op(), c.track_op()];
        (self.backward)(
            &a.detach(),
            &b.detach(),
            &c.detach(),
            &res.detach(),
            &grad.detach(),
            wanted,
        )
    }
}

/// Three-input version of [`with_backward`]: `backward(a, b, c, output, output_grad, wanted)`,
/// which gives the gradients of the inputs `wanted` says are tracked (the others may be `None`).
pub fn with_backward3<F>(
    inputs: [&Tensor; 3],
    value: Tensor,
    name: &'static str,
    backward: F,
) -> Result<Tensor>
where
    F: Fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor, Wanted3) -> Result<Grads3>
        + Send
        + Sync
        + 'static,
{
    inputs[0].apply_op3(
        inputs[1],
        inputs[2],
        Precomputed::new(name, value, backward)?,
    )
}

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

    /// The weight as a dense tensor of `dtype` (a copy for quantized weights).
    pub fn dense(&self, dtype: DType) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(t) => t.to_dtype(dtype),
            FrozenWeight::Quantized(q) => q.dequantize(&q.device())?.to_dtype(dtype),
        }
    }

    /// `x Wᵀ (+ bias)` for `x` of shape `[n, in]`, with a gradient for `x` only: the weight (and
    /// bias) are frozen, so no weight gradient is computed or stored.
    pub fn matmul_t(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        self.product(x, bias, true)
    }

    /// [`Self::matmul_t`] as a graph node whose value nobody reads (zeros; see
    /// [`super::matmul::unread_matmul`]): the same backward, no product forward.
    pub fn unread_matmul_t(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        self.product(x, bias, false)
    }

    fn product(&self, x: &Tensor, bias: Option<&Tensor>, read: bool) -> Result<Tensor> {
        let dtype = x.dtype();
        if let (FrozenWeight::Dense(w), None) = (self, bias)
            && super::matmul::on_cpu_products(x)
            && crate::engine::cpu_paths(w.device())
            && w.dtype() == dtype
        {
            return x.apply_op1(FrozenProduct { wt: w.t()?, read });
        }
        let xd = x.detach();
        let mut value = match self {
            _ if !read => {
                let out = match self {
                    FrozenWeight::Dense(w) => w.dim(0)?,
                    FrozenWeight::Quantized(q) => q.shape().dims()[0],
                };
                Tensor::zeros((xd.dim(0)?, out), dtype, xd.device())?
            }
            FrozenWeight::Dense(w) => mm(&xd, &w.t()?)?,
            // On the CPU, ggml's kernels: they take f32 activations (and quantize them to 8 bits).
            FrozenWeight::Quantized(q) if crate::engine::cpu_paths(xd.device()) => xd
                .to_dtype(DType::F32)?
                .contiguous()?
                .apply_op1_no_bwd(q.as_ref())?
                .to_dtype(dtype)?,
            // Elsewhere the weight dequantized for this product, as backward does: candle's CUDA
            // kernels for a quantized product gave a NaN loss on an H200 (tests/engine_cuda.rs).
            FrozenWeight::Quantized(_) => mm(&xd, &self.dense(dtype)?.t()?)?,
        };
        if let (Some(b), true) = (bias, read) {
            value = value.broadcast_add(&b.detach())?;
        }
        let weight = self.clone();
        with_backward(x, value, "frozen-matmul", move |_, _, grad| {
            // y = x Wᵀ  ⇒  dx = dy W. A quantized weight is dequantized for this product only.
            let w = weight.dense(grad.dtype())?;
            mm(grad, &w)
        })
    }
}

/// `x Wᵀ` on the CPU with a frozen dense weight as one op whose forward pass is the product
/// itself, written straight into the op's output: through [`with_backward`] the product was
/// computed first and then copied into the op's output (2% of an fp32 LoRA step, and one more
/// output-sized buffer live for a moment). Backward gives `x` its gradient `dy · W` only.
struct FrozenProduct {
    /// `Wᵀ`, a view of the weight.
    wt: Tensor,
    /// False for [`FrozenWeight::unread_matmul_t`]: forward writes zeros.
    read: bool,
}

impl CustomOp1 for FrozenProduct {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        if !self.read {
            let shape = super::matmul::product_shape(layout.dims(), self.wt.dim(1)?);
            return super::matmul::zeros_like_product(storage.dtype(), shape);
        }
        let (weight, weight_layout) = self.wt.storage_and_layout();
        let Storage::Cpu(weight) = &*weight else {
            candle_core::bail!("frozen-matmul: the weight is not on the CPU");
        };
        super::matmul::cpu_product(storage, layout, weight, weight_layout)
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        mm(&grad.detach(), &self.wt.t()?).map(Some)
    }
}

/// Softmax over the last dimension of `scale · scores` (`[b, h, s, s]`) under a causal mask
/// (`mask`: `[s, s]`, 0 or −∞), computed in fp32 (f64 for f64 scores) with candle's ops (any
/// device) and returned in the scores' dtype. Backward keeps the scores and the probabilities only,
/// as the CPU's fused kernel does: the scale is applied inside the op, so no scaled copy of the
/// scores is kept as well (on a GPU that copy was one more scores-sized tensor per layer).
pub fn causal_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let dtype = scores.dtype();
    let wide = wide(dtype);
    // One statement per op, each result replacing the last: in one chained expression every
    // intermediate lives to the end of the statement, and on an H200 the recomputed attention's
    // probabilities then held four fp32 copies of the scores at once (with the bf16 scores and
    // probabilities, 20 bytes per score; now at most two fp32 copies, 10 bytes).
    let mut z = scores.detach().to_dtype(wide)?;
    z = z.affine(scale, 0.0)?;
    z = z.broadcast_add(&mask.to_dtype(wide)?)?;
    z = candle_nn::ops::softmax_last_dim(&z)?;
    let value = z.to_dtype(dtype)?;
    drop(z);
    with_backward(scores, value, "causal-softmax", move |_, probs, grad| {
        causal_softmax_grad(probs, grad, scale)
    })
}

/// `t` as an operand of [`mm`]: as it is where memtune's CPU products run (they read any strides),
/// contiguous elsewhere (candle's products want batch entries at one stride).
fn operand(t: &Tensor) -> Result<Tensor> {
    if super::matmul::on_cpu_products(t) {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// The scores' gradient of [`causal_softmax`] from its probabilities `p` and their gradient `g`:
/// `scale · p ⊙ (g − Σ_j g_j p_j)` (masked positions have p = 0), in fp32 (f64 for f64), returned
/// in p's dtype.
pub fn causal_softmax_grad(p: &Tensor, g: &Tensor, scale: f64) -> Result<Tensor> {
    let dtype = p.dtype();
    let wide = wide(dtype);
    // As in `causal_softmax`, one op per statement: at most three fp32 scores-sized tensors live
    // (with the 16-bit inputs, 16 bytes per score where the chained expression held 26).
    let p = p.to_dtype(wide)?;
    let mut g = g.to_dtype(wide)?;
    let dot = (&g * &p)?.sum_keepdim(D::Minus1)?;
    g = g.broadcast_sub(&dot)?;
    g = (g * p)?;
    g = g.affine(scale, 0.0)?;
    g.to_dtype(dtype)
}

/// Rows `ids` (u32, one dimension) of `table` `[vocab, hidden]`: an embedding lookup whose
/// backward makes the table's gradient in one buffer. candle's `index_select` backward adds the
/// rows into a zero gradient with `index_add`, which returns a new tensor: the zeros and the sum
/// (two vocabulary-sized matrices, 62.5 MiB each at 32,000 × 512 in fp32) were live at once.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let value = table.detach().index_select(ids, 0)?;
    let ids = ids.clone();
    with_backward(table, value, "embedding", move |table, _, grad| {
        scatter_rows(table, &ids, grad)
    })
}

/// `table`'s shape of zeros with `grad`'s rows added at rows `ids`: on the CPU in one new buffer
/// ([`RowGrads::block`] over every row), elsewhere candle's `index_add`.
fn scatter_rows(table: &Tensor, ids: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let (vocab, hidden) = table.dims2()?;
    let (dtype, device) = (grad.dtype(), grad.device());
    if !(crate::engine::cpu_paths(device) && matches!(dtype, DType::F32 | DType::BF16 | DType::F16))
    {
        return Tensor::zeros((vocab, hidden), dtype, device)?.index_add(
            &ids.contiguous()?,
            grad,
            0,
        );
    }
    RowGrads::new(vocab, ids, grad)?.block(0, vocab)
}

/// An embedding table's gradient kept as what makes it: the ids looked up and the gradient of
/// each looked-up row. [`RowGrads::block`] writes any block of the table-shaped gradient from them,
/// so an update by blocks of rows never needs the whole `vocab × hidden` gradient, where all but
/// the looked-up rows are zero.
pub struct RowGrads {
    ids: Vec<u32>,
    /// `ids.len() × hidden` values, widened to f32.
    rows: Vec<f32>,
    vocab: usize,
    hidden: usize,
    dtype: DType,
    device: candle_core::Device,
}

impl RowGrads {
    /// The gradient of a `vocab`-row table whose rows `ids` were looked up, from `grad`
    /// (`[ids, hidden]`, in the table's dtype: f32, bf16 or f16).
    pub fn new(vocab: usize, ids: &Tensor, grad: &Tensor) -> Result<Self> {
        let (n, hidden) = grad.dims2()?;
        let ids = ids.flatten_all()?.to_vec1::<u32>()?;
        if ids.len() != n {
            candle_core::bail!("embedding: {} ids for {n} gradient rows", ids.len());
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            candle_core::bail!("embedding: id {id} outside the table's {vocab} rows");
        }
        let dtype = grad.dtype();
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            candle_core::bail!("embedding: no row gradients in {dtype:?}");
        }
        Ok(Self {
            ids,
            rows: grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            vocab,
            hidden,
            dtype,
            device: grad.device().clone(),
        })
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Rows `start..start + len` of the table-shaped gradient: zeros with the looked-up rows
    /// that fall in the block added in the ids' order, each addition in f32 and rounded once to
    /// the dtype, as candle's addition does. The same values, row for row, as the whole gradient.
    pub fn block(&self, start: usize, len: usize) -> Result<Tensor> {
        if start + len > self.vocab {
            candle_core::bail!(
                "embedding: rows {start}..{} of a {}-row table",
                start + len,
                self.vocab
            );
        }
        fn scatter<T: Elem + candle_core::WithDType>(
            g: &RowGrads,
            start: usize,
            len: usize,
        ) -> Result<Tensor> {
            let hidden = g.hidden;
            let mut out = vec![T::put(0.0); len * hidden];
            for (&id, row) in g.ids.iter().zip(g.rows.chunks_exact(hidden)) {
                let Some(at) = (id as usize).checked_sub(start).filter(|&r| r < len) else {
                    continue;
                };
                for (d, &v) in out[at * hidden..(at + 1) * hidden].iter_mut().zip(row) {
                    *d = T::put(d.get() + v);
                }
            }
            Tensor::from_vec(out, (len, hidden), &g.device)
        }
        match self.dtype {
            DType::F32 => scatter::<f32>(self, start, len),
            DType::BF16 => scatter::<half::bf16>(self, start, len),
            _ => scatter::<half::f16>(self, start, len),
        }
    }
}

/// Causal self-attention `softmax(scale · q kᵀ + mask) v` for q and k `[b, h, s, d]` and v
/// `[b, s, h, d]` (k and v with q's heads; v as the projection gives it, its heads side by side),
/// returned as `[b, s, h, d]`, contiguous: ready for the output projection without a copy, as v's
/// gradient is for v's. One op that keeps only q, k and v for backward, as flash attention does:
/// backward recomputes the probabilities from q and k (one more `q kᵀ` product and softmax per
/// layer) instead of keeping the scores and the probabilities, `2 · b · h · s²` elements per
/// layer, from forward to backward. The softmax runs on [`super::kernels::scaled_causal_softmax`]
/// (the fused kernel on the CPU, [`causal_softmax`] elsewhere), so every device keeps the same
/// tensors. The six products run on [`super::matmul::causal_product`] (and
/// [`super::matmul::causal_product_seq`] for the two that come out with the heads side by side),
/// which in f32 on the CPU multiply only the blocks on or below the diagonal (the rest is masked
/// or zero).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    use super::matmul::causal_product_seq;
    let mask = mask.clone();
    let probs = move |q: &Tensor, k: &Tensor| {
        let scores = causal_product(q, &k.t()?, Causal::Output)?;
        super::kernels::scaled_causal_softmax(&scores, &mask, scale)
    };
    // v and the output's gradient, `[b, s, h, d]`, are read as `[b, h, s, d]` views.
    let heads = |t: &Tensor| operand(&t.transpose(1, 2)?);
    let p = probs(&q.detach(), &k.detach())?;
    let value = causal_product_seq(&p, &heads(&v.detach())?, Causal::Lower)?;
    drop(p);
    with_backward3(
        [q, k, v],
        value,
        "causal-attention",
        move |q, k, v, _, grad, [want_q, want_k, want_v]| {
            let grad = heads(grad)?;
            let p = probs(q, k)?;
            let dv = want_v
                .then(|| causal_product_seq(&p.t()?, &grad, Causal::Upper))
                .transpose()?;
            if !(want_q || want_k) {
                return Ok((None, None, dv));
            }
            let dp = causal_product(&grad, &heads(v)?.t()?, Causal::Output)?;
            drop(grad);
            let ds = super::kernels::scaled_causal_softmax_grad(&p, &dp, scale)?;
            drop((p, dp));
            let dq = want_q
                .then(|| causal_product(&ds, k, Causal::Lower))
                .transpose()?;
            let dk = want_k
                .then(|| causal_product(&ds.t()?, q, Causal::Upper))
                .transpose()?;
            Ok((dq, dk, dv))
        },
    )
}

/// `silu(gate) · up`, SwiGLU's product, with candle's ops (any device), as one op whose backward
/// keeps only its two inputs, as the CPU's fused kernel does, rather than `silu(gate)` as well (on
/// a GPU one more intermediate-sized tensor per layer). The gradients are computed in fp32 (f64
/// for f64 inputs): with σ = sigmoid(g), d/dg = d · u · σ · (1 + g · (1 − σ)), d/du = d · g · σ.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let value = (gate.detach().silu()? * up.detach())?;
    with_backward2(gate, up, value, "swiglu", |g, u, _, d| {
        let dtype = g.dtype();
        let wide = wide(dtype);
        let (g, u, d) = (g.to_dtype(wide)?, u.to_dtype(wide)?, d.to_dtype(wide)?);
        let sigma = (g.neg()?.exp()? + 1.0)?.recip()?;
        let slope = ((&g * sigma.affine(-1.0, 1.0)?)? + 1.0)?;
        let dg = ((&d * &u)? * (&sigma * slope)?)?.to_dtype(dtype)?;
        let du = (d * (g * sigma)?)?.to_dtype(dtype)?;
        Ok((dg, du))
    })
}

/// Hugging Face's rotate-half RoPE on `x`: `[b, s, h, d]` (a projection's output with its heads
/// side by side) with tables `[s, d/2]` of x's dtype, returned as `[b, h, s, d]`, contiguous, as
/// attention reads it. On the CPU it runs [`super::kernels::rope`], which transposes the heads in
/// the same pass, and its backward hands `x` a contiguous `[b, s, h, d]` gradient the same way, so
/// neither pass copies a transposed view; elsewhere candle-nn's kernel, on contiguous copies.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    use super::kernels::RopeLayout;
    let value = {
        let xd = x.detach();
        match super::kernels::rope(&xd, cos, sin, 1.0, RopeLayout::SeqToHeads)? {
            Some(value) => value,
            None => candle_nn::rotary_emb::rope(&xd.transpose(1, 2)?.contiguous()?, cos, sin)?,
        }
    };
    let (cos, sin) = (cos.clone(), sin.clone());
    with_backward(x, value, "rope", move |_, _, grad| {
        // A rotation's transpose is the rotation by the opposite angle.
        let grad = grad.contiguous()?;
        match super::kernels::rope(&grad, &cos, &sin, -1.0, RopeLayout::HeadsToSeq)? {
            Some(back) => Ok(back),
            None => candle_nn::rotary_emb::rope(&grad, &cos, &sin.neg()?)?
                .transpose(1, 2)?
                .contiguous(),
        }
    })
}

/// RMSNorm `x / rms(x) · w` over the last dimension, computed in fp32 (f64 for f64 inputs).
/// `w_trainable` decides whether the weight gets a gradient.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, w_trainable: bool) -> Result<Tensor> {
    let dtype = x.dtype();
    let wide = wide(dtype);
    let x = x.contiguous()?;
    let value = if dtype == DType::F64 {
        // candle-nn's fused kernel has no f64 version; f64 is the tests' reference precision.
        let xd = x.detach();
        let r = ((xd.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?).recip()?;
        xd.broadcast_mul(&r)?
            .broadcast_mul(&w.detach().to_dtype(dtype)?)?
    } else {
        candle_nn::ops::rms_norm(&x.detach(), &w.detach().to_dtype(dtype)?, eps as f32)?
    };
    // Gradients: with r = 1/√(mean(x²) + ε) and u = g ⊙ w,
    // dx = r·u − x·r³·mean(u ⊙ x),  dw = Σ_rows g ⊙ x ⊙ r.
    let grads = move |x: &Tensor,
                      w: &Tensor,
                      grad: &Tensor,
                      want_w: bool|
          -> Result<(Tensor, Option<Tensor>)> {
        let grad_c = grad.contiguous()?;
        if !want_w && let Some(dx) = super::kernels::rms_norm_input_grad(x, w, &grad_c, eps)? {
            return Ok((dx, None));
        }
        if want_w && let Some((dx, dw)) = super::kernels::rms_norm_grads(x, w, &grad_c, eps)? {
            return Ok((dx, Some(dw)));
        }
        drop(grad_c);
        let (x, g, w32) = (x.to_dtype(wide)?, grad.to_dtype(wide)?, w.to_dtype(wide)?);
        let r = ((x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?).recip()?;
        let u = g.broadcast_mul(&w32)?;
        let dot = (&u * &x)?.mean_keepdim(D::Minus1)?;
        let dx =
            (u.broadcast_mul(&r)? - x.broadcast_mul(&(r.powf(3.0)? * dot)?)?)?.to_dtype(dtype)?;
        let dw = if want_w {
            let h = x.dim(D::Minus1)?;
            let rows = x.elem_count() / h;
            let gx = (g * x.broadcast_mul(&r)?)?.reshape((rows, h))?.sum(0)?;
            Some(gx.to_dtype(w.dtype())?)
        } else {
            None
        };
        Ok((dx, dw))
    };
    if w_trainable {
        with_backward2(&x, w, value, "rms-norm", move |x, w, _, grad| {
            let (dx, dw) = grads(x, w, grad, true)?;
            Ok((
                dx,
                dw.ok_or_else(|| candle_core::Error::Msg("rms-norm: no weight gradient".into()))?,
            ))
        })
    } else {
        let w = w.clone();
        with_backward(&x, value, "rms-norm", move |x, _, grad| {
            Ok(grads(x, &w, grad, false)?.0)
        })
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

/// A loss's per-row targets on the host, for the fused CPU kernels ([`super::kernels`]).
struct HostTargets {
    ids: Vec<u32>,
    mask: Vec<f64>,
}

impl HostTargets {
    fn new(targets: &LossTargets) -> Result<Self> {
        Ok(Self {
            ids: targets.ids.to_vec1::<u32>()?,
            mask: targets.mask.to_dtype(DType::F64)?.to_vec1::<f64>()?,
        })
    }

    /// The target ids of rows `[start, start + len)`.
    fn ids(&self, start: usize, len: usize) -> &[u32] {
        &self.ids[start..start + len]
    }

    /// The fused gradient kernel's per-row scales `mask · factor` of rows `[start, start + len)`
    /// (`factor`: the upstream gradient over the loss's normalizer).
    fn scales(&self, start: usize, len: usize, factor: f64) -> Vec<f32> {
        self.mask[start..start + len]
            .iter()
            .map(|&m| (m * factor) as f32)
            .collect()
    }

    /// `Σ mask · nll` over the rows from `start` on, one per value of `nll`.
    fn masked_sum(&self, start: usize, nll: &[f32]) -> f64 {
        nll.iter()
            .zip(&self.mask[start..])
            .map(|(&l, &m)| l as f64 * m)
            .sum()
    }
}

/// Logits of rows `[start, start + len)`, in f32 (f64 for an f64 model).
fn chunk_logits(h: &Tensor, w: &Tensor, start: usize, len: usize) -> Result<Tensor> {
    super::kernels::to_dtype(&mm(&h.narrow(0, start, len)?, &w.t()?)?, wide(h.dtype()))
}

/// candle's ops for one chunk's per-row log-sum-exp `[len, 1]` and its masked NLL sum (f64
/// models, and off the CPU).
fn composite_lse_nll(
    logits: &Tensor,
    targets: &LossTargets,
    start: usize,
    len: usize,
) -> Result<(Tensor, f64)> {
    let lse = log_sum_exp(logits)?;
    let ids = targets
        .ids
        .narrow(0, start, len)?
        .unsqueeze(1)?
        .contiguous()?;
    let nll = (&lse - logits.gather(&ids, 1)?)?.squeeze(1)?;
    let mask = targets
        .mask
        .narrow(0, start, len)?
        .to_dtype(logits.dtype())?;
    let sum = (nll * mask)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    Ok((lse, sum))
}

/// Per-row log-sum-exp of `logits` `[rows, vocab]` → `[rows, 1]`.
fn log_sum_exp(logits: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let sum = super::kernels::exp_tensor(&shifted)?.sum_keepdim(D::Minus1)?;
    drop(shifted);
    max + sum.log()?
}

struct ChunkedCrossEntropy {
    targets: LossTargets,
    chunk: usize,
    /// Each row's log-sum-exp from the forward pass `[n, 1]`: backward gets the probabilities
    /// from one recomputed matmul and one exp.
    lse: Tensor,
    value: f64,
    /// f32, or f64 for an f64 model.
    dtype: DType,
    weight_trainable: bool,
    /// The gradients the forward pass made while each chunk's logits existed, when it was told
    /// the upstream gradient; backward takes them instead of recomputing the logits.
    early: std::sync::Mutex<Option<EarlyGrads>>,
}

/// Gradients of a chunked loss made in its forward pass, for an upstream gradient of `upstream`.
struct EarlyGrads {
    h: Tensor,
    w: Option<Tensor>,
    upstream: f64,
}

/// Adds one chunk's gradients, from its `d loss / d logits`: the input's rows `d · W`, and, for a
/// trainable weight, `dᵀ · h` summed over chunks (in f32, f64 for an f64 model). The first
/// chunk's product stays in its own dtype until a second chunk is added to it: a 16-bit head's
/// gradient from one chunk (every step of up to a chunk's rows) is then never widened, which is
/// the same value (a 16-bit product widened and rounded back is itself) and half the bytes, where
/// a wide copy next to the product had been the step's peak (L4 at 1 × 128: 62.5 MiB of f32
/// next to 31.3 MiB of bf16).
#[allow(clippy::too_many_arguments)]
fn add_chunk_grads(
    d_logits: &Tensor,
    h: &Tensor,
    w: &Tensor,
    start: usize,
    weight_trainable: bool,
    wide: DType,
    grad_h: &mut Vec<Tensor>,
    grad_w: &mut Option<Tensor>,
) -> Result<()> {
    grad_h.push(mm(d_logits, w)?);
    if weight_trainable {
        let h_chunk = h.narrow(0, start, d_logits.dim(0)?)?;
        let g = d_logits.t()?;
        // Later chunks add into the total in place where they can (f32 on the CPU).
        if let Some(total) = grad_w.as_ref()
            && super::matmul::accumulate_product(total, &g, &h_chunk)?
        {
            return Ok(());
        }
        let gw = mm(&g, &h_chunk)?;
        *grad_w = Some(match grad_w.take() {
            // Each 16-bit tensor goes as soon as its wide copy exists.
            Some(total) => {
                let total = widened(total, wide)?;
                (total + widened(gw, wide)?)?
            }
            None => gw,
        });
    }
    Ok(())
}

/// `t` in `dtype`, dropping `t` (itself, for its dtype).
fn widened(t: Tensor, dtype: DType) -> Result<Tensor> {
    super::kernels::to_dtype(&t, dtype)
}

/// One chunk's `d loss / d logits` times `upstream` (softmax − one-hot target, each row weighted by
/// its mask), from the chunk's logits and per-row log-sum-exp `lse` (`[len, 1]`): the fused kernel
/// where `host` holds the chunk's rows on the host (their log-sum-exp, target ids and scales;
/// f32 logits on the CPU, given for f32 activations and for 16-bit ones whose head goes to
/// [`HeadRows`]; it writes the gradient over the logits, which nothing else holds, and rounds it
/// to `dtype`), candle's ops otherwise (f64 models, other 16-bit activations, and off the CPU).
/// The logits go as soon as their gradient exists: the matmuls after it widen it.
fn logits_grad(
    logits: Tensor,
    host: Option<(&[f32], &[u32], &[f32])>,
    lse: &Tensor,
    targets: &LossTargets,
    start: usize,
    upstream: f64,
    dtype: DType,
) -> Result<Tensor> {
    if let Some((lse_rows, ids, scale)) = host
        && super::kernels::cross_entropy_grad_in_place(&logits, lse_rows, ids, scale)?
    {
        return super::kernels::to_dtype(&logits, dtype);
    }
    let wide = logits.dtype();
    let len = logits.dim(0)?;
    // `exp` in place where it can: the logits, their shifted copy and its exponential were three
    // logits-sized tensors at once.
    let shifted = super::kernels::per_row(&logits, lse, RowOp::Sub)?;
    drop(logits);
    let probs = if super::kernels::exp_in_place(&shifted)? {
        shifted
    } else {
        super::kernels::exp_tensor(&shifted)?
    };
    let row_scale = (targets.mask.narrow(0, start, len)?.to_dtype(wide)?
        * (upstream / targets.normalizer))?
        .unsqueeze(1)?;
    let d_logits = super::kernels::per_row(&probs, &row_scale, RowOp::Mul)?;
    drop(probs);
    let ids = targets
        .ids
        .narrow(0, start, len)?
        .unsqueeze(1)?
        .contiguous()?;
    d_logits.scatter_add_set(&ids, &row_scale.neg()?, 1)?;
    super::kernels::to_dtype(&d_logits, dtype)
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
        // The same dtype as the CPU path: f64 for an f64 model, else f32.
        let storage = match self.dtype {
            DType::F64 => s1.device().storage_from_slice(&[self.value])?,
            _ => s1.device().storage_from_slice(&[self.value as f32])?,
        };
        Ok((storage, Shape::from(())))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Detached, as in `Precomputed::bwd`: otherwise every chunk's logits stay alive in a graph.
        let (h, w) = (&h.detach(), &w.detach());
        let upstream = grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let early = self.early.lock().ok().and_then(|mut early| early.take());
        if let Some(early) = early {
            let factor = upstream / early.upstream;
            let rescale = |t: Tensor| {
                if factor == 1.0 {
                    Ok(t)
                } else {
                    t.affine(factor, 0.0)
                }
            };
            let grad_h = rescale(early.h)?.to_dtype(h.dtype())?;
            let grad_w = early
                .w
                .map(|g| rescale(g)?.to_dtype(w.dtype()))
                .transpose()?;
            return Ok((Some(grad_h), grad_w));
        }
        let n = h.dim(0)?;
        let wide = wide(h.dtype());
        let mut grad_h = Vec::new();
        let mut grad_w: Option<Tensor> = None;
        let mut start = 0;
        // The fused kernel's per-row inputs, on the host (one value per row). Only for f32
        // activations: for bf16/f16 the matmuls below widen the gradient to f32 again, and the
        // composite's peak (at its exp) stays the segment's peak at every size, which is what the
        // cost model's linear fit needs; with the fused kernel the peak moves between stages as
        // the rows grow and the fit missed held-out runs by 4% (tests/cost_real_engine.rs).
        let host = if crate::engine::cpu_paths(h.device()) && h.dtype() == DType::F32 {
            Some((
                HostTargets::new(&self.targets)?,
                self.lse.flatten_all()?.to_vec1::<f32>()?,
            ))
        } else {
            None
        };
        let factor = upstream / self.targets.normalizer;
        while start < n {
            let len = self.chunk.min(n - start);
            let logits = chunk_logits(h, w, start, len)?;
            let scale = host
                .as_ref()
                .map(|(host, _)| host.scales(start, len, factor));
            let rows = host
                .as_ref()
                .zip(scale.as_deref())
                .map(|((host, lse), scale)| {
                    (&lse[start..start + len], host.ids(start, len), scale)
                });
            let d_logits = logits_grad(
                logits,
                rows,
                &self.lse.narrow(0, start, len)?,
                &self.targets,
                start,
                upstream,
                h.dtype(),
            )?;
            add_chunk_grads(
                &d_logits,
                h,
                w,
                start,
                self.weight_trainable,
                wide,
                &mut grad_h,
                &mut grad_w,
            )?;
            start += len;
        }
        let grad_h = Tensor::cat(&grad_h, 0)?;
        let grad_w = grad_w.map(|g| g.to_dtype(w.dtype())).transpose()?;
        Ok((Some(grad_h), grad_w))
    }
}

/// Mean next-token loss of `h Wᵀ` (`h`: `[n, hidden]`, `w`: `[vocab, hidden]`), `chunk` rows at a
/// time. `weight_trainable` says whether `w` needs a gradient (false for a frozen head under LoRA).
///
/// `upstream`: the gradient backward will bring (the loss scale a training step multiplies the
/// loss by), when one will be asked for. Each chunk's gradients are then made in the forward pass,
/// while its logits exist (as Liger's fused linear cross-entropy does), and backward only hands
/// them on: two passes over the vocabulary matrix per chunk instead of three (backward would
/// otherwise recompute the logits). Without it (evaluation, or a caller that does not know),
/// forward keeps each row's log-sum-exp only and backward recomputes.
///
/// `head_rows`: where a trainable weight's gradient may go block by block instead, as soon as
/// each block exists (`(first row, the rows' gradient in w's dtype)`; the caller updates those
/// rows of the weight and drops the block), with no gradient for `w` in backward. It is used when
/// the gradients are made in the forward pass and all rows are one chunk (the weight's gradient
/// is then complete per block); otherwise it is not called, and backward gives `w`'s gradient.
/// The rows' `W` is no longer read once its block is handed on.
pub fn chunked_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &LossTargets,
    chunk: usize,
    weight_trainable: bool,
    upstream: Option<f64>,
    head_rows: Option<HeadRows>,
) -> Result<Tensor> {
    chunked_cross_entropy_in(
        h,
        w,
        targets,
        (chunk, row_block(h.dim(1)?)),
        weight_trainable,
        upstream,
        head_rows,
    )
}

/// Where [`chunked_cross_entropy`] hands a weight's gradient block by block.
pub type HeadRows<'a> = &'a mut dyn FnMut(usize, &Tensor) -> Result<()>;

/// Elements of a block of a weight's gradient rows made and handed to the optimizer at once
/// (4 MiB in f32): the head's blocks ([`HeadRows`]) and the embedding's ([`RowGrads::block`]).
const ROW_BLOCK_ELEMENTS: usize = 1 << 20;

/// Rows of `width` elements in a block of `ROW_BLOCK_ELEMENTS` (1 Mi elements; at least 1 row).
pub fn row_block(width: usize) -> usize {
    (ROW_BLOCK_ELEMENTS / width.max(1)).max(1)
}

/// [`chunked_cross_entropy`] with `(chunk rows, head block rows)` (both at least 1).
fn chunked_cross_entropy_in(
    h: &Tensor,
    w: &Tensor,
    targets: &LossTargets,
    (chunk, block_rows): (usize, usize),
    weight_trainable: bool,
    upstream: Option<f64>,
    mut head_rows: Option<HeadRows>,
) -> Result<Tensor> {
    let n = h.dim(0)?;
    let wide = wide(h.dtype());
    let upstream = upstream.filter(|_| h.track_op() || (weight_trainable && w.track_op()));
    // A frozen head's loss in a training step: vocabulary blocks (f64, the tests' reference
    // precision, keeps the whole-vocabulary chunks).
    if !weight_trainable
        && let Some(upstream) = upstream
        && wide == DType::F32
    {
        let block = crate::config::loss_block(n, w.dim(0)?, false);
        return frozen_head_cross_entropy(
            h,
            w,
            targets,
            upstream,
            block,
            crate::engine::cpu_paths(h.device()),
        );
    }
    let (h_detached, w_detached) = (h.detach(), w.detach());
    let mut total = 0f64;
    let mut lse_parts = Vec::new();
    let host = if crate::engine::cpu_paths(h.device()) && wide == DType::F32 {
        Some(HostTargets::new(targets)?)
    } else {
        None
    };
    // The weight's gradient goes to `head_rows` block by block: one chunk, made in forward.
    if !(weight_trainable && upstream.is_some() && n <= chunk) {
        head_rows = None;
    }
    let weight_trainable = weight_trainable && head_rows.is_none();
    let (mut grad_h, mut grad_w) = (Vec::new(), None);
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let logits = chunk_logits(&h_detached, &w_detached, start, len)?;
        let fused = match &host {
            Some(host) => super::kernels::log_sum_exp_nll(&logits, host.ids(start, len))?
                .map(|(lse, nll)| (lse, host.masked_sum(start, &nll))),
            None => None,
        };
        let (lse_rows, lse, nll_sum) = match fused {
            Some((rows, sum)) => {
                let lse = Tensor::from_slice(&rows, (len, 1), h.device())?;
                (Some(rows), lse, sum)
            }
            None => {
                let (lse, sum) = composite_lse_nll(&logits, targets, start, len)?;
                (None, lse, sum)
            }
        };
        total += nll_sum;
        if let Some(upstream) = upstream {
            // The fused kernel for f32 activations only, as in backward (see there), and for
            // 16-bit ones where the weight's gradient goes to `head_rows`: a step that updates in
            // backward, which the cost model does not model (its fit is what keeps 16-bit logits
            // on the composite), so their gradient is made in place there too.
            let fused_rows = match (&host, &lse_rows) {
                (Some(host), Some(lse_rows)) if h.dtype() == DType::F32 || head_rows.is_some() => {
                    let scale = host.scales(start, len, upstream / targets.normalizer);
                    Some((lse_rows, host.ids(start, len), scale))
                }
                _ => None,
            };
            let rows = fused_rows
                .as_ref()
                .map(|(lse_rows, ids, scale)| (lse_rows.as_slice(), *ids, scale.as_slice()));
            let d_logits = logits_grad(logits, rows, &lse, targets, start, upstream, h.dtype())?;
            add_chunk_grads(
                &d_logits,
                &h_detached,
                &w_detached,
                start,
                weight_trainable,
                wide,
                &mut grad_h,
                &mut grad_w,
            )?;
            if let Some(sink) = head_rows.as_mut() {
                let vocab = d_logits.dim(1)?;
                for first in (0..vocab).step_by(block_rows) {
                    let rows = block_rows.min(vocab - first);
                    let g = d_logits.narrow(1, first, rows)?.t()?;
                    sink(first, &mm(&g, &h_detached)?)?;
                }
            }
        }
        lse_parts.push(lse);
        start += len;
    }
    let early = match upstream {
        Some(upstream) => Some(EarlyGrads {
            h: Tensor::cat(&grad_h, 0)?,
            w: grad_w,
            upstream,
        }),
        None => None,
    };
    let op = ChunkedCrossEntropy {
        targets: targets.clone(),
        chunk,
        lse: Tensor::cat(&lse_parts, 0)?,
        value: total / targets.normalizer,
        dtype: wide,
        weight_trainable,
        early: std::sync::Mutex::new(early),
    };
    // With the weight's gradient handed on, backward must not reach `w` (a conversion of a
    // parameter would wait for a gradient that never comes).
    match head_rows {
        Some(_) => h.apply_op2(&w_detached, op),
        None => h.apply_op2(w, op),
    }
}

/// A frozen head's loss (LoRA, QLoRA) in a training step, for f32, bf16 and f16 activations:
/// `rows` rows at a time, and the vocabulary in blocks of `cols` columns, with the softmax taken
/// block by block as flash attention does. Per block, the logits `h Wᵦᵀ` (widened to f32) become
/// `e^(z − shift)` in place, and their product with the block's rows `Wᵦ` is added to a running
/// `[rows, hidden]` sum (rescaled where a row's shift moves, [`super::kernels::OnlineRow::factor`]). At the end the
/// input's gradient is `scale · (Σ e^(z − shift) W / Σ e^(z − shift) − W[target])`, which is
/// `(softmax − one-hot) · W`, and the loss `log-sum-exp − z[target]`.
///
/// The gradient is made in the forward pass, for `upstream`, as the chunked loss does; what it
/// differs in: no logits-sized tensor exists (one block of `rows × cols`, about
/// [`crate::config::FROZEN_HEAD_BLOCK_ELEMENTS`]), and each row pass streams the vocabulary matrix
/// twice block by block, where a whole-vocabulary chunk of `loss_chunk_rows` rows streamed it
/// twice per chunk. A frozen head needs no weight gradient, which is what lets the blocks go: a
/// trained head's gradient `dᵀ h` needs each row's final normalisation in every block.
///
/// `fused`: the softmax block on the CPU kernel ([`super::kernels::softmax_block`], f32 logits on
/// the CPU); otherwise on candle's ops, with the running state as tensors (any device).
fn frozen_head_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &LossTargets,
    upstream: f64,
    (rows, cols): (usize, usize),
    fused: bool,
) -> Result<Tensor> {
    let n = h.dim(0)?;
    let (rows, cols) = (rows.max(1), cols.max(1));
    let host = HostTargets::new(targets)?;
    let (hd, wd) = (h.detach(), w.detach());
    let factor = upstream / targets.normalizer;
    let (mut total, mut lse) = (0f64, Vec::with_capacity(n));
    let mut grads = Vec::new();
    for start in (0..n).step_by(rows) {
        let len = rows.min(n - start);
        let scale = host.scales(start, len, factor);
        let part = frozen_head_rows(
            &hd.narrow(0, start, len)?,
            &wd,
            host.ids(start, len),
            &scale,
            cols,
            fused,
        )?;
        let nll: Vec<f32> = part.rows.iter().map(|r| r.lse - r.target).collect();
        total += host.masked_sum(start, &nll);
        lse.extend(part.rows.iter().map(|r| r.lse));
        grads.push(part.grad);
    }
    let op = ChunkedCrossEntropy {
        targets: targets.clone(),
        chunk: rows,
        lse: Tensor::from_vec(lse, (n, 1), h.device())?,
        value: total / targets.normalizer,
        dtype: DType::F32,
        weight_trainable: false,
        early: std::sync::Mutex::new(Some(EarlyGrads {
            h: Tensor::cat(&grads, 0)?,
            w: None,
            upstream,
        })),
    };
    h.apply_op2(w, op)
}

/// One row pass of [`frozen_head_cross_entropy`]: each row's statistics and the rows' gradient.
struct FrozenHeadRows {
    rows: Vec<RowStats>,
    /// `d loss / d h` for the rows, times the upstream gradient, in `h`'s dtype.
    grad: Tensor,
}

/// A row's softmax statistics at the end of a pass.
#[derive(Clone, Copy)]
struct RowStats {
    lse: f32,
    sum: f32,
    target: f32,
}

/// The running softmax state of a row pass: on the host, for the CPU kernel; as `[rows, 1]`
/// tensors otherwise (shift, sum, target logit; `None` before the first block).
enum Online {
    Host(Vec<super::kernels::OnlineRow>),
    Tensors(Option<(Tensor, Tensor, Tensor)>),
}

impl Online {
    /// Turns one block of f32 logits `z` `[rows, cols]` (vocabulary columns from `first`) into
    /// `e^(z − shift)`, adding it to the state; also gives the factor `[rows, 1]` by which sums
    /// over earlier blocks must be multiplied, when some row's shift moved.
    fn block(&mut self, z: Tensor, first: usize, ids: &[u32]) -> Result<(Tensor, Option<Tensor>)> {
        let n = z.dim(0)?;
        match self {
            Online::Host(rows) => {
                if !super::kernels::softmax_block(&z, first, ids, rows)? {
                    candle_core::bail!("frozen head loss: the logits are not f32 on the CPU");
                }
                let factor = rows.iter().any(|r| r.factor != 1.0).then(|| {
                    let f: Vec<f32> = rows.iter().map(|r| r.factor).collect();
                    Tensor::from_vec(f, (n, 1), z.device())
                });
                Ok((z, factor.transpose()?))
            }
            Online::Tensors(state) => {
                let cols = z.dim(1)?;
                let (local, inside): (Vec<u32>, Vec<f32>) = ids
                    .iter()
                    .map(|&id| match (id as usize).checked_sub(first) {
                        Some(l) if l < cols => (l as u32, 1.0),
                        _ => (0, 0.0),
                    })
                    .unzip();
                let dev = z.device();
                let picked = (z.gather(&Tensor::from_vec(local, (n, 1), dev)?, 1)?
                    * Tensor::from_vec(inside, (n, 1), dev)?)?;
                let max = z.max_keepdim(1)?;
                let (shift, factor, sum, target) = match state.take() {
                    None => (max, None, None, picked),
                    Some((old, sum, target)) => {
                        let shift = old.maximum(&max)?;
                        let factor = (old - &shift)?.exp()?;
                        (shift, Some(factor), Some(sum), (target + picked)?)
                    }
                };
                let p = z.broadcast_sub(&shift)?.exp()?;
                let block_sum = p.sum_keepdim(1)?;
                let sum = match (sum, &factor) {
                    (Some(sum), Some(f)) => ((sum * f)? + block_sum)?,
                    _ => block_sum,
                };
                *state = Some((shift, sum, target));
                Ok((p, factor))
            }
        }
    }

    /// Each row's statistics over every block.
    fn finish(self) -> Result<Vec<RowStats>> {
        match self {
            Online::Host(rows) => Ok(rows
                .iter()
                .map(|r| RowStats {
                    lse: r.log_sum_exp(),
                    sum: r.sum,
                    target: r.target,
                })
                .collect()),
            Online::Tensors(state) => {
                let Some((shift, sum, target)) = state else {
                    candle_core::bail!("frozen head loss: an empty vocabulary");
                };
                let v = |t: Tensor| t.flatten_all()?.to_vec1::<f32>();
                let (shift, sum, target) = (v(shift)?, v(sum)?, v(target)?);
                Ok(shift
                    .iter()
                    .zip(&sum)
                    .zip(&target)
                    .map(|((&s, &sum), &target)| RowStats {
                        lse: s + sum.ln(),
                        sum,
                        target,
                    })
                    .collect())
            }
        }
    }
}

/// The rows `h` `[len, hidden]` of [`frozen_head_cross_entropy`], their targets `ids` and per-row
/// gradient scales (mask · upstream / normalizer), against `w` `[vocab, hidden]` in blocks of
/// `cols` vocabulary rows.
fn frozen_head_rows(
    h: &Tensor,
    w: &Tensor,
    ids: &[u32],
    scale: &[f32],
    cols: usize,
    fused: bool,
) -> Result<FrozenHeadRows> {
    use super::kernels::{per_row, to_dtype};
    let wide = DType::F32;
    let (len, vocab) = (h.dim(0)?, w.dim(0)?);
    let dev = h.device();
    let mut online = if fused {
        Online::Host(vec![super::kernels::OnlineRow::START; len])
    } else {
        Online::Tensors(None)
    };
    // Σ over blocks of e^(z − shift) · Wᵦ, in f32.
    let mut acc: Option<Tensor> = None;
    for first in (0..vocab).step_by(cols) {
        let wb = w.narrow(0, first, cols.min(vocab - first))?;
        let z = to_dtype(&mm(h, &wb.t()?)?, wide)?;
        let (p, factor) = online.block(z, first, ids)?;
        if let (Some(f), Some(a)) = (&factor, &acc) {
            acc = Some(per_row(a, f, RowOp::Mul)?);
        }
        let p = to_dtype(&p, w.dtype())?;
        acc = Some(match acc {
            Some(a) if super::matmul::accumulate_product(&a, &p, &wb)? => a,
            Some(a) => (a + to_dtype(&mm(&p, &wb)?, wide)?)?,
            None => to_dtype(&mm(&p, &wb)?, wide)?,
        });
    }
    let rows = online.finish()?;
    let acc =
        acc.ok_or_else(|| candle_core::Error::Msg("frozen head loss: no vocabulary".into()))?;
    let column = |v: Vec<f32>| Tensor::from_vec(v, (len, 1), dev);
    let over_sum: Vec<f32> = rows.iter().zip(scale).map(|(r, &s)| s / r.sum).collect();
    let picked = w.index_select(&Tensor::new(ids, dev)?, 0)?;
    let grad = (per_row(&acc, &column(over_sum)?, RowOp::Mul)?
        - per_row(
            &to_dtype(&picked, wide)?,
            &column(scale.to_vec())?,
            RowOp::Mul,
        )?)?;
    Ok(FrozenHeadRows {
        rows,
        grad: to_dtype(&grad, h.dtype())?,
    })
}

/// The same loss over the full fp32 logits, all rows at once (what Hugging Face does): the logits
/// are kept for backward. For f32 logits on the CPU, forward (log-sum-exp and NLL) and backward
/// (softmax − one-hot) are each one pass per row ([`super::kernels`]); candle's log-softmax and
/// gather with its autograd slowed down more than linearly with the rows (4× the time for 2× the
/// tokens at Qwen2.5's vocabulary). bf16/f16 logits keep the composite, as the chunked loss's
/// backward does: with the fused kernel their head backward peaks at a widened copy of the
/// vocabulary matrix below ~0.7 × hidden tokens and at logits-sized tensors above, a switch the
/// calibration probes (up to 256 tokens) do not reach, and held-out runs at 512 tokens came out 6%
/// above the prediction.
pub fn full_cross_entropy(logits: &Tensor, targets: &LossTargets) -> Result<Tensor> {
    let dtype = wide(logits.dtype());
    let fusable = crate::engine::cpu_paths(logits.device()) && logits.dtype() == DType::F32;
    let logits = logits.to_dtype(dtype)?;
    if fusable {
        let host = HostTargets::new(targets)?;
        if let Some((lse, nll)) = super::kernels::log_sum_exp_nll(&logits, &host.ids)? {
            let normalizer = targets.normalizer;
            let value = Tensor::new(
                (host.masked_sum(0, &nll) / normalizer) as f32,
                logits.device(),
            )?;
            return with_backward(&logits, value, "full-cross-entropy", move |l, _, grad| {
                let upstream = grad.to_dtype(DType::F64)?.to_scalar::<f64>()? / normalizer;
                let scale = host.scales(0, host.mask.len(), upstream);
                super::kernels::cross_entropy_grad(l, &lse, &host.ids, &scale)?.ok_or_else(|| {
                    candle_core::Error::Msg("full cross entropy: logits left the CPU".into())
                })
            });
        }
    }
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = log_probs
        .gather(&targets.ids.unsqueeze(1)?, 1)?
        .squeeze(1)?;
    let total = (picked * targets.mask.to_dtype(dtype)?)?.sum_all()?;
    total.affine(-1.0 / targets.normalizer, 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A released tensor keeps its shape and its place in the graph (a sum's gradient still
    /// reaches the variable behind it), frees its data, and memtune's products and fused
    /// kernels refuse it with an error rather than read past its (empty) data.
    #[test]
    fn released_tensors_keep_the_graph_and_refuse_to_be_read() {
        let v = Var::from_tensor(&Tensor::arange(0f32, 12., &Device::Cpu).unwrap()).unwrap();
        let x = v.as_tensor().reshape((3, 4)).unwrap();
        let y = (&x * 2.0).unwrap();
        let z = (&y + 1.0).unwrap();
        release(&y).unwrap();
        assert_eq!(y.dims(), &[3, 4]);
        {
            let (storage, _) = y.storage_and_layout();
            let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
                panic!("not f32 on the CPU")
            };
            assert!(data.is_empty());
        }
        let g = z.sum_all().unwrap().backward().unwrap();
        let gx: Vec<f32> = g
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(gx, vec![2.0; 12]);
        let w = Tensor::ones((4, 5), DType::F32, &Device::Cpu).unwrap();
        let err = super::super::matmul::matmul(&y, &w)
            .unwrap_err()
            .to_string();
        assert!(err.contains("released"), "{err}");
        let err = super::super::kernels::swiglu(&y, &y)
            .unwrap_err()
            .to_string();
        assert!(err.contains("released"), "{err}");
        // A transposed view of it too.
        let err = super::super::matmul::matmul(&w.t().unwrap(), &y.t().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("released"), "{err}");
    }

    /// `n` deterministic values spread over `[-spread, spread)`.
    fn spread_values(n: usize, seed: usize, spread: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0) * spread)
            .collect()
    }

    /// Targets of `rows` rows spread over the vocabulary, row 4 masked out.
    fn loss_targets(rows: usize, vocab: usize) -> LossTargets {
        let ids: Vec<u32> = (0..rows as u32)
            .map(|r| (r * 37 + 5) % vocab as u32)
            .collect();
        let mask: Vec<f32> = (0..rows).map(|r| if r == 4 { 0.0 } else { 1.0 }).collect();
        LossTargets {
            ids: Tensor::new(ids.as_slice(), &Device::Cpu).unwrap(),
            mask: Tensor::new(mask.as_slice(), &Device::Cpu).unwrap(),
            normalizer: (rows - 1) as f64,
        }
    }

    /// A frozen head's loss taken in vocabulary blocks (on the CPU kernel and on candle's ops,
    /// several row passes, blocks that do not divide the vocabulary, a row whose maximum jumps in
    /// a later block, a masked row) gives the value and input gradient of the whole-vocabulary
    /// chunks, which backward recomputes when forward is not told the upstream gradient.
    #[test]
    fn a_frozen_head_in_vocabulary_blocks_matches_whole_rows() {
        let (rows, hidden, vocab) = (21, 12, 301);
        let values = |n: usize, seed: usize| spread_values(n, seed, 2.0);
        let targets = loss_targets(rows, vocab);
        let mut wv = values(vocab * hidden, 2);
        // One vocabulary row near the end scaled by 8: the rows whose largest logit it gives
        // move their shift in the last block.
        for v in &mut wv[(vocab - 3) * hidden..(vocab - 2) * hidden] {
            *v *= 8.0;
        }
        for dtype in [DType::F32, DType::BF16] {
            let h = Var::from_tensor(
                &Tensor::from_vec(values(rows * hidden, 1), (rows, hidden), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let w = Tensor::from_vec(wv.clone(), (vocab, hidden), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let grad_of = |loss: Tensor| {
                let g = loss.affine(2.0, 0.0).unwrap().backward().unwrap();
                let g = g.get(h.as_tensor()).unwrap().to_dtype(DType::F32).unwrap();
                let value = loss
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                (value, g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            };
            let (want_value, want) = grad_of(
                chunked_cross_entropy_in(h.as_tensor(), &w, &targets, (8, 64), false, None, None)
                    .unwrap(),
            );
            let tolerance = if dtype == DType::F32 { 2e-6 } else { 1e-2 };
            let largest = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for fused in [true, false] {
                let loss =
                    frozen_head_cross_entropy(h.as_tensor(), &w, &targets, 2.0, (8, 64), fused)
                        .unwrap();
                let (value, got) = grad_of(loss);
                assert!(
                    (value - want_value).abs() <= 1e-5 * want_value.abs(),
                    "{dtype:?} fused {fused}: loss {value} against {want_value}"
                );
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= tolerance * largest,
                        "{dtype:?} fused {fused}: element {i}: {g} against {w}"
                    );
                }
                // The masked row has no gradient.
                assert!(got[4 * hidden..5 * hidden].iter().all(|&g| g == 0.0));
            }
        }
    }

    /// A one-chunk loss that hands its weight's gradient on in blocks gives the same blocks, bit
    /// for bit, as the gradient backward gives without them, the same input gradient, and none
    /// for the weight; more rows than a chunk hand nothing on.
    #[test]
    fn head_rows_get_the_weight_gradient_block_by_block() {
        let (rows, hidden, vocab) = (23, 12, 301);
        let values = |n: usize, seed: usize| spread_values(n, seed, 1.0);
        let targets = loss_targets(rows, vocab);
        for dtype in [DType::F32, DType::BF16] {
            let tensor = |n, d: (usize, usize), seed| {
                Tensor::from_vec(values(n, seed), d, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let h = Var::from_tensor(&tensor(rows * hidden, (rows, hidden), 1)).unwrap();
            let w = Var::from_tensor(&tensor(vocab * hidden, (vocab, hidden), 2)).unwrap();
            let run = |chunk: usize, blocks: Option<&mut Vec<(usize, Tensor)>>| {
                let mut got = Vec::new();
                let loss = {
                    let mut collect = |first: usize, g: &Tensor| -> Result<()> {
                        got.push((first, g.clone()));
                        Ok(())
                    };
                    chunked_cross_entropy_in(
                        h.as_tensor(),
                        w.as_tensor(),
                        &targets,
                        (chunk, 64),
                        true,
                        Some(2.0),
                        blocks.is_some().then_some(&mut collect as HeadRows),
                    )
                    .unwrap()
                };
                let grads = loss.affine(2.0, 0.0).unwrap().backward().unwrap();
                if let Some(blocks) = blocks {
                    *blocks = got;
                }
                (
                    grads.get(h.as_tensor()).unwrap().clone(),
                    grads.get(w.as_tensor()).cloned(),
                )
            };
            let (want_h, want_w) = run(32, None);
            let want_w = want_w.unwrap();
            let mut blocks = Vec::new();
            let (got_h, got_w) = run(32, Some(&mut blocks));
            assert!(got_w.is_none(), "{dtype:?}: no weight gradient in backward");
            let bits = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            let same = |a: &Tensor, b: &Tensor| {
                let (a, b) = (bits(a), bits(b));
                a.to_vec1::<f64>().unwrap() == b.to_vec1::<f64>().unwrap()
            };
            assert!(same(&got_h, &want_h), "{dtype:?}: input gradient");
            assert_eq!(
                blocks.iter().map(|(f, _)| *f).collect::<Vec<_>>(),
                vec![0, 64, 128, 192, 256]
            );
            for (first, g) in &blocks {
                assert_eq!(g.dtype(), dtype);
                let want = want_w.narrow(0, *first, g.dim(0).unwrap()).unwrap();
                assert!(same(g, &want), "{dtype:?}: rows from {first}");
            }
            // Two chunks: nothing handed on, the weight's gradient comes from backward.
            let mut blocks = Vec::new();
            let (_, got_w) = run(16, Some(&mut blocks));
            assert!(
                blocks.is_empty() && got_w.is_some(),
                "{dtype:?}: two chunks"
            );
        }
    }
}
