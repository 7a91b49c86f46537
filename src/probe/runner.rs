//! The probe runner: a few real training steps of the engine with the meter read at every phase
//! boundary, and the peak split into components.
//!
//! How the parts are measured (all as deltas of the meter above the bytes in use before the model
//! was built):
//! - `weights`: the growth while the model is built (exact on CPU: the tensors' own bytes).
//! - `optimizer`: the growth while the optimizer is built (its state is allocated up front).
//! - `runtime`: what stays resident between steps beyond those two after the warm-up step — rope
//!   and mask tables, ggml's repacked blocks, matmul workspaces; on CUDA also the context and
//!   library workspaces the meter reports.
//! - `gradients`: the gradient store held at the peak: the accumulated store of earlier micro-batches
//!   and, when the peak falls in or after backward, the current micro-batch's gradients (measured
//!   at the end of backward).
//! - `activations`: the tensors the layers saved for backward, measured at the end of the last
//!   layer's forward. When the peak falls inside backward some of them are already freed; the part
//!   not live at the peak is taken off (so the parts never exceed the measured peak).
//! - `transient`: the rest of the measured peak: logits and the loss, attention scores, the
//!   recomputation under checkpointing, matmul temporaries.

use super::meter::MemoryMeter;
use super::{Components, ProbeResult, TimelineRow};
use crate::config::{Knobs, LossMode};
use crate::data::random_batch;
use crate::engine::Model;
use crate::engine::step::{Batch, Engine, StepObserver};
use crate::spec::ModelSpec;
use anyhow::{Context, Result};
use candle_core::Device;
use std::time::Instant;

/// One probe to run.
#[derive(Debug, Clone)]
pub struct ProbeRequest {
    /// The model at the depth to probe.
    pub spec: ModelSpec,
    pub knobs: Knobs,
    /// Untimed steps first (lazy initialisation, first-touch costs).
    pub warmup_steps: usize,
    /// Timed and measured steps (at least 1).
    pub steps: usize,
    pub device: Device,
    pub seed: u64,
}

struct Mark {
    t_s: f64,
    phase: &'static str,
    layer: Option<usize>,
    micro_batch: usize,
    current: u64,
    /// Running peak since the step started.
    peak: u64,
    /// Peak since the previous mark.
    segment_peak: u64,
}

/// Records a mark per phase boundary. Its buffer is allocated before the step so that recording
/// never allocates (the CPU meter would count it).
struct Recorder<'a> {
    meter: &'a dyn MemoryMeter,
    started: Instant,
    marks: Vec<Mark>,
    /// Highest memory since the step started (kept even if `marks` were to run out of room).
    running_peak: u64,
}

impl StepObserver for Recorder<'_> {
    /// Reads the meter and starts a new peak window, so that each mark carries the peak of the work
    /// since the previous one (the cost model fits those per-segment peaks) as well as the running
    /// peak.
    fn mark(&mut self, phase: &'static str, layer: Option<usize>, micro_batch: usize) {
        let current = self.meter.current_bytes();
        let segment_peak = self.meter.peak_bytes().max(current);
        self.meter.reset_peak();
        self.running_peak = self.running_peak.max(segment_peak);
        let peak = self.running_peak;
        if self.marks.len() < self.marks.capacity() {
            self.marks.push(Mark {
                t_s: self.started.elapsed().as_secs_f64(),
                phase,
                layer,
                micro_batch,
                current,
                peak,
                segment_peak,
            });
        }
    }
}

/// The optimisation settings a probe trains with: the defaults (clipping at 1.0, as `train`
/// does) at a learning rate small enough not to disturb the weights.
pub fn probe_hyper() -> crate::config::Hyper {
    crate::config::Hyper {
        lr: 1e-5,
        ..Default::default()
    }
}

/// Runs `req`, reading `meter`, with [`probe_hyper`]'s settings.
pub fn run_probe(req: &ProbeRequest, meter: &dyn MemoryMeter) -> Result<ProbeResult> {
    run_probe_with(req, probe_hyper(), meter)
}

/// Runs `req`, reading `meter`, with the optimisation settings `hyper` (their learning rate is
/// ignored: probes step at 1e-5).
pub fn run_probe_with(
    req: &ProbeRequest,
    hyper: crate::config::Hyper,
    meter: &dyn MemoryMeter,
) -> Result<ProbeResult> {
    let knobs = &req.knobs;
    let steps = req.steps.max(1);
    // Data first, so that its bytes are part of the baseline.
    let batches: Vec<Vec<Batch>> = (0..req.warmup_steps + steps)
        .map(|s| {
            (0..knobs.accum)
                .map(|m| {
                    random_batch(
                        knobs.batch,
                        knobs.seq,
                        req.spec.vocab_size,
                        req.seed + (s * 1000 + m) as u64,
                        &req.device,
                    )
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<_>>()?;
    let baseline = meter.current_bytes();

    let model = Model::build(
        &req.spec,
        knobs,
        &req.device,
        &mut ProbeInit::new(req.seed),
        req.seed,
    )
    .context("building the model for the probe")?;
    let after_weights = meter.current_bytes();
    let hyper = crate::config::Hyper {
        lr: probe_hyper().lr,
        ..hyper
    };
    let mut engine = Engine::new(model, hyper).context("building the optimizer for the probe")?;
    let after_optimizer = meter.current_bytes();

    if req.warmup_steps == 0 {
        // Without a warm-up step, one short forward makes what the weights build lazily on their
        // first use (a quantized weight's kernels keep some per weight).
        let ids = random_batch(1, 8, req.spec.vocab_size, req.seed, &req.device)?;
        engine
            .model
            .logits(&ids.ids)
            .context("priming the model for the probe")?;
    }
    engine
        .model
        .prepare(knobs.seq)
        .context("building the RoPE tables for the probe")?;
    for micro in &batches[..req.warmup_steps] {
        engine.train_step(micro, 1e-5, &mut crate::engine::NoObserver)?;
    }
    let resting = meter.current_bytes();

    let per_step_marks = 8 + knobs.accum * (4 * req.spec.num_hidden_layers + 8);
    let mut recorder = Recorder {
        meter,
        started: Instant::now(),
        marks: Vec::with_capacity(per_step_marks),
        running_peak: 0,
    };
    let mut step_times = Vec::with_capacity(steps);
    let mut peak = 0u64;
    let mut last_marks = Vec::new();
    for micro in &batches[req.warmup_steps..] {
        recorder.marks.clear();
        recorder.running_peak = 0;
        meter.reset_peak();
        let t = Instant::now();
        recorder.mark("step_start", None, 0);
        engine.train_step(micro, 1e-5, &mut recorder)?;
        step_times.push(t.elapsed().as_secs_f64());
        peak = peak.max(recorder.running_peak).max(meter.peak_bytes());
        last_marks = std::mem::take(&mut recorder.marks);
        recorder.marks = Vec::with_capacity(per_step_marks);
    }
    if meter.waits_for_device() {
        // The marks waited for the device (each reading does), which keeps a GPU's queue from
        // running ahead of the host: the step time is that of as many steps again without marks,
        // timed to the end of their work.
        step_times.clear();
        for micro in &batches[req.warmup_steps..] {
            let t = Instant::now();
            engine.train_step(micro, 1e-5, &mut crate::engine::NoObserver)?;
            meter.current_bytes();
            step_times.push(t.elapsed().as_secs_f64());
        }
    }
    step_times.sort_by(f64::total_cmp);
    let step_s = step_times[step_times.len() / 2];

    let above = |bytes: u64| bytes.saturating_sub(baseline);
    // What the device holds besides the bytes the meter reads (a CUDA context, loaded kernels,
    // library workspaces; nothing on the CPU) is part of the peak, and of every moment of the
    // timeline, where the cost model finds it as part of what a step starts with.
    let device_runtime = meter.runtime_bytes();
    let peak_bytes = above(peak) + device_runtime;
    let weights = after_weights.saturating_sub(baseline);
    let optimizer = after_optimizer.saturating_sub(after_weights);
    let runtime = resting.saturating_sub(after_optimizer) + device_runtime;
    let components = attribute(
        &last_marks,
        resting,
        [weights, optimizer, runtime],
        peak_bytes,
        req.spec.num_hidden_layers,
    );

    let timeline = last_marks
        .iter()
        .map(|m| TimelineRow {
            t_s: m.t_s,
            phase: m.phase.to_string(),
            layer: m.layer,
            micro_batch: m.micro_batch,
            current_bytes: above(m.current) + device_runtime,
            peak_bytes: above(m.peak) + device_runtime,
            segment_peak_bytes: above(m.segment_peak) + device_runtime,
        })
        .collect();
    let tokens = knobs.batch * knobs.seq * knobs.accum;
    Ok(ProbeResult {
        spec: req.spec.clone(),
        knobs: knobs.clone(),
        device: meter.device_name(),
        peak_bytes,
        components,
        step_s,
        tokens_per_s: tokens as f64 / step_s.max(1e-12),
        timeline,
    })
}

/// Splits the peak; `fixed` = [weights, optimizer, runtime] as measured outside the step.
fn attribute(
    marks: &[Mark],
    resting: u64,
    fixed: [u64; 3],
    peak_bytes: u64,
    layers: usize,
) -> Components {
    let [weights, optimizer, runtime] = fixed;
    let held = |m: &Mark| m.current.saturating_sub(resting);
    // The micro-batch and phase in which the peak was reached: the first mark whose running peak
    // equals the step's peak closes the interval that contains it.
    let step_peak = marks.iter().map(|m| m.peak).max().unwrap_or(0);
    let peak_mark = marks.iter().position(|m| m.peak == step_peak).unwrap_or(0);
    let peak_micro = marks.get(peak_mark).map_or(0, |m| m.micro_batch);
    let in_backward = marks.get(peak_mark).is_some_and(|m| {
        matches!(
            m.phase,
            "backward" | "recompute" | "micro_batch_done" | "clip" | "optimizer_step"
        )
    });

    let micro_marks = |micro: usize| marks.iter().filter(move |m| m.micro_batch == micro);
    // Gradient store carried from earlier micro-batches: held at the start of this micro-batch.
    let carried = if peak_micro == 0 {
        0
    } else {
        micro_marks(peak_micro - 1)
            .filter(|m| m.phase == "micro_batch_done")
            .map(held)
            .next_back()
            .unwrap_or(0)
    };
    // This micro-batch's own gradients: held at its end, minus what was carried in. Measured on the
    // first micro-batch (nothing carried), where the end-of-backward store is exactly its gradients.
    let own_grads = micro_marks(0)
        .filter(|m| m.phase == "micro_batch_done")
        .map(held)
        .next_back()
        .unwrap_or(0);
    let gradients = carried + if in_backward { own_grads } else { 0 };
    // Saved activations: held after the last layer's forward, less the carried store.
    let last_forward = micro_marks(peak_micro)
        .filter(|m| m.phase == "forward" && m.layer == Some(layers.saturating_sub(1)))
        .map(held)
        .next_back()
        .unwrap_or(0);
    let mut activations = last_forward.saturating_sub(carried);
    let fixed = weights + optimizer + runtime + gradients;
    let mut transient = peak_bytes.saturating_sub(fixed + activations);
    if fixed + activations > peak_bytes {
        activations = peak_bytes.saturating_sub(fixed);
        transient = 0;
    }
    Components {
        weights,
        gradients,
        optimizer,
        activations,
        transient,
        runtime,
    }
}

/// Fast deterministic initial values for probes: memory and step time do not depend on weight values,
/// so a probe fills weights with a cheap uniform(−0.03, 0.03) sequence (norms with ones) rather than
/// the trainer's normal draws, which dominate probe time for large embeddings.
///
/// One block of [`PROBE_INIT_BLOCK`] draws is made once, in f32, bf16 and f16, and every weight is
/// copies of it, each tensor starting where the last one stopped. The block's length is a prime, so
/// no row of a matrix lines up with it. A 2-layer Qwen2.5-0.5B probe holds 166M values: drawing and
/// converting each one took 0.4–0.8 s of every probe; copying takes a memcpy.
pub struct ProbeInit {
    f32: Vec<f32>,
    bf16: Vec<half::bf16>,
    f16: Vec<half::f16>,
    /// Where the next tensor starts in the block.
    offset: usize,
}

/// Draws in [`ProbeInit`]'s block: the largest prime below 2¹⁶.
pub const PROBE_INIT_BLOCK: usize = 65_521;

impl ProbeInit {
    pub fn new(seed: u64) -> Self {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let f32: Vec<f32> = (0..PROBE_INIT_BLOCK)
            .map(|_| {
                // xorshift64*
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let bits = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
                (bits as f32 / (1u64 << 24) as f32 - 0.5) * 0.06
            })
            .collect();
        Self {
            bf16: f32.iter().map(|&v| half::bf16::from_f32(v)).collect(),
            f16: f32.iter().map(|&v| half::f16::from_f32(v)).collect(),
            f32,
            offset: 0,
        }
    }

    /// `n` values from the block, starting at the offset, which then moves on by `n`.
    fn fill<T: Copy>(block: &[T], offset: &mut usize, n: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(n);
        let mut at = *offset;
        while out.len() < n {
            let take = (n - out.len()).min(block.len() - at);
            out.extend_from_slice(&block[at..at + take]);
            at = (at + take) % block.len();
        }
        *offset = at;
        out
    }
}

impl crate::engine::WeightSource for ProbeInit {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> candle_core::Result<candle_core::Tensor> {
        self.tensor_as(name, shape, candle_core::DType::F32)
    }

    fn tensor_as(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: candle_core::DType,
    ) -> candle_core::Result<candle_core::Tensor> {
        use candle_core::{DType, Tensor};
        if name.ends_with("norm.weight") {
            return Tensor::ones(shape, dtype, &Device::Cpu);
        }
        let n: usize = shape.iter().product();
        match dtype {
            DType::BF16 => Tensor::from_vec(
                Self::fill(&self.bf16, &mut self.offset, n),
                shape,
                &Device::Cpu,
            ),
            DType::F16 => Tensor::from_vec(
                Self::fill(&self.f16, &mut self.offset, n),
                shape,
                &Device::Cpu,
            ),
            // f32 itself (to_dtype to the same dtype is free), or converted from it.
            _ => Tensor::from_vec(
                Self::fill(&self.f32, &mut self.offset, n),
                shape,
                &Device::Cpu,
            )?
            .to_dtype(dtype),
        }
    }
}

/// The cost model's prober: real engine steps measured by `meter` on `device`.
pub struct EngineProber<'a> {
    pub device: Device,
    pub meter: &'a dyn MemoryMeter,
    pub warmup_steps: usize,
    pub steps: usize,
    pub seed: u64,
}

impl EngineProber<'_> {
    /// One probe of `spec` with `knobs` on this prober's device, meter and seed.
    fn run(
        &self,
        spec: ModelSpec,
        knobs: Knobs,
        warmup_steps: usize,
        steps: usize,
    ) -> Result<ProbeResult> {
        let req = ProbeRequest {
            spec,
            knobs,
            warmup_steps,
            steps,
            device: self.device.clone(),
            seed: self.seed,
        };
        run_probe(&req, self.meter)
    }
}

impl crate::cost::Prober for EngineProber<'_> {
    fn probe(&mut self, spec: &ModelSpec, knobs: &Knobs) -> Result<ProbeResult> {
        self.run(spec.clone(), knobs.clone(), self.warmup_steps, self.steps)
    }

    /// Without warm-up steps of its own, a probe's first step must find the runtime's lasting
    /// allocations made: the matmul kernels keep per-thread scratch that grows with the largest
    /// product they have seen (fp16's by some 100 KiB per layer shape). So for each method,
    /// quantization and precision one step runs first, unmeasured, at one layer and the plan's most
    /// tokens (the full loss first among equals: its logits are the largest product); each other
    /// loss mode of the same triple then runs one short step for what it keeps of its own.
    ///
    /// When that largest probe of the plan is itself at one layer without accumulation (Qwen's
    /// full-loss probe, a 7B model's chunk probe), its warm-up step is followed by its measured
    /// step on the same model, and the result is returned: the plan does not run it again.
    fn prepare(&mut self, plan: &[(ModelSpec, Knobs)]) -> Result<Vec<ProbeResult>> {
        if self.warmup_steps > 0 {
            return Ok(Vec::new());
        }
        let triple = |k: &Knobs| (k.method, k.quant, k.precision);
        let size = |k: &Knobs| (k.batch * k.seq, k.loss == LossMode::Full);
        let mut largest: Vec<(ModelSpec, Knobs)> = Vec::new();
        let mut short: Vec<(ModelSpec, Knobs)> = Vec::new();
        for (spec, knobs) in plan {
            match largest.iter_mut().find(|(_, k)| triple(k) == triple(knobs)) {
                Some(entry) if size(&entry.1) >= size(knobs) => {}
                Some(entry) => *entry = (spec.clone(), knobs.clone()),
                None => largest.push((spec.clone(), knobs.clone())),
            }
        }
        for (spec, knobs) in plan {
            let covered = |k: &Knobs| triple(k) == triple(knobs) && k.loss == knobs.loss;
            if !largest.iter().chain(&short).any(|(_, k)| covered(k)) {
                let seq = knobs.seq.min(16);
                short.push((
                    spec.with_layers(1),
                    Knobs {
                        batch: 1,
                        seq,
                        ..knobs.clone()
                    },
                ));
            }
        }
        let mut measured = Vec::new();
        let mut unmeasured = Vec::new();
        for (spec, knobs) in largest {
            if spec.num_hidden_layers == 1 && knobs.accum == 1 {
                measured.push(self.run(spec, knobs, 1, self.steps)?);
            } else {
                unmeasured.push((spec.with_layers(1), knobs));
            }
        }
        for (spec, knobs) in unmeasured.into_iter().chain(short) {
            self.run(spec, Knobs { accum: 1, ..knobs }, 0, 1)?;
        }
        Ok(measured)
    }

    fn device(&self) -> String {
        self.meter.device_name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::WeightSource;
    use candle_core::DType;

    #[test]
    fn probe_init_copies_one_block_in_every_dtype() {
        let mut a = ProbeInit::new(7);
        // Longer than the block, so the copy wraps around.
        let n = PROBE_INIT_BLOCK + 1000;
        let first = a.tensor("w1", &[n]).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(first[PROBE_INIT_BLOCK..], first[..1000]);
        assert!(first.iter().all(|v| v.abs() <= 0.03));
        // The next tensor goes on where the first stopped.
        let second = a.tensor("w2", &[3]).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(second, first[1000..1003]);

        // Another dtype: the same draws, rounded.
        let mut b = ProbeInit::new(7);
        let bf = b.tensor_as("w1", &[5], DType::BF16).unwrap();
        assert_eq!(bf.dtype(), DType::BF16);
        let hf = b.tensor_as("w2", &[5], DType::F16).unwrap();
        for (i, v) in bf.to_vec1::<half::bf16>().unwrap().iter().enumerate() {
            assert_eq!(*v, half::bf16::from_f32(first[i]));
        }
        for (i, v) in hf.to_vec1::<half::f16>().unwrap().iter().enumerate() {
            assert_eq!(*v, half::f16::from_f32(first[5 + i]));
        }

        let norm = b.tensor_as("model.norm.weight", &[4], DType::BF16).unwrap();
        assert_eq!(
            norm.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
            vec![1.0; 4]
        );
        // Another seed, other draws.
        let other = ProbeInit::new(8)
            .tensor("w1", &[4])
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_ne!(other, first[..4]);
    }
}
