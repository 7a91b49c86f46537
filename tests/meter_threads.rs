//! The counters under threads: blocks allocated on one thread and freed on another, and several
//! threads allocating at once, leave the count exactly where it started; the peak sees the
//! moment they were all alive. One test in this file: the counters are process-wide.

use memtune::probe::meter::{CpuMeter, MemoryMeter};
use std::hint::black_box;
use std::sync::{Arc, Barrier};

mod common;
use common::wait_for_the_harness;

const MIB: u64 = 1 << 20;
const THREADS: usize = 4;

/// Each worker allocates 1 MiB and hands it to the main thread, which frees it. Returns the
/// bytes left over and the peak above the start.
fn allocate_on_workers_free_on_main(meter: &CpuMeter) -> (i64, u64) {
    let before = meter.current_bytes();
    meter.reset_peak();
    let barrier = Arc::new(Barrier::new(THREADS + 1));
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let block = black_box(vec![1u8; MIB as usize]);
                // Every block is alive at the barrier.
                barrier.wait();
                block
            })
        })
        .collect();
    barrier.wait();
    let blocks: Vec<Vec<u8>> = workers
        .into_iter()
        .map(|worker| worker.join().expect("worker"))
        .collect();
    drop(blocks);
    drop(barrier);
    let left_over = meter.current_bytes() as i64 - before as i64;
    (left_over, meter.peak_bytes() - before)
}

#[test]
fn counts_stay_exact_across_threads() {
    let meter = CpuMeter::new();
    wait_for_the_harness(&meter);
    for _ in 0..3 {
        let (left_over, peak) = allocate_on_workers_free_on_main(&meter);
        assert_eq!(left_over, 0);
        assert!(
            peak >= THREADS as u64 * MIB,
            "peak {peak} should include all {THREADS} MiB alive at the barrier"
        );
    }
}
