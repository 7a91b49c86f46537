//! Training end to end through the library: low precision stays finite, and the loss falls.

use candle_core::Device;
use memtune::config::{Hyper, Knobs, Method, OptimizerKind, Precision};
use memtune::data::BadLinePolicy;
use memtune::spec::ModelSpec;
use memtune::train::{TrainRequest, run};

fn data(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("data.txt");
    let text: String = (0..30)
        .map(|i| format!("Counting sheep: {i}, {}, {}.\n\n", i + 1, i + 2))
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn fp16_stays_finite_for_50_steps_with_every_optimizer() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    for optimizer in [
        OptimizerKind::Adamw,
        OptimizerKind::Adamw8bit,
        OptimizerKind::Adafactor,
        OptimizerKind::Sgd,
    ] {
        let req = TrainRequest {
            model: "tiny".into(),
            options: memtune::train::RunOptions::default(),
            spec: ModelSpec::tiny(),
            knobs: Knobs {
                method: Method::Full,
                precision: Precision::Fp16,
                optimizer,
                seq: 32,
                batch: 2,
                ..Knobs::default()
            },
            hyper: Hyper {
                lr: 3e-3,
                ..Hyper::default()
            },
            data: data.clone(),
            steps: 50,
            seed: 1,
            device: Device::Cpu,
            output: None,
            eval_fraction: 0.0,
            bad_lines: BadLinePolicy::Fail,
        };
        let mut losses = Vec::new();
        let summary = run(&req, &mut |r| losses.push(r.loss)).unwrap();
        assert_eq!(losses.len(), 50);
        assert!(
            losses.iter().all(|l| l.is_finite()),
            "{optimizer}: {losses:?}"
        );
        assert!(
            summary.final_loss.is_finite() && summary.final_loss < summary.initial_loss,
            "{optimizer}: {} → {}",
            summary.initial_loss,
            summary.final_loss
        );
    }
}
