//! `memtune train --config FILE`: a TOML file with the run's settings. It reads the `tuned.toml`
//! that `memtune tune` writes (`model`, `[knobs]`, `[hyper]`; its other keys are ignored) and
//! three optional tables of its own:
//!
//! ```toml
//! model = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
//! [knobs]            # any subset of the knobs; the rest keep their defaults
//! seq = 128
//! [hyper]            # any subset of the optimisation settings
//! lr = 1e-3
//! [data]
//! train = "examples/data/pirate.jsonl"
//! eval_fraction = 0.1
//! bad_lines = "fail"
//! packing = "pack"
//! [output]
//! dir = "runs/pirate"
//! save_every = 20
//! eval_every = 10
//! merged = true
//! [train]
//! steps = 100
//! seed = 0
//! device = "cpu"
//! ```
//!
//! Relative paths are taken from the current folder, as on the command line. Flags override the
//! file.

use crate::config::{Hyper, Knobs};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The file, every part optional.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TrainFile {
    pub model: Option<String>,
    /// Kept as TOML so that a partial table can be laid over the defaults.
    pub knobs: Option<toml::Value>,
    pub hyper: Option<toml::Value>,
    pub data: Option<DataSection>,
    pub output: Option<OutputSection>,
    pub train: Option<TrainSection>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// The training data file.
    pub train: Option<PathBuf>,
    pub eval_fraction: Option<f64>,
    /// `fail` or `skip`.
    pub bad_lines: Option<String>,
    /// `pack` or `pad`.
    pub packing: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    pub dir: Option<PathBuf>,
    pub save_every: Option<usize>,
    pub eval_every: Option<usize>,
    /// Write merged full weights at the end.
    pub merged: Option<bool>,
    pub keep_checkpoints: Option<usize>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub steps: Option<usize>,
    pub seed: Option<u64>,
    pub device: Option<String>,
}

impl TrainFile {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--config {}: cannot read", path.display()))?;
        Self::parse(&text).with_context(|| format!("--config {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        Ok(toml::from_str(text)?)
    }

    /// The file's knobs laid over `base`.
    pub fn knobs(&self, base: Knobs) -> Result<Knobs> {
        overlay(base, self.knobs.as_ref()).context("[knobs]")
    }

    /// The file's optimisation settings laid over `base`.
    pub fn hyper(&self, base: Hyper) -> Result<Hyper> {
        overlay(base, self.hyper.as_ref()).context("[hyper]")
    }
}

/// `base` with the keys of `table` replaced, tables merged key by key.
fn overlay<T: Serialize + serde::de::DeserializeOwned>(
    base: T,
    table: Option<&toml::Value>,
) -> Result<T> {
    let Some(table) = table else {
        return Ok(base);
    };
    let mut value = toml::Value::try_from(&base)?;
    merge(&mut value, table);
    Ok(value.try_into()?)
}

fn merge(into: &mut toml::Value, from: &toml::Value) {
    match (into, from) {
        (toml::Value::Table(a), toml::Value::Table(b)) => {
            for (key, value) in b {
                match a.get_mut(key) {
                    Some(existing) if existing.is_table() && value.is_table() => {
                        merge(existing, value)
                    }
                    _ => {
                        a.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (into, from) => *into = from.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Checkpointing, Method, OptimizerKind};

    #[test]
    fn partial_tables_lay_over_the_defaults_and_unknown_keys_are_errors() {
        let file = TrainFile::parse(
            r#"
            model = "tiny"
            budget_bytes = 1000   # tune's extra keys are ignored
            [knobs]
            seq = 64
            checkpointing = "every:2"
            [knobs.lora]
            rank = 4
            [hyper]
            lr = 0.01
            [data]
            train = "d.jsonl"
            [output]
            save_every = 5
            "#,
        )
        .unwrap();
        let knobs = file.knobs(Knobs::default()).unwrap();
        assert_eq!(knobs.seq, 64);
        assert_eq!(knobs.checkpointing, Checkpointing::Every(2));
        assert_eq!(knobs.lora.rank, 4);
        // Untouched keys keep their defaults, nested ones included.
        assert_eq!(knobs.lora.alpha, Knobs::default().lora.alpha);
        assert_eq!(
            (knobs.method, knobs.optimizer),
            (Method::Lora, OptimizerKind::Adamw)
        );
        assert_eq!(file.hyper(Hyper::default()).unwrap().lr, 0.01);
        assert_eq!(file.output.unwrap().save_every, Some(5));

        let err = TrainFile::parse("[output]\nsave_evry = 5\n").unwrap_err();
        assert!(format!("{err:#}").contains("save_evry"), "{err:#}");
        let bad = TrainFile::parse("[knobs]\nmethod = \"lorax\"\n").unwrap();
        let err = bad.knobs(Knobs::default()).unwrap_err();
        assert!(format!("{err:#}").contains("lorax"), "{err:#}");
    }

    #[test]
    fn reads_what_tune_writes() {
        let tuned = crate::search::TunedConfig {
            model: "tiny".into(),
            budget_bytes: 1 << 30,
            margin: 0.1,
            policy: vec!["method: lora".into()],
            knobs: Knobs {
                batch: 3,
                ..Knobs::default()
            },
            hyper: Hyper::default(),
            predicted: crate::cost::Prediction {
                components: crate::probe::Components::default(),
                peak_bytes: 1,
                phase: crate::cost::Phase::Update,
                step_s: 1.0,
                tokens_per_s: 1.0,
            },
        };
        let file = TrainFile::parse(&tuned.to_toml().unwrap()).unwrap();
        assert_eq!(file.model.as_deref(), Some("tiny"));
        assert_eq!(file.knobs(Knobs::default()).unwrap(), tuned.knobs);
        assert_eq!(file.hyper(Hyper::default()).unwrap(), tuned.hyper);
    }
}
