//! The one in-memory report every chart and page renders from, and how it is loaded: from the CSV files
//! `profile`, `tune` and the accuracy evaluation write (recognised by their header, not their name),
//! from a `tuned.toml`, or straight from a probe or a search outcome.

use super::profile_csv::{PROFILE_HEADER, ProfileRow, profile_rows, read_profile};
use crate::cost::Evaluation;
use crate::probe::ProbeResult;
use crate::search::write::CandidateRow;
use crate::search::{SearchOutcome, TunedConfig};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Header of the timeline CSV (`profile --timeline-csv`).
pub const TIMELINE_HEADER: &str =
    "probe_id,t_s,phase,layer,micro_batch,current_bytes,peak_bytes,segment_peak_bytes";
/// The timeline header of memtune versions before `segment_peak_bytes`; still read.
const TIMELINE_HEADER_V1: &str = "probe_id,t_s,phase,layer,micro_batch,current_bytes,peak_bytes";
/// Header of `candidates.csv` (`tune`); a test checks it against what the search writes.
pub const CANDIDATES_HEADER: &str = "rank,method,lora_rank,quant,precision,checkpointing,micro_batch,accum,seq,optimizer,loss,weights_bytes,gradients_bytes,optimizer_bytes,activations_bytes,transient_bytes,runtime_bytes,peak_bytes,required_bytes,step_s,tokens_per_s,fits,reason";
/// Header of `accuracy.csv`: predicted against measured peaks of configurations the cost model was
/// not fitted to.
pub const ACCURACY_HEADER: &str = "label,predicted_peak_bytes,measured_peak_bytes";

/// One row of the timeline CSV: the meter read at a named mark of one probe's last measured step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineCsvRow {
    pub probe_id: String,
    /// Seconds since the probe started.
    pub t_s: f64,
    pub phase: String,
    /// Decoder layer for per-layer marks, empty otherwise.
    pub layer: Option<usize>,
    pub micro_batch: usize,
    pub current_bytes: u64,
    /// The running peak up to this mark.
    pub peak_bytes: u64,
    /// The peak since the previous mark (0 in files written before this column existed).
    #[serde(default)]
    pub segment_peak_bytes: u64,
}

/// One row of `accuracy.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccuracyRow {
    /// The configuration, e.g. `probe_label`'s `L4 b2x1 s256 lora r8 all fp32 ckpt=none adamw loss=chunked`.
    pub label: String,
    pub predicted_peak_bytes: u64,
    pub measured_peak_bytes: u64,
}

impl AccuracyRow {
    /// (predicted − measured) / measured; 0 when nothing was measured.
    pub fn relative_error(&self) -> f64 {
        if self.measured_peak_bytes == 0 {
            0.0
        } else {
            (self.predicted_peak_bytes as f64 - self.measured_peak_bytes as f64)
                / self.measured_peak_bytes as f64
        }
    }

    /// The rows of an evaluation on held-out probes.
    pub fn from_evaluation(evaluation: &Evaluation) -> Vec<AccuracyRow> {
        evaluation
            .rows
            .iter()
            .map(|r| AccuracyRow {
                label: r.label.clone(),
                predicted_peak_bytes: r.predicted_peak_bytes,
                measured_peak_bytes: r.measured_peak_bytes,
            })
            .collect()
    }
}

/// `accuracy.csv` as text, header first.
pub fn accuracy_csv(rows: &[AccuracyRow]) -> Result<String> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    for row in rows {
        writer.serialize(row)?;
    }
    let bytes = writer
        .into_inner()
        .map_err(|e| anyhow::anyhow!("csv: {e}"))?;
    let text = String::from_utf8(bytes)?;
    // An empty table still says what it is.
    Ok(if text.is_empty() {
        format!("{ACCURACY_HEADER}\n")
    } else {
        text
    })
}

/// Which configuration the report calls chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigRef {
    /// A row of `candidates.csv`, by its `rank` column.
    Candidate { rank: usize },
    /// A probe of the profile CSV, by its `probe_id`.
    Probe { probe_id: String },
}

/// Everything a report shows. Every exporter is a pure function of this.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReportData {
    /// The model, when an input names it.
    pub model: Option<String>,
    /// Measured probes, six rows each (one per component).
    pub profile: Vec<ProfileRow>,
    pub timeline: Vec<TimelineCsvRow>,
    /// Predicted configurations, in the search's order (the pick first).
    pub candidates: Vec<CandidateRow>,
    /// Predicted against measured peaks on configurations the cost model was not fitted to.
    pub accuracy: Vec<AccuracyRow>,
    pub chosen: Option<ConfigRef>,
    pub budget_bytes: Option<u64>,
    /// Safety margin of the search (fraction), when known.
    pub margin: Option<f64>,
    /// Where the data came from, one line per input, for the page.
    pub sources: Vec<String>,
}

/// What kind of input a CSV file is, from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    Profile,
    Timeline,
    Candidates,
    Accuracy,
}

impl InputKind {
    /// Recognises a file by its first line (a byte-order mark and surrounding spaces are ignored).
    pub fn from_header(first_line: &str) -> Option<InputKind> {
        let header = first_line.trim_start_matches('\u{feff}').trim();
        [
            (PROFILE_HEADER, InputKind::Profile),
            (TIMELINE_HEADER, InputKind::Timeline),
            (TIMELINE_HEADER_V1, InputKind::Timeline),
            (CANDIDATES_HEADER, InputKind::Candidates),
            (ACCURACY_HEADER, InputKind::Accuracy),
        ]
        .into_iter()
        .find(|(h, _)| *h == header)
        .map(|(_, kind)| kind)
    }
}

fn read_rows<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<Vec<T>> {
    let mut reader = csv::Reader::from_reader(text.trim_start_matches('\u{feff}').as_bytes());
    let mut rows = Vec::new();
    for (i, row) in reader.deserialize().enumerate() {
        rows.push(row.with_context(|| format!("{}: row {}", path.display(), i + 2))?);
    }
    Ok(rows)
}

fn probe_count(rows: &[ProfileRow]) -> usize {
    let mut ids: Vec<&str> = rows.iter().map(|r| r.probe_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    ids.len()
}

impl ReportData {
    /// Adds one CSV file of a known schema, or fails naming the schemas it could have been.
    pub fn add_csv(&mut self, path: &Path) -> Result<InputKind> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read `{}`", path.display()))?;
        let first = text.lines().next().unwrap_or("");
        let Some(kind) = InputKind::from_header(first) else {
            bail!(
                "`{}` is not a memtune CSV; its header must be one of\n  {PROFILE_HEADER}\n  {TIMELINE_HEADER}\n  {CANDIDATES_HEADER}\n  {ACCURACY_HEADER}",
                path.display()
            );
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        match kind {
            InputKind::Profile => {
                let rows = read_profile(path)?;
                self.sources.push(format!(
                    "{name}: profile, {} measured probe(s)",
                    probe_count(&rows)
                ));
                if self.model.is_none() {
                    self.model = rows.first().map(|r| r.model.clone());
                }
                self.profile.extend(rows);
            }
            InputKind::Timeline => {
                let rows: Vec<TimelineCsvRow> = read_rows(path, &text)?;
                self.sources
                    .push(format!("{name}: timeline, {} mark(s)", rows.len()));
                self.timeline.extend(rows);
            }
            InputKind::Candidates => {
                let rows: Vec<CandidateRow> = read_rows(path, &text)?;
                self.sources.push(format!(
                    "{name}: candidates, {} predicted configuration(s), {} fitting",
                    rows.len(),
                    rows.iter().filter(|r| r.fits).count()
                ));
                self.candidates.extend(rows);
            }
            InputKind::Accuracy => {
                let rows: Vec<AccuracyRow> = read_rows(path, &text)?;
                self.sources.push(format!(
                    "{name}: accuracy, {} held-out configuration(s)",
                    rows.len()
                ));
                self.accuracy.extend(rows);
            }
        }
        Ok(kind)
    }

    /// Takes the budget, margin, model and pick of a `tuned.toml`.
    pub fn add_tuned(&mut self, tuned: &TunedConfig, source: &str) {
        self.budget_bytes = Some(tuned.budget_bytes);
        self.margin = Some(tuned.margin);
        self.model = Some(tuned.model.clone());
        let probe = crate::search::Candidate {
            knobs: tuned.knobs.clone(),
            prediction: tuned.predicted,
            required_bytes: 0,
            fits: true,
            reason: String::new(),
        };
        let wanted = CandidateRow::new(0, &probe);
        if let Some(row) = self.candidates.iter().find(|r| same_knobs(r, &wanted)) {
            self.chosen = Some(ConfigRef::Candidate { rank: row.rank });
        }
        self.sources
            .push(format!("{source}: the tuned configuration and its budget"));
    }

    /// When nothing chose a configuration: the search's pick (the first candidate, if it fits).
    pub fn settle_chosen(&mut self) {
        if self.chosen.is_none() {
            self.chosen = self
                .candidates
                .first()
                .filter(|r| r.fits)
                .map(|r| ConfigRef::Candidate { rank: r.rank });
        }
    }

    /// A report of one probe (what `profile --report` shows): its breakdown and timeline.
    pub fn from_probe(probe_id: &str, probe: &ProbeResult) -> Self {
        let timeline = probe
            .timeline
            .iter()
            .map(|t| TimelineCsvRow {
                probe_id: probe_id.to_string(),
                t_s: t.t_s,
                phase: t.phase.clone(),
                layer: t.layer,
                micro_batch: t.micro_batch,
                current_bytes: t.current_bytes,
                peak_bytes: t.peak_bytes,
                segment_peak_bytes: t.segment_peak_bytes,
            })
            .collect();
        ReportData {
            model: Some(probe.spec.name.clone()),
            profile: profile_rows(probe_id, probe),
            timeline,
            chosen: Some(ConfigRef::Probe {
                probe_id: probe_id.to_string(),
            }),
            sources: vec![format!("probe {probe_id} (measured)")],
            ..ReportData::default()
        }
    }

    /// A report of a search (what `tune --out` shows), with the held-out evaluation if there was one.
    pub fn from_outcome(outcome: &SearchOutcome, evaluation: Option<&Evaluation>) -> Self {
        let candidates: Vec<CandidateRow> = outcome
            .candidates
            .iter()
            .enumerate()
            .map(|(i, c)| CandidateRow::new(i + 1, c))
            .collect();
        let mut sources = vec![format!(
            "search: {} predicted configuration(s), {} fitting",
            candidates.len(),
            outcome.fitting
        )];
        let accuracy = evaluation.map(AccuracyRow::from_evaluation);
        if let Some(rows) = &accuracy {
            sources.push(format!(
                "evaluation: {} held-out configuration(s)",
                rows.len()
            ));
        }
        let mut data = ReportData {
            model: Some(outcome.model.clone()),
            candidates,
            accuracy: accuracy.unwrap_or_default(),
            budget_bytes: Some(outcome.budget_bytes),
            margin: Some(outcome.margin),
            sources,
            ..ReportData::default()
        };
        data.settle_chosen();
        data
    }
}

/// Whether two candidate rows describe the same configuration (ignoring predictions and rank).
pub fn same_knobs(a: &CandidateRow, b: &CandidateRow) -> bool {
    a.method == b.method
        && a.lora_rank == b.lora_rank
        && a.quant == b.quant
        && a.precision == b.precision
        && a.checkpointing == b.checkpointing
        && a.micro_batch == b.micro_batch
        && a.accum == b.accum
        && a.seq == b.seq
        && a.optimizer == b.optimizer
        && a.loss == b.loss
}

/// Loads a report from a folder (every `*.csv` in it recognised by header, plus `tuned.toml` if
/// present; other files are ignored) or from a single CSV file of one of the four schemas.
pub fn load_report_inputs(from: &Path) -> Result<ReportData> {
    let mut data = ReportData::default();
    if from.is_dir() {
        let mut csvs = Vec::new();
        let entries =
            std::fs::read_dir(from).with_context(|| format!("cannot list `{}`", from.display()))?;
        for entry in entries {
            let path = entry
                .with_context(|| format!("cannot list `{}`", from.display()))?
                .path();
            let is_csv = path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
            if is_csv && path.is_file() {
                csvs.push(path);
            }
        }
        // Sorted, so that the same folder always gives the same report.
        csvs.sort();
        if csvs.is_empty() {
            bail!(
                "--from {}: no CSV files in the folder; expected any of profile.csv, timeline.csv, candidates.csv, accuracy.csv",
                from.display()
            );
        }
        for path in &csvs {
            data.add_csv(path)?;
        }
        let tuned = from.join("tuned.toml");
        if tuned.is_file() {
            let text = std::fs::read_to_string(&tuned)
                .with_context(|| format!("cannot read `{}`", tuned.display()))?;
            let config = TunedConfig::from_toml(&text)
                .with_context(|| format!("`{}` is not a memtune tuned.toml", tuned.display()))?;
            data.add_tuned(&config, "tuned.toml");
        }
    } else if from.is_file() {
        data.add_csv(from)?;
    } else {
        bail!(
            "--from {}: no such file or folder; expected a folder of memtune CSV files or one CSV file",
            from.display()
        );
    }
    data.settle_chosen();
    Ok(data)
}
