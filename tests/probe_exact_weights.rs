//! Probes are the ground truth, so their exact parts must be exact: on CPU the `weights` and
//! `optimizer` components equal the arithmetic of the tensors they hold (up to candle's small
//! per-tensor bookkeeping), and the parts explain the measured peak. One test in its own binary: the counting allocator is process-global.

use candle_core::Device;
use memtune::config::{Knobs, Method, OptimizerKind, Precision, Quant};
use memtune::cost::exact;
use memtune::probe::meter::CpuMeter;
use memtune::probe::runner::{ProbeRequest, run_probe};
use memtune::spec::{ModelSpec, catalog};

/// candle's bookkeeping per tensor (the `Tensor_` struct, its shape and layout vectors, the `Arc`
/// and lock around the storage), measured at 256 bytes; allow a little more per tensor.
const PER_TENSOR_SLACK: u64 = 1024;

fn probe(spec: &ModelSpec, knobs: &Knobs, warmup_steps: usize) -> memtune::probe::ProbeResult {
    let req = ProbeRequest {
        spec: spec.clone(),
        knobs: knobs.clone(),
        warmup_steps,
        steps: 1,
        device: Device::Cpu,
        seed: 0,
    };
    run_probe(&req, &CpuMeter::new()).unwrap()
}

fn tensors(spec: &ModelSpec, knobs: &Knobs) -> u64 {
    // Base tensors (embedding, per layer 2 norms + 7 matrices (+3 biases), final norm, head) plus
    // two per adapter.
    let per_layer = 9 + if spec.attention_bias { 3 } else { 0 };
    let head = if spec.tie_word_embeddings { 0 } else { 1 };
    let adapters = if knobs.method == Method::Full {
        0
    } else {
        2 * knobs.lora.targets.len() as u64
    };
    2 + head + spec.num_hidden_layers as u64 * (per_layer + adapters)
}

fn assert_close(what: &str, measured: u64, exact: u64, slack: u64) {
    assert!(
        measured >= exact && measured - exact <= slack,
        "{what}: measured {measured} vs exact {exact} (allowed bookkeeping {slack})"
    );
}

#[test]
fn weights_and_optimizer_state_are_exact_for_catalog_models_at_reduced_depth() {
    let smol = catalog::get("HuggingFaceTB/SmolLM2-135M")
        .unwrap()
        .with_layers(1);
    let qwen = catalog::get("Qwen/Qwen2.5-0.5B").unwrap().with_layers(1);
    let cases = [
        (
            smol.clone(),
            Knobs {
                method: Method::Full,
                optimizer: OptimizerKind::Adamw,
                ..Knobs::default()
            },
        ),
        (
            smol.clone(),
            Knobs {
                method: Method::Full,
                optimizer: OptimizerKind::Adamw8bit,
                precision: Precision::Bf16,
                ..Knobs::default()
            },
        ),
        (
            smol.clone(),
            Knobs {
                method: Method::Full,
                optimizer: OptimizerKind::Adafactor,
                ..Knobs::default()
            },
        ),
        (
            smol.clone(),
            Knobs {
                method: Method::Full,
                optimizer: OptimizerKind::Sgd,
                precision: Precision::Bf16Pure,
                ..Knobs::default()
            },
        ),
        (
            smol.clone(),
            Knobs {
                method: Method::Lora,
                precision: Precision::Bf16,
                ..Knobs::default()
            },
        ),
        (
            smol.clone(),
            Knobs {
                method: Method::Qlora,
                quant: Quant::Q4,
                ..Knobs::default()
            },
        ),
        (
            qwen.clone(),
            Knobs {
                method: Method::Qlora,
                quant: Quant::Q8,
                ..Knobs::default()
            },
        ),
    ];
    for (spec, base) in cases {
        let knobs = Knobs {
            seq: 8,
            batch: 1,
            ..base
        };
        let p = probe(&spec, &knobs, 0);
        let label = format!(
            "{} {} {} {} {}",
            spec.name, knobs.method, knobs.precision, knobs.optimizer, knobs.quant
        );
        let slack = tensors(&spec, &knobs) * PER_TENSOR_SLACK;
        assert_close(
            &format!("{label}: weights"),
            p.components.weights,
            exact::weight_bytes(&spec, &knobs),
            slack,
        );
        // Optimizer state: one or more tensors per trainable parameter, plus the optimizer's own
        // vectors.
        assert_close(
            &format!("{label}: optimizer"),
            p.components.optimizer,
            exact::optimizer_bytes(&spec, &knobs),
            4 * slack + 64 * 1024,
        );
        assert_eq!(
            p.components.total(),
            p.peak_bytes,
            "{label}: parts explain the peak"
        );
    }
}
