//! The engine on a CUDA GPU computes what it computes on the CPU: the same loss and gradients for
//! the same weights and batch, with every knob whose code differs by device (the frozen head's
//! loss in vocabulary blocks on candle's ops, the trained head's chunked loss, checkpointing, the
//! quantized base, low precision), and the same losses over a few optimizer steps with each
//! optimizer.
//! The CPU runs its fused kernels, the GPU candle's ops: each checks the other. The same ops taken
//! on the CPU (`memtune::engine::set_gpu_paths_on_cpu`, what `--target-gpu`'s probes run) are
//! checked against the CPU's kernels on every machine.
//!
//! The GPU tests need an NVIDIA GPU and the `cuda` feature; elsewhere they skip, saying so. They
//! run on a card through `scripts/gpu-check.sh`.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device};
use memtune::config::{
    Checkpointing, Hyper, Knobs, LossMode, Method, OptimizerKind, Precision, Quant,
};
use memtune::data::{BadLinePolicy, random_batch};
use memtune::engine::model::{Model, RandomInit};
use memtune::engine::step::{Batch, NoObserver, forward_backward};
use memtune::spec::ModelSpec;
use memtune::train::{RunOptions, TrainRequest, run};

/// The GPU, or why these tests skip.
fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(device) => Some(device),
        Err(e) => {
            println!("skipped: needs an NVIDIA GPU and the cuda feature ({e})");
            None
        }
    }
}

/// Three layers (every:2 mixes recomputed and kept ones) and a vocabulary of 40,000: at 32 rows
/// a frozen head's loss takes it in two blocks (32,768 columns, then the rest), so the online
/// softmax's rescale runs on the GPU too.
fn spec() -> ModelSpec {
    ModelSpec {
        num_hidden_layers: 3,
        vocab_size: 40_000,
        ..ModelSpec::tiny()
    }
}

/// A step's loss and every trainable parameter's gradient (by name, as f64).
type StepResult = (f64, Vec<(String, Vec<f64>)>);

/// Loss and gradients of one micro-batch of 2 × 16 tokens, the model and batch built on `device`
/// from the same seeds. LoRA's B starts at zero; it gets a value so A's gradient is not zero.
fn step(spec: &ModelSpec, knobs: &Knobs, device: &Device) -> StepResult {
    let model = Model::build(spec, knobs, device, &mut RandomInit::new(7), 7).unwrap();
    for layer in &model.layers {
        for lin in layer.linears() {
            if let Some(lora) = &lin.lora {
                let b = lora.b.as_tensor().ones_like().unwrap();
                lora.b.set(&b.affine(0.01, 0.0).unwrap()).unwrap();
            }
        }
    }
    let batch: Batch = random_batch(knobs.batch, knobs.seq, spec.vocab_size, 3, device).unwrap();
    let (loss, grads): (f64, GradStore) = forward_backward(
        &model,
        &batch,
        batch.counted_tokens as f64,
        1.0,
        &mut NoObserver,
        0,
    )
    .unwrap();
    let grads = model
        .trainable()
        .into_iter()
        .map(|p| {
            let g = grads
                .get(p.var.as_tensor())
                .unwrap_or_else(|| panic!("{} has no gradient on {device:?}", p.name));
            let v = g
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (p.name.clone(), v)
        })
        .collect();
    (loss, grads)
}

/// Compares a step of every case (the CPU's kernels) with `other` (the same case computed another
/// way, named `where_`), printing each case's figures before failing on any.
fn compare_steps(where_: &str, other: &dyn Fn(&ModelSpec, &Knobs) -> StepResult) {
    let spec = spec();
    let cases = [
        // (method, precision, checkpointing, loss, tolerance relative to the largest gradient)
        (
            Method::Lora,
            Precision::Fp32,
            Checkpointing::None,
            LossMode::Chunked,
            1e-4,
        ),
        (
            Method::Lora,
            Precision::Bf16,
            Checkpointing::Every(2),
            LossMode::Chunked,
            6e-2,
        ),
        (
            Method::Lora,
            Precision::Fp32,
            Checkpointing::Full,
            LossMode::Full,
            1e-4,
        ),
        (
            Method::Full,
            Precision::Fp32,
            Checkpointing::None,
            LossMode::Chunked,
            1e-4,
        ),
        (
            Method::Full,
            Precision::Bf16Pure,
            Checkpointing::Full,
            LossMode::Chunked,
            6e-2,
        ),
        (
            Method::Qlora,
            Precision::Bf16,
            Checkpointing::None,
            LossMode::Chunked,
            6e-2,
        ),
        (
            Method::Lora,
            Precision::Fp16,
            Checkpointing::None,
            LossMode::Chunked,
            6e-2,
        ),
    ];
    let mut failures = Vec::new();
    for (method, precision, checkpointing, loss, tolerance) in cases {
        let knobs = Knobs {
            method,
            precision,
            checkpointing,
            loss,
            quant: Quant::Q4,
            batch: 2,
            seq: 16,
            ..Knobs::default()
        };
        let what = format!("{method} {precision} checkpointing {checkpointing} loss {loss}");
        let (cpu_loss, cpu) = step(&spec, &knobs, &Device::Cpu);
        let (other_loss, on_other) = other(&spec, &knobs);
        let loss_tolerance = if precision == Precision::Fp32 {
            1e-5
        } else {
            1e-2
        };
        // Written so that a NaN fails: every comparison with one is false.
        let close = (other_loss - cpu_loss).abs() <= loss_tolerance * cpu_loss.abs();
        if !close {
            failures.push(format!(
                "{what}: loss {other_loss} {where_}, {cpu_loss} on the CPU's kernels"
            ));
        }
        assert_eq!(cpu.len(), on_other.len(), "{what}: trainable parameters");
        let mut worst = (0.0f64, String::new());
        for ((name, c), (other_name, g)) in cpu.iter().zip(&on_other) {
            assert_eq!(name, other_name);
            let largest = c.iter().fold(0f64, |m, v| m.max(v.abs()));
            assert!(
                largest > 0.0,
                "{what}: {name} has a zero gradient on the CPU"
            );
            // A NaN anywhere makes the difference NaN (f64::max would skip it).
            let diff = c
                .iter()
                .zip(g)
                .map(|(a, b)| (a - b).abs())
                .fold(0f64, |m, d| {
                    if d.is_nan() || m.is_nan() {
                        f64::NAN
                    } else {
                        m.max(d)
                    }
                });
            let relative = if diff.is_nan() {
                f64::INFINITY
            } else {
                diff / largest
            };
            if relative > worst.0 {
                worst = (relative, name.clone());
            }
        }
        println!(
            "{what}: loss {cpu_loss:.6} (CPU's kernels) {other_loss:.6} ({where_}); worst \
             gradient {:.2e} of its largest ({})",
            worst.0, worst.1
        );
        if worst.0 > tolerance {
            failures.push(format!(
                "{what}: {} differs by {:.2e} of its largest gradient (limit {tolerance:.0e})",
                worst.1, worst.0
            ));
        }
    }
    // Every case runs and prints before the verdict, so one card run shows them all.
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn a_step_on_the_gpu_gives_the_cpus_loss_and_gradients() {
    let Some(gpu) = gpu() else { return };
    compare_steps("on the GPU", &|spec, knobs| step(spec, knobs, &gpu));
}

/// The GPU's code paths taken on the CPU (what `--target-gpu`'s probes measure) compute what the
/// CPU's kernels do: the same cases, on every machine. The switch is process-wide, so this test
/// turns it off again before it returns; the GPU tests, which read the CPU's kernels, run after it
/// on a card (`--test-threads 1`) and skip elsewhere.
#[test]
fn the_gpus_code_paths_on_the_cpu_give_the_cpu_kernels_loss_and_gradients() {
    compare_steps("on the GPU's code paths, on the CPU", &|spec, knobs| {
        memtune::engine::set_gpu_paths_on_cpu(true);
        let got = step(spec, knobs, &Device::Cpu);
        memtune::engine::set_gpu_paths_on_cpu(false);
        got
    });
}

#[test]
fn training_on_the_gpu_follows_the_cpus_losses_with_every_optimizer() {
    let Some(gpu) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.txt");
    let text: String = (0..30)
        .map(|i| format!("Counting sheep: {i}, {}, {}.\n\n", i + 1, i + 2))
        .collect();
    std::fs::write(&data, text).unwrap();
    let mut failures = Vec::new();
    for optimizer in [
        OptimizerKind::Adamw,
        OptimizerKind::Adamw8bit,
        OptimizerKind::Adafactor,
        OptimizerKind::Sgd,
    ] {
        for update_in_backward in [false, true] {
            let losses = |device: &Device| {
                let req = TrainRequest {
                    model: "tiny".into(),
                    options: RunOptions::default(),
                    spec: ModelSpec::tiny(),
                    knobs: Knobs {
                        method: Method::Full,
                        precision: Precision::Fp32,
                        optimizer,
                        seq: 32,
                        batch: 2,
                        ..Knobs::default()
                    },
                    hyper: Hyper {
                        lr: 3e-3,
                        update_in_backward,
                        // Clipping by the global norm needs every gradient before an update.
                        clip: if update_in_backward { 0.0 } else { 1.0 },
                        ..Hyper::default()
                    },
                    data: data.clone(),
                    steps: 5,
                    seed: 1,
                    device: device.clone(),
                    output: None,
                    eval_fraction: 0.0,
                    bad_lines: BadLinePolicy::Fail,
                };
                let mut losses = Vec::new();
                run(&req, &mut |r| losses.push(r.loss)).unwrap();
                losses
            };
            let (cpu, on_gpu) = (losses(&Device::Cpu), losses(&gpu));
            println!(
                "{optimizer} update in backward {update_in_backward}: CPU {cpu:?}, GPU {on_gpu:?}"
            );
            assert_eq!((cpu.len(), on_gpu.len()), (5, 5));
            for (step, (c, g)) in cpu.iter().zip(&on_gpu).enumerate() {
                let close = (c - g).abs() <= 1e-3 * c.abs();
                if !close {
                    failures.push(format!(
                        "{optimizer} update in backward {update_in_backward}, step {}: loss {g} \
                         on the GPU, {c} on the CPU",
                        step + 1
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
