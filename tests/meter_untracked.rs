//! `untracked`: blocks allocated inside it are left out of the count for their whole life, even
//! when grown or freed outside it or on another thread, and the counter never underflows.
//! One test in this file: the counters are process-wide.

use memtune::probe::meter::{CpuMeter, MemoryMeter, untracked};
use std::hint::black_box;

mod common;
use common::wait_for_the_harness;

const MIB: usize = 1 << 20;

#[test]
fn untracked_blocks_stay_out_of_the_count_wherever_they_are_freed() {
    let meter = CpuMeter::new();
    wait_for_the_harness(&meter);
    let before = meter.current_bytes();
    meter.reset_peak();

    // Allocated inside, freed outside: no change at either end.
    let hidden = untracked(|| black_box(vec![1u8; 4 * MIB]));
    assert_eq!(meter.current_bytes(), before);
    drop(hidden);
    assert_eq!(
        meter.current_bytes(),
        before,
        "a free of an untracked block is not subtracted"
    );

    // Grown outside: still hidden, and its free later subtracts nothing.
    let mut timeline: Vec<u64> = untracked(|| Vec::with_capacity(16));
    for row in 0..100_000 {
        timeline.push(row);
    }
    black_box(&mut timeline);
    assert_eq!(meter.current_bytes(), before);
    assert_eq!(
        meter.peak_bytes(),
        before,
        "nothing hidden reached the peak"
    );

    // Freed on another thread (spawning it allocates a little, tracked, and frees it at join).
    std::thread::spawn(move || drop(timeline))
        .join()
        .expect("the freeing thread");
    assert_eq!(meter.current_bytes(), before);

    // A tracked block resized inside `untracked` stays tracked, so its size stays right.
    let mut tracked = black_box(vec![0u8; MIB]);
    untracked(|| tracked.reserve_exact(MIB));
    assert_eq!(meter.current_bytes() - before, 2 * MIB as u64);
    drop(tracked);
    assert_eq!(meter.current_bytes(), before);

    // Nested calls and a panic inside one leave tracking on afterwards.
    untracked(|| untracked(|| black_box(vec![0u8; MIB])));
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {})); // the panic below is expected: keep it off stderr
    let caught = std::panic::catch_unwind(|| untracked(|| panic!("inside untracked")));
    std::panic::set_hook(default_hook);
    assert!(caught.is_err());
    let counted = black_box(vec![0u8; MIB]);
    assert_eq!(meter.current_bytes() - before, MIB as u64);
    drop(counted);
    assert_eq!(meter.current_bytes(), before);
}
