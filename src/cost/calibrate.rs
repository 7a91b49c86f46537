//! Calibration: the probes memtune chooses for itself, running them (or reusing a cached run), fitting,
//! and judging the fit on probes it was not fitted to.
//!
//! The plan probes every class of discrete knobs the search may pick (method, quantization,
//! precision), each at a few shapes, at reduced depth (1–2 layers), short sequences and micro-batches
//! of 1–2 (see [`calibration_plan`]): the segment model carries the structure (what a segment leaves
//! and how high it goes, per layer or once; the replay carries depth), the probes only fix
//! coefficients. A probe still carries the full vocabulary and hidden size, so for large layers
//! (≥ 50M parameters, e.g. 7B) the sequences are halved. On the CPU the probes run without
//! warm-up steps of their own: the prober runs a few unmeasured steps first (see
//! `EngineProber::prepare`).

use super::{CostError, CostModel, FailedProbe, Prober, shape_key, version};
use crate::config::{Checkpointing, Knobs, LossMode, Method, OptimizerKind};
use crate::probe::ProbeResult;
use crate::search::SearchSpace;
use crate::spec::ModelSpec;
use anyhow::Context;
use std::path::{Path, PathBuf};

/// Layers above this many parameters make probes costly: use shorter sequences.
const LARGE_LAYER_PARAMS: u64 = 50_000_000;
/// A vocabulary matrix above this many parameters makes every probe's time its head's (each
/// token streams the whole matrix two or three times): use shorter sequences too.
const LARGE_HEAD_PARAMS: u64 = 100_000_000;
/// Batch and sequence of the probe that makes the chunked loss saturate: more tokens than the
/// loss computes at once (`loss_chunk_rows`) for this vocabulary.
fn chunk_probe(vocab: usize) -> (usize, usize) {
    (2, crate::config::loss_chunk_rows(vocab) / 2 + 32)
}

/// A short, stable description of a probe configuration: everything that changes its cost and nothing
/// else (LoRA alpha and dropout do not). Also the identity of a probe in the cache.
pub fn probe_label(spec: &ModelSpec, knobs: &Knobs) -> String {
    let method = match knobs.method {
        Method::Full => "full".to_string(),
        Method::Lora => format!("lora r{} {}", knobs.lora.rank, targets(knobs)),
        Method::Qlora => format!(
            "qlora {} r{} {}",
            knobs.quant,
            knobs.lora.rank,
            targets(knobs)
        ),
    };
    format!(
        "L{} b{}x{} s{} {} {} ckpt={} {} loss={}",
        spec.num_hidden_layers,
        knobs.batch,
        knobs.accum,
        knobs.seq,
        method,
        knobs.precision,
        knobs.checkpointing,
        knobs.optimizer,
        knobs.loss
    )
}

pub(crate) fn targets(knobs: &Knobs) -> String {
    if knobs.lora.targets.len() == crate::config::Target::ALL.len() {
        "all".to_string()
    } else {
        knobs
            .lora
            .targets
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn prefer<T: Copy + PartialEq>(values: &[T], preferred: T) -> T {
    if values.contains(&preferred) {
        preferred
    } else {
        values[0]
    }
}

/// The probes that calibrate `spec` for searching `space`, without duplicates.
///
/// The segment model ([`super::segments`]) fits each segment kind per class of discrete knobs
/// (method, quantization, precision; the loss mode for the loss, the optimizer for the update), over
/// shape features. So every class of the space gets its own small design:
/// - four shapes at two layers — (1, s0), (1, s1), (2, s0) and a chunk-saturating (2, c) — which
///   separate per-layer constants, tokens and seq² attention terms, and the chunked loss's rows;
/// - one more at one layer, so what scales with the parameter count (gradients, the update) is told
///   from what does not;
/// - with checkpointing allowed, the probes recompute one layer in two (`every:2`), which shows
///   kept and recomputed layers in every two-layer probe;
/// - with accumulation allowed, three of them accumulate two micro-batches (the second one's
///   gradient merge is a segment of its own);
/// - each other loss mode adds three probes, each other optimizer and LoRA rank two (the
///   optimizer's for full fine-tuning and for one adapter class: the update sees only trainable
///   tensors).
///
/// Large layers (≥ 50M parameters, e.g. 7B) get halved sequences and run the chunk probe at one
/// layer. A large vocabulary matrix (≥ 100M parameters, e.g. Qwen2.5's 152k × 896) halves the
/// sequences too: there every probe's time is its head's (each token streams the whole matrix two
/// or three times), and the segments' bytes are exact at any length (Qwen2.5-0.5B's held-out peaks
/// moved by at most 0.01 point, its tune went from 22.8 s to 16.3 s).
pub fn calibration_plan(spec: &ModelSpec, space: &SearchSpace) -> Vec<(ModelSpec, Knobs)> {
    let large = spec.layer_params() >= LARGE_LAYER_PARAMS;
    let large_head = (spec.vocab_size * spec.hidden_size) as u64 >= LARGE_HEAD_PARAMS;
    let cap = |s: usize| s.min(spec.max_position_embeddings).max(1);
    let (s0, s1) = if large || large_head {
        (cap(32), cap(64))
    } else {
        (cap(64), cap(128))
    };
    // The full loss's head peaks and takes its time over every token at once: its one-layer probe
    // keeps the long plan's tokens when only the vocabulary shortened the others, so that the
    // head's time per token is not set by 128 tokens and two shorter probes.
    let full_loss_seq = if large_head && !large {
        cap(2 * s1)
    } else {
        s1
    };
    let deep = spec.num_hidden_layers.min(2);
    // The chunk probe also doubles the longest other probe's tokens (2 × s1 at least).
    let (chunk_batch, chunk_seq) = chunk_probe(spec.vocab_size);
    let chunk_seq = cap(chunk_seq.max(s1));
    // The chunk probes' depth: one layer where a layer is large.
    let chunk_depth = if large { 1 } else { deep };

    let checkpointing = if space
        .checkpointing
        .iter()
        .any(|&c| c != Checkpointing::None)
    {
        Checkpointing::Every(2)
    } else {
        Checkpointing::None
    };
    let accum = if space.effective_batch > 1
        && space
            .micro_batches
            .iter()
            .any(|&m| m < space.effective_batch)
    {
        2
    } else {
        1
    };
    let base_loss = prefer(&space.losses, LossMode::Chunked);
    let base_optimizer = prefer(&space.optimizers, OptimizerKind::Adamw);
    let base_rank = space.ranks[0];
    let other_rank = space
        .ranks
        .iter()
        .copied()
        .filter(|&r| r != base_rank)
        .max();

    let frozen_method = space.methods.iter().copied().find(|&m| m != Method::Full);
    let mut plan: Vec<(ModelSpec, Knobs)> = Vec::new();
    let mut add = |layers: usize, batch: usize, seq: usize, accum: usize, knobs: &Knobs| {
        let entry = (
            spec.with_layers(layers.max(1)),
            Knobs {
                batch,
                seq,
                accum,
                ..knobs.clone()
            },
        );
        let label = probe_label(&entry.0, &entry.1);
        if !plan.iter().any(|(s, k)| probe_label(s, k) == label) {
            plan.push(entry);
        }
    };
    for &method in &space.methods {
        let quants: &[crate::config::Quant] = if method == Method::Qlora {
            &space.quants
        } else {
            &space.quants[..1]
        };
        for &quant in quants {
            for &precision in &space.precisions {
                let class = Knobs {
                    method,
                    lora: crate::config::LoraSettings {
                        rank: base_rank,
                        ..space.lora.clone()
                    },
                    quant,
                    precision,
                    checkpointing,
                    batch: 1,
                    accum: 1,
                    seq: s0,
                    optimizer: base_optimizer,
                    loss: base_loss,
                };
                add(1, 1, s0, accum, &class);
                add(deep, 1, s0, accum, &class);
                add(deep, 1, s1, accum, &class);
                add(deep, 2, s0, 1, &class);
                add(chunk_depth, chunk_batch, chunk_seq, 1, &class);
                // Past one chunk a trained head's loss grows with the tokens at a rate the
                // chunk probe alone cannot tell from the logit rows' growth below the chunk (a
                // fit took SmolLM2-135M's for 212 B per token × hidden where the rows explain it,
                // and predicted a full fine-tune at 4,096 tokens 0.5 GB high): a second probe past
                // it, at twice the tokens, pins it. Full fine-tunes only (a frozen head's loss
                // has no such chunks).
                if method == Method::Full && base_loss == LossMode::Chunked {
                    add(chunk_depth, 2 * chunk_batch, chunk_seq, 1, &class);
                }
                for &loss in space.losses.iter().filter(|&&l| l != base_loss) {
                    let knobs = Knobs {
                        loss,
                        ..class.clone()
                    };
                    add(deep, 1, s0, 1, &knobs);
                    add(deep, 1, s1, 1, &knobs);
                    // Twice the tokens at one layer: the full loss's head peaks at its logits
                    // beyond some length, at a widened weight below it.
                    add(1, 2, full_loss_seq, 1, &knobs);
                }
                // The update sees only trainable tensors: LoRA and QLoRA share its probes.
                let first_frozen = method != Method::Full
                    && Some(method) == frozen_method
                    && quant == space.quants[0];
                let optimizers = if method == Method::Full || first_frozen {
                    &space.optimizers[..]
                } else {
                    &[]
                };
                for &optimizer in optimizers.iter().filter(|&&o| o != base_optimizer) {
                    let knobs = Knobs {
                        optimizer,
                        ..class.clone()
                    };
                    add(1, 1, s0, 1, &knobs);
                    add(deep, 1, s0, 1, &knobs);
                }
                if let Some(rank) = other_rank.filter(|_| method != Method::Full) {
                    let knobs = Knobs {
                        lora: crate::config::LoraSettings {
                            rank,
                            ..class.lora.clone()
                        },
                        ..class.clone()
                    };
                    add(deep, 1, s0, 1, &knobs);
                    add(deep, 1, s1, 1, &knobs);
                }
            }
        }
    }
    plan
}

/// The longest sequence a long-attention probe takes ([`long_attention_probes`]).
pub const LONG_ATTENTION_SEQ: usize = 1024;

/// Where the GPU's code paths run attention (candle's ops: a recomputed layer's probabilities and
/// their gradient in fp32, scores-sized), a layer's transient peaks at tokens-sized tensors for
/// short sequences and at the scores past a few hundred tokens; the plan's probes (≤ 2 × 202
/// tokens for SmolLM2) saw only the first, and the card measured 5–8% more than the prediction at
/// 512 and 1,024 tokens (an H200, `reports/BENCHMARKS.md`). So for a requested sequence longer
/// than every probe's, one more probe per layer class of the plan (method, quantization, precision:
/// what a layer's segments are fitted per; the first probe of each, with the class's
/// checkpointing) at that sequence (at most [`LONG_ATTENTION_SEQ`]), batch 1, with the plan's
/// depth; the layer segments then fit their excess as two pieces, the second growing with the
/// scores.
pub fn long_attention_probes(
    spec: &ModelSpec,
    space: &SearchSpace,
    plan: &[(ModelSpec, Knobs)],
) -> Vec<(ModelSpec, Knobs)> {
    let longest = plan.iter().map(|(_, k)| k.seq).max().unwrap_or(0);
    let seq = space
        .seq
        .min(LONG_ATTENTION_SEQ)
        .min(spec.max_position_embeddings);
    if seq <= longest {
        return Vec::new();
    }
    let depth = plan
        .iter()
        .map(|(s, _)| s.num_hidden_layers)
        .max()
        .unwrap_or(1);
    let class = |k: &Knobs| (k.method, k.quant, k.precision);
    let mut out: Vec<(ModelSpec, Knobs)> = Vec::new();
    for (_, knobs) in plan {
        if out.iter().any(|(_, k)| class(k) == class(knobs)) {
            continue;
        }
        out.push((
            spec.with_layers(depth),
            Knobs {
                batch: 1,
                accum: 1,
                seq,
                ..knobs.clone()
            },
        ));
    }
    out
}

/// Configurations for judging a fit: deeper, longer and larger than any calibration probe, varying
/// each knob of `space` from the base, plus a few combinations.
pub fn holdout_plan(
    spec: &ModelSpec,
    space: &SearchSpace,
    layers: usize,
    seq: usize,
    batch: usize,
) -> Vec<(ModelSpec, Knobs)> {
    let model = spec.with_layers(layers.clamp(1, spec.num_hidden_layers.max(1)));
    let mut out: Vec<(ModelSpec, Knobs)> = Vec::new();
    let base = Knobs {
        method: space.methods[0],
        lora: crate::config::LoraSettings {
            rank: space.ranks[0],
            ..space.lora.clone()
        },
        quant: space.quants[0],
        precision: space.precisions[0],
        checkpointing: space.checkpointing[0],
        batch,
        accum: 1,
        seq,
        optimizer: space.optimizers[0],
        loss: space.losses[0],
    };
    let mut push = |knobs: Knobs| {
        if !out.iter().any(|(_, k)| *k == knobs) {
            out.push((model.clone(), knobs));
        }
    };
    push(base.clone());
    for &method in &space.methods {
        push(Knobs {
            method,
            ..base.clone()
        });
    }
    for &quant in &space.quants {
        if space.methods.contains(&Method::Qlora) {
            push(Knobs {
                method: Method::Qlora,
                quant,
                ..base.clone()
            });
        }
    }
    for &rank in &space.ranks {
        push(Knobs {
            lora: crate::config::LoraSettings {
                rank,
                ..base.lora.clone()
            },
            ..base.clone()
        });
    }
    for &precision in &space.precisions {
        push(Knobs {
            precision,
            ..base.clone()
        });
    }
    for &checkpointing in &space.checkpointing {
        push(Knobs {
            checkpointing,
            ..base.clone()
        });
        for &precision in &space.precisions {
            push(Knobs {
                checkpointing,
                precision,
                ..base.clone()
            });
        }
    }
    for &optimizer in &space.optimizers {
        push(Knobs {
            optimizer,
            ..base.clone()
        });
    }
    for &loss in &space.losses {
        push(Knobs {
            loss,
            ..base.clone()
        });
        for &precision in &space.precisions {
            push(Knobs {
                loss,
                precision,
                ..base.clone()
            });
        }
    }
    push(Knobs {
        accum: 2,
        ..base.clone()
    });
    out
}

/// Progress of a calibration, reported before each probe and once at the end.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationProgress {
    /// Probes finished so far (run now or found in the cache).
    pub done: usize,
    pub total: usize,
    /// The probe about to run, or a summary at the end.
    pub label: String,
    /// True for the final report when every probe came from the cache.
    pub cached: bool,
    /// True for the report before the prober's warm-up (`label` says what it does).
    pub warm_up: bool,
}

/// Where the calibration of `spec` on `device` is cached: one JSON file per (model shape, device,
/// memtune version).
pub fn cache_path(cache_dir: &Path, spec: &ModelSpec, device: &str) -> PathBuf {
    // The CPU's product kernels change step times (and a few buffers): a cache folder moved to a
    // CPU without AVX512-BF16, or a run with GEMM_AVX512=0, must not reuse probes timed with them.
    // Probes that took the GPU's code paths (`--target-gpu`) are kept apart from the CPU's own.
    let kernels = if device == "cpu" {
        let paths = if crate::engine::gpu_paths_on_cpu() {
            "+gpupaths"
        } else {
            ""
        };
        format!("{}{paths}", crate::engine::matmul::cpu_kernels())
    } else {
        String::new()
    };
    let key = format!("{}|{}{}|{}", shape_key(spec), device, kernels, version());
    cache_dir.join(format!(
        "calibration-{}-{:016x}.json",
        shape_key(spec),
        super::fnv1a(key.as_bytes())
    ))
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, then a rename, so a reader never
/// sees half a file and a crash leaves the old one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// A cached calibration for this shape, device and version, if one is on disk and readable.
pub fn load_cached(path: &Path, spec: &ModelSpec, device: &str) -> Option<CostModel> {
    let text = std::fs::read_to_string(path).ok()?;
    let model: CostModel = serde_json::from_str(&text).ok()?;
    (model.version == version() && model.device == device && model.fits_shape(spec))
        .then_some(model)
}

/// Saves a calibration to the cache (atomically).
pub fn save(model: &CostModel, path: &Path) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(model)?;
    write_atomic(path, &json)
        .with_context(|| format!("writing calibration cache {}", path.display()))
}

/// Calibrates a cost model for `spec` over `space`: reuses the cached probes for this (shape, device,
/// version), runs only the planned probes missing from the cache, refits, and rewrites the cache after
/// every probe (a late failure loses nothing). A probe that fails is recorded, not retried, and does
/// not stop the others; calibration fails only when no probe succeeds.
pub fn calibrate(
    spec: &ModelSpec,
    space: &SearchSpace,
    prober: &mut dyn Prober,
    cache_dir: Option<&Path>,
    progress: &mut dyn FnMut(&CalibrationProgress),
) -> anyhow::Result<CostModel> {
    let device = prober.device();
    let path = cache_dir.map(|d| cache_path(d, spec, &device));
    let cached = path.as_deref().and_then(|p| load_cached(p, spec, &device));
    let (mut probes, mut failed) = match cached.clone() {
        Some(model) => (model.fitted_on, model.failed),
        None => (Vec::new(), Vec::new()),
    };
    let mut plan = calibration_plan(spec, space);
    if crate::engine::gpu_code_paths(&device) {
        plan.extend(long_attention_probes(spec, space, &plan));
    }
    let known = |label: &str, probes: &[ProbeResult], failed: &[FailedProbe]| {
        probes
            .iter()
            .any(|p| probe_label(&p.spec, &p.knobs) == label)
            || failed.iter().any(|f| f.label == label)
    };
    let mut pending: Vec<&(ModelSpec, Knobs)> = plan
        .iter()
        .filter(|(s, k)| !known(&probe_label(s, k), &probes, &failed))
        .collect();
    let total = plan.len();
    // The cache keeps every probe ever run for this shape and device, across search spaces; a model
    // is fitted to the probes of this space's plan only. Fitting everything at once lets probes of
    // unrelated knob values pull the shared coefficients (seen: 1.2 GiB became 53 GiB).
    let plan_labels: std::collections::HashSet<String> =
        plan.iter().map(|(s, k)| probe_label(s, k)).collect();
    let fit_plan = |probes: &[ProbeResult], failed: &[FailedProbe]| {
        let chosen: Vec<ProbeResult> = probes
            .iter()
            .filter(|p| plan_labels.contains(&probe_label(&p.spec, &p.knobs)))
            .cloned()
            .collect();
        let failed: Vec<FailedProbe> = failed
            .iter()
            .filter(|f| plan_labels.contains(&f.label))
            .cloned()
            .collect();
        CostModel::fit(chosen, &device, failed)
    };
    if pending.is_empty()
        && let Some(model) = cached
    {
        progress(&CalibrationProgress {
            done: total,
            total,
            label: "calibration cached".to_string(),
            cached: true,
            warm_up: false,
        });
        return Ok(fit_plan(&model.fitted_on, &model.failed)?);
    }
    // Every probe run so far, saved after each one (a late failure loses nothing).
    let save_all = |probes: &[ProbeResult], failed: &[FailedProbe]| -> anyhow::Result<()> {
        if let Some(p) = &path
            && !probes.is_empty()
        {
            save(
                &CostModel::fit(probes.to_vec(), &device, failed.to_vec())?,
                p,
            )?;
        }
        Ok(())
    };
    if !pending.is_empty() {
        let owned: Vec<(ModelSpec, Knobs)> = pending.iter().map(|&p| p.clone()).collect();
        progress(&CalibrationProgress {
            done: total - pending.len(),
            total,
            label: "warming up: one unmeasured step per method, quantization and precision \
                    (a class's largest one-layer probe is measured on the way)"
                .to_string(),
            cached: false,
            warm_up: true,
        });
        let measured = prober
            .prepare(&owned)
            .context("warming up before the calibration probes")?;
        if !measured.is_empty() {
            probes.extend(measured);
            pending.retain(|(s, k)| !known(&probe_label(s, k), &probes, &failed));
            save_all(&probes, &failed)?;
        }
    }
    for (index, (probe_spec, knobs)) in pending.iter().enumerate() {
        let label = probe_label(probe_spec, knobs);
        progress(&CalibrationProgress {
            done: total - pending.len() + index,
            total,
            label: label.clone(),
            cached: false,
            warm_up: false,
        });
        match prober.probe(probe_spec, knobs) {
            Ok(result) => probes.push(result),
            Err(e) => failed.push(FailedProbe {
                label,
                error: format!("{e:#}"),
            }),
        }
        save_all(&probes, &failed)?;
    }
    if probes.is_empty() {
        let reasons: Vec<String> = failed
            .iter()
            .map(|f| format!("{}: {}", f.label, f.error))
            .collect();
        return Err(CostError::NoProbes)
            .with_context(|| format!("every calibration probe failed:\n{}", reasons.join("\n")));
    }
    let model = fit_plan(&probes, &failed)?;
    progress(&CalibrationProgress {
        done: total,
        total,
        label: format!(
            "calibrated on {} probes ({} failed)",
            model.fitted_on.len(),
            model.failed.len()
        ),
        cached: false,
        warm_up: false,
    });
    Ok(model)
}

/// One judged probe.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluationRow {
    pub label: String,
    pub measured_peak_bytes: u64,
    pub predicted_peak_bytes: u64,
    /// (predicted − measured) / measured.
    pub peak_error: f64,
    pub measured_step_s: f64,
    pub predicted_step_s: f64,
    pub step_error: f64,
}

/// Prediction error of a model on probes (ideally ones it was not fitted to).
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub rows: Vec<EvaluationRow>,
    /// Median and worst of |peak_error|.
    pub median_peak_error: f64,
    pub worst_peak_error: f64,
    pub median_step_error: f64,
    pub worst_step_error: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        0.5 * (v[mid - 1] + v[mid])
    }
}

/// Judges `model` on `probes`.
pub fn evaluate(model: &CostModel, probes: &[ProbeResult]) -> Evaluation {
    let rows: Vec<EvaluationRow> = probes
        .iter()
        .map(|p| {
            let predicted = model.predict(&p.spec, &p.knobs);
            let rel = |pred: f64, meas: f64| {
                if meas > 0.0 {
                    (pred - meas) / meas
                } else {
                    0.0
                }
            };
            EvaluationRow {
                label: probe_label(&p.spec, &p.knobs),
                measured_peak_bytes: p.peak_bytes,
                predicted_peak_bytes: predicted.peak_bytes,
                peak_error: rel(predicted.peak_bytes as f64, p.peak_bytes as f64),
                measured_step_s: p.step_s,
                predicted_step_s: predicted.step_s,
                step_error: rel(predicted.step_s, p.step_s),
            }
        })
        .collect();
    summarize(rows)
}

fn summarize(rows: Vec<EvaluationRow>) -> Evaluation {
    let peak: Vec<f64> = rows.iter().map(|r| r.peak_error.abs()).collect();
    let step: Vec<f64> = rows.iter().map(|r| r.step_error.abs()).collect();
    Evaluation {
        median_peak_error: median(peak.clone()),
        worst_peak_error: peak.iter().copied().fold(0.0, f64::max),
        median_step_error: median(step.clone()),
        worst_step_error: step.iter().copied().fold(0.0, f64::max),
        rows,
    }
}

/// Leave-one-out cross-validation of a fitted model: each fitted probe predicted by a model fitted to
/// all the others. Judges a calibration without running extra probes (though probes at larger shapes,
/// see [`holdout_plan`], judge extrapolation better). A probe whose removal leaves nothing to fit is
/// skipped.
pub fn leave_one_out(model: &CostModel) -> Result<Evaluation, CostError> {
    let mut rows = Vec::new();
    for (i, probe) in model.fitted_on.iter().enumerate() {
        let rest: Vec<ProbeResult> = model
            .fitted_on
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(_, p)| p.clone())
            .collect();
        if rest.is_empty() {
            continue;
        }
        let partial = CostModel::fit(rest, &model.device, Vec::new())?;
        rows.extend(evaluate(&partial, std::slice::from_ref(probe)).rows);
    }
    Ok(summarize(rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Precision;
    use crate::cost::Phase;
    use crate::cost::synthetic::SyntheticProber;
    use crate::search::PolicyRequest;

    fn wide_space() -> SearchSpace {
        SearchSpace::from_request(&PolicyRequest {
            methods: Some(vec![Method::Lora, Method::Full, Method::Qlora]),
            ranks: Some(vec![8, 32]),
            optimizers: Some(vec![
                OptimizerKind::Adamw,
                OptimizerKind::Adamw8bit,
                OptimizerKind::Adafactor,
                OptimizerKind::Sgd,
            ]),
            effective_batch: 8,
            seq: 512,
            ..PolicyRequest::default()
        })
        .unwrap()
    }

    /// A small Llama with 12 layers (probes use 1–2 of them).
    fn spec() -> ModelSpec {
        ModelSpec {
            name: "synthetic-12l".to_string(),
            vocab_size: 4096,
            hidden_size: 256,
            intermediate_size: 704,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            num_key_value_heads: 2,
            head_dim: 32,
            max_position_embeddings: 4096,
            ..ModelSpec::tiny()
        }
    }

    #[test]
    fn step_time_is_the_sum_of_segment_times_except_on_a_gpu() {
        let model = calibrate(
            &spec(),
            &wide_space(),
            &mut SyntheticProber::new(),
            None,
            &mut |_| {},
        )
        .unwrap();
        assert!(!model.segments.times.is_empty());
        // Six times deeper than any probe, accumulating, with a recomputed layer in two.
        let knobs = Knobs {
            method: Method::Qlora,
            batch: 2,
            accum: 2,
            seq: 512,
            checkpointing: Checkpointing::Every(2),
            ..Knobs::default()
        };
        let truth = SyntheticProber::truth(&spec(), &knobs).step_s;
        let segments = model.segments.step_seconds(&spec(), &knobs).unwrap();
        assert!(
            (segments / truth - 1.0).abs() < 1e-3,
            "{segments} s vs {truth} s"
        );
        assert_eq!(model.predict(&spec(), &knobs).step_s, segments);
        // The same probes, as timed on a GPU (asynchronous kernels): no segment times.
        let on_gpu: Vec<ProbeResult> = model
            .fitted_on
            .iter()
            .cloned()
            .map(|p| ProbeResult {
                device: "cuda:0 (test)".to_string(),
                ..p
            })
            .collect();
        let refit = super::super::segments::SegmentModel::fit(&on_gpu).unwrap();
        assert!(refit.times.is_empty());
        assert_eq!(refit.step_seconds(&spec(), &knobs), None);
    }

    #[test]
    fn long_attention_probes_take_one_per_layer_class_at_the_requested_sequence() {
        // The plan's longest probe here is the chunk probe, 544 tokens (a 4,096-token vocabulary
        // takes 1,024 rows a chunk).
        let space = SearchSpace {
            seq: 768,
            ..wide_space()
        };
        let plan = calibration_plan(&spec(), &space);
        let long = long_attention_probes(&spec(), &space, &plan);
        let classes: std::collections::BTreeSet<String> = plan
            .iter()
            .map(|(_, k)| format!("{} {} {}", k.method, k.quant, k.precision))
            .collect();
        assert_eq!(long.len(), classes.len());
        assert!(long.iter().all(|(s, k)| s.num_hidden_layers == 2
            && k.batch == 1
            && k.accum == 1
            && k.seq == 768));
        // Capped at 1,024 tokens, and none when the plan's probes are as long as the request.
        let longer = SearchSpace {
            seq: 4096,
            ..space.clone()
        };
        assert!(
            long_attention_probes(&spec(), &longer, &plan)
                .iter()
                .all(|(_, k)| k.seq == LONG_ATTENTION_SEQ)
        );
        let short = SearchSpace { seq: 512, ..space };
        assert!(long_attention_probes(&spec(), &short, &plan).is_empty());
    }

    #[test]
    fn plan_is_small_shallow_and_covers_every_knob_value() {
        let space = wide_space();
        let plan = calibration_plan(&spec(), &space);
        // Batch 4 only for full fine-tuning's second chunk probe.
        assert!(plan.iter().all(|(s, k)| s.num_hidden_layers <= 2
            && (k.batch <= 2 || (k.method == Method::Full && k.batch == 4))
            && k.seq <= chunk_probe(s.vocab_size).1.max(128)));
        for method in &space.methods {
            assert!(plan.iter().any(|(_, k)| k.method == *method), "{method}");
        }
        for p in &space.precisions {
            assert!(plan.iter().any(|(_, k)| k.precision == *p), "{p}");
        }
        // Recomputing one layer in two shows kept and recomputed layers in every two-layer probe.
        assert!(
            plan.iter()
                .all(|(_, k)| k.checkpointing == Checkpointing::Every(2))
        );
        for o in &space.optimizers {
            assert!(plan.iter().any(|(_, k)| k.optimizer == *o), "{o}");
        }
        for q in &space.quants {
            assert!(
                plan.iter()
                    .any(|(_, k)| k.method == Method::Qlora && k.quant == *q),
                "{q}"
            );
        }
        assert!(plan.iter().any(|(_, k)| k.lora.rank == 32));
        assert!(plan.iter().any(|(_, k)| k.accum > 1));
        // Five probes per class of (method, quantization, precision), three per other loss mode,
        // two per other rank, and two per other optimizer for each kind of trainable tensors and precision.
        let classes = space
            .methods
            .iter()
            .map(|&m| {
                if m == Method::Qlora {
                    space.quants.len()
                } else {
                    1
                }
            })
            .sum::<usize>()
            * space.precisions.len();
        let per_class = 5 + 3 * (space.losses.len() - 1) + 2 * usize::from(space.ranks.len() > 1);
        let optimizers = 2 * 2 * (space.optimizers.len() - 1) * space.precisions.len();
        assert!(
            plan.len() <= classes * per_class + optimizers,
            "{} probes",
            plan.len()
        );
        // The default policy (lora only) stays near two dozen probes.
        let default = SearchSpace::from_request(&PolicyRequest::default()).unwrap();
        let n = calibration_plan(&spec(), &default).len();
        assert!(n <= 25, "{n}");
    }

    #[test]
    fn large_vocabulary_matrices_get_short_sequences_but_two_layer_chunk_probes() {
        let qwen = crate::spec::catalog::get("Qwen/Qwen2.5-0.5B").unwrap();
        let default = SearchSpace::from_request(&PolicyRequest::default()).unwrap();
        let plan = calibration_plan(&qwen, &default);
        let chunk = chunk_probe(qwen.vocab_size);
        assert_eq!(chunk, (2, 87));
        let mut seqs: Vec<usize> = plan.iter().map(|(_, k)| k.seq).collect();
        seqs.sort();
        seqs.dedup();
        assert_eq!(seqs, vec![32, 64, 87, 128]);
        // The chunk probe keeps two layers: its layers are the fit's fourth shape.
        assert!(
            plan.iter()
                .filter(|(_, k)| (k.batch, k.seq) == chunk)
                .all(|(s, _)| s.num_hidden_layers == 2)
        );
        // A vocabulary below the threshold keeps the longer sequences.
        let smol = crate::spec::catalog::get("HuggingFaceTB/SmolLM2-135M").unwrap();
        let mut seqs: Vec<usize> = calibration_plan(&smol, &default)
            .iter()
            .map(|(_, k)| k.seq)
            .collect();
        seqs.sort();
        seqs.dedup();
        assert_eq!(seqs, vec![64, 128, chunk_probe(smol.vocab_size).1]);
    }

    #[test]
    fn large_layers_get_short_sequences() {
        let seven_b = ModelSpec {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 32,
            head_dim: 128,
            ..spec()
        };
        let default = SearchSpace::from_request(&PolicyRequest::default()).unwrap();
        let plan = calibration_plan(&seven_b, &default);
        // Only the chunked-loss saturation probes exceed 64 tokens, and they run one layer.
        let long: Vec<_> = plan.iter().filter(|(_, k)| k.seq > 64).collect();
        assert!(!long.is_empty());
        for (s, k) in long {
            assert_eq!((k.batch, k.seq), chunk_probe(32000));
            assert_eq!(s.num_hidden_layers, 1);
        }
    }

    #[test]
    fn fit_on_the_plan_predicts_held_out_larger_configs_within_one_percent() {
        let space = wide_space();
        let model = calibrate(
            &spec(),
            &space,
            &mut SyntheticProber::new(),
            None,
            &mut |_| {},
        )
        .unwrap();
        let mut holdout: Vec<ProbeResult> = holdout_plan(&spec(), &space, 12, 512, 4)
            .iter()
            .chain(holdout_plan(&spec(), &space, 6, 1024, 1).iter())
            .map(|(s, k)| SyntheticProber::truth(s, k))
            .collect();
        // Full fine-tunes at small scale peak in the optimizer step: judge that phase too.
        holdout.push(SyntheticProber::truth(
            &spec().with_layers(3),
            &Knobs {
                method: Method::Full,
                seq: 32,
                batch: 1,
                ..Knobs::default()
            },
        ));
        assert!(holdout.len() >= 30);
        let eval = evaluate(&model, &holdout);
        let worst = eval
            .rows
            .iter()
            .max_by(|a, b| a.peak_error.abs().total_cmp(&b.peak_error.abs()))
            .unwrap();
        assert!(eval.worst_peak_error < 0.01, "worst {worst:?}");
        let slow = eval
            .rows
            .iter()
            .max_by(|a, b| a.step_error.abs().total_cmp(&b.step_error.abs()))
            .unwrap();
        assert!(eval.worst_step_error < 0.01, "worst {slow:?}");
    }

    #[test]
    fn full_fine_tunes_that_peak_in_the_optimizer_step_still_predict_backward_at_scale() {
        // A large vocabulary makes the embedding's optimizer temporaries dwarf a probe's activations:
        // every full fine-tune probe peaks in the optimizer step, and only the timeline's backward
        // mark tells what forward/backward cost. Both ways of reporting marks must work.
        let spec = ModelSpec {
            vocab_size: 64_000,
            hidden_size: 512,
            ..spec()
        };
        let space = SearchSpace::from_request(&PolicyRequest {
            methods: Some(vec![Method::Full]),
            ..PolicyRequest::default()
        })
        .unwrap();
        for running in [false, true] {
            let mut prober = SyntheticProber {
                running_peaks: running,
                ..SyntheticProber::new()
            };
            let model = calibrate(&spec, &space, &mut prober, None, &mut |_| {}).unwrap();
            let compute: Vec<String> = model
                .fitted_on
                .iter()
                .filter(|p| Phase::of_probe(p) == Phase::Compute)
                .map(|p| probe_label(&p.spec, &p.knobs))
                .collect();
            assert!(compute.len() * 2 < model.fitted_on.len(), "{compute:?}");
            let holdout: Vec<ProbeResult> = holdout_plan(&spec, &space, 12, 1024, 8)
                .iter()
                .map(|(s, k)| SyntheticProber::truth(s, k))
                .collect();
            assert!(holdout.iter().all(|p| Phase::of_probe(p) == Phase::Compute));
            let eval = evaluate(&model, &holdout);
            assert!(
                eval.worst_peak_error < 0.01,
                "running={running}: {:?}",
                eval.rows
            );
        }
    }

    #[test]
    fn leave_one_out_judges_every_fitted_probe() {
        let space = SearchSpace::from_request(&PolicyRequest::default()).unwrap();
        let model = calibrate(
            &spec(),
            &space,
            &mut SyntheticProber::new(),
            None,
            &mut |_| {},
        )
        .unwrap();
        let eval = leave_one_out(&model).unwrap();
        assert_eq!(eval.rows.len(), model.fitted_on.len());
        assert!(eval.median_peak_error < 0.01, "{:?}", eval.rows);
    }

    #[test]
    fn cache_is_reused_and_extended_only_by_missing_probes() {
        let dir = tempfile::tempdir().unwrap();
        let narrow = SearchSpace::from_request(&PolicyRequest {
            precisions: Some(vec![Precision::Fp32]),
            ..PolicyRequest::default()
        })
        .unwrap();
        let mut prober = SyntheticProber::new();
        let first =
            calibrate(&spec(), &narrow, &mut prober, Some(dir.path()), &mut |_| {}).unwrap();
        let ran = prober.probes_run;
        assert_eq!(ran, calibration_plan(&spec(), &narrow).len());
        let mut events = Vec::new();
        let again = calibrate(&spec(), &narrow, &mut prober, Some(dir.path()), &mut |e| {
            events.push(e.clone())
        })
        .unwrap();
        assert_eq!(prober.probes_run, ran, "a cached calibration runs no probe");
        // (JSON may move a float by one ulp: compare what matters.)
        assert_eq!(again.fitted_on.len(), first.fitted_on.len());
        let probe = &first.fitted_on[0];
        let (a, b) = (
            first.predict(&probe.spec, &probe.knobs),
            again.predict(&probe.spec, &probe.knobs),
        );
        assert_eq!(a.peak_bytes, b.peak_bytes);
        assert!(events.last().unwrap().cached);
        // Allowing bf16 runs only the bf16 probes.
        let wider = SearchSpace::from_request(&PolicyRequest {
            precisions: Some(vec![Precision::Fp32, Precision::Bf16]),
            ..PolicyRequest::default()
        })
        .unwrap();
        calibrate(&spec(), &wider, &mut prober, Some(dir.path()), &mut |_| {}).unwrap();
        let new = prober.probes_run - ran;
        let bf16 = calibration_plan(&spec(), &wider)
            .iter()
            .filter(|(_, k)| k.precision == Precision::Bf16)
            .count();
        assert_eq!(new, bf16);
        // No temporary file is left beside the cache.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn failed_probes_are_recorded_and_the_rest_still_fit() {
        let space = SearchSpace::from_request(&PolicyRequest {
            precisions: Some(vec![Precision::Fp32]),
            ..PolicyRequest::default()
        })
        .unwrap();
        let plan = calibration_plan(&spec(), &space);
        let smallest = plan
            .iter()
            .map(|(s, k)| SyntheticProber::truth(s, k).peak_bytes)
            .min()
            .unwrap();
        let mut prober = SyntheticProber {
            fail_above_bytes: Some(smallest),
            ..SyntheticProber::new()
        };
        let model = calibrate(&spec(), &space, &mut prober, None, &mut |_| {}).unwrap();
        assert_eq!(model.fitted_on.len() + model.failed.len(), plan.len());
        assert!(
            model
                .failed
                .iter()
                .all(|f| f.error.contains("out of memory"))
        );
        let mut none_run = SyntheticProber {
            fail_above_bytes: Some(0),
            ..SyntheticProber::new()
        };
        let err = calibrate(&spec(), &space, &mut none_run, None, &mut |_| {}).unwrap_err();
        assert!(
            format!("{err:#}").contains("every calibration probe failed"),
            "{err:#}"
        );
    }

    /// A prober whose warm-up measures the plan's first probe, as the engine's does for a class's
    /// largest one-layer probe.
    struct WarmingProber {
        inner: SyntheticProber,
    }

    impl Prober for WarmingProber {
        fn probe(&mut self, spec: &ModelSpec, knobs: &Knobs) -> anyhow::Result<ProbeResult> {
            self.inner.probe(spec, knobs)
        }
        fn prepare(&mut self, plan: &[(ModelSpec, Knobs)]) -> anyhow::Result<Vec<ProbeResult>> {
            Ok(vec![SyntheticProber::truth(&plan[0].0, &plan[0].1)])
        }
        fn device(&self) -> String {
            self.inner.device()
        }
    }

    #[test]
    fn probes_measured_while_warming_up_are_not_run_again() {
        let space = SearchSpace::from_request(&PolicyRequest::default()).unwrap();
        let plan = calibration_plan(&spec(), &space);
        let mut prober = WarmingProber {
            inner: SyntheticProber::new(),
        };
        let mut first_done = None;
        let mut warm_ups = 0;
        let model = calibrate(&spec(), &space, &mut prober, None, &mut |p| {
            if p.warm_up {
                warm_ups += 1;
            } else {
                first_done.get_or_insert(p.done);
            }
        })
        .unwrap();
        assert_eq!(warm_ups, 1, "the warm-up is announced once");
        assert_eq!(prober.inner.probes_run, plan.len() - 1);
        assert_eq!(model.fitted_on.len(), plan.len());
        assert_eq!(
            first_done,
            Some(1),
            "progress counts the warm-up's probe as done"
        );
        let first = probe_label(&plan[0].0, &plan[0].1);
        assert!(
            model
                .fitted_on
                .iter()
                .any(|p| probe_label(&p.spec, &p.knobs) == first)
        );
    }
}
