//! The probe runner above a fake meter: the attribution arithmetic and the CSV export, with no
//! dependence on the real allocator.

use candle_core::Device;
use memtune::config::Knobs;
use memtune::probe::meter::FakeMeter;
use memtune::probe::runner::{ProbeRequest, run_probe};
use memtune::probe::{Components, ProbeResult};
use memtune::report::profile_csv::{PROFILE_HEADER, profile_rows, render_profile};
use memtune::spec::ModelSpec;

#[test]
fn a_constant_meter_attributes_nothing() {
    // A meter that never moves: every component and the peak are zero.
    let meter = FakeMeter::new("fake");
    meter.set_current(1 << 20);
    let req = ProbeRequest {
        spec: ModelSpec::tiny(),
        knobs: Knobs {
            seq: 16,
            ..Knobs::default()
        },
        warmup_steps: 0,
        steps: 1,
        device: Device::Cpu,
        seed: 0,
    };
    let p = run_probe(&req, &meter).unwrap();
    assert_eq!(p.device, "fake");
    assert_eq!(p.peak_bytes, 0);
    assert_eq!(p.components, Components::default());
    assert!(
        p.timeline
            .iter()
            .any(|r| r.phase == "forward" && r.layer == Some(1))
    );
    assert!(p.timeline.iter().all(|r| r.current_bytes == 0));
}

#[test]
fn the_profile_csv_of_a_known_probe_is_byte_exact() {
    let p = ProbeResult {
        spec: ModelSpec::tiny(),
        knobs: Knobs {
            seq: 16,
            ..Knobs::default()
        },
        device: "fake".into(),
        peak_bytes: 21,
        components: Components {
            weights: 1,
            gradients: 2,
            optimizer: 3,
            activations: 4,
            transient: 5,
            runtime: 6,
        },
        step_s: 0.5,
        tokens_per_s: 32.0,
        timeline: vec![],
    };
    let text = render_profile(&profile_rows("p1", &p), true).unwrap();
    let v = env!("CARGO_PKG_VERSION");
    let knobs = "tiny,2,fake,lora,8,16.0,q_proj k_proj v_proj o_proj gate_proj up_proj down_proj,q4,fp32,none,1,1,16,adamw,chunked";
    let expected = format!(
        "{PROFILE_HEADER}\n\
         p1,{knobs},weights,1,21,0.5,32.0,{v}\n\
         p1,{knobs},gradients,2,21,0.5,32.0,{v}\n\
         p1,{knobs},optimizer,3,21,0.5,32.0,{v}\n\
         p1,{knobs},activations,4,21,0.5,32.0,{v}\n\
         p1,{knobs},transient,5,21,0.5,32.0,{v}\n\
         p1,{knobs},runtime,6,21,0.5,32.0,{v}\n"
    );
    assert_eq!(text, expected);
}
