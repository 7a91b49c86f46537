//! What `Hyper::update_in_backward` is for, measured: a full fine-tune's step holds one layer's
//! gradients at a time instead of every layer's, so its exact allocator peak falls by at least
//! all but two layers' gradients. One test in its own binary: the counting allocator is
//! process-global.

use candle_core::Device;
use memtune::config::{Hyper, Knobs, Method};
use memtune::engine::model::{Model, RandomInit};
use memtune::probe::meter::CpuMeter;
use memtune::probe::runner::{ProbeRequest, probe_hyper, run_probe_with};
use memtune::spec::ModelSpec;

#[test]
fn a_full_fine_tune_updating_in_backward_peaks_lower_by_the_layers_gradients() {
    let spec = ModelSpec {
        hidden_size: 128,
        intermediate_size: 256,
        num_attention_heads: 4,
        num_key_value_heads: 4,
        head_dim: 32,
        num_hidden_layers: 5,
        ..ModelSpec::tiny()
    };
    let knobs = Knobs {
        method: Method::Full,
        batch: 1,
        seq: 8,
        ..Knobs::default()
    };
    // One layer's gradients: its parameters' bytes (fp32 gradients of fp32 weights).
    let layer_bytes: u64 = {
        let model = Model::build(&spec, &knobs, &Device::Cpu, &mut RandomInit::new(0), 0).unwrap();
        model
            .trainable()
            .iter()
            .filter(|p| p.name.contains("layers.0."))
            .map(|p| 4 * p.var.elem_count() as u64)
            .sum()
    };
    let req = ProbeRequest {
        spec: spec.clone(),
        knobs: knobs.clone(),
        warmup_steps: 1,
        steps: 1,
        device: Device::Cpu,
        seed: 0,
    };
    let at_end = Hyper {
        clip: 0.0,
        ..probe_hyper()
    };
    let in_backward = Hyper {
        update_in_backward: true,
        ..at_end.clone()
    };
    let peak_at_end = run_probe_with(&req, at_end, &CpuMeter::new())
        .unwrap()
        .peak_bytes;
    let peak_in_backward = run_probe_with(&req, in_backward, &CpuMeter::new())
        .unwrap()
        .peak_bytes;
    let layers = spec.num_hidden_layers as u64;
    assert!(
        peak_in_backward + (layers - 2) * layer_bytes <= peak_at_end,
        "peak {peak_in_backward} B updating in backward, {peak_at_end} B at the end; one layer's \
         gradients are {layer_bytes} B"
    );
}
