//! `Hyper::update_in_backward`: updating each part as backward makes its gradients takes the same
//! steps, bit for bit, as one update at the end (without clipping), for every optimizer, method,
//! precision, checkpointing policy and a tied or untied head; and the settings it cannot run with
//! are refused by name.

use candle_core::{DType, Device};
use memtune::config::{Checkpointing, Hyper, Knobs, Method, OptimizerKind, Precision};
use memtune::data::random_batch;
use memtune::engine::model::{Model, RandomInit};
use memtune::engine::step::{Engine, NoObserver, StepStats};
use memtune::spec::ModelSpec;

fn spec(tied: bool) -> ModelSpec {
    ModelSpec {
        num_hidden_layers: 3,
        tie_word_embeddings: tied,
        ..ModelSpec::tiny()
    }
}

fn engine(spec: &ModelSpec, knobs: &Knobs, in_backward: bool) -> Engine {
    let model = Model::build(spec, knobs, &Device::Cpu, &mut RandomInit::new(3), 3).unwrap();
    let hyper = Hyper {
        lr: 1e-2,
        weight_decay: 0.01,
        clip: 0.0,
        update_in_backward: in_backward,
        ..Hyper::default()
    };
    Engine::new(model, hyper).unwrap()
}

/// Every trainable parameter's values, by name, as f64.
fn weights(engine: &Engine) -> Vec<(String, Vec<f64>)> {
    engine
        .params
        .iter()
        .map(|p| {
            let values = p
                .var
                .as_tensor()
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (p.name.clone(), values)
        })
        .collect()
}

fn steps(engine: &mut Engine, spec: &ModelSpec, knobs: &Knobs) -> Vec<StepStats> {
    (0..3)
        .map(|s| {
            let batch = random_batch(
                knobs.batch,
                knobs.seq,
                spec.vocab_size,
                10 + s,
                &Device::Cpu,
            )
            .unwrap();
            engine.train_step(&[batch], 1e-2, &mut NoObserver).unwrap()
        })
        .collect()
}

fn assert_same_steps(what: &str, spec: &ModelSpec, knobs: &Knobs) {
    let mut at_end = engine(spec, knobs, false);
    let mut in_backward = engine(spec, knobs, true);
    let before = weights(&at_end);
    let a = steps(&mut at_end, spec, knobs);
    let b = steps(&mut in_backward, spec, knobs);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.loss, y.loss, "{what}: losses");
        // The global norm sums the parts' squares in another order.
        assert!(
            (x.grad_norm - y.grad_norm).abs() <= 1e-5 * x.grad_norm,
            "{what}: gradient norms {} and {}",
            x.grad_norm,
            y.grad_norm
        );
        assert!(!y.skipped);
    }
    let (after, fused) = (weights(&at_end), weights(&in_backward));
    assert_eq!(after.len(), fused.len());
    for ((name, x), (_, y)) in after.iter().zip(&fused) {
        assert!(x == y, "{what}: `{name}` differs after three steps");
    }
    // The steps did update every parameter (the comparison above is not of untouched weights).
    for ((name, x), (_, y)) in before.iter().zip(&after) {
        assert!(x != y, "{what}: `{name}` was not updated");
    }
}

#[test]
fn updating_in_backward_takes_the_same_steps_as_updating_at_the_end() {
    let base = Knobs {
        batch: 2,
        seq: 16,
        ..Knobs::default()
    };
    for tied in [false, true] {
        for checkpointing in [
            Checkpointing::None,
            Checkpointing::Every(2),
            Checkpointing::Full,
        ] {
            let knobs = Knobs {
                method: Method::Full,
                checkpointing,
                ..base.clone()
            };
            assert_same_steps(
                &format!("full fp32, tied {tied}, checkpointing {checkpointing}"),
                &spec(tied),
                &knobs,
            );
        }
    }
    // A vocabulary over one block of rows (1 Mi elements: 16,384 rows of 64): the untied head and
    // the embedding are updated in three blocks each, the last one short.
    let wide = ModelSpec {
        vocab_size: 40_000,
        ..spec(false)
    };
    let knobs = Knobs {
        method: Method::Full,
        ..base.clone()
    };
    assert_same_steps("full fp32, untied, 40k vocabulary", &wide, &knobs);
    for precision in [Precision::Bf16, Precision::Bf16Pure] {
        let knobs = Knobs {
            method: Method::Full,
            precision,
            ..base.clone()
        };
        for tied in [true, false] {
            // Untied, the head is updated block by block as the loss makes its gradient, which
            // the fused kernel makes there (rounded to bf16 as candle's ops round theirs).
            assert_same_steps(
                &format!("full {precision}, tied {tied}"),
                &spec(tied),
                &knobs,
            );
        }
    }
    for optimizer in [
        OptimizerKind::Adamw8bit,
        OptimizerKind::Adafactor,
        OptimizerKind::Sgd,
    ] {
        let knobs = Knobs {
            method: Method::Full,
            optimizer,
            ..base.clone()
        };
        assert_same_steps(&format!("full fp32, {optimizer}"), &spec(true), &knobs);
    }
    let lora = Knobs {
        method: Method::Lora,
        checkpointing: Checkpointing::Full,
        ..base.clone()
    };
    assert_same_steps("lora fp32", &spec(false), &lora);
}

#[test]
fn settings_it_cannot_run_with_are_refused_by_name() {
    let spec = spec(false);
    let build = |knobs: &Knobs, clip: f64| {
        let model = Model::build(&spec, knobs, &Device::Cpu, &mut RandomInit::new(3), 3).unwrap();
        let hyper = Hyper {
            clip,
            update_in_backward: true,
            ..Hyper::default()
        };
        Engine::new(model, hyper).err().map(|e| e.to_string())
    };
    let knobs = Knobs {
        method: Method::Full,
        batch: 1,
        seq: 8,
        ..Knobs::default()
    };
    let clipped = build(&knobs, 1.0).expect("clipping is refused");
    assert!(clipped.contains("--clip 0"), "{clipped}");
    let accumulated = build(
        &Knobs {
            accum: 2,
            ..knobs.clone()
        },
        0.0,
    )
    .expect("accumulation is refused");
    assert!(accumulated.contains("--accum 1"), "{accumulated}");
    let fp16 = build(
        &Knobs {
            precision: Precision::Fp16,
            ..knobs.clone()
        },
        0.0,
    )
    .expect("fp16 is refused");
    assert!(fp16.contains("fp16"), "{fp16}");
    assert!(build(&knobs, 0.0).is_none());

    // Two micro-batches in one step are refused too, without updating anything.
    let model = Model::build(&spec, &knobs, &Device::Cpu, &mut RandomInit::new(3), 3).unwrap();
    let hyper = Hyper {
        clip: 0.0,
        update_in_backward: true,
        ..Hyper::default()
    };
    let mut engine = Engine::new(model, hyper).unwrap();
    let batch = || random_batch(1, 8, spec.vocab_size, 1, &Device::Cpu).unwrap();
    let err = engine
        .train_step(&[batch(), batch()], 1e-3, &mut NoObserver)
        .unwrap_err()
        .to_string();
    assert!(err.contains("one micro-batch"), "{err}");
}
