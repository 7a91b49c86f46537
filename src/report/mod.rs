//! Exports: every file memtune writes from measurements renders from the in-memory results
//! (`ProbeResult`), here. CSV schemas are stable and documented in the README; units are in the
//! column names.

pub mod profile_csv;
