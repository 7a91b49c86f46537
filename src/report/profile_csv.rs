//! The profile CSV: one row per (probe, component), every knob a column, so that many probes append
//! into one file and load cleanly in a spreadsheet or pandas. And the timeline CSV: one row per mark.

use crate::probe::{COMPONENT_NAMES, ProbeResult};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// One row of the profile CSV. The column order is the field order; it is part of the format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileRow {
    /// Identifies the probe within the file: rows of one probe share it.
    pub probe_id: String,
    pub model: String,
    /// Decoder layers the probe ran with.
    pub layers: usize,
    pub device: String,
    pub method: String,
    pub rank: usize,
    pub alpha: f64,
    pub lora_targets: String,
    pub quant: String,
    pub precision: String,
    pub checkpointing: String,
    pub batch: usize,
    pub accum: usize,
    pub seq: usize,
    pub optimizer: String,
    pub loss: String,
    /// One of weights, gradients, optimizer, activations, transient, runtime.
    pub component: String,
    pub bytes: u64,
    /// The probe's measured peak (the same on each of its rows).
    pub peak_bytes: u64,
    pub step_s: f64,
    pub tokens_per_s: f64,
    pub memtune_version: String,
}

pub const PROFILE_HEADER: &str = "probe_id,model,layers,device,method,rank,alpha,lora_targets,quant,precision,checkpointing,batch,accum,seq,optimizer,loss,component,bytes,peak_bytes,step_s,tokens_per_s,memtune_version";

/// The six rows of one probe.
pub fn profile_rows(probe_id: &str, p: &ProbeResult) -> Vec<ProfileRow> {
    let k = &p.knobs;
    let parts = p.components.as_array();
    COMPONENT_NAMES
        .iter()
        .zip(parts)
        .map(|(component, bytes)| ProfileRow {
            probe_id: probe_id.to_string(),
            model: p.spec.name.clone(),
            layers: p.spec.num_hidden_layers,
            device: p.device.clone(),
            method: k.method.to_string(),
            rank: k.lora.rank,
            alpha: k.lora.alpha,
            lora_targets: k
                .lora
                .targets
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(" "),
            quant: k.quant.to_string(),
            precision: k.precision.to_string(),
            checkpointing: k.checkpointing.to_string(),
            batch: k.batch,
            accum: k.accum,
            seq: k.seq,
            optimizer: k.optimizer.to_string(),
            loss: k.loss.to_string(),
            component: component.to_string(),
            bytes,
            peak_bytes: p.peak_bytes,
            step_s: p.step_s,
            tokens_per_s: p.tokens_per_s,
            memtune_version: env!("CARGO_PKG_VERSION").to_string(),
        })
        .collect()
}

/// Renders rows as CSV text, with the header when `header` is true.
pub fn render_profile(rows: &[ProfileRow], header: bool) -> Result<String> {
    let mut w = csv::WriterBuilder::new()
        .has_headers(header)
        .from_writer(Vec::new());
    for row in rows {
        w.serialize(row)?;
    }
    Ok(String::from_utf8(
        w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?,
    )?)
}

/// Appends `rows` to the CSV at `path`, writing the header when the file is new or empty, and
/// refusing a file whose header is not this schema's (rather than mixing formats).
pub fn append_profile(path: &Path, rows: &[ProfileRow]) -> Result<()> {
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let fresh = existing.trim().is_empty();
    if !fresh {
        let first = existing.lines().next().unwrap_or("");
        if first.trim() != PROFILE_HEADER {
            bail!(
                "--csv {}: the file exists with other columns; expected the memtune profile header\n  {PROFILE_HEADER}",
                path.display()
            );
        }
    }
    let text = render_profile(rows, fresh)?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("--csv {}: cannot open for appending", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("--csv {}: write failed", path.display()))?;
    Ok(())
}

/// Reads a profile CSV back.
pub fn read_profile(path: &Path) -> Result<Vec<ProfileRow>> {
    let mut r = csv::Reader::from_path(path)
        .with_context(|| format!("cannot read `{}`", path.display()))?;
    let mut rows = Vec::new();
    for (i, row) in r.deserialize().enumerate() {
        rows.push(row.with_context(|| format!("{}: row {}", path.display(), i + 2))?);
    }
    Ok(rows)
}

/// The timeline CSV:
/// `probe_id,t_s,phase,layer,micro_batch,current_bytes,peak_bytes,segment_peak_bytes`.
pub fn render_timeline(probe_id: &str, p: &ProbeResult) -> String {
    let mut out = String::from(
        "probe_id,t_s,phase,layer,micro_batch,current_bytes,peak_bytes,segment_peak_bytes\n",
    );
    for row in &p.timeline {
        out.push_str(&format!(
            "{},{:.6},{},{},{},{},{},{}\n",
            probe_id,
            row.t_s,
            row.phase,
            row.layer.map(|l| l.to_string()).unwrap_or_default(),
            row.micro_batch,
            row.current_bytes,
            row.peak_bytes,
            row.segment_peak_bytes
        ));
    }
    out
}
