//! The counting allocator: exact current and peak for plain allocations, growth and shrinkage by
//! `realloc`, and `reset_peak`. One test in this file, run as steps in order: the counters are
//! process-wide, and a second test running beside it would move them.

use memtune::probe::meter::{CpuMeter, MemoryMeter};
use std::hint::black_box;

mod common;
use common::wait_for_the_harness;

const MIB: u64 = 1 << 20;

#[test]
fn counting_allocator_is_exact() {
    let meter = CpuMeter::new();
    wait_for_the_harness(&meter);
    assert_eq!(meter.device_name(), "cpu");
    assert!(meter.is_exact());

    // A 10 MiB Vec<u8> is 10 MiB while it lives, and nothing after.
    let before = meter.current_bytes();
    let buffer = black_box(vec![7u8; 10 * MIB as usize]);
    assert_eq!(meter.current_bytes() - before, 10 * MIB);
    assert!(meter.peak_bytes() >= before + 10 * MIB);
    drop(buffer);
    assert_eq!(meter.current_bytes(), before);

    // realloc counts the change of size: 1 MiB → 3 MiB → 2 MiB of capacity.
    let mut growing: Vec<u8> = Vec::with_capacity(MIB as usize);
    black_box(&mut growing);
    assert_eq!(meter.current_bytes() - before, MIB);
    growing.reserve_exact(3 * MIB as usize);
    black_box(&mut growing);
    assert_eq!(growing.capacity() as u64, 3 * MIB);
    assert_eq!(meter.current_bytes() - before, 3 * MIB);
    growing.shrink_to(2 * MIB as usize);
    black_box(&mut growing);
    assert_eq!(meter.current_bytes() - before, 2 * MIB);
    drop(growing);
    assert_eq!(meter.current_bytes(), before);

    // Pushing byte by byte grows by doubling; every step is a realloc, and the total is the
    // final capacity.
    let mut pushed = Vec::new();
    for byte in 0..100_000u32 {
        pushed.push(byte as u8);
    }
    black_box(&mut pushed);
    assert_eq!(meter.current_bytes() - before, pushed.capacity() as u64);
    drop(pushed);
    assert_eq!(meter.current_bytes(), before);

    // The peak stays at the 10 MiB until reset, then follows from the current value.
    assert!(meter.peak_bytes() >= before + 10 * MIB);
    meter.reset_peak();
    assert_eq!(meter.peak_bytes(), before);
    let one = black_box(vec![0u8; MIB as usize]);
    let two = black_box(vec![0u8; MIB as usize]);
    drop(one);
    drop(two);
    assert_eq!(meter.current_bytes(), before);
    assert_eq!(meter.peak_bytes(), before + 2 * MIB);
}
