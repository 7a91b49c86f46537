//! Helpers shared by the test binaries that read the process-wide allocation counters.

use memtune::probe::meter::{CpuMeter, MemoryMeter};

/// libtest's main thread records the test it has just started (150 to 900 bytes here, kept until
/// the test ends) while the test's first lines run; waits until the count stops moving so that
/// bookkeeping lands before the baseline. (With `harness = false` this would not be needed.)
pub fn wait_for_the_harness(meter: &CpuMeter) {
    let mut last = meter.current_bytes();
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(30));
        let now = meter.current_bytes();
        if now == last {
            return;
        }
        last = now;
    }
}
