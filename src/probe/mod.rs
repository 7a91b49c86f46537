//! Probes: instrumented training steps and the memory meters behind them.

pub mod meter;
