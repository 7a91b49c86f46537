//! Activations measured by probes grow linearly with depth: what the cost model's per-layer
//! extrapolation stands on. Its own test binary: the counting allocator is process-global.

use candle_core::Device;
use memtune::config::{Knobs, Method};
use memtune::probe::meter::CpuMeter;
use memtune::probe::runner::{ProbeRequest, run_probe};
use memtune::spec::ModelSpec;

#[test]
fn activations_grow_linearly_with_depth() {
    let spec = ModelSpec {
        num_hidden_layers: 4,
        hidden_size: 128,
        intermediate_size: 256,
        head_dim: 32,
        ..ModelSpec::tiny()
    };
    let knobs = Knobs {
        method: Method::Lora,
        seq: 64,
        batch: 2,
        ..Knobs::default()
    };
    let acts: Vec<f64> = [1, 2, 4]
        .iter()
        .map(|&layers| {
            let req = ProbeRequest {
                spec: spec.with_layers(layers),
                knobs: knobs.clone(),
                warmup_steps: 1,
                steps: 1,
                device: Device::Cpu,
                seed: 0,
            };
            run_probe(&req, &CpuMeter::new())
                .unwrap()
                .components
                .activations as f64
        })
        .collect();
    let per_layer_12 = acts[1] - acts[0];
    let per_layer_24 = (acts[2] - acts[1]) / 2.0;
    assert!(per_layer_12 > 0.0, "{acts:?}");
    let rel = (per_layer_24 - per_layer_12).abs() / per_layer_12;
    assert!(
        rel < 0.02,
        "per-layer activations {per_layer_12} (1→2) vs {per_layer_24} (2→4): {acts:?}"
    );
}
