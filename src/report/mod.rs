//! Exports: every file memtune writes from measurements renders from the in-memory results
//! (`ProbeResult`), here. CSV schemas are stable and documented in the README; units are in the
//! column names.

pub mod charts;
pub mod data;
pub mod page;
pub mod profile_csv;

pub use data::{ReportData, load_report_inputs};
pub use page::{RenderedReport, render_report, write_rendered, write_report_dir};
