//! The cost model against the real engine: calibrated on its own 1–2-layer probes of a small Llama,
//! it predicts the measured peak of deeper, longer, larger runs it never saw, for every method,
//! precision, checkpointing policy, loss mode and with accumulation. Its own test binary: the
//! counting allocator is process-global.

use candle_core::Device;
use memtune::config::{Checkpointing, Knobs, LossMode, Method, OptimizerKind, Precision, Quant};
use memtune::cost::calibrate;
use memtune::probe::meter::CpuMeter;
use memtune::probe::runner::{EngineProber, ProbeRequest, run_probe};
use memtune::search::{PolicyRequest, SearchSpace};
use memtune::spec::ModelSpec;

#[test]
fn segment_model_predicts_unseen_full_depth_runs() {
    let spec = ModelSpec {
        vocab_size: 2048,
        hidden_size: 128,
        intermediate_size: 320,
        num_hidden_layers: 8,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 32,
        ..ModelSpec::tiny()
    };
    let space = SearchSpace::from_request(&PolicyRequest {
        methods: Some(vec![Method::Lora, Method::Full, Method::Qlora]),
        quants: Some(vec![Quant::Q8]),
        precisions: Some(vec![Precision::Fp32, Precision::Bf16]),
        checkpointing: Some(vec![
            Checkpointing::None,
            Checkpointing::Every(2),
            Checkpointing::Full,
        ]),
        losses: Some(vec![LossMode::Chunked, LossMode::Full]),
        effective_batch: 4,
        seq: 256,
        ..PolicyRequest::default()
    })
    .unwrap();
    let meter = CpuMeter::new();
    let mut prober = EngineProber {
        device: Device::Cpu,
        meter: &meter,
        warmup_steps: 0,
        steps: 1,
        seed: 0,
    };
    let model = calibrate(&spec, &space, &mut prober, None, &mut |_| {}).unwrap();
    assert!(
        model
            .fitted_on
            .iter()
            .all(|p| p.spec.num_hidden_layers <= 2)
    );

    let case = |method, precision, checkpointing, loss, batch, accum, seq| Knobs {
        method,
        quant: Quant::Q8,
        precision,
        checkpointing,
        loss,
        batch,
        accum,
        seq,
        optimizer: OptimizerKind::Adamw,
        ..Knobs::default()
    };
    use Checkpointing::{Every, Full as Ckpt, None as NoCkpt};
    use LossMode::{Chunked, Full as FullLoss};
    use Method::{Full, Lora, Qlora};
    use Precision::{Bf16, Fp32};
    let cases = [
        case(Lora, Fp32, NoCkpt, Chunked, 2, 1, 256),
        case(Lora, Bf16, Ckpt, Chunked, 4, 1, 192),
        case(Full, Fp32, NoCkpt, FullLoss, 1, 2, 256),
        case(Full, Bf16, Every(2), Chunked, 2, 2, 256),
        case(Qlora, Bf16, NoCkpt, FullLoss, 2, 1, 256),
        case(Qlora, Fp32, Every(2), Chunked, 4, 1, 256),
    ];
    let mut errors = Vec::new();
    for knobs in cases {
        let predicted = model.predict(&spec, &knobs).peak_bytes as f64;
        let measured = run_probe(
            &ProbeRequest {
                spec: spec.clone(),
                knobs: knobs.clone(),
                warmup_steps: 1,
                steps: 1,
                device: Device::Cpu,
                seed: 0,
            },
            &meter,
        )
        .unwrap();
        let segments = segment_table(&model, &measured);
        let measured = measured.peak_bytes as f64;
        errors.push((
            format!(
                "{} {} ckpt={} loss={} {}x{}x{}",
                knobs.method,
                knobs.precision,
                knobs.checkpointing,
                knobs.loss,
                knobs.batch,
                knobs.accum,
                knobs.seq
            ),
            (predicted - measured) / measured,
            segments,
        ));
    }
    let worst = errors
        .iter()
        .map(|(_, e, _)| e.abs())
        .fold(0.0f64, f64::max);
    let report: Vec<String> = errors
        .iter()
        .map(|(label, e, table)| format!("{label}: {:+.2}%\n{table}", 100.0 * e))
        .collect();
    // At this size (tensors of KiBs) small allocations that do not follow the shapes (matmul
    // packing buffers, per-tensor bookkeeping) weigh more than at real sizes, where the same model
    // is within 1% (reports/BENCHMARKS.md, examples/accuracy.rs). The phase model this replaced
    // missed such configurations by 25–400%.
    eprintln!("{}", report.join("\n"));
    assert!(worst < 0.03, "{}", report.join("\n"));
}

/// Per segment kind, the measured and replayed (delta, excess) in KiB: where a miss comes from.
fn segment_table(
    model: &memtune::cost::CostModel,
    measured: &memtune::probe::ProbeResult,
) -> String {
    use memtune::cost::segments::observations;
    let obs = observations(measured).unwrap_or_default();
    let replay = model
        .segments
        .replay(&measured.spec, &measured.knobs)
        .unwrap_or_default();
    let mut out = String::new();
    for (o, r) in obs.iter().zip(&replay) {
        out.push_str(&format!(
            "  {:>22}: {:>9.1} {:>9.1} | {:>9.1} {:>9.1}\n",
            o.kind.name(),
            o.delta / 1024.0,
            o.excess.unwrap_or(0.0) / 1024.0,
            r.delta / 1024.0,
            r.excess / 1024.0
        ));
    }
    out
}
