//! bf16 and f16 matrix products on the CPU, tile by tile.
//!
//! candle 0.11 has no bf16 gemm on the CPU: it widens *both whole operands* to f32 in new buffers
//! (the whole storage, even when the operand is a narrow view of it), multiplies, and rounds the
//! product back. Every product through a weight therefore allocates a widened copy of that weight:
//! 545 MB for Qwen2.5-0.5B's vocabulary matrix, at every head product of every step, converted on
//! one core. Its f16 products run gemm's f16 path, which converts while packing, again and again.
//!
//! Here the product is cut into tiles of rows of the left operand and columns of the right one,
//! each summed over blocks of the inner dimension. A task widens only its tile's blocks (in their
//! own memory order, so a transposed weight is read row by row; bf16 by a shift, f16 with F16C),
//! multiplies them with gemm's f32 kernel on one thread, and rounds its block of the output; the
//! tasks run on rayon's threads. The arithmetic is candle's: f32 products of the widened values,
//! summed in f32, rounded once. `examples/matmul_bf16.rs` times the two side by side.
//!
//! On a CPU with AVX512-BF16 a bf16 tile skips the widening: `dot` packs pairs of bf16 and
//! multiplies them with `vdpbf16ps` (exact products, f32 sums, bf16's subnormals as zero), and on
//! one with AMX (Intel Xeon since Sapphire Rapids) with its tile unit's `tdpbf16ps`, the same
//! arithmetic on 16 × 32 tiles. `MEMTUNE_NO_BF16_DOT=1` turns both off, `MEMTUNE_NO_AMX=1` the
//! second, for side-by-side timing.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// A 16-bit storage type the tiled product widens to f32 and rounds back to.
trait Half: Copy + Send + Sync + 'static {
    const ZERO: Self;
    /// The operand's elements, or `None` for another dtype.
    fn slice(storage: &CpuStorage) -> Option<&[Self]>;
    fn storage(data: Vec<Self>) -> CpuStorage;
    fn widen(self) -> f32;
    /// A contiguous run of [`Half::widen`].
    fn widen_run(src: &[Self], dst: &mut [f32]);
    /// A contiguous run of f32 → Self, rounding to nearest even.
    fn narrow_run(src: &[f32], dst: &mut [Self]);
    /// Whether this CPU multiplies this type natively ([`dot`]: bf16 with AVX512-BF16).
    fn native_dot() -> bool {
        false
    }
}

/// The bit patterns of 16-bit floats.
fn bits<T: Half>(data: &[T]) -> &[u16] {
    debug_assert_eq!(std::mem::size_of::<T>(), 2);
    // SAFETY: bf16 and f16 are `repr(transparent)` over u16 (the only `Half` types).
    unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u16, data.len()) }
}

/// The storage plumbing of a [`Half`] type: its zero and its `CpuStorage` variant.
macro_rules! half_storage {
    ($t:ty, $variant:ident) => {
        const ZERO: Self = <$t>::ZERO;
        fn slice(storage: &CpuStorage) -> Option<&[Self]> {
            match storage {
                CpuStorage::$variant(data) => Some(data),
                _ => None,
            }
        }
        fn storage(data: Vec<Self>) -> CpuStorage {
            CpuStorage::$variant(data)
        }
    };
}

impl Half for bf16 {
    half_storage!(bf16, BF16);
    fn native_dot() -> bool {
        dot::available()
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        widen(self)
    }
    fn widen_run(src: &[Self], dst: &mut [f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = widen(s);
        }
    }
    #[inline(always)]
    fn narrow_run(src: &[f32], dst: &mut [Self]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = narrow(s);
        }
    }
}

/// f16 with F16C's conversions, 8 lanes at a time, where the CPU has them (`half`'s otherwise).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must have F16C and AVX; `src` and `dst` have the same length.
    #[target_feature(enable = "f16c,avx")]
    pub unsafe fn widen_f16(src: &[f16], dst: &mut [f32]) {
        let n = dst.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 ≤ n ≤ both lengths; unaligned loads and stores.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
        }
        for i in n..dst.len() {
            dst[i] = src[i].to_f32();
        }
    }

    /// Rounds to nearest even, as `half` does.
    ///
    /// # Safety
    /// The CPU must have F16C and AVX; `src` and `dst` have the same length.
    #[target_feature(enable = "f16c,avx")]
    pub unsafe fn narrow_f16(src: &[f32], dst: &mut [f16]) {
        let n = dst.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 ≤ n ≤ both lengths; unaligned loads and stores.
            unsafe {
                let v = _mm256_loadu_ps(src.as_ptr().add(i));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
            }
        }
        for i in n..dst.len() {
            dst[i] = f16::from_f32(src[i]);
        }
    }
}

/// f16 with F16C's conversions where the CPU has them (see [`x86`]), `half`'s otherwise.
impl Half for f16 {
    half_storage!(f16, F16);
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn widen_run(src: &[Self], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx")
        {
            // SAFETY: the CPU has F16C and AVX (checked above).
            unsafe { x86::widen_f16(&src[..dst.len()], dst) };
            return;
        }
        use half::slice::HalfFloatSliceExt;
        src[..dst.len()].convert_to_f32_slice(dst);
    }
    fn narrow_run(src: &[f32], dst: &mut [Self]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx")
        {
            // SAFETY: the CPU has F16C and AVX (checked above).
            unsafe { x86::narrow_f16(&src[..dst.len()], dst) };
            return;
        }
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(&src[..dst.len()]);
    }
}

/// Elements of the right operand one task widens at once, when there are tiles enough for every
/// thread (4 MiB in f32)...
const PANEL_ELEMENTS: usize = 1 << 20;
/// ...and at most (16 MiB), when a tile's rows of the left operand outweigh its panel: every column
/// panel widens those rows again, so a narrow output over a long inner dimension (the head's input
/// gradient `g · W`) is cut into no more panels than there are threads.
const PANEL_ELEMENTS_MAX: usize = 1 << 22;
/// Rows of the left operand one task takes at most.
const ROW_BLOCK: usize = 256;
/// Inner-dimension elements one task widens at once.
const K_BLOCK: usize = 4096;

/// Which product kernels this CPU runs, part of the calibration cache's key: the 16-bit ones, and
/// `+noavx512` where `GEMM_AVX512=0` keeps gemm's f32 products off the AVX-512 kernels this CPU
/// has (vendor/gemm-common/MEMTUNE.md).
pub fn cpu_kernels() -> String {
    let bf16 = match (bf16::native_dot(), dot::amx()) {
        (true, true) => "+bf16amx",
        (true, false) => "+bf16dot",
        _ => "",
    };
    let f32 = if gemm_avx512_off() { "+noavx512" } else { "" };
    format!("{bf16}{f32}")
}

/// Whether `GEMM_AVX512=0` turns off AVX-512 kernels this CPU has (the vendored gemm-common's
/// `prefer_avx512` reads the same variable).
fn gemm_avx512_off() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::env::var("GEMM_AVX512").is_ok_and(|v| v.trim() == "0")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `a · b` for tensors `[..., m, k]` and `[..., k, n]` with the same leading dimensions. bf16 and
/// f16 on the CPU take the tiled path, f32 `f32_product` (gemm directly); everything else is
/// candle's matmul.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if on_cpu_products_of(a, b) {
        a.apply_op2(b, Tiled)
    } else {
        a.matmul(b)
    }
}

/// `a · b` as a node of the autograd graph whose value nobody reads: its forward writes zeros of
/// the product's shape instead of multiplying, its backward is [`matmul`]'s. A recomputed layer's
/// output is one such value (backward reads the inputs of the layer's products, never the output),
/// so its last product, the MLP's down projection, need not run again: about a fifth of a
/// recomputation's FLOPs in a Llama layer. Any device; on the CPU no product-sized copy is made.
pub fn unread_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if on_cpu_products_of(a, b) {
        return a.apply_op2(b, Unread);
    }
    let shape = product_shape(a.dims(), b.dim(b.rank() - 1)?);
    let zeros = Tensor::zeros(shape, a.dtype(), a.device())?;
    super::ops::with_backward2(a, b, zeros, "unread-matmul", |a, b, _, grad| {
        Ok((matmul(grad, &b.t()?)?, matmul(&a.t()?, grad)?))
    })
}

/// The gradients of `a · b` given the product's gradient: `grad · bᵀ` for `a`, `aᵀ · grad` for `b`
/// (as `(gradᵀ · a)ᵀ` where `b` is a transposed view), each only where that operand is tracked.
fn product_grads(
    a: &Tensor,
    b: &Tensor,
    grad: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let ga = if a.track_op() {
        Some(matmul(grad, &b.t()?)?)
    } else {
        None
    };
    let gb = if !b.track_op() {
        None
    } else if b.rank() == 2 && !b.is_contiguous() && b.t()?.is_contiguous() {
        // `b` is a transposed weight (`x · Wᵀ`): its gradient is made as `(gradᵀ · a)ᵀ`, the
        // transpose of a contiguous `[n, k]`, which the transpose's backward hands `W` as it is,
        // in W's own layout, where `aᵀ · grad` would be copied into it element by element.
        Some(matmul(&grad.t()?, a)?.t()?)
    } else {
        Some(matmul(&a.t()?, grad)?)
    };
    Ok((ga, gb))
}

/// Whether memtune's CPU products multiply `a` by `b`: [`on_cpu_products`] for `a`, `b` of its
/// dtype, and shapes `[..., m, k]` and `[..., k, n]` with the same leading dimensions.
fn on_cpu_products_of(a: &Tensor, b: &Tensor) -> bool {
    on_cpu_products(a)
        && b.dtype() == a.dtype()
        && a.rank() >= 2
        && a.rank() == b.rank()
        && a.dims()[..a.rank() - 2] == b.dims()[..b.rank() - 2]
        && a.dims()[a.rank() - 1] == b.dims()[b.rank() - 2]
}

/// Whether [`matmul`] multiplies `t` (with an operand of its dtype) on memtune's CPU products,
/// which read any strides: a CPU tensor of f32, bf16 or f16. Elsewhere candle's product runs.
pub(crate) fn on_cpu_products(t: &Tensor) -> bool {
    // Not [`crate::engine::cpu_paths`]: with the GPU's code paths on the CPU the products stay
    // memtune's, which, as cuBLAS does, read bf16 and f16 operands as they are (candle's CPU
    // product widens them to f32 first, a transient no GPU has: the tied 49k-row head of
    // SmolLM2-135M as a 113 MB f32 copy).
    t.device().is_cpu() && matches!(t.dtype(), DType::BF16 | DType::F16 | DType::F32)
}

/// gemm's parallelism over all of rayon's threads (none with one thread).
fn all_threads() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        threads => gemm::Parallelism::Rayon(threads),
    }
}

/// `dst = a · b` for batch entry `bi` of two f32 operands on gemm's kernels, or `dst += a · b`
/// with `accumulate`; `dst` is `m × n`, row-major.
///
/// # Safety
/// Entry `bi` of both operands lies inside their data at their strides, with `a.cols == b.rows`,
/// and `dst` points at `a.rows × b.cols` elements no other thread touches during the call (read
/// first only with `accumulate`).
unsafe fn gemm_entry(
    a: &Operand<f32>,
    b: &Operand<f32>,
    bi: usize,
    dst: *mut f32,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    let n = b.cols;
    if a.rows <= COLUMN_BLOCK_ROWS && transposes_columns(b) {
        // SAFETY: the caller's contract.
        return unsafe { gemm_column_blocks(a, b, bi, dst, accumulate, parallelism) };
    }
    // SAFETY: the caller's contract.
    unsafe {
        gemm_rows(
            (a, 0..a.rows),
            (b, b.starts[bi]),
            bi,
            (dst, n),
            accumulate,
            parallelism,
        )
    }
}

/// [`gemm_entry`]'s product of `a`'s rows `rows` by the right operand's `k × n` block at element
/// `b_at`, into `dst`'s rows of `n` elements (`dst` points at the first row's, rows `dst_rows`
/// apart), in calls of at most [`GEMM_ROWS`] rows.
///
/// # Safety
/// As [`gemm_entry`]'s, for those rows of `a` and `dst` and that block of `b`.
unsafe fn gemm_rows(
    (a, rows): (&Operand<f32>, std::ops::Range<usize>),
    (b, b_at): (&Operand<f32>, usize),
    bi: usize,
    (dst, dst_rows): (*mut f32, usize),
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    let (k, n) = (b.rows, b.cols);
    for r0 in rows.clone().step_by(GEMM_ROWS) {
        // SAFETY: the caller's contract; rows `r0..r0 + GEMM_ROWS` (at most) of `a` and `dst`.
        unsafe {
            gemm_block(
                (GEMM_ROWS.min(rows.end - r0), k, n),
                (dst.add((r0 - rows.start) * dst_rows), dst_rows),
                (a, a.starts[bi] + r0 * a.row_stride),
                (b, b_at),
                accumulate,
                parallelism,
            )
        }
    }
}

/// Elements of a transposed right operand one task copies at once (128 KiB of f32, a block that
/// stays in the core's L2 cache while gemm reads it), in blocks of at least 64 columns (gemm's
/// f32 micro-panel on AVX-512 is 64 rows of its transposed product).
const COLUMN_BLOCK_ELEMENTS: usize = 1 << 15;

/// Rows of the left operand up to which [`gemm_entry`] copies a transposed right operand in
/// column blocks. gemm's own packing of it costs the same for any number of rows, so it weighs
/// most on short products (1.15–1.40× faster at 128 rows of the benchmark matrix's shapes); at
/// 1,024 rows the two paths ran within the noise of each other (0.91–1.01×) in
/// `examples/matmul_f32.rs`.
const COLUMN_BLOCK_ROWS: usize = 512;

/// Whether [`gemm_entry`] multiplies by `b` in column blocks: `b` is a transposed view (its
/// columns contiguous, as a weight `W` `[n, k]` is read for `x · Wᵀ`), wide enough for a block
/// of 16 columns, and the CPU has AVX-512 for the 16 × 16 transposes (`MEMTUNE_NO_COLUMN_BLOCKS=1`
/// turns this off, for side-by-side timing).
///
/// gemm computes a row-major product as its transpose, `Wᵀᵀ · xᵀ`, whose left operand is then
/// `W` row by row, and it packs a left operand's columns: from rows `k` elements apart one
/// element at a time (a scalar load and store per element), on every thread that uses the panel.
/// For a forward product at 128 tokens that packing cost a third of the product's time
/// (`examples/matmul_f32.rs`).
fn transposes_columns(b: &Operand<f32>) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        b.row_stride == 1
            && b.col_stride != 1
            && b.rows >= 16
            && b.cols >= 16
            && *HAS.get_or_init(|| {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::env::var_os("MEMTUNE_NO_COLUMN_BLOCKS").is_none()
            })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = b;
        false
    }
}

/// [`gemm_entry`] for a transposed right operand ([`transposes_columns`]): blocks of its columns
/// are copied row-major into a task's scratch with AVX-512 16 × 16 transposes, and each block's
/// columns of the output are a gemm call on one thread that reads the copy as it is. The blocks
/// run on rayon's threads (work-stealing, so a thread the host slows takes fewer) or, with
/// `Parallelism::None`, one after another on this one. The same products and sums as gemm's own
/// path, over the inner dimension in gemm's blocks of it.
///
/// # Safety
/// As [`gemm_entry`]'s.
unsafe fn gemm_column_blocks(
    a: &Operand<f32>,
    b: &Operand<f32>,
    bi: usize,
    dst: *mut f32,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    let (m, k, n) = (a.rows, b.rows, b.cols);
    if m == 0 {
        return;
    }
    let width = (COLUMN_BLOCK_ELEMENTS / k / 64 * 64).max(64).min(n);
    let columns = n.div_ceil(width);
    // With fewer column blocks than tasks enough to balance the threads, rows are split too (a
    // column block is then copied once per row block, each of at least 64 rows).
    let threads = match parallelism {
        gemm::Parallelism::None => 1,
        _ => rayon::current_num_threads().max(1),
    };
    let row_blocks = if threads == 1 {
        1
    } else {
        (TASKS_PER_THREAD * threads)
            .div_ceil(columns)
            .clamp(1, m.div_ceil(64))
    };
    let height = m.div_ceil(row_blocks);
    let output = Output(dst);
    // Task `t` is column block `t / row_blocks`, row block `t % row_blocks`; a worker's scratch
    // remembers the column block it holds, so consecutive tasks copy it once.
    let task = |(scratch, held): &mut (Vec<f32>, Option<usize>), t: usize| {
        let (j, i) = (t / row_blocks, t % row_blocks);
        let (j0, w) = (j * width, width.min(n - j * width));
        let (r0, r1) = (i * height, ((i + 1) * height).min(m));
        if r0 >= r1 {
            return;
        }
        if scratch.len() < k * w {
            scratch.resize(k * w, 0.0);
        }
        let copy = &mut scratch[..k * w];
        if *held != Some(j) {
            transpose_columns(b, b.starts[bi] + j0 * b.col_stride, w, copy);
            *held = Some(j);
        }
        let copy = Operand {
            data: &*copy,
            rows: k,
            cols: w,
            row_stride: w,
            col_stride: 1,
            starts: Vec::new(),
        };
        // SAFETY: the caller's contract for `a` and `dst`; this task writes only the output's
        // rows `r0..r1` of columns `j0..j0 + w`, which no other task touches; `copy` is `k × w`,
        // row-major.
        unsafe {
            gemm_rows(
                (a, r0..r1),
                (&copy, 0),
                bi,
                (output.at(r0 * n + j0), n),
                accumulate,
                gemm::Parallelism::None,
            )
        }
    };
    let tasks = columns * row_blocks;
    if threads == 1 {
        let mut scratch = (Vec::new(), None);
        (0..tasks).for_each(|t| task(&mut scratch, t));
    } else {
        // One scratch per thread, all allocated here: how many exist at once then does not
        // depend on how the tasks fall on the threads (rayon makes one per job it splits off),
        // so a step's memory peak is the same from run to run.
        let slots: Vec<std::sync::Mutex<(Vec<f32>, Option<usize>)>> = (0..threads)
            .map(|_| std::sync::Mutex::new((vec![0.0; k * width], None)))
            .collect();
        (0..tasks).into_par_iter().for_each(|t| {
            let slot = &slots[rayon::current_thread_index().unwrap_or(0) % threads];
            // Uncontended: a task runs on one thread and calls into no other task.
            let mut scratch = slot.lock().unwrap_or_else(|e| e.into_inner());
            task(&mut scratch, t)
        });
    }
}

/// Tasks per thread [`gemm_column_blocks`] aims for at least, so that a thread the host slows
/// leaves fewer of them undone when the others finish.
const TASKS_PER_THREAD: usize = 4;

/// `dst` (`k × w`, row-major) = the `w` columns of `b` from element `at` (each `k` contiguous
/// elements, `b.col_stride` apart), transposed 16 × 16 at a time on AVX-512 and element by
/// element at the edges.
fn transpose_columns(b: &Operand<f32>, at: usize, w: usize, dst: &mut [f32]) {
    let (k, cs) = (b.rows, b.col_stride);
    let src = &b.data[at..at + (w - 1) * cs + k];
    let (kw, ww) = (k / 16 * 16, w / 16 * 16);
    #[cfg(target_arch = "x86_64")]
    for c0 in (0..ww).step_by(16) {
        for r0 in (0..kw).step_by(16) {
            // SAFETY: AVX-512F ([`transposes_columns`]); the 16 runs of 16 f32 (32 halves) from
            // column c0 + i, row r0 lie in `src`, and the 16 rows r0.. of 16 f32 from column c0
            // in `dst` (`k × w`).
            unsafe {
                dot::x86_pack::words(
                    src.as_ptr().add(c0 * cs + r0) as *const u16,
                    2 * cs,
                    dst.as_mut_ptr().add(r0 * w + c0) as *mut u32,
                    w,
                )
            }
        }
    }
    // The edges: rows past the last whole 16 for every column, columns past the last whole 16
    // for every row (all of them without AVX-512's loop).
    let (kw, ww) = if cfg!(target_arch = "x86_64") {
        (kw, ww)
    } else {
        (0, 0)
    };
    for c in 0..w {
        let rows = if c < ww { kw..k } else { 0..k };
        for r in rows {
            dst[r * w + c] = src[c * cs + r];
        }
    }
}

/// Output rows per gemm call in [`gemm_entry`]. gemm computes a row-major product as its
/// transpose and, on rayon's threads, packs that transpose's whole right operand: `kc` × the
/// output's rows, a copy as large as the left operand's block. For a product with a vocabulary's
/// rows (the chunked loss's head gradient, `d logitsᵀ · h`) that was 15.6 MiB at 128 tokens and a
/// 32,000 vocabulary, and more for a longer chunk; in blocks of 4,096 rows it is at most
/// `kc` × 4,096.
const GEMM_ROWS: usize = 4096;

/// `dst = a · b` (or `dst += a · b` with `accumulate`) for an `m × k` block of `a` starting at
/// element `a_at` and a `k × n` block of `b` starting at `b_at`, at the operands' strides, into
/// `m × n` elements at `dst` with rows `dst_rows` apart.
///
/// # Safety
/// Both blocks lie inside their operands' data, and `dst`'s rows are this call's alone.
unsafe fn gemm_block(
    (m, k, n): (usize, usize, usize),
    (dst, dst_rows): (*mut f32, usize),
    (a, a_at): (&Operand<f32>, usize),
    (b, b_at): (&Operand<f32>, usize),
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rows as isize,
            accumulate,
            a.data.as_ptr().add(a_at),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr().add(b_at),
            b.col_stride as isize,
            b.row_stride as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// `a · b` of two CPU storages of one dtype (bf16, f16 or f32), `[..., m, k]` by `[..., k, n]`
/// with the same leading dimensions: [`matmul`]'s forward, for ops that multiply inside their own
/// forward pass.
pub(crate) fn cpu_product(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (d1, d2) = (l1.dims(), l2.dims());
    let r = d1.len();
    if r < 2 || d2.len() != r || d1[..r - 2] != d2[..r - 2] || d1[r - 1] != d2[r - 2] {
        candle_core::bail!("matmul: shapes {d1:?} and {d2:?} do not multiply");
    }
    match s1 {
        CpuStorage::BF16(_) => tiled::<bf16>(s1, l1, s2, l2),
        CpuStorage::F16(_) => tiled::<f16>(s1, l1, s2, l2),
        CpuStorage::F32(_) => f32_product(s1, l1, s2, l2),
        other => candle_core::bail!("matmul: unsupported dtype {:?}", other.dtype()),
    }
}

/// `dst += a · b` in place for 2-D f32 CPU tensors (`dst` contiguous `[m, n]`, `a` `[m, k]` and
/// `b` `[k, n]` at any strides), on gemm's kernels with no product-sized temporary: a sum over
/// chunks (the chunked loss's head gradient) keeps one buffer instead of three at its peak (the
/// total, the chunk's product and their sum). False, with nothing done, for other dtypes, devices,
/// ranks or layouts; the caller then adds a product.
pub fn accumulate_product(dst: &Tensor, a: &Tensor, b: &Tensor) -> Result<bool> {
    let all = [dst, a, b];
    if !(all
        .iter()
        .all(|t| crate::engine::cpu_paths(t.device()) && t.dtype() == DType::F32 && t.rank() == 2)
        && dst.is_contiguous())
    {
        return Ok(false);
    }
    let ((m, k), (k2, n)) = (a.dims2()?, b.dims2()?);
    if k != k2 || dst.dims2()? != (m, n) {
        candle_core::bail!(
            "accumulate_product: {:?} += {:?} · {:?}",
            dst.dims(),
            a.dims(),
            b.dims()
        );
    }
    dst.inplace_op3(a, b, &AccumulateProduct)?;
    Ok(true)
}

/// Which blocks of a causal attention product [`causal_product`] computes. Attention's
/// matrices are `s × s` per sequence and head, zero (probabilities and their gradients) or
/// unused (scores and the probabilities' gradient) above the diagonal; rows are taken in blocks
/// of [`CAUSAL_BLOCK`], and only blocks on or below the diagonal are multiplied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Causal {
    /// `a · b` is `s × s` and only its entries on or below the diagonal are used (the scores
    /// `q · kᵀ`, the probabilities' gradient `dO · vᵀ`): a row block's columns after the block
    /// are not multiplied and are written as zeros.
    Output,
    /// `a` is `s × s` and zero above the diagonal (`P · v`, `dS · k`): a row block reads `a`'s
    /// columns (and `b`'s rows) up to the block's end only.
    Lower,
    /// `a` is `s × s` and zero below the diagonal: a transposed lower one (`Pᵀ · dO`, `dSᵀ ·
    /// q`): a row block reads `a`'s columns (and `b`'s rows) from the block's start only.
    Upper,
}

/// Rows per block of [`causal_product`]: at a sequence of 256, 10 of 16 blocks are multiplied.
pub const CAUSAL_BLOCK: usize = 64;

/// `a · b` for attention's causal products (see [`Causal`]), `[..., m, k]` by `[..., k, n]`: on
/// the CPU in f32, only the blocks on or below the diagonal are multiplied (gemm on one thread
/// per batch entry and row block, the tasks spread over rayon's threads), which is 62.5% of the
/// products' work at a sequence of 256 (the rest is masked or zero); elsewhere [`matmul`]'s
/// whole product, equal where the result is used.
pub fn causal_product(a: &Tensor, b: &Tensor, kind: Causal) -> Result<Tensor> {
    if causal_fits(a, b, kind) {
        a.apply_op2_no_bwd(b, &CausalProduct { kind, seq: false })
    } else {
        matmul(a, b)
    }
}

/// [`causal_product`] of `[b, h, m, k]` by `[b, h, k, n]`, returned as `[b, m, h, n]`
/// (contiguous): the heads side by side, as attention's output and v's gradient are read next.
/// On the CPU in f32 the product writes that layout itself; elsewhere it is a copy of the
/// transposed product.
pub fn causal_product_seq(a: &Tensor, b: &Tensor, kind: Causal) -> Result<Tensor> {
    if a.rank() == 4 && causal_fits(a, b, kind) {
        a.apply_op2_no_bwd(b, &CausalProduct { kind, seq: true })
    } else {
        matmul(a, b)?.transpose(1, 2)?.contiguous()
    }
}

/// Whether [`CausalProduct`] runs `a · b` of `kind`: f32 on the CPU, `s × s` where it must be.
fn causal_fits(a: &Tensor, b: &Tensor, kind: Causal) -> bool {
    on_cpu_products_of(a, b) && a.dtype() == DType::F32 && {
        let (da, db) = (a.dims(), b.dims());
        let m = da[da.len() - 2];
        match kind {
            Causal::Output => m == db[db.len() - 1],
            Causal::Lower | Causal::Upper => m == da[da.len() - 1],
        }
    }
}

/// The op of [`causal_product`] (f32, CPU). `seq`: the output is `[b, m, h, n]` for operands
/// `[b, h, ...]` ([`causal_product_seq`]), rather than `[b, h, m, n]`.
struct CausalProduct {
    kind: Causal,
    seq: bool,
}

impl CustomOp2 for CausalProduct {
    fn name(&self) -> &'static str {
        "causal-product"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b, shape) = f32_operands(s1, l1, s2, l2)?;
        let (m, k, n) = (a.rows, a.cols, b.cols);
        let len = a.starts.len() * m * n;
        // Where entry `bi`'s output matrix starts, and its rows' stride: `[.., m, n]` per entry,
        // or with `seq`, entry (batch, head) of `[b, m, h, n]`.
        let heads = if self.seq { l1.dims()[1] } else { 1 };
        let (shape, row_stride) = if self.seq {
            let (d0, d2) = (l1.dims()[0], l1.dims()[2]);
            (Shape::from((d0, d2, heads, n)), heads * n)
        } else {
            (shape, n)
        };
        let entry_at = |bi: usize| (bi / heads) * m * heads * n + (bi % heads) * n;
        let mut out = Vec::<f32>::with_capacity(len);
        let output = Output(out.as_mut_ptr());
        let kind = self.kind;
        let tasks: Vec<(usize, usize)> = (0..a.starts.len())
            .flat_map(|bi| (0..m).step_by(CAUSAL_BLOCK).map(move |r0| (bi, r0)))
            .collect();
        tasks.into_par_iter().for_each(|(bi, r0)| {
            let r1 = (r0 + CAUSAL_BLOCK).min(m);
            let rows = r1 - r0;
            let dst = output.at(entry_at(bi) + r0 * row_stride);
            let (a_row, b_at) = (a.starts[bi] + r0 * a.row_stride, b.starts[bi]);
            // The block's columns of the output (Output) or span of the inner dimension
            // (Lower, Upper).
            let (cols, inner) = match kind {
                Causal::Output => (0..r1, 0..k),
                Causal::Lower => (0..n, 0..r1),
                Causal::Upper => (0..n, r0..k),
            };
            // The product's columns, written by gemm (none over an empty inner dimension).
            let written = if inner.is_empty() { 0 } else { cols.end };
            if written > 0 {
                // SAFETY: the blocks lie inside the operands (rows `r0..r1` and columns `inner`
                // of `a`, rows `inner` and columns `cols` of `b`, within entry `bi`'s
                // dimensions, which candle's layouts place inside the storages); the output rows
                // `r0..r1` of entry `bi` are this task's alone (`n` elements each, `row_stride`
                // apart: entries' rows interleave in the `seq` layout but never overlap).
                unsafe {
                    gemm_block(
                        (rows, inner.len(), cols.len()),
                        (dst, row_stride),
                        (&a, a_row + inner.start * a.col_stride),
                        (&b, b_at + inner.start * b.row_stride),
                        false,
                        gemm::Parallelism::None,
                    )
                };
            }
            for r in 0..rows {
                // SAFETY: as above; the columns gemm did not write, as zeros.
                let row = unsafe { std::slice::from_raw_parts_mut(dst.add(r * row_stride), n) };
                row[written..].fill(0.0);
            }
        });
        // SAFETY: every task wrote its rows in full (the product's columns, then zeros), and the
        // entries' rows cover the output.
        unsafe { out.set_len(len) };
        Ok((CpuStorage::F32(out), shape))
    }
}

/// The in-place op of [`accumulate_product`].
struct AccumulateProduct;

impl candle_core::InplaceOp3 for AccumulateProduct {
    fn name(&self) -> &'static str {
        "accumulate-product"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<()> {
        let (CpuStorage::F32(d), CpuStorage::F32(x), CpuStorage::F32(y)) = (dst, a, b) else {
            candle_core::bail!("accumulate-product: f32 operands only");
        };
        let Some((start, end)) = dl.contiguous_offsets() else {
            candle_core::bail!("accumulate-product: the destination is not contiguous");
        };
        let (a, b) = (Operand::from_slice(x, al)?, Operand::from_slice(y, bl)?);
        let Some(d) = d.get_mut(start..end) else {
            candle_core::bail!("accumulate-product: the destination's data was released");
        };
        if d.len() != a.rows * b.cols || b.rows != a.cols {
            candle_core::bail!("accumulate-product: shapes do not match");
        }
        if a.cols == 0 || d.is_empty() {
            return Ok(());
        }
        // SAFETY: the operands lie inside their storages at their layouts' strides (candle's
        // layouts of 2-D tensors with the dimensions checked above); `d` holds the m × n
        // destination, read and written in place.
        unsafe { gemm_entry(&a, &b, 0, d.as_mut_ptr(), true, all_threads()) };
        Ok(())
    }
}

/// The product of [`matmul`]; its backward is two products of the same kind, one per tracked
/// operand (a frozen operand gets none).
struct Tiled;

/// One operand's matrices: their dimensions, strides and where each batch entry starts.
struct Operand<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
    starts: Vec<usize>,
}

impl<'a, T> Operand<'a, T> {
    /// The operand at `layout` in `data`, which must hold every element the layout addresses (a
    /// tensor whose data was released, see `ops::release`, fails here instead of being read out
    /// of bounds by the kernels' raw pointers).
    fn from_slice(data: &'a [T], layout: &Layout) -> Result<Self> {
        let dims = layout.dims();
        let strides = layout.stride();
        let r = dims.len();
        if dims.iter().all(|&d| d > 0) {
            let last = dims
                .iter()
                .zip(strides)
                .map(|(&d, &s)| (d - 1) * s)
                .sum::<usize>()
                + layout.start_offset();
            if last >= data.len() {
                candle_core::bail!(
                    "matmul: an operand of shape {dims:?} addresses element {last} of {} (its data \
                     was released?)",
                    data.len()
                );
            }
        }
        // Every batch entry's offset, walking the leading dimensions with their strides.
        let mut starts = vec![layout.start_offset()];
        for d in 0..r - 2 {
            starts = starts
                .iter()
                .flat_map(|&s| (0..dims[d]).map(move |i| s + i * strides[d]))
                .collect();
        }
        Ok(Self {
            data,
            rows: dims[r - 2],
            cols: dims[r - 1],
            row_stride: strides[r - 2],
            col_stride: strides[r - 1],
            starts,
        })
    }
}

impl<'a, T: Half> Operand<'a, T> {
    fn new(storage: &'a CpuStorage, layout: &Layout) -> Result<Self> {
        let Some(data) = T::slice(storage) else {
            candle_core::bail!("tiled matmul: operands of different dtypes");
        };
        Operand::from_slice(data, layout)
    }

    /// Rows `rows` × columns `cols` of batch entry `b`, widened into `out`, in the operand's own
    /// memory order. Returns (row stride, column stride) of `out`.
    fn widen(
        &self,
        b: usize,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        out: &mut Vec<f32>,
    ) -> (isize, isize) {
        let (nr, nc) = (rows.len(), cols.len());
        out.clear();
        out.resize(nr * nc, 0.0);
        let base = self.starts[b];
        // Column-major when the columns are the contiguous direction in memory (a transposed
        // matrix): each of its columns is then one contiguous run.
        let column_major = self.row_stride == 1 && self.col_stride != 1;
        if column_major {
            for (c, dst) in cols.zip(out.chunks_exact_mut(nr)) {
                let at = base + c * self.col_stride + rows.start;
                T::widen_run(&self.data[at..at + nr], dst);
            }
            (1, nr as isize)
        } else {
            for (r, dst) in rows.zip(out.chunks_exact_mut(nc)) {
                let row = base + r * self.row_stride;
                if self.col_stride == 1 {
                    let at = row + cols.start;
                    T::widen_run(&self.data[at..at + nc], dst);
                } else {
                    for (c, d) in cols.clone().zip(dst) {
                        *d = self.data[row + c * self.col_stride].widen();
                    }
                }
            }
            (nc as isize, 1)
        }
    }
}

/// bf16 → f32: the 16 bits are the f32's upper half (exact).
#[inline(always)]
pub(crate) fn widen(v: bf16) -> f32 {
    f32::from_bits(u32::from(v.to_bits()) << 16)
}

/// f32 → bf16, rounding to nearest even (NaN stays a quiet NaN), as `half` does, branch-free so
/// that a row of them vectorizes.
#[inline(always)]
pub(crate) fn narrow(v: f32) -> bf16 {
    let bits = v.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    let nan = (bits >> 16) | 0x0040;
    bf16::from_bits(if v.is_nan() { nan } else { rounded } as u16)
}

/// The output's storage, written by tasks that own disjoint blocks of it.
struct Output<T>(*mut T);
// SAFETY: every task writes only its own rows × columns block (see `cpu_fwd`).
unsafe impl<T> Send for Output<T> {}
unsafe impl<T> Sync for Output<T> {}

impl<T> Output<T> {
    /// Through a method, so that closures capture the whole (Sync) wrapper, not its pointer.
    fn at(&self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }
}

/// One worker's widened operands and f32 result, reused for each of its tiles.
struct Scratch {
    lhs: Vec<f32>,
    rhs: Vec<f32>,
    dst: Vec<f32>,
}

/// The tiled product of two 16-bit operands.
fn tiled<T: Half>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (a, b) = (Operand::<T>::new(s1, l1)?, Operand::<T>::new(s2, l2)?);
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let batches = a.starts.len();
    let shape = product_shape(l1.dims(), n);
    #[cfg(target_arch = "x86_64")]
    if T::native_dot() {
        let out = if dot::amx() {
            // SAFETY: `amx()` held.
            unsafe { dot::packed_product::<T, dot::Amx>(&a, &b) }
        } else {
            // SAFETY: `native_dot()` held: `dot::available()`.
            unsafe { dot::packed_product::<T, dot::Dot>(&a, &b) }
        };
        return Ok((T::storage(out), shape));
    }
    let mut out = vec![T::ZERO; batches * m * n];
    if m == 0 || n == 0 {
        return Ok((T::storage(out), shape));
    }
    // Tiles: rows of `a` by columns of `b`, each summed over blocks of the inner dimension
    // so that a tile's widened operands stay small whatever `k` is.
    let k_block = k.clamp(1, K_BLOCK);
    let mut panel = (PANEL_ELEMENTS / k_block).max(16);
    if m.min(ROW_BLOCK) >= panel {
        // A tile's rows of `a` outweigh its panel of `b`, and every panel widens them again.
        let threads = rayon::current_num_threads().max(1);
        panel = panel
            .max(n.div_ceil(threads))
            .min((PANEL_ELEMENTS_MAX / k_block).max(16));
    }
    let panel = panel.min(n);
    let tiles: Vec<(usize, usize, usize)> = (0..batches)
        .flat_map(|bi| {
            (0..m.div_ceil(ROW_BLOCK)).flat_map(move |ri| {
                (0..n.div_ceil(panel)).map(move |pi| (bi, ri * ROW_BLOCK, pi * panel))
            })
        })
        .collect();
    let output = Output(out.as_mut_ptr());
    // Each worker's buffers are made here, before any task runs, and the tiles are dealt out
    // round-robin: the bytes a product holds are then the same in every run. With buffers made
    // per task, a second task's buffers were live or not as the threads happened to overlap, and
    // a probe's peak moved by one widened tile between identical runs.
    let workers = rayon::current_num_threads().clamp(1, tiles.len());
    let rows = m.min(ROW_BLOCK);
    let mut scratch: Vec<Scratch> = (0..workers)
        .map(|_| Scratch {
            lhs: Vec::with_capacity(rows * k_block),
            rhs: Vec::with_capacity(k_block * panel),
            dst: vec![0f32; rows * panel],
        })
        .collect();
    scratch.par_iter_mut().enumerate().for_each(|(w, s)| {
        for &(bi, r0, c0) in tiles.iter().skip(w).step_by(workers) {
            let (rs, cs) = (r0..(r0 + ROW_BLOCK).min(m), c0..(c0 + panel).min(n));
            let nc = cs.len();
            let dst = &mut s.dst[..rs.len() * nc];
            widened_tile(&a, &b, bi, rs, cs, k_block, &mut s.lhs, &mut s.rhs, dst);
            let base = bi * m * n;
            for (r, row) in dst.chunks(nc).enumerate() {
                let at = base + (r0 + r) * n + c0;
                // SAFETY: rows `rs` × columns `cs` of entry `bi` belong to this tile alone,
                // and lie inside `out` (batches × m × n elements).
                let target = unsafe { std::slice::from_raw_parts_mut(output.at(at), nc) };
                T::narrow_run(row, target);
            }
        }
    });
    Ok((T::storage(out), shape))
}

/// Two f32 storages as product operands (`[..., m, k]` and `[..., k, n]`), and the product's
/// shape `[..., m, n]`.
fn f32_operands<'a>(
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
) -> Result<(Operand<'a, f32>, Operand<'a, f32>, Shape)> {
    let (CpuStorage::F32(x), CpuStorage::F32(y)) = (s1, s2) else {
        candle_core::bail!("matmul: f32 operands expected");
    };
    let (a, b) = (Operand::from_slice(x, l1)?, Operand::from_slice(y, l2)?);
    let shape = product_shape(l1.dims(), b.cols);
    Ok((a, b, shape))
}

/// The f32 product on gemm, as candle's own but for two things: a new output is not zero-filled
/// first (gemm overwrites every element), and batched products (attention's, one per sequence
/// and head) run their entries on the threads in parallel, each on one thread, where candle runs
/// them one after another, each split over the threads (small products that gemm's threads
/// mostly wait on).
fn f32_product(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (a, b, shape) = f32_operands(s1, l1, s2, l2)?;
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let batches = a.starts.len();
    let len = batches * m * n;
    if len == 0 || k == 0 {
        return Ok((CpuStorage::F32(vec![0.0; len]), shape));
    }
    let mut out = Vec::<f32>::with_capacity(len);
    let output = Output(out.as_mut_ptr());
    let entry = |bi: usize, parallelism| {
        // SAFETY: entry `bi`'s operands lie inside their storages at the layouts' strides
        // (`cpu_product` checked the shapes); its output is the `m × n` elements from `bi · m · n`,
        // written by this call alone, which overwrites all of them (no accumulation).
        unsafe { gemm_entry(&a, &b, bi, output.at(bi * m * n), false, parallelism) }
    };
    let threads = rayon::current_num_threads().max(1);
    if batches >= threads && threads > 1 {
        (0..batches)
            .into_par_iter()
            .for_each(|bi| entry(bi, gemm::Parallelism::None));
    } else {
        (0..batches).for_each(|bi| entry(bi, all_threads()));
    }
    // SAFETY: every entry's output was written in full.
    unsafe { out.set_len(len) };
    Ok((CpuStorage::F32(out), shape))
}

/// `dst` (rows × cols, row-major f32) = the tile's product: its blocks of `k_block` of the inner
/// dimension widened to f32 in `lhs` and `rhs` and multiplied on gemm's f32 kernel, one thread.
#[allow(clippy::too_many_arguments)]
fn widened_tile<T: Half>(
    a: &Operand<T>,
    b: &Operand<T>,
    bi: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    k_block: usize,
    lhs: &mut Vec<f32>,
    rhs: &mut Vec<f32>,
    dst: &mut [f32],
) {
    let (mr, nc, k) = (rows.len(), cols.len(), a.cols);
    for (i, k0) in (0..k).step_by(k_block).enumerate() {
        let k1 = (k0 + k_block).min(k);
        let (lhs_rs, lhs_cs) = a.widen(bi, rows.clone(), k0..k1, lhs);
        let (rhs_rs, rhs_cs) = b.widen(bi, k0..k1, cols.clone(), rhs);
        // SAFETY: the buffers hold mr × (k1 − k0), (k1 − k0) × nc and mr × nc elements at the
        // strides given; the first block overwrites `dst`, the others add to it.
        unsafe {
            gemm::gemm(
                mr,
                nc,
                k1 - k0,
                dst.as_mut_ptr(),
                1,
                nc as isize,
                i > 0,
                lhs.as_ptr(),
                lhs_cs,
                lhs_rs,
                rhs.as_ptr(),
                rhs_cs,
                rhs_rs,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

impl CustomOp2 for Tiled {
    fn name(&self) -> &'static str {
        "tiled-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_product(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        product_grads(a, b, grad)
    }
}

/// The product of [`unread_matmul`] on the CPU: zeros forward, [`Tiled`]'s backward.
struct Unread;

impl CustomOp2 for Unread {
    fn name(&self) -> &'static str {
        "unread-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = l2.shape().dim(candle_core::D::Minus1)?;
        zeros_like_product(s1.dtype(), product_shape(l1.dims(), n))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        product_grads(a, b, grad)
    }
}

/// The shape of a product `[..., m, k] · [..., k, n]` from its left operand's dimensions `a` and
/// the right one's columns `n`: `[..., m, n]`.
pub(crate) fn product_shape(a: &[usize], n: usize) -> Shape {
    let mut dims = a.to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Shape::from(dims)
}

/// Zeros of `dtype` and `shape` as a CPU op's output.
pub(crate) fn zeros_like_product(dtype: DType, shape: Shape) -> Result<(CpuStorage, Shape)> {
    use candle_core::backend::BackendDevice;
    let zeros = candle_core::cpu_backend::CpuDevice.zeros_impl(&shape, dtype)?;
    Ok((zeros, shape))
}

/// bf16 products on AVX512-BF16: `vdpbf16ps` multiplies pairs of bf16 and adds both products to
/// f32 lanes, twice the multiply-adds of an f32 FMA per instruction, with no widening pass.
///
/// [`dot::packed_product`] packs a task's columns of the right operand as micro-panels of
/// [`dot::NR`] columns and its rows of the left one row by row, both as 32-bit pairs of consecutive
/// inner elements (a missing last one is zero), and [`dot::Dot`] keeps an [`dot::MR`] × NR block of
/// f32 sums in 24 registers, reading the left rows' pairs where they were packed.
/// Inputs below bf16's normal range count as zero and tiny sums flush to zero (the instruction's
/// rules); otherwise the sums are f32 sums of the exact products, in another order than the
/// widened path's.
mod dot {
    use super::{Half, Operand, Output, PANEL_ELEMENTS, ROW_BLOCK, bits};

    /// Rows of a micro-panel of the left operand.
    pub const MR: usize = 12;
    /// Columns of a micro-panel of the right operand (two registers of 16 f32).
    pub const NR: usize = 32;

    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            *HAS.get_or_init(|| {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bf16")
                    && std::env::var_os("MEMTUNE_NO_BF16_DOT").is_none()
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    fn pair(lo: u16, hi: u16) -> u32 {
        u32::from(lo) | (u32::from(hi) << 16)
    }

    /// One row (or column) whose inner elements are contiguous, as lane `lane` of a micro-panel
    /// `width` lanes wide: its pairs are 32-bit words (a missing last one is zero).
    fn pack_run(src: &[u16], panel: &mut [u32], width: usize, lane: usize) {
        let whole = src.chunks_exact(2);
        let last = whole.remainder().first().map(|&lo| pair(lo, 0));
        let pairs = whole.len();
        if width == 1 {
            // A row of its own: the pairs are consecutive words, the same bytes as the run's
            // (the low half of a word is its first element on a little-endian CPU).
            #[cfg(target_endian = "little")]
            {
                let dst = &mut panel[..pairs];
                // SAFETY: `dst` holds `pairs` words, `src` at least 2 × `pairs` halves; the
                // buffers are distinct and the copy is bytewise.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        src.as_ptr() as *const u8,
                        dst.as_mut_ptr() as *mut u8,
                        pairs * 4,
                    )
                };
            }
            #[cfg(not(target_endian = "little"))]
            for (d, two) in panel[..pairs].iter_mut().zip(whole) {
                *d = pair(two[0], two[1]);
            }
        } else {
            for (d, two) in panel[lane..].iter_mut().step_by(width).zip(whole) {
                *d = pair(two[0], two[1]);
            }
        }
        if let Some(v) = last {
            panel[pairs * width + lane] = v;
        }
    }

    /// Lanes `lanes` (rows of a left operand, columns of a right one) × inner elements `ks`, as
    /// micro-panels `[panel][pair][W]`: 32-bit pairs of consecutive inner elements, a missing
    /// last one zero. `base` is the batch entry's start; `lane_stride` and `inner_stride` are the
    /// operand's strides along the lanes and along the inner dimension.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn pack<const W: usize>(
        data: &[u16],
        base: usize,
        lanes: std::ops::Range<usize>,
        lane_stride: usize,
        ks: std::ops::Range<usize>,
        inner_stride: usize,
        pitch: usize,
        out: &mut Vec<u32>,
    ) {
        let kp = ks.len().div_ceil(2);
        debug_assert!(pitch >= kp);
        // Every element is written below (pairs, or zeros for the padding), so a reused buffer
        // is not cleared first.
        let len = lanes.len().div_ceil(W) * pitch * W;
        if out.len() < len {
            out.resize(len, 0);
        }
        out.truncate(len);
        if W == 1 && lane_stride == 1 && inner_stride != 1 {
            // Rows of a transposed matrix: a pair's two inner elements are two runs along the
            // rows, each element going to its own row of `out`.
            let nl = lanes.len();
            // Whole blocks of 16 pairs × 16 rows on AVX-512, the rest one by one.
            let (mut p_done, mut j_done) = (0, 0);
            #[cfg(target_arch = "x86_64")]
            if available() {
                (p_done, j_done) = (ks.len() / 32 * 16, nl / 16 * 16);
                for j0 in (0..j_done).step_by(16) {
                    for p0 in (0..p_done).step_by(16) {
                        let at = base + (ks.start + 2 * p0) * inner_stride + lanes.start + j0;
                        // The block reads elements `at + c · inner_stride + i` for c < 32 and
                        // i < 16, all inside `data`, and writes 16 rows of 16 words inside `out`.
                        let last = at + 31 * inner_stride + 15;
                        assert!(last < data.len() && (j0 + 15) * pitch + p0 + 16 <= out.len());
                        // SAFETY: `available()` held (AVX-512F); the bounds are checked above.
                        unsafe {
                            x86_pack::pairs_of_runs(
                                data.as_ptr().add(at),
                                inner_stride,
                                out.as_mut_ptr().add(j0 * pitch + p0),
                                pitch,
                            )
                        };
                    }
                }
            }
            for p in 0..kp {
                // Rows below `j_done` already have their first `p_done` pairs.
                let first = if p < p_done { j_done } else { 0 };
                let kk = ks.start + 2 * p;
                let lo_at = base + kk * inner_stride + lanes.start;
                let lo = &data[lo_at..lo_at + nl];
                if kk + 1 < ks.end {
                    let hi = &data[lo_at + inner_stride..lo_at + inner_stride + nl];
                    for (j, (&l, &h)) in lo.iter().zip(hi).enumerate().skip(first) {
                        out[j * pitch + p] = pair(l, h);
                    }
                } else {
                    for (j, &l) in lo.iter().enumerate().skip(first) {
                        out[j * pitch + p] = pair(l, 0);
                    }
                }
            }
            for row in out.chunks_exact_mut(pitch) {
                row[kp..].fill(0);
            }
            return;
        }
        for (ip, l0) in lanes.clone().step_by(W).enumerate() {
            let panel = &mut out[ip * pitch * W..(ip + 1) * pitch * W];
            let width = W.min(lanes.end - l0);
            panel[kp * W..].fill(0);
            if width < W {
                for p in 0..kp {
                    panel[p * W + width..(p + 1) * W].fill(0);
                }
            }
            if inner_stride == 1 {
                // Each lane's inner elements are contiguous (a row of activations, a transposed
                // weight's column): its pairs are 32-bit words.
                // Whole blocks of 16 lanes × 16 pairs on AVX-512, the rest one by one.
                let mut p_done = 0;
                #[cfg(target_arch = "x86_64")]
                if W > 1 && available() {
                    p_done = ks.len() / 32 * 16;
                    for j0 in (0..width / 16 * 16).step_by(16) {
                        let at = base + (l0 + j0) * lane_stride + ks.start;
                        let last = at + 15 * lane_stride + 2 * p_done;
                        assert!(p_done == 0 || last <= data.len());
                        for p0 in (0..p_done).step_by(16) {
                            // SAFETY: `available()` held (AVX-512F); lane `i` < 16 reads the
                            // 32 halves from `at + i · lane_stride + 2 · p0`, inside `data`
                            // (checked above), and the block writes 16 rows of 16 words
                            // inside `panel` (`p0 + 16 <= p_done <= kp <= pitch`).
                            unsafe {
                                x86_pack::words(
                                    data.as_ptr().add(at + 2 * p0),
                                    lane_stride,
                                    panel.as_mut_ptr().add(p0 * W + j0),
                                    W,
                                )
                            };
                        }
                    }
                }
                for j in 0..width {
                    let at = base + (l0 + j) * lane_stride;
                    let skip = if j < width / 16 * 16 { p_done } else { 0 };
                    if 2 * skip >= ks.len() {
                        continue;
                    }
                    pack_run(
                        &data[at + ks.start + 2 * skip..at + ks.end],
                        &mut panel[skip * W..],
                        W,
                        j,
                    );
                }
                continue;
            }
            for p in 0..kp {
                let kk = ks.start + 2 * p;
                let lo_at = base + kk * inner_stride + l0 * lane_stride;
                let hi_at = (kk + 1 < ks.end).then(|| lo_at + inner_stride);
                let dst = &mut panel[p * W..p * W + width];
                if lane_stride == 1 {
                    // Two contiguous runs of lanes, one per inner element of the pair.
                    let lo = &data[lo_at..lo_at + width];
                    match hi_at {
                        Some(h) => {
                            let hi = &data[h..h + width];
                            for ((d, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
                                *d = pair(l, h);
                            }
                        }
                        None => {
                            for (d, &l) in dst.iter_mut().zip(lo) {
                                *d = pair(l, 0);
                            }
                        }
                    }
                } else {
                    for (j, d) in dst.iter_mut().enumerate() {
                        let off = j * lane_stride;
                        *d = pair(data[lo_at + off], hi_at.map_or(0, |h| data[h + off]));
                    }
                }
            }
        }
    }

    /// Packing's transposes on AVX-512, 16 × 16 words at a time.
    #[cfg(target_arch = "x86_64")]
    pub mod x86_pack {
        use std::arch::x86_64::*;

        /// `m[0..16]` transposed: word `c` of row `i` becomes word `i` of row `c`. Plain loops,
        /// no closures: a closure would be a function of its own without AVX-512 enabled, and
        /// every intrinsic in it an out-of-line call.
        #[inline(always)]
        unsafe fn transpose(m: &mut [__m512i; 16]) {
            // SAFETY (all intrinsics here): register-only operations; the caller has AVX-512F.
            unsafe {
                // Within each 128-bit lane: 2 × 2 blocks of words...
                let mut t = *m;
                for x in (0..16).step_by(2) {
                    t[x] = _mm512_unpacklo_epi32(m[x], m[x + 1]);
                    t[x + 1] = _mm512_unpackhi_epi32(m[x], m[x + 1]);
                }
                // ...then of 64-bit halves: u[4g + c] holds rows 4g..4g+4 of column 4l + c in
                // 128-bit lane l...
                let mut u = t;
                for g in 0..4 {
                    for c in 0..4 {
                        let (a, b) = (t[4 * g + c / 2], t[4 * g + c / 2 + 2]);
                        u[4 * g + c] = if c % 2 == 0 {
                            _mm512_unpacklo_epi64(a, b)
                        } else {
                            _mm512_unpackhi_epi64(a, b)
                        };
                    }
                }
                // ...then across lanes: v[8h + c] (lanes 0, 2) and v[8h + 4 + c] (lanes 1, 3)
                // from row groups 2h and 2h + 1...
                let mut v = u;
                for h in 0..2 {
                    for c in 0..4 {
                        let (a, b) = (u[8 * h + c], u[8 * h + 4 + c]);
                        v[8 * h + c] = _mm512_shuffle_i32x4::<0x88>(a, b);
                        v[8 * h + 4 + c] = _mm512_shuffle_i32x4::<0xdd>(a, b);
                    }
                }
                // ...and columns c, c + 4, c + 8, c + 12 whole (quarter q: v[c + 4 (q mod 2)]
                // and v[8 + c + 4 (q mod 2)], lanes 0, 2 for q < 2, lanes 1, 3 for q ≥ 2).
                for c in 0..4 {
                    for q in 0..2 {
                        let (a, b) = (v[c + 4 * q], v[8 + c + 4 * q]);
                        m[4 * q + c] = _mm512_shuffle_i32x4::<0x88>(a, b);
                        m[4 * (q + 2) + c] = _mm512_shuffle_i32x4::<0xdd>(a, b);
                    }
                }
            }
        }

        /// 16 runs of 16 words (32 halves), run `i` at `src + i · stride` halves, transposed:
        /// word `c` of run `i` goes to `dst[c · dst_stride + i]`.
        ///
        /// # Safety
        /// AVX-512F; the runs are readable and the 16 rows of 16 words at `dst` writable.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn words(src: *const u16, stride: usize, dst: *mut u32, dst_stride: usize) {
            // SAFETY: the caller's contract.
            unsafe {
                let mut m = [_mm512_setzero_si512(); 16];
                for (i, row) in m.iter_mut().enumerate() {
                    *row = _mm512_loadu_si512(src.add(i * stride) as *const __m512i);
                }
                transpose(&mut m);
                for (c, row) in m.iter().enumerate() {
                    _mm512_storeu_si512(dst.add(c * dst_stride) as *mut __m512i, *row);
                }
            }
        }

        /// 16 pairs of runs of 16 halves (pair `c`: the runs at `src + 2c · stride` and at
        /// `src + (2c + 1) · stride`) as words `lo | hi << 16`, transposed: element `i` of pair
        /// `c` goes to `dst[i · dst_stride + c]`.
        ///
        /// # Safety
        /// AVX-512F; the runs are readable and the 16 rows of 16 words at `dst` writable.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn pairs_of_runs(
            src: *const u16,
            stride: usize,
            dst: *mut u32,
            dst_stride: usize,
        ) {
            // SAFETY: the caller's contract.
            unsafe {
                let mut m = [_mm512_setzero_si512(); 16];
                for (c, row) in m.iter_mut().enumerate() {
                    let lo = _mm256_loadu_si256(src.add(2 * c * stride) as *const __m256i);
                    let hi = _mm256_loadu_si256(src.add((2 * c + 1) * stride) as *const __m256i);
                    *row = _mm512_or_si512(
                        _mm512_cvtepu16_epi32(lo),
                        _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hi)),
                    );
                }
                transpose(&mut m);
                for (i, row) in m.iter().enumerate() {
                    _mm512_storeu_si512(dst.add(i * dst_stride) as *mut __m512i, *row);
                }
            }
        }

        #[cfg(test)]
        mod tests {
            #[test]
            fn transposes_match_the_scalar_ones() {
                if !super::super::available() {
                    return;
                }
                let src: Vec<u16> = (0..40 * 64).map(|v| (v * 7 + 3) as u16).collect();
                let stride = 40;
                let mut dst = vec![0u32; 16 * 20];
                // SAFETY: AVX-512F (checked); 16 runs of 32 halves at stride 40 lie in `src`,
                // 16 rows of 16 words at stride 20 in `dst`.
                unsafe { super::words(src.as_ptr(), stride, dst.as_mut_ptr(), 20) };
                for i in 0..16 {
                    for c in 0..16 {
                        let (lo, hi) = (src[i * stride + 2 * c], src[i * stride + 2 * c + 1]);
                        assert_eq!(dst[c * 20 + i], u32::from(lo) | u32::from(hi) << 16);
                    }
                }
                // SAFETY: as above; pair c reads halves up to (2c + 1) · 40 + 15 < 40 · 64.
                unsafe { super::pairs_of_runs(src.as_ptr(), stride, dst.as_mut_ptr(), 20) };
                for i in 0..16 {
                    for c in 0..16 {
                        let (lo, hi) = (src[2 * c * stride + i], src[(2 * c + 1) * stride + i]);
                        assert_eq!(dst[i * 20 + c], u32::from(lo) | u32::from(hi) << 16);
                    }
                }
            }
        }
    }

    /// Rows of an AMX tile (and pairs of the inner dimension it holds: 64 bytes a row).
    const AMX_ROWS: usize = 16;

    /// Inner-dimension elements an AMX product packs at once (a multiple of 32): the left
    /// operand's packed rows take at most [`ROW_BLOCK`] × 8 KiB, and a longer inner dimension (a
    /// vocabulary's, in the head's input gradient `g · W`) is summed over blocks.
    const AMX_K: usize = 4096;

    /// [`Dot`]'s [`Micro::INNER`], as AMX's: a micro-panel of [`NR`] columns then takes at most
    /// 256 KiB, in a core's second-level cache with the left rows read against it. Side by side
    /// on an AMD EPYC (Zen 4), 4,096 ran L4 8 × 256 full bf16 steps 2% and 1 × 128 LoRA ones 9%
    /// faster than 512, medians of 3 (the head's input gradient `g · W` then sums 8 blocks, not 63).
    pub const DOT_K: usize = AMX_K;

    /// Whether bf16 tiles run on AMX (Intel's tile unit: `tdpbf16ps` multiplies a 16 × 32 by a
    /// 32 × 16 bf16 tile into 16 × 16 f32 sums, the same arithmetic as `vdpbf16ps`): the CPU has
    /// AMX-TILE and AMX-BF16, [`available`] holds, `MEMTUNE_NO_AMX` is unset, and Linux grants
    /// this process the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`).
    pub fn amx() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            *HAS.get_or_init(|| {
                let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
                let (tile, bf16) = (leaf7.edx & (1 << 24) != 0, leaf7.edx & (1 << 22) != 0);
                if !(tile && bf16 && available()) || std::env::var_os("MEMTUNE_NO_AMX").is_some() {
                    return false;
                }
                const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
                const XFEATURE_XTILEDATA: libc::c_long = 18;
                // SAFETY: a plain system call with integer arguments; it fails cleanly (non-zero)
                // on kernels or machines without AMX.
                unsafe {
                    libc::syscall(
                        libc::SYS_arch_prctl,
                        ARCH_REQ_XCOMP_PERM,
                        XFEATURE_XTILEDATA,
                    ) == 0
                }
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// The whole product `a · b` on micro-kernel `K` (AMX's tiles or AVX512-BF16's `vdpbf16ps`),
    /// written straight into a new output. Each task takes one batch entry's columns `panel` wide
    /// (a multiple of [`NR`]) by a chunk of its rows, packs its right operand's columns once per
    /// block of at most [`Micro::INNER`] inner elements (the whole inner dimension, usually; even
    /// blocks otherwise), as micro-panels of [`NR`] columns, `pitch` pairs each, a multiple of 16,
    /// zero-padded, and then, per [`ROW_BLOCK`] rows (fewer where [`Micro::LHS_BYTES`] says),
    /// packs those rows of the left operand as rows of pairs (rows padded to a multiple of
    /// [`Micro::ROWS`]), and `K` multiplies them block by block (see [`Micro::blocks_into`]).
    /// With one inner block its sums are rounded into the output as they leave the kernel, so
    /// nothing is zero-filled, copied or added twice; with more, they are summed in an f32
    /// buffer and rounded after the last.
    /// Chunks are as few as keep every thread busy: each chunk packs its columns again.
    ///
    /// # Safety
    /// `K`'s instructions run on this CPU: [`amx`] holds for [`Amx`], [`available`] for [`Dot`].
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn packed_product<T: Half, K: Micro>(a: &Operand<T>, b: &Operand<T>) -> Vec<T> {
        use rayon::prelude::*;
        let (m, k, n) = (a.rows, a.cols, b.cols);
        let batches = a.starts.len();
        let len = batches * m * n;
        if len == 0 || k == 0 {
            return vec![T::ZERO; len];
        }
        let block = 2 * AMX_ROWS;
        // The inner dimension in even blocks of at most K::INNER: one block (the usual case)
        // rounds the kernel's sums straight into the output; more add them up in an f32 buffer
        // first.
        let kc = k
            .div_ceil(k.div_ceil(K::INNER))
            .next_multiple_of(block)
            .min(k);
        let k_blocks = k.div_ceil(kc);
        let pitch = kc.div_ceil(block) * AMX_ROWS;
        let mut panel = (PANEL_ELEMENTS / kc / NR * NR).clamp(NR, n.div_ceil(NR) * NR);
        let threads = rayon::current_num_threads().max(1);
        if batches * n.div_ceil(panel) < threads && a.col_stride == 1 {
            // Too few tasks for the threads: split the columns rather than the rows, where the
            // left operand's rows are contiguous: packing them is a copy, while the right
            // operand's columns would be packed again for every chunk of rows.
            panel = panel.min(n.div_ceil(threads).div_ceil(NR) * NR);
        }
        let units = batches * n.div_ceil(panel);
        let blocks = m.div_ceil(block);
        // Row chunks: enough that the tasks share out evenly among the threads (or at least
        // four a thread), and no more.
        let mut chunks = 1;
        while !(units * chunks).is_multiple_of(threads)
            && units * chunks < 4 * threads
            && chunks < blocks
        {
            chunks += 1;
        }
        let chunk_rows = blocks.div_ceil(chunks) * block;
        let tiles: Vec<(usize, usize, usize)> = (0..batches)
            .flat_map(|bi| {
                (0..m)
                    .step_by(chunk_rows)
                    .flat_map(move |r0| (0..n).step_by(panel).map(move |c0| (bi, r0, c0)))
            })
            .collect();
        let workers = threads.min(tiles.len());
        let mut out = Vec::<T>::with_capacity(len);
        let output = Output(out.as_mut_ptr());
        let (a_bits, b_bits) = (bits(a.data), bits(b.data));
        // Each worker's buffers are made before any task runs (see `tiled`).
        // Rows of the left operand packed at once: ROW_BLOCK, or fewer where a long inner block
        // would take them past what `K` keeps in cache.
        let lhs_pitch = if K::SPREAD_ROWS && (pitch / 16).is_multiple_of(2) {
            pitch + 16
        } else {
            pitch
        };
        let row_block = (K::LHS_BYTES / (lhs_pitch * 4)).clamp(K::ROWS, ROW_BLOCK);
        let rows_max = row_block.min(chunk_rows).next_multiple_of(K::ROWS);
        let panel_max = panel.min(n.div_ceil(NR) * NR);
        let sums_len = if k_blocks > 1 {
            chunk_rows * panel_max
        } else {
            0
        };
        let mut scratch: Vec<(Vec<u32>, Vec<u32>, Vec<f32>)> = (0..workers)
            .map(|_| {
                (
                    Vec::with_capacity(rows_max * lhs_pitch),
                    Vec::with_capacity(panel_max * pitch),
                    vec![0f32; sums_len],
                )
            })
            .collect();
        scratch
            .par_iter_mut()
            .enumerate()
            .for_each(|(w, (lhs, rhs, acc))| {
                crate::engine::kernels::vectorized(
                    #[inline(always)]
                    || {
                        // SAFETY: `K`'s instructions run here (this function's contract).
                        unsafe { K::begin() };
                        let mut sums = [0f32; SUMS];
                        for &(bi, r0, c0) in tiles.iter().skip(w).step_by(workers) {
                            let cs = c0..(c0 + panel).min(n);
                            let nc = cs.len();
                            let rs_end = (r0 + chunk_rows).min(m);
                            for (kb, k0) in (0..k).step_by(kc).enumerate() {
                                let ks = k0..(k0 + kc).min(k);
                                let last = kb + 1 == k_blocks;
                                pack::<NR>(
                                    b_bits,
                                    b.starts[bi],
                                    cs.clone(),
                                    b.col_stride,
                                    ks.clone(),
                                    b.row_stride,
                                    pitch,
                                    rhs,
                                );
                                for rb in (r0..rs_end).step_by(row_block) {
                                    let rs = rb..(rb + row_block).min(rs_end);
                                    let mr = rs.len();
                                    pack::<1>(
                                        a_bits,
                                        a.starts[bi],
                                        rs,
                                        a.row_stride,
                                        ks.clone(),
                                        a.col_stride,
                                        lhs_pitch,
                                        lhs,
                                    );
                                    lhs.resize(mr.div_ceil(K::ROWS) * K::ROWS * lhs_pitch, 0);
                                    let at = (bi * m + rb) * n + c0;
                                    let acc_at = (rb - r0) * nc;
                                    // SAFETY: `K`'s instructions run here and `K::begin` ran; the
                                    // buffers are packed as `blocks_into` reads them; rows `rs` ×
                                    // columns `cs` of entry `bi` are this task's alone, and `acc`
                                    // holds this tile's rows × columns (chunk_rows × panel).
                                    unsafe {
                                        K::blocks_into(
                                            lhs,
                                            rhs,
                                            pitch,
                                            lhs_pitch,
                                            mr,
                                            nc,
                                            &mut sums,
                                            |i, j, v| {
                                                let dst = || {
                                                    std::slice::from_raw_parts_mut(
                                                        output.at(at + i * n + j),
                                                        v.len(),
                                                    )
                                                };
                                                if k_blocks == 1 {
                                                    return T::narrow_run(v, dst());
                                                }
                                                let from = acc_at + i * nc + j;
                                                let partial = &mut acc[from..from + v.len()];
                                                if kb == 0 {
                                                    partial.copy_from_slice(v);
                                                    return;
                                                }
                                                for (p, x) in partial.iter_mut().zip(v) {
                                                    *p += x;
                                                }
                                                if last {
                                                    T::narrow_run(partial, dst());
                                                }
                                            },
                                        )
                                    };
                                }
                            }
                        }
                        // SAFETY: ends what `K::begin` began on this thread.
                        unsafe { K::end() };
                    },
                )
            });
        // SAFETY: the tasks wrote every element: their tiles cover every batch entry's rows and
        // columns, and `blocks_into` hands every row × column of its block to the writer.
        unsafe { out.set_len(len) };
        out
    }

    /// The f32 sums one call of [`Micro::blocks_into`] hands out at a time: 32 rows × [`NR`].
    #[cfg(target_arch = "x86_64")]
    const SUMS: usize = 2 * AMX_ROWS * NR;

    /// How [`packed_product`] multiplies its packed operands.
    #[cfg(target_arch = "x86_64")]
    pub trait Micro {
        /// The packed left operand's rows are padded to a multiple of this (the rows one block
        /// reads at once).
        const ROWS: usize;

        /// Inner-dimension elements packed at once at most (a multiple of 32): a longer inner
        /// dimension is cut into even blocks, summed in f32.
        const INNER: usize;

        /// Bytes of packed left rows one [`Micro::blocks_into`] call takes at most (they are read
        /// again for every micro-panel of the right operand), or `usize::MAX` for [`ROW_BLOCK`]
        /// rows whatever their length.
        const LHS_BYTES: usize;

        /// Whether the packed left rows are spread over the first-level cache's sets: their
        /// stride is then an odd number of 64-byte lines (one line more than `pitch` pairs where
        /// those are an even number), so the [`MR`] rows a block reads side by side fall in
        /// distinct sets instead of one (a `pitch` of 1,024 or 2,048 pairs, 4 or 8 KiB, maps
        /// every row to the same set).
        const SPREAD_ROWS: bool;

        /// Sets this thread up for [`Micro::blocks_into`].
        ///
        /// # Safety
        /// This kernel's instructions run on this CPU.
        unsafe fn begin() {}

        /// Ends what [`Micro::begin`] set up.
        ///
        /// # Safety
        /// [`Micro::begin`] ran on this thread.
        unsafe fn end() {}

        /// The `mr × nc` product of `lhs` (rows of `pitch` pairs, `lhs_pitch` words apart, padded
        /// to a multiple of [`Micro::ROWS`] rows) and `rhs` (micro-panels of [`NR`] columns ×
        /// `pitch` pairs), block by block: `put(i, j, sums)` receives row `i`'s sums for columns
        /// `j..j + sums.len()`.
        ///
        /// # Safety
        /// [`Micro::begin`] ran on this thread; the buffers hold what the contract above says.
        #[allow(clippy::too_many_arguments)]
        unsafe fn blocks_into(
            lhs: &[u32],
            rhs: &[u32],
            pitch: usize,
            lhs_pitch: usize,
            mr: usize,
            nc: usize,
            sums: &mut [f32; SUMS],
            put: impl FnMut(usize, usize, &[f32]),
        );
    }

    /// AMX: each 32 × 32 block of the output is four accumulator tiles (tmm0–3) fed by two left
    /// tiles (tmm4–5) and two right ones (tmm6–7), 16 pairs at a time over the inner block.
    #[cfg(target_arch = "x86_64")]
    pub struct Amx;

    #[cfg(target_arch = "x86_64")]
    impl Micro for Amx {
        const ROWS: usize = 2 * AMX_ROWS;
        const INNER: usize = AMX_K;
        const LHS_BYTES: usize = usize::MAX;
        const SPREAD_ROWS: bool = false;

        unsafe fn begin() {
            use std::arch::asm;
            // Palette 1; eight tiles of 16 rows × 64 bytes.
            let mut config = [0u8; 64];
            config[0] = 1;
            for t in 0..8 {
                config[16 + 2 * t] = 64;
                config[48 + t] = AMX_ROWS as u8;
            }
            // SAFETY: `amx()` held (the contract); the configuration is a valid palette-1 layout.
            unsafe { asm!("ldtilecfg [{}]", in(reg) config.as_ptr(), options(nostack)) };
        }

        unsafe fn end() {
            // SAFETY: releases this thread's tile state (the configuration `begin` loaded).
            unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
        }

        #[inline(always)]
        unsafe fn blocks_into(
            lhs: &[u32],
            rhs: &[u32],
            pitch: usize,
            lhs_pitch: usize,
            mr: usize,
            nc: usize,
            sums: &mut [f32; SUMS],
            mut put: impl FnMut(usize, usize, &[f32]),
        ) {
            use std::arch::asm;
            debug_assert!(lhs_pitch >= pitch);
            debug_assert!(lhs.len() >= mr.div_ceil(2 * AMX_ROWS) * 2 * AMX_ROWS * lhs_pitch);
            debug_assert!(rhs.len() >= nc.div_ceil(NR) * NR * pitch);
            let (a_stride, b_stride) = (lhs_pitch * 4, NR * 4);
            for (jp, j0) in (0..nc).step_by(NR).enumerate() {
                let width = NR.min(nc - j0);
                let b_panel = rhs[jp * pitch * NR..].as_ptr();
                for i0 in (0..mr).step_by(2 * AMX_ROWS) {
                    let height = (2 * AMX_ROWS).min(mr - i0);
                    let a_rows = lhs[i0 * lhs_pitch..].as_ptr();
                    // SAFETY: every load reads 16 rows of 64 bytes at the given stride inside `lhs`
                    // or `rhs` (see the contract above); the stores write `sums` (32 rows × NR f32).
                    unsafe {
                        asm!(
                            "tilezero tmm0",
                            "tilezero tmm1",
                            "tilezero tmm2",
                            "tilezero tmm3",
                            options(nostack, nomem)
                        );
                        for q in 0..pitch / AMX_ROWS {
                            let a0 = a_rows.add(q * AMX_ROWS);
                            let a1 = a0.add(AMX_ROWS * lhs_pitch);
                            let b0 = b_panel.add(q * AMX_ROWS * NR);
                            let b1 = b0.add(AMX_ROWS);
                            asm!(
                                "tileloadd tmm4, [{a0} + {sa}*1]",
                                "tileloadd tmm5, [{a1} + {sa}*1]",
                                "tileloadd tmm6, [{b0} + {sb}*1]",
                                "tileloadd tmm7, [{b1} + {sb}*1]",
                                "tdpbf16ps tmm0, tmm4, tmm6",
                                "tdpbf16ps tmm1, tmm4, tmm7",
                                "tdpbf16ps tmm2, tmm5, tmm6",
                                "tdpbf16ps tmm3, tmm5, tmm7",
                                a0 = in(reg) a0,
                                a1 = in(reg) a1,
                                b0 = in(reg) b0,
                                b1 = in(reg) b1,
                                sa = in(reg) a_stride,
                                sb = in(reg) b_stride,
                                options(nostack, readonly)
                            );
                        }
                        let c = sums.as_mut_ptr();
                        asm!(
                            "tilestored [{c0} + {s}*1], tmm0",
                            "tilestored [{c1} + {s}*1], tmm1",
                            "tilestored [{c2} + {s}*1], tmm2",
                            "tilestored [{c3} + {s}*1], tmm3",
                            c0 = in(reg) c,
                            c1 = in(reg) c.add(AMX_ROWS),
                            c2 = in(reg) c.add(AMX_ROWS * NR),
                            c3 = in(reg) c.add(AMX_ROWS * NR + AMX_ROWS),
                            s = in(reg) NR * 4,
                            options(nostack)
                        );
                    }
                    for i in 0..height {
                        put(i0 + i, j0, &sums[i * NR..i * NR + width]);
                    }
                }
            }
        }
    }

    /// AVX512-BF16: [`MR`] rows × [`NR`] columns of sums in 24 registers, each step broadcasting
    /// one pair of each row against two registers of a micro-panel's pairs (`vdpbf16ps`).
    #[cfg(target_arch = "x86_64")]
    pub struct Dot;

    #[cfg(target_arch = "x86_64")]
    impl Micro for Dot {
        const ROWS: usize = MR;
        const INNER: usize = DOT_K;
        const LHS_BYTES: usize = 256 << 10;
        const SPREAD_ROWS: bool = true;

        /// The CPU has AVX512F and AVX512-BF16 ([`available`]: the contract of
        /// [`packed_product`] for `Dot`).
        #[target_feature(enable = "avx512f,avx512bf16")]
        unsafe fn blocks_into(
            lhs: &[u32],
            rhs: &[u32],
            pitch: usize,
            lhs_pitch: usize,
            mr: usize,
            nc: usize,
            sums: &mut [f32; SUMS],
            mut put: impl FnMut(usize, usize, &[f32]),
        ) {
            use std::arch::x86_64::*;
            assert!(lhs_pitch >= pitch);
            assert!(lhs.len() >= mr.div_ceil(MR) * MR * lhs_pitch);
            assert!(rhs.len() >= nc.div_ceil(NR) * NR * pitch);
            for (jp, j0) in (0..nc).step_by(NR).enumerate() {
                let width = NR.min(nc - j0);
                let b = rhs[jp * pitch * NR..].as_ptr();
                for i0 in (0..mr).step_by(MR) {
                    let height = MR.min(mr - i0);
                    let a = lhs[i0 * lhs_pitch..].as_ptr();
                    // SAFETY: row `i` < MR of this block reads `pitch` words from
                    // `a + i · lhs_pitch`,
                    // the micro-panel `pitch` × NR words from `b`, all inside the buffers (asserted
                    // above); the transmutes reinterpret 512 bits as 32 bf16.
                    unsafe {
                        let mut lo = [_mm512_setzero_ps(); MR];
                        let mut hi = [_mm512_setzero_ps(); MR];
                        for p in 0..pitch {
                            let bp = b.add(p * NR);
                            let b0: __m512bh =
                                std::mem::transmute(_mm512_loadu_si512(bp as *const _));
                            let b1: __m512bh =
                                std::mem::transmute(_mm512_loadu_si512(bp.add(16) as *const _));
                            for i in 0..MR {
                                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(
                                    *a.add(i * lhs_pitch + p) as i32,
                                ));
                                lo[i] = _mm512_dpbf16_ps(lo[i], av, b0);
                                hi[i] = _mm512_dpbf16_ps(hi[i], av, b1);
                            }
                        }
                        for i in 0..MR {
                            _mm512_storeu_ps(sums.as_mut_ptr().add(i * NR), lo[i]);
                            _mm512_storeu_ps(sums.as_mut_ptr().add(i * NR + 16), hi[i]);
                        }
                    }
                    for i in 0..height {
                        put(i0 + i, j0, &sums[i * NR..i * NR + width]);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn an_unread_product_is_zeros_with_the_products_gradients() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16] {
            let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5, 7), &dev).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 7), &dev).unwrap()).unwrap();
            let g = Tensor::randn(0f32, 1.0, (3, 5, 6), &dev).unwrap();
            let (ac, wt) = (
                a.as_tensor().to_dtype(dtype).unwrap(),
                w.as_tensor().to_dtype(dtype).unwrap().t().unwrap(),
            );
            let wt = wt.broadcast_as((3, 7, 6)).unwrap();
            let read = matmul(&ac, &wt).unwrap();
            let unread = unread_matmul(&ac, &wt).unwrap();
            assert_eq!(unread.dims(), read.dims());
            assert_eq!(max_abs(&unread), 0.0, "{dtype:?}: the value is zeros");
            let seeded = |y: &Tensor| {
                let grads = (y.to_dtype(DType::F32).unwrap() * &g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                [a.as_tensor(), w.as_tensor()].map(|v| grads.get(v).unwrap().clone())
            };
            for (x, y) in seeded(&read).iter().zip(seeded(&unread)) {
                assert_eq!(
                    max_abs(&(x - y).unwrap()),
                    0.0,
                    "{dtype:?}: the same gradients"
                );
            }
        }
    }

    fn up(t: &Tensor) -> Tensor {
        t.to_dtype(DType::F32).unwrap()
    }

    /// The largest absolute value of `t`, in f32.
    fn max_abs(t: &Tensor) -> f32 {
        up(t)
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn check(a: &Tensor, b: &Tensor) {
        let want = a
            .to_dtype(DType::F32)
            .unwrap()
            .matmul(&b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .to_dtype(a.dtype())
            .unwrap();
        let got = matmul(a, b).unwrap();
        assert_eq!(got.dims(), want.dims());
        let diff = max_abs(&(up(&got) - up(&want)).unwrap());
        let scale = max_abs(&want);
        // Same widened products, summed in f32 and rounded once; only the summation order may
        // differ from candle's (one 16-bit rounding step at most; f32 sums in another order).
        let tolerance = if a.dtype() == DType::F32 { 1e-5 } else { 1e-2 };
        assert!(diff <= scale * tolerance, "max diff {diff} against {scale}");
    }

    /// xorshift64 from `seed` (made odd): the tests' reproducible bit patterns.
    fn xorshift(seed: u64) -> impl Iterator<Item = u64> {
        let mut s = seed | 1;
        std::iter::repeat_with(move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        })
    }

    fn randn(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = xorshift(seed)
            .take(n)
            .map(|s| (s % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    #[test]
    fn f16_runs_match_half() {
        let mut values: Vec<f32> = xorshift(0x0bad_cafe_1234_5679)
            .take(10_003)
            .map(|s| f32::from_bits(s as u32) % 70_000.0)
            .collect();
        values.extend([0.0, -0.0, 65_504.0, 65_520.0, 1e-8, 6.1e-5, f32::INFINITY]);
        let mut halves = vec![f16::ZERO; values.len()];
        <f16 as Half>::narrow_run(&values, &mut halves);
        let mut back = vec![0f32; values.len()];
        <f16 as Half>::widen_run(&halves, &mut back);
        for ((v, h), b) in values.iter().zip(&halves).zip(&back) {
            if v.is_nan() {
                continue;
            }
            assert_eq!(h.to_bits(), f16::from_f32(*v).to_bits(), "{v:e}");
            assert_eq!(b.to_bits(), h.to_f32().to_bits());
        }
    }

    #[test]
    fn conversions_match_half() {
        let mut values: Vec<f32> = xorshift(0x1234_5678_9abc_def1)
            .take(100_000)
            .map(|s| f32::from_bits(s as u32))
            .collect();
        values.extend([
            0.0,
            -0.0,
            1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN,
        ]);
        values.extend([
            f32::MIN_POSITIVE,
            1e-40,
            f32::NAN,
            1.0 + f32::EPSILON * 128.0,
        ]);
        for v in values {
            let want = bf16::from_f32(v);
            let got = narrow(v);
            if v.is_nan() {
                assert!(got.is_nan());
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{v:e}");
            }
            assert_eq!(widen(want).to_bits(), want.to_f32().to_bits());
        }
    }

    #[test]
    fn matches_the_widened_product_in_every_layout() {
        // Plain, a transposed weight (x · wᵀ), wide outputs split into panels, tall inputs split
        // into row blocks, a narrow view of a larger tensor, and batched (attention) products;
        // f32 runs gemm directly.
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let randn = |shape: &[usize], seed| randn(shape, seed, dtype);
            let x = randn(&[37, 64], 1);
            let w = randn(&[300, 64], 2);
            check(&x, &w.t().unwrap());
            check(
                &x.t().unwrap().contiguous().unwrap().t().unwrap(),
                &w.t().unwrap(),
            );
            let wide = randn(&[20_000, 64], 3);
            check(&x, &wide.t().unwrap());
            let tall = randn(&[600, 48], 4);
            check(&tall, &randn(&[48, 70], 5));
            check(&tall.t().unwrap(), &randn(&[600, 9], 6));
            let narrow = tall.narrow(0, 100, 50).unwrap();
            check(&narrow, &randn(&[48, 33], 7));
            let q = randn(&[2, 3, 17, 8], 8);
            let k = randn(&[2, 3, 17, 8], 9);
            check(&q, &k.t().unwrap());
            // Odd inner dimensions, over more than one of the native path's blocks, with the
            // left operand and the right one in either memory order.
            let long = randn(&[5, 2 * dot::DOT_K + 3], 10);
            let right = randn(&[2 * dot::DOT_K + 3, 41], 11);
            check(&long, &right);
            check(
                &long,
                &right.t().unwrap().contiguous().unwrap().t().unwrap(),
            );
            check(
                &long.t().unwrap().contiguous().unwrap().t().unwrap(),
                &right,
            );
            check(&randn(&[3, 1], 12), &randn(&[1, 5], 13));
            // An inner dimension over AMX's block (summed over three blocks), odd, with the
            // right operand transposed as a weight's.
            let longer = randn(&[37, 2 * 4096 + 35], 16);
            check(&longer, &randn(&[41, 2 * 4096 + 35], 17).t().unwrap());
            // A weight gradient's shape, `gᵀ · x` over 2,048 tokens: the packed left rows (1,024
            // pairs) are spread one line apart on `vdpbf16ps`, and more than one block of rows.
            let g = randn(&[2048, 25], 18);
            check(&g.t().unwrap(), &randn(&[2048, 40], 19));
            // An empty inner dimension: a zero product (every output element written).
            let empty = matmul(&randn(&[3, 0], 14), &randn(&[0, 5], 15)).unwrap();
            assert_eq!(max_abs(&up(&empty)), 0.0);
            assert_eq!(empty.dims(), &[3, 5]);
        }
    }

    #[test]
    fn causal_products_match_the_whole_product_where_it_is_used() {
        // Sequences across one, several and a partial block, batch entries and heads, operands
        // as strided views ([b, s, h, d] with the heads transposed) and as transposes; against
        // candle's whole product on the lower triangle (Output) or with the zeros it skips
        // (Lower, Upper), and zeros above the blocks of Output.
        let f32s = |shape: &[usize], seed| randn(shape, seed, DType::F32);
        for (s, d, seed) in [(5, 8, 1), (CAUSAL_BLOCK, 16, 2), (150, 16, 3), (256, 32, 4)] {
            let heads = |seed| f32s(&[2, s, 3, d], seed).transpose(1, 2).unwrap();
            let (q, k) = (heads(seed), heads(seed + 10));
            let lower = f32s(&[2, 3, s, s], seed + 20)
                .broadcast_mul(&Tensor::tril2(s, DType::F32, &Device::Cpu).unwrap())
                .unwrap();
            let close = |got: &Tensor, want: &Tensor| {
                assert_eq!(got.dims(), want.dims());
                let diff = max_abs(&(got - want).unwrap());
                assert!(diff <= 1e-5 * max_abs(want), "s {s}: {diff}");
            };
            // candle's product of contiguous copies.
            let full = |a: &Tensor, b: &Tensor| {
                (a.contiguous().unwrap())
                    .matmul(&b.contiguous().unwrap())
                    .unwrap()
            };
            let tril = Tensor::tril2(s, DType::F32, &Device::Cpu).unwrap();
            let scores = causal_product(&q, &k.t().unwrap(), Causal::Output).unwrap();
            let want = full(&q, &k.t().unwrap());
            close(
                &scores.broadcast_mul(&tril).unwrap(),
                &want.broadcast_mul(&tril).unwrap(),
            );
            // Above the diagonal blocks: zeros; on them: the product.
            let blocks = Tensor::from_vec(
                (0..s * s)
                    .map(|i| u8::from((i % s) / CAUSAL_BLOCK <= (i / s) / CAUSAL_BLOCK))
                    .collect::<Vec<_>>(),
                (s, s),
                &Device::Cpu,
            )
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
            close(&scores, &want.broadcast_mul(&blocks).unwrap());
            let v = heads(seed + 30);
            close(
                &causal_product(&lower, &v, Causal::Lower).unwrap(),
                &full(&lower, &v),
            );
            let upper = lower.t().unwrap();
            close(
                &causal_product(&upper, &q, Causal::Upper).unwrap(),
                &full(&upper, &q),
            );
        }
        // Other dtypes take the whole product.
        let bf = f32s(&[2, 40, 40], 9).to_dtype(DType::BF16).unwrap();
        check(&bf, &bf);
        let got = causal_product(&bf, &bf, Causal::Lower).unwrap();
        assert_eq!(
            got.to_dtype(DType::F32).unwrap().to_vec3::<f32>().unwrap(),
            matmul(&bf, &bf)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec3::<f32>()
                .unwrap()
        );
    }

    #[test]
    fn accumulate_product_adds_the_product_in_place() {
        // dst += gᵀ · h with g read through a transposed view (the chunked loss's head gradient),
        // against candle's product and sum; bf16 operands and a non-contiguous destination are
        // left to the caller.
        let f32s = |shape: &[usize], seed| randn(shape, seed, DType::F32);
        let (g, h, dst) = (f32s(&[37, 29], 1), f32s(&[37, 19], 2), f32s(&[29, 19], 3));
        let want = (&dst + g.t().unwrap().matmul(&h).unwrap()).unwrap();
        assert!(accumulate_product(&dst, &g.t().unwrap(), &h).unwrap());
        let diff = max_abs(&(&dst - &want).unwrap());
        assert!(diff < 1e-5 * max_abs(&want), "{diff}");
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        assert!(!accumulate_product(&bf(&dst), &bf(&g.t().unwrap()), &bf(&h)).unwrap());
        let before = dst.to_vec2::<f32>().unwrap();
        assert!(!accumulate_product(&dst.t().unwrap(), &h.t().unwrap(), &g).unwrap());
        assert_eq!(dst.to_vec2::<f32>().unwrap(), before);
        assert!(accumulate_product(&dst, &g, &h).is_err());
    }

    #[test]
    fn products_with_more_rows_than_a_gemm_call_match_candles() {
        // More output rows than GEMM_ROWS, in the row blocks gemm_entry splits them into: the
        // left operand read row-major, transposed (the chunked loss's head gradient) and as
        // batch entries; and accumulated in place.
        let rows = 2 * GEMM_ROWS + 37;
        let f32s = |shape: &[usize], seed| randn(shape, seed, DType::F32);
        let (g, h) = (f32s(&[24, rows], 4), f32s(&[24, 16], 5));
        check(&g.t().unwrap(), &h);
        check(&g.t().unwrap().contiguous().unwrap(), &h);
        let (x, y) = (f32s(&[2, rows, 8], 6), f32s(&[2, 8, 5], 7));
        check(&x, &y);
        let dst = f32s(&[rows, 16], 8);
        let want = (&dst + g.t().unwrap().matmul(&h).unwrap()).unwrap();
        assert!(accumulate_product(&dst, &g.t().unwrap(), &h).unwrap());
        let diff = max_abs(&(&dst - &want).unwrap());
        assert!(diff < 1e-5 * max_abs(&want), "{diff}");
    }

    #[test]
    fn transposed_right_operands_in_column_blocks_match_candles() {
        // A transposed right operand (x · Wᵀ) is multiplied in column blocks copied by 16 × 16
        // transposes: inner dimensions and widths that are and are not multiples of 16, one
        // block and several, a narrowed weight (columns further apart than its rows are long),
        // batch entries (each on one thread), rows split into blocks, accumulated in place, and
        // past COLUMN_BLOCK_ROWS (gemm's own path).
        let f32s = |shape: &[usize], seed| randn(shape, seed, DType::F32);
        for (m, k, n) in [
            (5, 37, 3543),
            (33, 64, 48),
            (7, 16, 20),
            (130, 512, 300),
            (3, 5, 40),
        ] {
            let (x, w) = (f32s(&[m, k], 11), f32s(&[n, k], 12));
            check(&x, &w.t().unwrap());
            let wide = f32s(&[n, k + 5], 13);
            check(&x, &wide.narrow(1, 2, k).unwrap().t().unwrap());
        }
        let (q, kt) = (f32s(&[6, 40, 32], 14), f32s(&[6, 72, 32], 15));
        check(&q, &kt.transpose(1, 2).unwrap());
        for rows in [COLUMN_BLOCK_ROWS, COLUMN_BLOCK_ROWS + 9] {
            let (x, w) = (f32s(&[rows, 24], 16), f32s(&[40, 24], 17));
            check(&x, &w.t().unwrap());
            let dst = f32s(&[rows, 40], 18);
            let want = (&dst + x.matmul(&w.t().unwrap()).unwrap()).unwrap();
            assert!(accumulate_product(&dst, &x, &w.t().unwrap()).unwrap());
            let diff = max_abs(&(&dst - &want).unwrap());
            assert!(diff < 1e-5 * max_abs(&want), "{diff}");
        }
        // No rows: nothing to add, and no block to split.
        let (x, w) = (f32s(&[0, 24], 19), f32s(&[40, 24], 20));
        let dst = f32s(&[0, 40], 21);
        accumulate_product(&dst, &x, &w.t().unwrap()).unwrap();
        assert_eq!(matmul(&x, &w.t().unwrap()).unwrap().dims(), &[0, 40]);
    }

    #[test]
    fn bf16_runs_natively_where_the_cpu_can() {
        #[cfg(target_arch = "x86_64")]
        if std::env::var_os("MEMTUNE_NO_BF16_DOT").is_none() {
            let has = std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16");
            assert_eq!(bf16::native_dot(), has);
        }
        assert!(!f16::native_dot());
        // AMX only with the native path, and the calibration cache's key says which ran.
        assert!(!dot::amx() || bf16::native_dot());
        let key = if dot::amx() { "+bf16amx" } else { "+bf16dot" };
        let bf16_key = if bf16::native_dot() { key } else { "" };
        assert!(cpu_kernels().starts_with(bf16_key));
        // gemm's f32 kernels: `+noavx512` exactly where GEMM_AVX512=0 turns off kernels it has.
        assert_eq!(cpu_kernels().ends_with("+noavx512"), gemm_avx512_off());
    }

    #[test]
    fn gradients_match_candles_product() {
        // y = (x · wᵀ) · c with x and w trained and c frozen: both paths give the same gradients
        // to 16-bit precision, and the frozen operand gets none.
        for dtype in [DType::BF16, DType::F16] {
            let randn = |shape: &[usize], seed| randn(shape, seed, dtype);
            let x = candle_core::Var::from_tensor(&randn(&[12, 40], 10)).unwrap();
            let w = candle_core::Var::from_tensor(&randn(&[24, 40], 11)).unwrap();
            let c = randn(&[24, 7], 12);
            let grads = |product: &dyn Fn(&Tensor, &Tensor) -> Tensor, frozen_gets_none: bool| {
                let y = product(&product(x.as_tensor(), &w.t().unwrap()), &c);
                let loss = y
                    .to_dtype(DType::F32)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let g = loss.backward().unwrap();
                // candle's own product computes the frozen operand's gradient too.
                assert_eq!(g.get(&c).is_none(), frozen_gets_none);
                [
                    g.get(x.as_tensor()).unwrap().clone(),
                    g.get(w.as_tensor()).unwrap().clone(),
                ]
            };
            let ours = grads(&|a, b| matmul(a, b).unwrap(), true);
            let theirs = grads(&|a, b| a.matmul(b).unwrap(), false);
            for (o, t) in ours.iter().zip(&theirs) {
                let diff = max_abs(&(up(o) - up(t)).unwrap());
                let scale = max_abs(t);
                assert!(diff <= scale * 2e-2, "max diff {diff} against {scale}");
            }
        }
    }
}
