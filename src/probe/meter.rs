//! Memory meters: where a probe's bytes come from. One trait, three implementations: the CPU meter
//! (a counting global allocator, exact), the CUDA meter (driver and NVML readings, sampled) and a
//! fake for testing the layers above without either.
//!
//! The counting allocator is declared here with `#[global_allocator]`, so it is active in every
//! binary that links this crate: the CLI, the tests and the examples.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A source of memory readings for one device.
///
/// `current_bytes` and `peak_bytes` are process-wide and absolute: callers subtract a baseline
/// read before the work they measure.
pub trait MemoryMeter: Send + Sync {
    /// Bytes in use now.
    fn current_bytes(&self) -> u64;
    /// The highest `current_bytes` since the last `reset_peak` (or since the meter began). Exact
    /// meters see every allocation; sampling meters only see what was in use when they were read.
    fn peak_bytes(&self) -> u64;
    /// Starts a new peak window at the current value.
    fn reset_peak(&self);
    /// e.g. `cpu` or `cuda:0 (NVIDIA H100 80GB HBM3)`.
    fn device_name(&self) -> String;
    /// Device memory in use that is not tensors: CUDA context, library workspaces, allocator slack.
    fn runtime_bytes(&self) -> u64 {
        0
    }
    /// Whether every allocation is seen (the peak is the true peak), or the figures are samples.
    fn is_exact(&self) -> bool;
    /// Whether each reading waits for the device's queued work first (a GPU's), so that reading at
    /// every mark of a step also slows the step down.
    fn waits_for_device(&self) -> bool {
        false
    }
}

// ---------------------------------------------------------------------------------------------
// The counting allocator
// ---------------------------------------------------------------------------------------------

/// Bytes requested by live tracked allocations (`Layout::size`, not what the system allocator
/// rounds up to).
static CURRENT_BYTES: AtomicU64 = AtomicU64::new(0);
/// The highest value `CURRENT_BYTES` has reached since the last reset.
static PEAK_BYTES: AtomicU64 = AtomicU64::new(0);

/// The last byte of every block records whether the block is counted.
///
/// Why a tag in the block: a buffer allocated inside [`untracked`] may be freed anywhere (another
/// thread, after `untracked` returned), and the free must then not be subtracted, or the counter
/// would underflow. The allocator hooks cannot keep a table of untracked addresses without
/// allocating, so each block carries its own answer. The tag sits after the caller's bytes, not
/// before them, so the pointer handed out is the system allocator's own pointer with its own
/// alignment, and large-alignment blocks waste nothing. It costs one byte per allocation (often
/// nothing, inside the system allocator's rounding).
const TAG_TRACKED: u8 = 0x54;
const TAG_UNTRACKED: u8 = 0x55;

thread_local! {
    /// Depth of nested [`untracked`] calls on this thread. A `const` initialiser and a type without
    /// `Drop` make this a plain thread-local slot: reading it never allocates, which the allocator
    /// hooks rely on.
    static UNTRACKED_DEPTH: Cell<u32> = const { Cell::new(0) };
}

fn this_thread_is_untracked() -> bool {
    UNTRACKED_DEPTH
        .try_with(|depth| depth.get() > 0)
        .unwrap_or(false)
}

/// The layout actually requested from the system: the caller's plus one tag byte.
fn tagged_layout(layout: Layout) -> Option<Layout> {
    let size = layout.size().checked_add(1)?;
    Layout::from_size_align(size, layout.align()).ok()
}

fn count_allocation(bytes: u64) {
    let now = CURRENT_BYTES.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK_BYTES.fetch_max(now, Ordering::Relaxed);
}

fn count_free(bytes: u64) {
    CURRENT_BYTES.fetch_sub(bytes, Ordering::Relaxed);
}

/// A `GlobalAlloc` around [`System`] that counts live bytes and their peak. The hooks touch only
/// atomics and one thread-local `Cell`; they never allocate or panic. The first allocation also
/// sets glibc's allocator to keep freed memory (see `keep_freed_memory`).
pub struct CountingAllocator;

static ALLOCATOR_CONFIGURED: AtomicBool = AtomicBool::new(false);

/// Tells glibc's malloc to keep freed memory in the process for reuse instead of returning it to
/// the OS at every free: no `mmap` for large blocks, and no trimming of the heap's top below
/// 2 GiB. A training step allocates and frees the same large tensors every step; by default glibc
/// maps each block over its threshold afresh and unmaps it on free, so every step pays page faults
/// and zeroing for all of them (about a fifth of a step's time was in the kernel). Measured
/// (`reports/BENCHMARKS.md`, issue 7): +25–30% tokens/s on the benchmark models, with the same
/// counted bytes and the same OS high-water mark. Counted bytes are what the allocator is asked
/// for, so nothing the meter reports depends on this. One arena for every thread: the binary runs
/// its work on rayon's workers (`engine::on_rayon_worker`), and with an arena per thread the
/// blocks freed by one thread were not reused by the other (the same counted peak, up to 40% more
/// resident memory: L2 8 × 256 full bf16 90 MiB counted, 103 → 148 MiB above the baseline). Runs
/// once, on the first allocation.
fn keep_freed_memory() {
    if ALLOCATOR_CONFIGURED.load(Ordering::Relaxed)
        || ALLOCATOR_CONFIGURED.swap(true, Ordering::Relaxed)
    {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it does not call back into Rust's allocator.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

// SAFETY: every block comes from `System` with the caller's alignment and a size one byte larger;
// the caller's bytes are `[ptr, ptr + size)` and the tag byte `ptr + size` is never handed out.
// Frees and reallocs rebuild the same tagged layout from the caller's layout.
//
// The hooks are never inlined. To the compiler, a block from `__rust_alloc` is an object of the
// caller's size, so a tag read at `ptr + size` inlined into a function that also sees the
// allocation is a read past its end: undefined behaviour it may exploit. A release build did: a
// test comparing a two-element Vec with its expected value, printed equal, was folded to "not
// equal". Out of line, the hooks see only a pointer, as any allocator's bookkeeping does.
unsafe impl GlobalAlloc for CountingAllocator {
    #[inline(never)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        keep_freed_memory();
        let Some(tagged) = tagged_layout(layout) else {
            return std::ptr::null_mut();
        };
        // SAFETY: `tagged` has a non-zero size.
        let ptr = unsafe { System.alloc(tagged) };
        if !ptr.is_null() {
            // SAFETY: the tag byte is inside the block just allocated.
            unsafe { tag_new_block(ptr, layout.size()) };
        }
        ptr
    }

    #[inline(never)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        keep_freed_memory();
        let Some(tagged) = tagged_layout(layout) else {
            return std::ptr::null_mut();
        };
        // SAFETY: `tagged` has a non-zero size.
        let ptr = unsafe { System.alloc_zeroed(tagged) };
        if !ptr.is_null() {
            // SAFETY: the tag byte is inside the block just allocated.
            unsafe { tag_new_block(ptr, layout.size()) };
        }
        ptr
    }

    #[inline(never)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was returned by `alloc*`/`realloc` for `layout`, so the tag byte exists.
        let tag = unsafe { ptr.add(layout.size()).read() };
        if tag != TAG_UNTRACKED {
            count_free(layout.size() as u64);
        }
        if let Some(tagged) = tagged_layout(layout) {
            // SAFETY: the block was allocated from `System` with exactly this tagged layout.
            unsafe { System.dealloc(ptr, tagged) };
        }
    }

    #[inline(never)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (Some(old_tagged), Some(new_tagged_size)) =
            (tagged_layout(layout), new_size.checked_add(1))
        else {
            return std::ptr::null_mut();
        };
        if Layout::from_size_align(new_tagged_size, layout.align()).is_err() {
            return std::ptr::null_mut();
        }
        // The block keeps the tag it was born with: a tracked block resized inside `untracked`
        // stays counted (its later free will subtract its full size), and an untracked block
        // resized outside stays uncounted.
        // SAFETY: the tag byte of a live block.
        let tag = unsafe { ptr.add(layout.size()).read() };
        // SAFETY: `ptr` came from `System` with `old_tagged`; the new size is valid for its align.
        let new_ptr = unsafe { System.realloc(ptr, old_tagged, new_tagged_size) };
        if new_ptr.is_null() {
            // The old block is untouched and still counted as it was.
            return new_ptr;
        }
        // SAFETY: `new_ptr + new_size` is the last byte of the new block.
        unsafe { new_ptr.add(new_size).write(tag) };
        if tag != TAG_UNTRACKED {
            let old_size = layout.size();
            if new_size >= old_size {
                count_allocation((new_size - old_size) as u64);
            } else {
                count_free((old_size - new_size) as u64);
            }
        }
        new_ptr
    }
}

/// Writes the tag of a block just allocated and counts it unless this thread is untracked.
///
/// # Safety
/// `ptr` points to a live block of at least `size + 1` bytes.
unsafe fn tag_new_block(ptr: *mut u8, size: usize) {
    if this_thread_is_untracked() {
        // SAFETY: guaranteed by the caller.
        unsafe { ptr.add(size).write(TAG_UNTRACKED) };
    } else {
        // SAFETY: guaranteed by the caller.
        unsafe { ptr.add(size).write(TAG_TRACKED) };
        count_allocation(size as u64);
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Restores the thread's untracked depth even if `f` panics.
struct UntrackedGuard;

impl UntrackedGuard {
    fn enter() -> Self {
        UNTRACKED_DEPTH.with(|depth| depth.set(depth.get() + 1));
        UntrackedGuard
    }
}

impl Drop for UntrackedGuard {
    fn drop(&mut self) {
        UNTRACKED_DEPTH.with(|depth| depth.set(depth.get().saturating_sub(1)));
    }
}

/// Runs `f` with the blocks it allocates on this thread left out of the count, for their whole
/// life: growing or freeing them later, on any thread, is not counted either. Use it for the
/// measurer's own bookkeeping (timelines, report rows) so it does not show up in what it measures.
///
/// What it does not hide: blocks allocated before `f` and resized inside it (they stay counted,
/// so their sizes stay right), and allocations made by other threads that `f` starts or wakes
/// (rayon workers, for example). Nests.
pub fn untracked<R>(f: impl FnOnce() -> R) -> R {
    let _guard = UntrackedGuard::enter();
    f()
}

/// Bytes held by live counted allocations of this process.
pub fn allocated_bytes() -> u64 {
    CURRENT_BYTES.load(Ordering::Relaxed)
}

/// The peak of [`allocated_bytes`] since the last [`reset_allocated_peak`].
pub fn peak_allocated_bytes() -> u64 {
    PEAK_BYTES.load(Ordering::Relaxed)
}

/// Starts a new peak window at the current count.
pub fn reset_allocated_peak() {
    PEAK_BYTES.store(CURRENT_BYTES.load(Ordering::Relaxed), Ordering::Relaxed);
    // An allocation on another thread between the load and the store would otherwise be lost.
    PEAK_BYTES.fetch_max(CURRENT_BYTES.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// The OS's high-water mark of this process's resident memory (`VmHWM` in `/proc/self/status`).
/// Counts what the allocator counts plus its slack, code, stacks and untracked blocks. `None`
/// where `/proc` is not available.
pub fn os_peak_rss_bytes() -> Option<u64> {
    proc_status_field("VmHWM")
}

/// The OS's view of this process's resident memory now (`VmRSS`).
pub fn os_current_rss_bytes() -> Option<u64> {
    proc_status_field("VmRSS")
}

fn proc_status_field(name: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_status_kib(&status, name)
}

/// Reads a `Name:   1234 kB` line of `/proc/<pid>/status` as bytes.
fn parse_status_kib(status: &str, name: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(':')?;
        let kib = value
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse::<u64>()
            .ok()?;
        kib.checked_mul(1024)
    })
}

// ---------------------------------------------------------------------------------------------
// CPU meter
// ---------------------------------------------------------------------------------------------

/// Reads the counting allocator. Exact: every heap byte candle's CPU tensors use goes through it
/// (their storage is a `Vec`), as do the gemm and rayon buffers. The counters are process-wide.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuMeter;

impl CpuMeter {
    pub fn new() -> Self {
        CpuMeter
    }
}

impl MemoryMeter for CpuMeter {
    fn current_bytes(&self) -> u64 {
        allocated_bytes()
    }

    fn peak_bytes(&self) -> u64 {
        peak_allocated_bytes()
    }

    fn reset_peak(&self) {
        reset_allocated_peak();
    }

    fn device_name(&self) -> String {
        "cpu".to_string()
    }

    fn is_exact(&self) -> bool {
        true
    }
}

// ---------------------------------------------------------------------------------------------
// CUDA meter
// ---------------------------------------------------------------------------------------------

/// Why a meter could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeterError {
    /// No usable NVIDIA driver: the CUDA driver library or NVML is missing or not loaded.
    #[error("no NVIDIA driver found ({0}); the CUDA memory meter needs one")]
    NoDriver(String),
    /// The driver is there but this device cannot be used.
    #[error("CUDA device {ordinal}: {message}")]
    Device { ordinal: usize, message: String },
}

/// Where [`CudaMeter::current_bytes`] got its figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CudaUsageSource {
    /// The device memory pool's counters of bytes in use (exact; candle's tensors only).
    MemoryPool,
    /// NVML's used-memory figure for this process id on this device.
    NvmlProcess,
    /// NVML's device-wide used memory minus what was used before this meter created its context.
    /// Taken when NVML does not list this process, as inside containers with their own process-id
    /// namespace; wrong if other processes allocate or free meanwhile, and it misses the context
    /// when candle's device was created before the meter.
    DeviceDelta,
}

/// Reads a CUDA device's memory.
///
/// Tensors: candle allocates every tensor through cudarc's stream-ordered allocator, which draws
/// from the device's current memory pool, and the pool counts the bytes in use and their high-water
/// mark (`CU_MEMPOOL_ATTR_USED_MEM_CURRENT` / `_HIGH`, the counterpart of PyTorch's
/// `memory_allocated` / `max_memory_allocated`). So `current_bytes` and `peak_bytes` are exact, as
/// on the CPU: every allocation is seen, a spike between two reads too. Each read first waits for
/// the device (`cuCtxSynchronize`), so a probe's marks also time the work before them, not just
/// its launch.
///
/// The rest of what the process holds on the device (the CUDA context, loaded kernels, library
/// workspaces) is `runtime_bytes`: NVML's figure for this process (or the device's used memory
/// minus what other processes held before) less the pool's reserved bytes.
///
/// Where the driver has no memory pools, `current_bytes` falls back to that NVML figure, sampled:
/// the peak is then the highest value read and `is_exact` is false.
///
/// It retains the device's primary context, the same one candle uses, so it adds no context
/// of its own.
pub struct CudaMeter {
    ordinal: usize,
    name: String,
    context: Arc<cudarc::driver::CudaContext>,
    nvml: nvml_wrapper::Nvml,
    /// The same device's UUID as NVML spells it (NVML numbers GPUs in PCI order and ignores
    /// `CUDA_VISIBLE_DEVICES`, so the CUDA ordinal cannot be used as NVML's index).
    nvml_uuid: String,
    /// NVML's device-wide used bytes before this meter's context existed: other processes'.
    baseline_used_bytes: u64,
    pid: u32,
    last_bytes: AtomicU64,
    peak_bytes: AtomicU64,
    used_delta_fallback: AtomicBool,
    /// The device's current memory pool (a `CUmemoryPool` handle kept as an address, so the meter
    /// stays `Send + Sync`), when the driver has pools.
    pool: Option<usize>,
}

impl std::fmt::Debug for CudaMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaMeter")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .field("nvml_uuid", &self.nvml_uuid)
            .field("baseline_used_bytes", &self.baseline_used_bytes)
            .finish_non_exhaustive()
    }
}

impl CudaMeter {
    /// Opens device `ordinal` (a CUDA ordinal, as in candle's `Device::new_cuda`). Fails with
    /// [`MeterError::NoDriver`] when the CUDA driver library or NVML is missing; never panics.
    pub fn new(ordinal: usize) -> Result<CudaMeter, MeterError> {
        use cudarc::driver::CudaContext;

        let nvml_result = crate::device::nvml_init();
        let driver_result = crate::device::cuda_driver_present();
        let nvml = match (nvml_result, driver_result) {
            (Ok(nvml), Ok(())) => nvml,
            (nvml_result, driver_result) => {
                let reasons: Vec<String> = [nvml_result.err(), driver_result.err()]
                    .into_iter()
                    .flatten()
                    .collect();
                return Err(MeterError::NoDriver(reasons.join(", ")));
            }
        };
        let device_error = |message: String| MeterError::Device { ordinal, message };

        let count = crate::device::guard_cudarc(CudaContext::device_count)
            .map_err(|e| device_error(format!("cannot count devices: {e}")))?;
        if ordinal >= usize::try_from(count).unwrap_or(0) {
            return Err(device_error(format!(
                "no such device: the driver sees {count} (check CUDA_VISIBLE_DEVICES)"
            )));
        }
        let uuid = crate::device::guard_cudarc(|| {
            let device = cudarc::driver::result::device::get(ordinal as i32)?;
            cudarc::driver::result::device::get_uuid(device)
        })
        .map_err(|e| device_error(format!("cannot read its UUID: {e}")))?;
        // The driver's UUID names a whole GPU or, under MIG, a GPU instance; NVML spells the two
        // with different prefixes.
        let hex = crate::device::uuid_hex(&uuid.bytes);
        let nvml_uuid = ["GPU-", "MIG-"]
            .iter()
            .map(|prefix| format!("{prefix}{hex}"))
            .find(|candidate| nvml.device_by_uuid(candidate.as_str()).is_ok())
            .ok_or_else(|| device_error(format!("NVML knows no device with UUID {hex}")))?;
        // Read before our context exists, so the baseline is other processes' memory only.
        let baseline_used_bytes = nvml
            .device_by_uuid(nvml_uuid.as_str())
            .and_then(|device| device.memory_info())
            .map(|info| info.used)
            .map_err(|e| device_error(format!("NVML memory info: {e}")))?;
        let context = crate::device::guard_cudarc(|| CudaContext::new(ordinal))
            .map_err(|e| device_error(format!("cannot create a context: {e}")))?;
        let name = crate::device::guard_cudarc(|| context.name())
            .map_err(|e| device_error(format!("cannot read its name: {e}")))?;
        let meter = CudaMeter {
            ordinal,
            name,
            context,
            nvml,
            nvml_uuid,
            baseline_used_bytes,
            pid: std::process::id(),
            last_bytes: AtomicU64::new(0),
            peak_bytes: AtomicU64::new(0),
            used_delta_fallback: AtomicBool::new(false),
            pool: current_pool(ordinal),
        };
        meter.reset_peak();
        Ok(meter)
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The driver's `(free, total)` bytes for the whole device.
    pub fn free_and_total_bytes(&self) -> Result<(u64, u64), MeterError> {
        crate::device::guard_cudarc(|| self.context.mem_get_info())
            .map(|(free, total)| (free as u64, total as u64))
            .map_err(|e| MeterError::Device {
                ordinal: self.ordinal,
                message: format!("cuMemGetInfo: {e}"),
            })
    }

    /// Which source the last reading came from.
    pub fn usage_source(&self) -> CudaUsageSource {
        if self.pool.is_some() {
            CudaUsageSource::MemoryPool
        } else if self.used_delta_fallback.load(Ordering::Relaxed) {
            CudaUsageSource::DeviceDelta
        } else {
            CudaUsageSource::NvmlProcess
        }
    }

    /// NVML's used bytes for this process on this device; `None` if NVML does not list it.
    fn nvml_process_bytes(&self) -> Option<u64> {
        let device = self.nvml.device_by_uuid(self.nvml_uuid.as_str()).ok()?;
        let processes = device.running_compute_processes().ok()?;
        processes
            .iter()
            .find(|process| process.pid == self.pid)
            .and_then(|process| match process.used_gpu_memory {
                nvml_wrapper::enums::device::UsedGpuMemory::Used(bytes) => Some(bytes),
                nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => None,
            })
    }

    /// NVML's used bytes for the whole device (or MIG instance), the same figure as the baseline:
    /// the driver's total − free would also count the memory the driver reserves for itself.
    fn nvml_device_used_bytes(&self) -> Option<u64> {
        let device = self.nvml.device_by_uuid(self.nvml_uuid.as_str()).ok()?;
        device.memory_info().ok().map(|info| info.used)
    }

    /// What the process holds on the device, from NVML: its per-process figure, or the device's
    /// used memory minus other processes' (taken before this meter existed).
    fn process_bytes(&self) -> Option<u64> {
        match self.nvml_process_bytes() {
            Some(bytes) => {
                self.used_delta_fallback.store(false, Ordering::Relaxed);
                Some(bytes)
            }
            None => self.nvml_device_used_bytes().map(|used| {
                self.used_delta_fallback.store(true, Ordering::Relaxed);
                used.saturating_sub(self.baseline_used_bytes)
            }),
        }
    }

    /// Waits for the device's queued work, so that a reading (and the time it is taken at)
    /// includes it.
    fn synchronize(&self) {
        // A failed wait leaves the reading as it is; the next kernel reports the error.
        let _ = crate::device::guard_cudarc(|| self.context.synchronize());
    }

    /// One of the memory pool's counters.
    fn pool_counter(&self, attribute: cudarc::driver::sys::CUmemPool_attribute) -> Option<u64> {
        let pool = self.pool?;
        let mut value: u64 = 0;
        crate::device::guard_cudarc(|| {
            // SAFETY: `pool` is the device's pool handle (pools live as long as the device) and
            // the counters are 64-bit values.
            unsafe {
                cudarc::driver::sys::cuMemPoolGetAttribute(
                    pool as cudarc::driver::sys::CUmemoryPool,
                    attribute,
                    (&mut value as *mut u64).cast(),
                )
                .result()
            }
        })
        .ok()?;
        Some(value)
    }

    /// The pool's bytes in use: candle's live tensors.
    fn pool_used_bytes(&self) -> Option<u64> {
        use cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT;
        self.pool_counter(CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    }

    /// Reads the device (after waiting for it) and records the reading in the peak.
    fn sample(&self) -> u64 {
        self.synchronize();
        let reading = match self.pool_used_bytes() {
            Some(bytes) => Some(bytes),
            None => self.process_bytes(),
        };
        // A failed read repeats the last good one rather than reporting zero.
        let bytes = reading.unwrap_or_else(|| self.last_bytes.load(Ordering::Relaxed));
        self.last_bytes.store(bytes, Ordering::Relaxed);
        self.peak_bytes.fetch_max(bytes, Ordering::Relaxed);
        bytes
    }
}

/// The device's current memory pool, which cudarc's stream-ordered allocations draw from; `None`
/// when the driver has no pools (cudarc then allocates with `cuMemAlloc`, which nothing counts).
fn current_pool(ordinal: usize) -> Option<usize> {
    use cudarc::driver::sys;
    crate::device::guard_cudarc(|| {
        let device = cudarc::driver::result::device::get(ordinal as i32)?;
        let mut supported: std::ffi::c_int = 0;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: both calls write one value through the pointer they are given.
        unsafe {
            sys::cuDeviceGetAttribute(
                &mut supported,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED,
                device,
            )
            .result()?;
            if supported == 0 {
                return Ok(0);
            }
            sys::cuDeviceGetMemPool(&mut pool, device).result()?;
        }
        Ok(pool as usize)
    })
    .ok()
    .filter(|&pool| pool != 0)
}

impl MemoryMeter for CudaMeter {
    fn current_bytes(&self) -> u64 {
        self.sample()
    }

    fn peak_bytes(&self) -> u64 {
        use cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        let now = self.sample();
        if let Some(high) = self.pool_counter(CU_MEMPOOL_ATTR_USED_MEM_HIGH) {
            self.peak_bytes.fetch_max(high.max(now), Ordering::Relaxed);
        }
        self.peak_bytes.load(Ordering::Relaxed)
    }

    fn reset_peak(&self) {
        let now = self.sample();
        if let Some(pool) = self.pool {
            use cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
            let mut zero: u64 = 0;
            // SAFETY: as in `pool_counter`; the high-water mark can only be reset to zero, after
            // which it follows the bytes in use again.
            let _ = crate::device::guard_cudarc(|| unsafe {
                cudarc::driver::sys::cuMemPoolSetAttribute(
                    pool as cudarc::driver::sys::CUmemoryPool,
                    CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    (&mut zero as *mut u64).cast(),
                )
                .result()
            });
        }
        self.peak_bytes.store(now, Ordering::Relaxed);
    }

    fn device_name(&self) -> String {
        format!("cuda:{} ({})", self.ordinal, self.name)
    }

    /// With the pool's counters: what the process holds beyond the pool's reserved bytes (the
    /// context, loaded kernels, library workspaces), which the readings leave out. Without them
    /// the readings are already everything the process holds, so nothing is added.
    fn runtime_bytes(&self) -> u64 {
        use cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT;
        self.synchronize();
        match self.pool_counter(CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT) {
            Some(reserved) => self.process_bytes().unwrap_or(0).saturating_sub(reserved),
            None => 0,
        }
    }

    fn is_exact(&self) -> bool {
        self.pool.is_some()
    }

    fn waits_for_device(&self) -> bool {
        true
    }
}

// ---------------------------------------------------------------------------------------------
// Fake meter
// ---------------------------------------------------------------------------------------------

/// A meter whose readings are set by the test: either directly (`set_current`, `allocate`,
/// `free`) or as a script of values that successive `current_bytes` reads return in turn (the
/// last one repeats). The peak follows every value set or read.
#[derive(Debug)]
pub struct FakeMeter {
    name: String,
    current_bytes: AtomicU64,
    peak_bytes: AtomicU64,
    runtime_bytes: AtomicU64,
    exact: bool,
    script: Mutex<VecDeque<u64>>,
}

impl Default for FakeMeter {
    fn default() -> Self {
        Self::new("fake")
    }
}

impl FakeMeter {
    pub fn new(name: &str) -> Self {
        FakeMeter {
            name: name.to_string(),
            current_bytes: AtomicU64::new(0),
            peak_bytes: AtomicU64::new(0),
            runtime_bytes: AtomicU64::new(0),
            exact: true,
            script: Mutex::new(VecDeque::new()),
        }
    }

    /// A meter whose `current_bytes` reads return `readings` in order, then repeat the last one.
    pub fn scripted(name: &str, readings: impl IntoIterator<Item = u64>) -> Self {
        let meter = Self::new(name);
        if let Ok(mut script) = meter.script.lock() {
            script.extend(readings);
        }
        meter
    }

    /// Makes `is_exact` report `exact` (to test how callers treat sampling meters).
    pub fn with_exact(mut self, exact: bool) -> Self {
        self.exact = exact;
        self
    }

    pub fn set_current(&self, bytes: u64) {
        self.current_bytes.store(bytes, Ordering::Relaxed);
        self.peak_bytes.fetch_max(bytes, Ordering::Relaxed);
    }

    /// Adds `bytes` to the current value, as an allocation would.
    pub fn allocate(&self, bytes: u64) {
        let now = self.current_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak_bytes.fetch_max(now, Ordering::Relaxed);
    }

    /// Subtracts `bytes` from the current value (not below zero), as a free would.
    pub fn free(&self, bytes: u64) {
        let _ = self
            .current_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
                Some(now.saturating_sub(bytes))
            });
    }

    pub fn set_runtime_bytes(&self, bytes: u64) {
        self.runtime_bytes.store(bytes, Ordering::Relaxed);
    }
}

impl MemoryMeter for FakeMeter {
    fn current_bytes(&self) -> u64 {
        let next = self
            .script
            .lock()
            .ok()
            .and_then(|mut script| match script.len() {
                0 => None,
                1 => script.front().copied(),
                _ => script.pop_front(),
            });
        if let Some(bytes) = next {
            self.set_current(bytes);
        }
        self.current_bytes.load(Ordering::Relaxed)
    }

    fn peak_bytes(&self) -> u64 {
        self.peak_bytes.load(Ordering::Relaxed)
    }

    fn reset_peak(&self) {
        self.peak_bytes.store(
            self.current_bytes.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
    }

    fn device_name(&self) -> String {
        self.name.clone()
    }

    fn runtime_bytes(&self) -> u64 {
        self.runtime_bytes.load(Ordering::Relaxed)
    }

    fn is_exact(&self) -> bool {
        self.exact
    }
}

#[cfg(test)]
mod tests {
    // Tests of the global counters live in tests/meter_*.rs, one process per scenario: unit tests
    // here run beside the rest of the library's tests, whose allocations would race with them.
    use super::*;

    #[test]
    fn parses_proc_status_lines_in_kib() {
        let status = "Name:\tmemtune\nVmHWM:\t  742016 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(742_016 * 1024));
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(12_345 * 1024));
        assert_eq!(parse_status_kib(status, "VmPeak"), None);
        // A field whose name is a prefix of another must not match it.
        assert_eq!(parse_status_kib("VmRSSx:\t1 kB\n", "VmRSS"), None);
    }

    #[test]
    fn os_rss_is_readable_on_linux() {
        // Current first: the high-water mark read afterwards can only be at or above it.
        let current = os_current_rss_bytes().expect("VmRSS in /proc/self/status");
        let peak = os_peak_rss_bytes().expect("VmHWM in /proc/self/status");
        assert!(current > 0);
        assert!(
            peak >= current,
            "high-water mark {peak} below current {current}"
        );
    }

    #[test]
    fn fake_meter_tracks_peak_through_set_allocate_and_free() {
        let meter = FakeMeter::new("fake:0");
        meter.set_current(100);
        meter.allocate(50);
        assert_eq!((meter.current_bytes(), meter.peak_bytes()), (150, 150));
        meter.free(120);
        assert_eq!((meter.current_bytes(), meter.peak_bytes()), (30, 150));
        meter.free(1_000);
        assert_eq!(meter.current_bytes(), 0);
        meter.reset_peak();
        assert_eq!(meter.peak_bytes(), 0);
        meter.set_current(70);
        assert_eq!(meter.peak_bytes(), 70);
        meter.set_runtime_bytes(9);
        assert_eq!(meter.runtime_bytes(), 9);
        assert_eq!(meter.device_name(), "fake:0");
        assert!(meter.is_exact());
        assert!(!FakeMeter::default().with_exact(false).is_exact());
    }

    #[test]
    fn fake_meter_script_plays_in_order_then_holds_the_last_value() {
        let meter = FakeMeter::scripted("fake", [10, 40, 20]);
        let reads: Vec<u64> = (0..5).map(|_| meter.current_bytes()).collect();
        assert_eq!(reads, [10, 40, 20, 20, 20]);
        assert_eq!(meter.peak_bytes(), 40);
    }

    #[test]
    fn meters_are_usable_as_trait_objects_across_threads() {
        let meters: Vec<Box<dyn MemoryMeter>> =
            vec![Box::new(CpuMeter::new()), Box::new(FakeMeter::default())];
        std::thread::scope(|scope| {
            for meter in &meters {
                scope.spawn(move || meter.device_name());
            }
        });
        assert_eq!(meters[0].device_name(), "cpu");
        assert!(meters[0].is_exact());
        assert_eq!(meters[0].runtime_bytes(), 0);
    }
}
