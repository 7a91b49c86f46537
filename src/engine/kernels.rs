//! Fused CPU kernels for the element-wise parts of a training step, with their backward passes.
//!
//! candle runs `silu(gate) · up` as two ops forward and about eight backward, each a full pass
//! that allocates its output; the attention softmax likewise, and RMSNorm's input gradient (about
//! ten ops; its forward is candle-nn's fused kernel already). Here each is one pass forward and
//! one backward, computed in f32 whatever the storage dtype (f32, bf16, f16), and the forward
//! keeps only what backward needs. The public functions take the fused path for contiguous CPU
//! tensors of those dtypes and candle's own ops everywhere else: f64 is the engine's reference
//! precision, so the tests compare the two paths; on a GPU candle's ops run inside one op with
//! a hand-written backward ([`super::ops::swiglu`], [`super::ops::causal_softmax`]), so that a
//! step keeps the same tensors as on the CPU and CPU probes plan GPU memory.
//!
//! The loops are written to vectorise (no libm call: [`exp`]; reductions in independent lanes;
//! blocks with constant indices) and run compiled for the CPU's widest vector unit
//! (`vectorized`).

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use half::{bf16, f16};
use rayon::prelude::*;

/// Elements per parallel task: small enough to split a layer's tensor between the cores, large
/// enough that scheduling stays negligible.
pub(crate) const GRAIN: usize = 16 * 1024;

/// A storage element the kernels read and write, computing in f32.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn get(self) -> f32;
    fn put(v: f32) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
    #[inline(always)]
    fn put(v: f32) -> Self {
        v
    }
}

/// f16: widened and rounded by the `half` crate.
impl Elem for f16 {
    #[inline(always)]
    fn get(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn put(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// bf16 by the branch-free conversions of the tiled product (the same values as `half`'s, NaN
/// aside: a NaN stays a NaN), so that loops over them vectorise.
impl Elem for bf16 {
    #[inline(always)]
    fn get(self) -> f32 {
        crate::engine::matmul::widen(self)
    }
    #[inline(always)]
    fn put(v: f32) -> Self {
        crate::engine::matmul::narrow(v)
    }
}

/// Whether the fused path applies: CPU, a dtype the kernels store, contiguous.
pub(crate) fn fusable(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| {
        crate::engine::cpu_paths(t.device())
            && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16)
            && t.is_contiguous()
    }) && ts.windows(2).all(|w| w[0].dtype() == w[1].dtype())
}

/// The contiguous elements of a storage under `layout`.
pub(crate) fn slice<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => match data.get(start..end) {
            Some(elements) => Ok(elements),
            None => candle_core::bail!("fused kernel: the input's data was released"),
        },
        None => candle_core::bail!("fused kernel: non-contiguous input"),
    }
}

/// Runs `kernel` over equal-length contiguous inputs of one dtype, producing one output of the
/// inputs' shape, or two stacked as `[2, n]`.
fn map_elementwise<const N: usize>(
    inputs: [(&CpuStorage, &Layout); N],
    outputs: usize,
    kernel: impl KernelFn<N>,
) -> Result<(CpuStorage, Shape)> {
    let shape = inputs[0].1.shape().clone();
    let n = shape.elem_count();
    let out_shape = if outputs == 1 {
        shape
    } else {
        Shape::from((outputs, n))
    };
    macro_rules! run {
        ($variant:ident, $t:ty) => {{
            let mut ins: Vec<&[$t]> = Vec::with_capacity(N);
            for (storage, layout) in inputs {
                match storage {
                    CpuStorage::$variant(data) => ins.push(slice(data, layout)?),
                    _ => candle_core::bail!("fused kernel: mixed dtypes"),
                }
            }
            // One chunk of GRAIN elements starting at `at`, into one or two outputs.
            let chunk = |at: usize, o0: &mut [$t], o1: Option<&mut [$t]>| {
                let len = o0.len();
                let xs: [&[$t]; N] = std::array::from_fn(|k| &ins[k][at..at + len]);
                // Blocks of LANES elements with constant indices (no bounds checks, so the loop
                // vectorises), then the tail, from `full` on, one by one.
                let full = len / LANES * LANES;
                let tail = |o0: &mut [$t], mut o1: Option<&mut [$t]>| {
                    for (i, o) in o0.iter_mut().enumerate() {
                        let ys = kernel.apply(std::array::from_fn(|k| xs[k][full + i].get()));
                        *o = <$t>::put(ys[0]);
                        if let Some(o1) = o1.as_deref_mut() {
                            o1[i] = <$t>::put(ys[1]);
                        }
                    }
                };
                vectorized(
                    #[inline(always)]
                    || {
                        let (head0, tail0) = o0.split_at_mut(full);
                        let (mut head1, tail1) = match o1 {
                            Some(o1) => {
                                let (h, t) = o1.split_at_mut(full);
                                (Some(h), Some(t))
                            }
                            None => (None, None),
                        };
                        for (b, o0) in head0.chunks_exact_mut(LANES).enumerate() {
                            let from = b * LANES;
                            let xb: [&[$t; LANES]; N] = std::array::from_fn(|k| {
                                xs[k][from..from + LANES].try_into().expect("a block")
                            });
                            let mut y = [[0f32; LANES]; 2];
                            for lane in 0..LANES {
                                let ys = kernel.apply(std::array::from_fn(|k| xb[k][lane].get()));
                                y[0][lane] = ys[0];
                                y[1][lane] = ys[1];
                            }
                            for (o, &v) in o0.iter_mut().zip(&y[0]) {
                                *o = <$t>::put(v);
                            }
                            if let Some(h) = head1.as_deref_mut() {
                                for (o, &v) in h[from..from + LANES].iter_mut().zip(&y[1]) {
                                    *o = <$t>::put(v);
                                }
                            }
                        }
                        tail(tail0, tail1);
                    },
                )
            };
            let mut out = vec![<$t>::put(0.0); outputs * n];
            if outputs == 1 {
                out.par_chunks_mut(GRAIN)
                    .enumerate()
                    .for_each(|(c, o0)| chunk(c * GRAIN, o0, None));
            } else {
                let (first, second) = out.split_at_mut(n);
                first
                    .par_chunks_mut(GRAIN)
                    .zip(second.par_chunks_mut(GRAIN))
                    .enumerate()
                    .for_each(|(c, (o0, o1))| chunk(c * GRAIN, o0, Some(o1)));
            }
            Ok((CpuStorage::$variant(out), out_shape))
        }};
    }
    match inputs[0].0 {
        CpuStorage::F32(_) => run!(F32, f32),
        CpuStorage::BF16(_) => run!(BF16, bf16),
        CpuStorage::F16(_) => run!(F16, f16),
        other => candle_core::bail!("fused kernel: unsupported dtype {:?}", other.dtype()),
    }
}

/// An element-wise function of `N` inputs with up to two outputs.
trait KernelFn<const N: usize>: Sync {
    fn apply(&self, x: [f32; N]) -> [f32; 2];
}

impl<const N: usize, F: Fn([f32; N]) -> [f32; 2] + Sync> KernelFn<N> for F {
    #[inline(always)]
    fn apply(&self, x: [f32; N]) -> [f32; 2] {
        self(x)
    }
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Runs `f` compiled for the widest vector unit this CPU has (AVX-512, else AVX2 with FMA, else
/// the baseline), so that the loops it inlines are vectorised for that unit: the release build
/// targets baseline x86-64 (SSE2), whose 4 lanes are a quarter of an AVX-512 register. Call it
/// inside each parallel task (rayon's workers run their closures outside it), with the closure
/// marked `#[inline(always)]` (else it stays a baseline function of its own).
/// `MEMTUNE_NO_SIMD=1` keeps the baseline, for side-by-side timing.
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static UNIT: OnceLock<u8> = OnceLock::new();
        let unit = *UNIT.get_or_init(|| {
            if std::env::var_os("MEMTUNE_NO_SIMD").is_some() {
                0
            } else if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                2
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                1
            } else {
                0
            }
        });
        // SAFETY: each branch runs only where the CPU has the features it enables.
        match unit {
            2 => return unsafe { on_avx512(f) },
            1 => return unsafe { on_avx2(f) },
            _ => {}
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn on_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn on_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `e^x` in f32 without a libm call, so that loops over it vectorise: Cephes' `expf` (range
/// reduction by ln 2 in two parts, a degree-7 polynomial), within 2 ulp of the rounded value for
/// normal results; results below f32's normal range are 0, above it +∞; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LO: f32 = -87.3;
    const HI: f32 = 88.3;
    // 1.5 · 2²³: adding it rounds to an integer, which lands in the low bits of the sum's bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(LO, HI);
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = (((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 0.166_666_65)
        * r
        + 0.5)
        * r
        * r
        + r
        + 1.0;
    let pow2 = f32::from_bits(((t.to_bits() as i32 - 0x4b40_0000 + 127) << 23) as u32);
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        p * pow2
    }
}

/// `e^t` element-wise, as candle's `Tensor::exp` (a new tensor of the same shape and dtype, no
/// gradient), with [`exp`] vectorised on a contiguous f32 CPU tensor; candle's op elsewhere.
pub fn exp_tensor(t: &Tensor) -> Result<Tensor> {
    let out = with_f32_slice(t, |x| {
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(GRAIN)
            .zip(x.par_chunks(GRAIN))
            .for_each(|(o, x)| {
                vectorized(
                    #[inline(always)]
                    || {
                        for (o, &x) in o.iter_mut().zip(x) {
                            *o = exp(x);
                        }
                    },
                )
            });
        out
    });
    match out {
        Some(out) => Tensor::from_vec(out, t.shape(), t.device()),
        None => t.exp(),
    }
}

/// Whether an in-place f32 kernel ([`f32_in_place`]'s callers) serves `t`: a contiguous f32
/// tensor on the CPU's paths.
fn in_place_f32(t: &Tensor) -> bool {
    crate::engine::cpu_paths(t.device()) && t.dtype() == DType::F32 && t.is_contiguous()
}

/// The elements of an in-place op's contiguous f32 CPU storage, or an error naming `what` (another
/// dtype or layout, or data a training pass released).
fn f32_in_place<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a mut [f32]> {
    let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
        candle_core::bail!("{what}: not a contiguous f32 tensor");
    };
    match data.get_mut(start..end) {
        Some(xs) => Ok(xs),
        None => candle_core::bail!("{what}: the tensor's data was released"),
    }
}

/// `e^t` in place (the values [`exp_tensor`] gives) for a contiguous f32 CPU tensor that nothing
/// else reads; false, with nothing done, elsewhere.
pub fn exp_in_place(t: &Tensor) -> Result<bool> {
    if !in_place_f32(t) {
        return Ok(false);
    }
    t.inplace_op1(&ExpInPlace)?;
    Ok(true)
}

struct ExpInPlace;

impl candle_core::InplaceOp1 for ExpInPlace {
    fn name(&self) -> &'static str {
        "exp-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let xs = f32_in_place(storage, layout, "exp in place")?;
        xs.par_chunks_mut(GRAIN).for_each(|xs| {
            vectorized(
                #[inline(always)]
                || {
                    for x in xs.iter_mut() {
                        *x = exp(*x);
                    }
                },
            )
        });
        Ok(())
    }
}

/// Lanes of the reductions below: independent partial results vectorise, one running sum does not.
const LANES: usize = 16;

/// `Σ f(x)` over `xs`, in [`LANES`] partial sums.
#[inline(always)]
pub(crate) fn sum_by<T: Copy>(xs: &[T], f: impl Fn(T) -> f32) -> f32 {
    sums_by(xs, xs, xs, |x, _, _| [f(x)])[0]
}

/// `Σ f(a_i, b_i, c_i)` over `a`, `b` and `c` (equal lengths), `K` sums at once, each in
/// [`LANES`] partial sums.
#[inline(always)]
fn sums_by<A: Copy, B: Copy, C: Copy, const K: usize>(
    a: &[A],
    b: &[B],
    c: &[C],
    f: impl Fn(A, B, C) -> [f32; K],
) -> [f32; K] {
    let mut acc = [[0f32; LANES]; K];
    let (ac, bc, cc) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    let mut total = [0f32; K];
    let tails = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .zip(cc.remainder());
    for ((&x, &y), &z) in tails {
        let v = f(x, y, z);
        for k in 0..K {
            total[k] += v[k];
        }
    }
    for ((ac, bc), cc) in ac.zip(bc).zip(cc) {
        let ac: &[A; LANES] = ac.try_into().expect("chunks of LANES");
        let bc: &[B; LANES] = bc.try_into().expect("chunks of LANES");
        let cc: &[C; LANES] = cc.try_into().expect("chunks of LANES");
        for lane in 0..LANES {
            let v = f(ac[lane], bc[lane], cc[lane]);
            for k in 0..K {
                acc[k][lane] += v[k];
            }
        }
    }
    for k in 0..K {
        total[k] += acc[k].iter().sum::<f32>();
    }
    total
}

/// `max f(x)` over `xs` (−∞ when empty), in [`LANES`] partial maxima.
#[inline(always)]
fn max_by<T: Copy>(xs: &[T], f: impl Fn(T) -> f32) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            let v = f(x);
            *a = if v > *a { v } else { *a };
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(f(x)));
    acc.iter().fold(tail, |m, &v| m.max(v))
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        map_elementwise([(g, gl), (u, ul)], 1, |[g, u]: [f32; 2]| {
            [g * sigmoid(g) * u, 0.0]
        })
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let both = g.apply_op3_no_bwd(u, &grad, &SwiGluBackward)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// `[2, …]`: the gradients of `silu(g) · u` for `g` and for `u`.
struct SwiGluBackward;

impl CustomOp3 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
        d: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (storage, _) =
            map_elementwise([(g, gl), (u, ul), (d, dl)], 2, |[g, u, d]: [f32; 3]| {
                let s = sigmoid(g);
                [d * u * s * (1.0 + g * (1.0 - s)), d * g * s]
            })?;
        let mut dims = vec![2];
        dims.extend_from_slice(gl.dims());
        Ok((storage, Shape::from(dims)))
    }
}

/// `silu(gate) · up`, SwiGLU's product, fused on the CPU (see the module docs).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fusable(&[gate, up]) && gate.shape() == up.shape() {
        gate.apply_op2(up, SwiGlu)
    } else if crate::engine::cpu_paths(gate.device()) {
        // f64, the tests' reference precision: candle's own autograd.
        gate.silu()? * up
    } else {
        super::ops::swiglu(gate, up)
    }
}

/// `x · factor` (f32 arithmetic, rounded once to `x`'s dtype), with no gradient.
struct Scale {
    factor: f32,
}

impl CustomOp1 for Scale {
    fn name(&self) -> &'static str {
        "scale"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let factor = self.factor;
        // `+ 0.0` as candle's affine adds its (zero) offset: −0 becomes +0 the same way.
        map_elementwise([(x, l)], 1, move |[x]: [f32; 1]| [x * factor + 0.0, 0.0])
    }
}

/// `x · factor` in one pass where the fused kernels apply (CPU, contiguous f32 / bf16 / f16): the
/// same values as widening to f32, `affine(factor, 0)` and rounding back, which takes three passes
/// and two new tensors for a 16-bit `x`. `None` elsewhere.
pub fn scale(x: &Tensor, factor: f64) -> Result<Option<Tensor>> {
    if !fusable(&[x]) {
        return Ok(None);
    }
    let factor = factor as f32;
    x.apply_op1_no_bwd(&Scale { factor }).map(Some)
}

/// Softmax of `scale · scores` over the last dimension under a causal mask: `scores` is
/// `[…, s, s]` with row `i` of each `s × s` block seeing columns `0..=i`.
struct CausalSoftmax {
    scale: f32,
}

/// `s` of a `[…, s, s]` layout.
fn square_side(layout: &Layout) -> Result<usize> {
    let dims = layout.dims();
    let s = *dims.last().unwrap_or(&0);
    if dims.len() < 2 || dims[dims.len() - 2] != s {
        candle_core::bail!("causal softmax: expected [..., s, s], got {dims:?}");
    }
    Ok(s)
}

fn softmax_rows<T: Elem>(x: &[T], s: usize, scale: f32) -> Vec<T> {
    rows_with_zero_tails(x.len(), s, |out| {
        out.par_chunks_mut(s)
            .zip(x.par_chunks(s))
            .enumerate()
            // One row's exponentials, per rayon leaf task rather than per row: at most one per
            // thread is alive, so the peak the meter sees does not depend on scheduling.
            .for_each_init(
                || vec![0f32; s],
                |e, (r, (o, x))| {
                    vectorized(
                        #[inline(always)]
                        || {
                            let x = &x[..r % s + 1];
                            let max = max_by(x, |v| v.get() * scale);
                            let e = &mut e[..x.len()];
                            for (e, &v) in e.iter_mut().zip(x) {
                                *e = exp(v.get() * scale - max);
                            }
                            let inv = 1.0 / sum_by(e, |v| v);
                            for (o, e) in o.iter_mut().zip(e.iter()) {
                                o.write(T::put(e * inv));
                            }
                        },
                    )
                },
            )
    })
}

fn softmax_backward_rows<T: Elem>(p: &[T], g: &[T], s: usize, scale: f32) -> Vec<T> {
    rows_with_zero_tails(p.len(), s, |out| {
        out.par_chunks_mut(s)
            .zip(p.par_chunks(s).zip(g.par_chunks(s)))
            .enumerate()
            .for_each(|(r, (o, (p, g)))| {
                vectorized(
                    #[inline(always)]
                    || {
                        let seen = r % s + 1;
                        let (p, g) = (&p[..seen], &g[..seen]);
                        let [dot] = sums_by(p, g, g, |p, g, _| [p.get() * g.get()]);
                        for ((o, p), g) in o.iter_mut().zip(p).zip(g) {
                            o.write(T::put(scale * p.get() * (g.get() - dot)));
                        }
                    },
                )
            })
    })
}

/// A new `len`-element buffer of `s × s` matrices whose row `r` (of each matrix) `fill` writes
/// up to and including its diagonal element; the rest of each row is written here as zeros. No
/// element is written twice (a zero-filled buffer wrote every row's causal part twice).
fn rows_with_zero_tails<T: Elem>(
    len: usize,
    s: usize,
    fill: impl FnOnce(&mut [std::mem::MaybeUninit<T>]),
) -> Vec<T> {
    let mut out = Vec::<T>::with_capacity(len);
    let rows = &mut out.spare_capacity_mut()[..len];
    fill(rows);
    rows.par_chunks_mut(s).enumerate().for_each(|(r, row)| {
        let tail = &mut row[r % s + 1..];
        // SAFETY: writes `tail.len()` elements of `tail` as zero bytes, which is 0.0 in every
        // `Elem` (f32, f16, bf16); a memset, where a loop of `T::put(0.0)` was not one.
        unsafe { std::ptr::write_bytes(tail.as_mut_ptr(), 0, tail.len()) };
    });
    // SAFETY: every element was written: each row's first `r % s + 1` by `fill` (its contract),
    // the rest just above.
    unsafe { out.set_len(len) };
    out
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax-fused"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let s = square_side(l)?;
        let storage = match x {
            CpuStorage::F32(d) => CpuStorage::F32(softmax_rows(slice(d, l)?, s, self.scale)),
            CpuStorage::BF16(d) => CpuStorage::BF16(softmax_rows(slice(d, l)?, s, self.scale)),
            CpuStorage::F16(d) => CpuStorage::F16(softmax_rows(slice(d, l)?, s, self.scale)),
            other => candle_core::bail!("causal softmax: unsupported dtype {:?}", other.dtype()),
        };
        Ok((storage, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        scaled_causal_softmax_grad(res, grad, self.scale as f64).map(Some)
    }
}

/// `scale · p ⊙ (g − Σ_j g_j p_j)`, the gradient of [`CausalSoftmax`] for its scores.
struct CausalSoftmaxBackward {
    scale: f32,
}

impl CustomOp2 for CausalSoftmaxBackward {
    fn name(&self) -> &'static str {
        "causal-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        pl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = square_side(pl)?;
        let storage =
            match (p, g) {
                (CpuStorage::F32(p), CpuStorage::F32(g)) => CpuStorage::F32(softmax_backward_rows(
                    slice(p, pl)?,
                    slice(g, gl)?,
                    s,
                    self.scale,
                )),
                (CpuStorage::BF16(p), CpuStorage::BF16(g)) => CpuStorage::BF16(
                    softmax_backward_rows(slice(p, pl)?, slice(g, gl)?, s, self.scale),
                ),
                (CpuStorage::F16(p), CpuStorage::F16(g)) => CpuStorage::F16(softmax_backward_rows(
                    slice(p, pl)?,
                    slice(g, gl)?,
                    s,
                    self.scale,
                )),
                _ => candle_core::bail!("causal softmax backward: mismatched dtypes"),
            };
        Ok((storage, pl.shape().clone()))
    }
}

/// Softmax over the last dimension of `scale · scores` (`[b, h, s, s]`) under a causal mask
/// (`mask`: `[s, s]`, 0 or −∞), computed in fp32 and returned in the scores' dtype. Only the
/// probabilities are kept for backward.
pub fn scaled_causal_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    if fusable(&[scores]) {
        return scores.apply_op1(CausalSoftmax {
            scale: scale as f32,
        });
    }
    super::ops::causal_softmax(scores, mask, scale)
}

/// The scores' gradient of [`scaled_causal_softmax`] from its probabilities `p` and their gradient
/// `g`: one fused pass on the CPU, [`super::ops::causal_softmax_grad`] elsewhere.
pub fn scaled_causal_softmax_grad(p: &Tensor, g: &Tensor, scale: f64) -> Result<Tensor> {
    let g = g.contiguous()?;
    if fusable(&[p, &g]) {
        let op = CausalSoftmaxBackward {
            scale: scale as f32,
        };
        return p.apply_op2_no_bwd(&g, &op);
    }
    super::ops::causal_softmax_grad(p, &g, scale)
}

/// Hugging Face's rotate-half RoPE of `x` by the angles whose cosines and sines are `cos` and
/// `sin` (`[s, d/2]`), turned by `sign` (−1 rotates back: the backward pass):
/// `y₁ = x₁·cos − sign·x₂·sin`, `y₂ = x₂·cos + sign·x₁·sin` for the two halves of each row, in f32
/// and rounded once (candle-nn's kernel rounds a 16-bit type after every operation). `layout`
/// says how `x`'s rows are laid out and where each goes in the output.
struct Rope {
    sign: f32,
    layout: RopeLayout,
}

/// How [`rope`] reads its input's rows of `d` elements and lays out its output's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// `[b, h, s, d]` in, the same out.
    Heads,
    /// `[b, s, h, d]` in (a projection's output, its heads side by side), `[b, h, s, d]` out:
    /// the heads transposed in the same pass, where a copy would otherwise make them contiguous.
    SeqToHeads,
    /// `[b, h, s, d]` in, `[b, s, h, d]` out: [`RopeLayout::SeqToHeads`]'s backward.
    HeadsToSeq,
}

impl RopeLayout {
    /// For input dims `[n0, n1, n2, d]`: the output's dims, the positions' axis length, and for
    /// output row `r` the input row it reads and its position.
    fn plan(self, [n0, n1, n2]: [usize; 3]) -> ([usize; 3], usize) {
        match self {
            Self::Heads => ([n0, n1, n2], n2),
            Self::SeqToHeads => ([n0, n2, n1], n1),
            Self::HeadsToSeq => ([n0, n2, n1], n2),
        }
    }

    /// Output row `r` of an output with dims `out` (leading three): (input row, position).
    #[inline(always)]
    fn source(self, r: usize, [_, o1, o2]: [usize; 3]) -> (usize, usize) {
        match self {
            Self::Heads => (r, r % o2),
            // Output [b, h, s]: input [b, s, h] row (b · s + t) · h + head, position t.
            Self::SeqToHeads => {
                let (b, head, t) = (r / (o1 * o2), (r / o2) % o1, r % o2);
                ((b * o2 + t) * o1 + head, t)
            }
            // Output [b, s, h]: input [b, h, s] row (b · h + head) · s + t, position t.
            Self::HeadsToSeq => {
                let (b, t, head) = (r / (o1 * o2), (r / o2) % o1, r % o2);
                ((b * o2 + head) * o1 + t, t)
            }
        }
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope-fused"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        cos: &CpuStorage,
        cl: &Layout,
        sin: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n0, n1, n2, d) = xl.shape().dims4()?;
        let (out_dims, s) = self.layout.plan([n0, n1, n2]);
        if d % 2 != 0 || cl.dims() != [s, d / 2] || sl.dims() != [s, d / 2] {
            candle_core::bail!("rope: x {:?} against tables {:?}", xl.dims(), cl.dims());
        }
        let (sign, layout) = (self.sign, self.layout);
        let source = |r| layout.source(r, out_dims);
        let storage = match (x, cos, sin) {
            (CpuStorage::F32(x), CpuStorage::F32(c), CpuStorage::F32(sn)) => {
                let tables = (slice(c, cl)?, slice(sn, sl)?);
                CpuStorage::F32(rotate(slice(x, xl)?, tables, d, sign, source))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(c), CpuStorage::BF16(sn)) => {
                let tables = (slice(c, cl)?, slice(sn, sl)?);
                CpuStorage::BF16(rotate(slice(x, xl)?, tables, d, sign, source))
            }
            (CpuStorage::F16(x), CpuStorage::F16(c), CpuStorage::F16(sn)) => {
                let tables = (slice(c, cl)?, slice(sn, sl)?);
                CpuStorage::F16(rotate(slice(x, xl)?, tables, d, sign, source))
            }
            _ => candle_core::bail!("rope: tables of another dtype"),
        };
        let [o0, o1, o2] = out_dims;
        Ok((storage, Shape::from((o0, o1, o2, d))))
    }
}

/// A new `len`-element vector written by `fill` on rayon's threads, without a zero fill first:
/// `fill(first, chunk)` gets a chunk of whole rows of `row` elements (at most [`GRAIN`] elements a
/// chunk, at least one row) starting at row `first`.
///
/// # Safety
/// `fill` writes every element of each chunk it is given.
unsafe fn filled_by_rows<T: Send>(
    len: usize,
    row: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    let row = row.max(1);
    let rows_per_task = (GRAIN / row).max(1);
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(rows_per_task * row)
        .enumerate()
        .for_each(|(c, chunk)| fill(c * rows_per_task, chunk));
    // SAFETY: the chunks cover all `len` elements, and `fill` wrote every element of each (the
    // caller's contract).
    unsafe { out.set_len(len) };
    out
}

/// [`Rope`]'s pass: output row `r` (of `d` elements) is input row `source(r).0` rotated by the
/// angles of position `source(r).1`. Every output element is written once, so the output is not
/// zero-filled first.
fn rotate<T: Elem>(
    x: &[T],
    (cos, sin): (&[T], &[T]),
    d: usize,
    sign: f32,
    source: impl Fn(usize) -> (usize, usize) + Sync,
) -> Vec<T> {
    let half = d / 2;
    let fill = |first: usize, o: &mut [std::mem::MaybeUninit<T>]| {
        vectorized(
            #[inline(always)]
            || {
                for (r, o) in o.chunks_exact_mut(d).enumerate() {
                    let (row, t) = source(first + r);
                    let x = &x[row * d..][..d];
                    let (cs, sn) = (&cos[t * half..][..half], &sin[t * half..][..half]);
                    let (o1, o2) = o.split_at_mut(half);
                    let (x1, x2) = x.split_at(half);
                    let it = o1.iter_mut().zip(o2).zip(x1.iter().zip(x2));
                    for (((o1, o2), (x1, x2)), (c, sn)) in it.zip(cs.iter().zip(sn)) {
                        let (a, b) = (x1.get(), x2.get());
                        let (c, sn) = (c.get(), sign * sn.get());
                        o1.write(T::put(a * c - b * sn));
                        o2.write(T::put(b * c + a * sn));
                    }
                }
            },
        )
    };
    // SAFETY: `fill` writes each of its chunk's rows in full (`d` elements: both halves).
    unsafe { filled_by_rows(x.len(), d, fill) }
}

/// `Rope` (no gradient: the caller's op supplies it) for contiguous CPU `x` (laid out as
/// `layout` says), `cos` and `sin` of one dtype; `None` where candle-nn's kernel applies (CUDA,
/// f64, other layouts).
pub fn rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    sign: f32,
    layout: RopeLayout,
) -> Result<Option<Tensor>> {
    if !(fusable(&[x, cos, sin]) && x.rank() == 4) {
        return Ok(None);
    }
    x.apply_op3_no_bwd(cos, sin, &Rope { sign, layout })
        .map(Some)
}

/// The input gradient of RMSNorm `y = x · r · w` (r = 1/√(mean(x²) + ε) per row of the last
/// dimension): `dx = r · (g ⊙ w) − x · r³ · mean(g ⊙ w ⊙ x)`, one pass per row in f32. candle's
/// composite runs about ten ops over the whole tensor, in f32 copies of x and g.
struct RmsNormInputGrad {
    eps: f32,
    /// Whether and where the weight's gradient `dw = Σ_rows g ⊙ x · r` goes.
    weight: WeightGrad,
}

/// Where [`RmsNormInputGrad`] puts the weight's gradient.
enum WeightGrad {
    /// Nowhere: the input gradient only.
    None,
    /// After `dx` in the output (flat: `dx` then `dw`, both of x's dtype).
    Stacked,
    /// Here, in f32 (for an f32 weight of 16-bit activations), the output holding `dx` only.
    Aside(std::sync::Mutex<Option<Vec<f32>>>),
}

/// `dx` for rows of `h` elements of `x` and `g`, with the weight `w` in f32, and with `want_w`
/// the weight's gradient in f32 too; `stacked`: `dw` also follows `dx` in the output, in T.
fn rms_norm_dx_rows<T: Elem>(
    x: &[T],
    g: &[T],
    w: &[f32],
    eps: f32,
    (want_w, stacked): (bool, bool),
) -> (Vec<T>, Vec<f32>) {
    let h = w.len();
    let n = x.len();
    let mut out = vec![T::put(0.0); n + if stacked { h } else { 0 }];
    let rows_per_task = (GRAIN / h.max(1)).max(1);
    let partials: Vec<Vec<f32>> = out[..n]
        .par_chunks_mut(rows_per_task * h)
        .enumerate()
        .map(|(c, o)| {
            let at = c * rows_per_task * h;
            let mut dw = vec![0f32; if want_w { h } else { 0 }];
            vectorized(
                #[inline(always)]
                || {
                    for (r, dst) in o.chunks_mut(h).enumerate() {
                        let xs = &x[at + r * h..at + (r + 1) * h];
                        let gs = &g[at + r * h..at + (r + 1) * h];
                        let [sq, dot] = sums_by(xs, gs, w, |x, g, w| {
                            let x = x.get();
                            [x * x, g.get() * w * x]
                        });
                        let inv = 1.0 / (sq / h as f32 + eps).sqrt();
                        let k = inv * inv * inv * dot / h as f32;
                        for (((d, &xv), &gv), &wv) in dst.iter_mut().zip(xs).zip(gs).zip(w) {
                            *d = T::put(inv * gv.get() * wv - xv.get() * k);
                        }
                        if want_w {
                            for ((s, &xv), &gv) in dw.iter_mut().zip(xs).zip(gs) {
                                *s += gv.get() * (xv.get() * inv);
                            }
                        }
                    }
                },
            );
            dw
        })
        .collect();
    let mut dw = Vec::new();
    if want_w {
        dw = vec![0f32; h];
        for part in &partials {
            for (s, p) in dw.iter_mut().zip(part) {
                *s += p;
            }
        }
        for (o, &s) in out[n..].iter_mut().zip(&dw) {
            *o = T::put(s);
        }
    }
    (out, dw)
}

impl CustomOp3 for RmsNormInputGrad {
    fn name(&self) -> &'static str {
        "rms-norm-input-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let w: Vec<f32> = match w {
            CpuStorage::F32(d) => slice(d, wl)?.to_vec(),
            CpuStorage::BF16(d) => slice(d, wl)?.iter().map(|v| v.to_f32()).collect(),
            CpuStorage::F16(d) => slice(d, wl)?.iter().map(|v| v.to_f32()).collect(),
            other => candle_core::bail!("rms-norm gradient: weight dtype {:?}", other.dtype()),
        };
        let h = w.len();
        let (want_w, stacked) = match &self.weight {
            WeightGrad::None => (false, false),
            WeightGrad::Stacked => (true, true),
            WeightGrad::Aside(_) => (true, false),
        };
        if h == 0 || xl.shape().dims().last() != Some(&h) {
            candle_core::bail!(
                "rms-norm gradient: rows of {:?} against a weight of {h}",
                xl.shape()
            );
        }
        let mode = (want_w, stacked);
        let (storage, dw) = match (x, g) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                let (dx, dw) = rms_norm_dx_rows(slice(x, xl)?, slice(g, gl)?, &w, self.eps, mode);
                (CpuStorage::F32(dx), dw)
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(g)) => {
                let (dx, dw) = rms_norm_dx_rows(slice(x, xl)?, slice(g, gl)?, &w, self.eps, mode);
                (CpuStorage::BF16(dx), dw)
            }
            (CpuStorage::F16(x), CpuStorage::F16(g)) => {
                let (dx, dw) = rms_norm_dx_rows(slice(x, xl)?, slice(g, gl)?, &w, self.eps, mode);
                (CpuStorage::F16(dx), dw)
            }
            _ => candle_core::bail!("rms-norm gradient: mismatched dtypes"),
        };
        if let WeightGrad::Aside(aside) = &self.weight {
            *aside.lock().map_err(|_| {
                candle_core::Error::Msg("rms-norm gradient: lock poisoned".into())
            })? = Some(dw);
        }
        let shape = if stacked {
            Shape::from(xl.shape().elem_count() + h)
        } else {
            xl.shape().clone()
        };
        Ok((storage, shape))
    }
}

/// RMSNorm's input gradient in one fused pass (see `RmsNormInputGrad`), for contiguous CPU
/// `x` and `grad` of one dtype (f32, bf16, f16) and a 1-D weight of any of those; `None` where
/// the caller's composite applies (CUDA, f64, other layouts).
pub fn rms_norm_input_grad(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    eps: f64,
) -> Result<Option<Tensor>> {
    if !rms_norm_fusable(x, w, grad) {
        return Ok(None);
    }
    let op = RmsNormInputGrad {
        eps: eps as f32,
        weight: WeightGrad::None,
    };
    x.apply_op3_no_bwd(w, grad, &op).map(Some)
}

/// RMSNorm's input and weight gradients in one fused pass: `dw` in the weight's dtype, computed in
/// f32 (for a weight of x's dtype it comes out of the same buffer as `dx`; for an f32 weight of
/// 16-bit activations, as mixed precision trains it, it is kept in f32 beside the op); `None`
/// where the caller's composite applies.
pub fn rms_norm_grads(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    eps: f64,
) -> Result<Option<(Tensor, Tensor)>> {
    if !rms_norm_fusable(x, w, grad) {
        return Ok(None);
    }
    if w.dtype() != x.dtype() {
        if w.dtype() != DType::F32 {
            return Ok(None);
        }
        let op = RmsNormInputGrad {
            eps: eps as f32,
            weight: WeightGrad::Aside(std::sync::Mutex::new(None)),
        };
        let dx = x.apply_op3_no_bwd(w, grad, &op)?;
        let WeightGrad::Aside(aside) = op.weight else {
            unreachable!("built as Aside above")
        };
        let dw = aside
            .into_inner()
            .map_err(|_| candle_core::Error::Msg("rms-norm gradient: lock poisoned".into()))?
            .ok_or_else(|| {
                candle_core::Error::Msg("rms-norm gradient: no weight gradient".into())
            })?;
        let dw = Tensor::from_vec(dw, w.shape(), w.device())?;
        return Ok(Some((dx, dw)));
    }
    let op = RmsNormInputGrad {
        eps: eps as f32,
        weight: WeightGrad::Stacked,
    };
    let both = x.apply_op3_no_bwd(w, grad, &op)?;
    let n = x.elem_count();
    let dx = both.narrow(0, 0, n)?.reshape(x.shape())?;
    // Storage of its own (`copy` would clone all of it): a view would keep dx's buffer alive as
    // long as the weight's gradient (to the update), one activation-sized buffer per norm: 17 MiB
    // more at SmolLM2-135M's full depth, measured.
    let dw = both.narrow(0, n, w.elem_count())?.force_contiguous()?;
    Ok(Some((dx, dw)))
}

fn rms_norm_fusable(x: &Tensor, w: &Tensor, grad: &Tensor) -> bool {
    let w_ok = crate::engine::cpu_paths(w.device())
        && matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && w.is_contiguous()
        && w.rank() == 1;
    fusable(&[x, grad]) && w_ok && x.dims() == grad.dims()
}

/// `t.to_dtype(dtype)`, converted on every thread where `t` is a contiguous CPU tensor and the
/// conversion is between f32 and bf16 or f16 (candle converts on one thread), with candle's own
/// conversions (`half`'s, rounding to nearest even): the same values. candle's op elsewhere.
pub fn to_dtype(t: &Tensor, dtype: DType) -> Result<Tensor> {
    let wide_narrow = matches!(
        (t.dtype(), dtype),
        (DType::F32, DType::BF16 | DType::F16) | (DType::BF16 | DType::F16, DType::F32)
    );
    if wide_narrow && fusable(&[t]) {
        t.apply_op1_no_bwd(&Convert(dtype))
    } else {
        t.to_dtype(dtype)
    }
}

/// The op of [`to_dtype`].
struct Convert(DType);

/// `f` of every element of `src`, on rayon's threads, into a new vector.
fn map_par<S: Copy + Sync, D: Send>(src: &[S], f: impl Fn(S) -> D + Sync) -> Vec<D> {
    let fill = |first: usize, o: &mut [std::mem::MaybeUninit<D>]| {
        for (o, &s) in o.iter_mut().zip(&src[first..]) {
            o.write(f(s));
        }
    };
    // SAFETY: each chunk lies within `src.len()` elements, so `src[first..]` is at least as long
    // as the chunk and `fill` writes all of it.
    unsafe { filled_by_rows(src.len(), 1, fill) }
}

impl CustomOp1 for Convert {
    fn name(&self) -> &'static str {
        "to-dtype"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        use half::{bf16, f16};
        let out = match (storage, self.0) {
            (CpuStorage::F32(x), DType::BF16) => {
                CpuStorage::BF16(map_par(slice(x, layout)?, bf16::from_f32))
            }
            (CpuStorage::F32(x), DType::F16) => {
                CpuStorage::F16(map_par(slice(x, layout)?, f16::from_f32))
            }
            (CpuStorage::BF16(x), DType::F32) => {
                CpuStorage::F32(map_par(slice(x, layout)?, bf16::to_f32))
            }
            (CpuStorage::F16(x), DType::F32) => {
                CpuStorage::F32(map_par(slice(x, layout)?, f16::to_f32))
            }
            (x, to) => candle_core::bail!("to-dtype: {:?} to {to:?}", x.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }
}

/// How [`per_row`] combines an element with its row's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowOp {
    /// `x − v`, as `broadcast_sub`.
    Sub,
    /// `x · v`, as `broadcast_mul`.
    Mul,
}

/// `x` `[rows, cols]` combined with its row's value of `values` `[rows, 1]` by `op`, into a new
/// tensor: on every thread for contiguous f32 CPU tensors (candle's broadcast ops run on one),
/// the same values; candle's `broadcast_sub` / `broadcast_mul` elsewhere.
pub fn per_row(x: &Tensor, values: &Tensor, op: RowOp) -> Result<Tensor> {
    let (rows, cols) = x.dims2()?;
    if x.dtype() == DType::F32 && cols > 0 && fusable(&[x, values]) && values.dims() == [rows, 1] {
        return x.apply_op2_no_bwd(values, &PerRow(op));
    }
    match op {
        RowOp::Sub => x.broadcast_sub(values),
        RowOp::Mul => x.broadcast_mul(values),
    }
}

/// The op of [`per_row`].
struct PerRow(RowOp);

impl CustomOp2 for PerRow {
    fn name(&self) -> &'static str {
        "per-row"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(v)) = (x, v) else {
            candle_core::bail!("per-row: f32 operands expected");
        };
        let (x, v) = (slice(x, xl)?, slice(v, vl)?);
        let cols = xl.dims()[1];
        let op = self.0;
        let fill = |first: usize, o: &mut [std::mem::MaybeUninit<f32>]| {
            vectorized(
                #[inline(always)]
                || {
                    for (r, o) in o.chunks_exact_mut(cols).enumerate() {
                        let (x, value) = (&x[(first + r) * cols..][..cols], v[first + r]);
                        for (o, &x) in o.iter_mut().zip(x) {
                            o.write(match op {
                                RowOp::Sub => x - value,
                                RowOp::Mul => x * value,
                            });
                        }
                    }
                },
            )
        };
        // SAFETY: `fill` writes each of its chunk's rows in full (`cols` elements, from a row of
        // x of that length).
        let out = unsafe { filled_by_rows(x.len(), cols, fill) };
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// The elements of a contiguous f32 CPU tensor; `None` for anything else.
fn with_f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !crate::engine::cpu_paths(t.device()) || t.dtype() != DType::F32 {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        candle_core::Storage::Cpu(CpuStorage::F32(d)) => Some(f(&d[start..end])),
        _ => None,
    }
}

/// Per row of f32 `logits` `[rows, vocab]`: its log-sum-exp and its negative log-likelihood of
/// `ids[row]`, in one pass over the row (two reads). `None` when the logits are not a contiguous
/// f32 CPU tensor (the caller then uses candle's ops).
pub fn log_sum_exp_nll(logits: &Tensor, ids: &[u32]) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
    let (rows, vocab) = logits.dims2()?;
    if ids.len() != rows {
        candle_core::bail!("cross entropy: {} targets for {rows} rows", ids.len());
    }
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        candle_core::bail!("cross entropy: target id {bad} outside a vocabulary of {vocab}");
    }
    Ok(with_f32_slice(logits, |l| {
        l.par_chunks(vocab.max(1))
            .zip(ids.par_iter())
            .map(|(row, &id)| {
                vectorized(
                    #[inline(always)]
                    || {
                        let max = max_by(row, |v| v);
                        let lse = max + sum_by(row, |v| exp(v - max)).ln();
                        (lse, lse - row[id as usize])
                    },
                )
            })
            .unzip()
    }))
}

/// The gradient of `Σ_rows scale · nll` for f32 `logits` `[rows, vocab]`:
/// `(exp(l − lse) − onehot(id)) · scale[row]`, in one pass, in f32, in a new tensor. `None` when
/// the logits are not a contiguous f32 CPU tensor. (Only f32 activations take this path: see the
/// chunked loss.)
pub fn cross_entropy_grad(
    logits: &Tensor,
    lse: &[f32],
    ids: &[u32],
    scale: &[f32],
) -> Result<Option<Tensor>> {
    let op = CrossEntropyGrad::new(logits, lse, ids, scale)?;
    let grad = with_f32_slice(logits, |l| {
        let mut out = l.to_vec();
        op.rows(&mut out);
        out
    });
    grad.map(|g| Tensor::from_vec(g, logits.shape(), logits.device()))
        .transpose()
}

/// [`cross_entropy_grad`] written over the logits themselves, for a caller that owns them and
/// needs them no more: one logits-sized buffer fewer. False (and nothing written) when the logits
/// are not a contiguous f32 CPU tensor.
pub fn cross_entropy_grad_in_place(
    logits: &Tensor,
    lse: &[f32],
    ids: &[u32],
    scale: &[f32],
) -> Result<bool> {
    if !in_place_f32(logits) {
        return Ok(false);
    }
    logits.inplace_op1(&CrossEntropyGrad::new(logits, lse, ids, scale)?)?;
    Ok(true)
}

/// How far a block's largest logit may pass a row's shift before [`softmax_block`] moves the
/// shift: the exponentials it stores are then at most e⁸ (no overflow in f32 or bf16, the same
/// relative precision), and a row's running sums are rescaled only when its maximum jumps, which
/// after its first block is rare.
const SHIFT_SLACK: f32 = 8.0;

/// One row's running state in a softmax taken over blocks of its columns ([`softmax_block`]).
#[derive(Debug, Clone, Copy)]
pub struct OnlineRow {
    /// What the row's exponentials are taken against: `e^(z − shift)` (−∞ before any block).
    pub shift: f32,
    /// `Σ e^(z − shift)` over the blocks so far.
    pub sum: f32,
    /// The row's target logit, once the block holding it has been seen.
    pub target: f32,
    /// What this block's call multiplied the row's earlier sum by (`e^(old − new shift)`, 1 when
    /// the shift stayed): anything else summed over the row's exponentials needs the same factor.
    pub factor: f32,
}

impl OnlineRow {
    pub const START: OnlineRow = OnlineRow {
        shift: f32::NEG_INFINITY,
        sum: 0.0,
        target: 0.0,
        factor: 1.0,
    };

    /// The row's log-sum-exp over every column seen.
    pub fn log_sum_exp(&self) -> f32 {
        self.shift + self.sum.ln()
    }
}

/// One block of a softmax over vocabulary columns, for f32 logits `z` `[rows, cols]` (columns
/// `first..first + cols` of each row): replaces `z` by `e^(z − shift)` in place, in one pass after
/// the row's maximum, adds those to each row's sum (moving its shift first where the block's
/// maximum passes it by more than `SHIFT_SLACK` (8), and recording the factor), and keeps each row's
/// target logit where `ids[row]` falls in the block. False (and nothing done) when `z` is not a
/// contiguous f32 CPU tensor.
pub fn softmax_block(
    z: &Tensor,
    first: usize,
    ids: &[u32],
    rows: &mut [OnlineRow],
) -> Result<bool> {
    let (n, cols) = z.dims2()?;
    if ids.len() != n || rows.len() != n {
        candle_core::bail!("softmax block: per-row inputs do not match {n} rows");
    }
    if !in_place_f32(z) {
        return Ok(false);
    }
    let op = SoftmaxBlock {
        first,
        cols,
        ids,
        rows: std::sync::Mutex::new(rows),
    };
    z.inplace_op1(&op)?;
    Ok(true)
}

struct SoftmaxBlock<'a> {
    first: usize,
    cols: usize,
    ids: &'a [u32],
    rows: std::sync::Mutex<&'a mut [OnlineRow]>,
}

impl candle_core::InplaceOp1 for SoftmaxBlock<'_> {
    fn name(&self) -> &'static str {
        "softmax-block"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let z = f32_in_place(storage, layout, "softmax block")?;
        let mut rows = self
            .rows
            .lock()
            .map_err(|_| candle_core::Error::Msg("softmax block: state poisoned".into()))?;
        let (first, cols) = (self.first, self.cols.max(1));
        z.par_chunks_mut(cols)
            .zip(rows.par_iter_mut())
            .zip(self.ids.par_iter())
            .for_each(|((z, st), &id)| {
                let local = (id as usize).wrapping_sub(first);
                if local < z.len() {
                    st.target = z[local];
                }
                vectorized(
                    #[inline(always)]
                    || {
                        let max = max_by(z, |v| v);
                        st.factor = 1.0;
                        if max > st.shift + SHIFT_SLACK {
                            st.factor = exp(st.shift - max);
                            st.sum *= st.factor;
                            st.shift = max;
                        }
                        let shift = st.shift;
                        let mut acc = [0f32; LANES];
                        let mut chunks = z.chunks_exact_mut(LANES);
                        for c in &mut chunks {
                            for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
                                *v = exp(*v - shift);
                                *a += *v;
                            }
                        }
                        let mut total = 0f32;
                        for v in chunks.into_remainder() {
                            *v = exp(*v - shift);
                            total += *v;
                        }
                        st.sum += total + acc.iter().sum::<f32>();
                    },
                )
            });
        Ok(())
    }
}

/// Per-row inputs of the cross-entropy gradient (see [`cross_entropy_grad`]).
struct CrossEntropyGrad<'a> {
    lse: &'a [f32],
    ids: &'a [u32],
    scale: &'a [f32],
    vocab: usize,
}

impl<'a> CrossEntropyGrad<'a> {
    fn new(logits: &Tensor, lse: &'a [f32], ids: &'a [u32], scale: &'a [f32]) -> Result<Self> {
        let (rows, vocab) = logits.dims2()?;
        if lse.len() != rows || ids.len() != rows || scale.len() != rows {
            candle_core::bail!("cross entropy gradient: per-row inputs do not match {rows} rows");
        }
        Ok(Self {
            lse,
            ids,
            scale,
            vocab,
        })
    }

    /// Turns rows of logits into their gradients.
    fn rows(&self, data: &mut [f32]) {
        data.par_chunks_mut(self.vocab.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                let (lse, s, id) = (self.lse[r], self.scale[r], self.ids[r] as usize);
                let picked = row[id];
                vectorized(
                    #[inline(always)]
                    || {
                        for v in row.iter_mut() {
                            *v = exp(*v - lse) * s;
                        }
                    },
                );
                row[id] = (exp(picked - lse) - 1.0) * s;
            });
    }
}

impl candle_core::InplaceOp1 for CrossEntropyGrad<'_> {
    fn name(&self) -> &'static str {
        "cross-entropy-grad-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        self.rows(f32_in_place(storage, layout, "cross entropy gradient")?);
        Ok(())
    }
}
