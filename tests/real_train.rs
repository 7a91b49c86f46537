//! End-to-end tests of the trainer's results on the tiny model (no downloads): checkpoints and exact
//! resume, the PEFT adapter and merged-weights folders, generation from them, `--config` files, and
//! the errors for bad inputs.

#[path = "common/bin.rs"]
mod bin;

use bin::{last_json, memtune, stderr};
use std::path::Path;
use std::process::Output;

fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "memtune failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A small instruction file: the model learns to answer with the word reversed.
fn data_file(dir: &Path) -> String {
    let words = [
        "apple", "river", "stone", "cloud", "green", "tiger", "music", "paper",
    ];
    let lines: String = (0..40)
        .map(|i| {
            let w = words[i % words.len()];
            let r: String = w.chars().rev().collect();
            format!("{{\"instruction\":\"Reverse {w} {i}\",\"output\":\"{r}\"}}\n")
        })
        .collect();
    let path = dir.join("data.jsonl");
    std::fs::write(&path, lines).unwrap();
    path.display().to_string()
}

const TINY: &[&str] = &[
    "--model", "tiny", "--seq", "32", "--batch", "2", "--lr", "0.01",
];

fn train(extra: &[&str]) -> Output {
    let mut args = vec!["train", "--json"];
    args.extend_from_slice(TINY);
    args.extend_from_slice(extra);
    memtune(&args)
}

/// The `train_loss` and `eval_loss` columns of a loss log (timing and memory vary run to run).
fn losses(log: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let cols: Vec<&str> = l.split(',').collect();
            (cols[1].to_string(), cols[2].to_string())
        })
        .collect()
}

#[test]
fn a_killed_and_resumed_run_ends_with_the_same_losses() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_file(dir.path());
    let whole = dir.path().join("whole");
    let parts = dir.path().join("parts");
    let common = [
        "--data",
        &data,
        "--steps",
        "20",
        "--eval-every",
        "5",
        "--save-every",
        "10",
        "--no-merged",
    ];
    let a = ok(train(
        &[&common[..], &["--output", whole.to_str().unwrap()]].concat(),
    ));
    // The same run stopped after step 10, as if killed there, then resumed from its output folder.
    let stopped = ok(train(
        &[
            &common[..],
            &["--output", parts.to_str().unwrap(), "--stop-after", "10"],
        ]
        .concat(),
    ));
    assert_eq!(last_json(&stopped)["steps"], 10);
    assert!(
        !parts.join("adapter").exists(),
        "a stopped run writes no final results"
    );
    let b = ok(train(
        &[&common[..], &["--resume", parts.to_str().unwrap()]].concat(),
    ));
    let (a, b) = (last_json(&a), last_json(&b));
    assert_eq!(b["resumed_from_step"], 10);
    assert_eq!(b["steps"], 20);
    // Bit for bit: the same floating-point numbers, not merely close ones.
    assert_eq!(a["final_loss"], b["final_loss"]);
    assert_eq!(a["last_step_loss"], b["last_step_loss"]);
    assert_eq!(a["initial_loss"], b["initial_loss"]);
    assert!(a["final_loss"].as_f64().unwrap() < a["initial_loss"].as_f64().unwrap());
    let log_a = losses(&whole.join("loss_log.csv"));
    assert_eq!(log_a.len(), 20, "one row per step");
    assert_eq!(log_a, losses(&parts.join("loss_log.csv")));
    // Evaluations at steps 5, 10, 15, 20 only.
    let evaluated: Vec<usize> = (1..=log_a.len())
        .filter(|&s| !log_a[s - 1].1.is_empty())
        .collect();
    assert_eq!(evaluated, vec![5, 10, 15, 20]);
    // Both checkpoints are kept, each with the files a resume needs.
    for step in ["step-000010", "step-000020"] {
        let ckpt = whole.join("checkpoints").join(step);
        for file in [
            "trainable.safetensors",
            "optimizer.safetensors",
            "state.json",
            "loss_log.csv",
        ] {
            assert!(
                ckpt.join(file).is_file(),
                "{} missing",
                ckpt.join(file).display()
            );
        }
    }
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(whole.join("checkpoints/step-000010/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["step"], 10);
    assert!(state["data_position"].as_u64().is_some() && state["data_epoch"].as_u64().is_some());

    // A resume with other settings is refused, naming them.
    let o = train(
        &[
            &common[..],
            &["--resume", parts.to_str().unwrap(), "--seed", "3"],
        ]
        .concat(),
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--seed: 3 now, 0 in the checkpoint"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn full_then_lora_outputs_load_back_and_generate_alike() {
    let dir = tempfile::tempdir().unwrap();
    // Plain text holds no EOS, so greedy replies run to --max-tokens.
    let data = dir.path().join("data.txt");
    let text: String = (0..30)
        .map(|i| format!("The quick brown fox jumps over the lazy dog {i}.\n\n"))
        .collect();
    std::fs::write(&data, text).unwrap();
    let data = data.display().to_string();
    let base = dir.path().join("base");
    let tuned = dir.path().join("tuned");
    // A full fine-tune leaves a Hugging Face folder: the base for a LoRA run on real weights.
    let full = last_json(&ok(train(&[
        "--data",
        &data,
        "--steps",
        "3",
        "--method",
        "full",
        "--output",
        base.to_str().unwrap(),
    ])));
    assert_eq!(full["written"], serde_json::json!([base.join("merged")]));
    let merged = base.join("merged");
    for file in ["config.json", "model.safetensors"] {
        assert!(merged.join(file).is_file());
    }
    let lora = last_json(&ok(memtune(&[
        "train",
        "--json",
        "--model",
        merged.to_str().unwrap(),
        "--data",
        &data,
        "--steps",
        "4",
        "--seq",
        "32",
        "--lr",
        "0.01",
        "--lora-targets",
        "q_proj,v_proj,down_proj",
        "--rank",
        "4",
        "--output",
        tuned.to_str().unwrap(),
    ])));
    assert_eq!(
        lora["written"],
        serde_json::json!([tuned.join("adapter"), tuned.join("merged")])
    );
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tuned.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    assert_eq!(config["lora_alpha"], 8.0);
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );

    // Base + adapter and the merged weights generate the same greedy tokens.
    let generate = |args: &[&str]| {
        let mut all = vec![
            "generate",
            "--json",
            "--prompt",
            "Reverse apple",
            "--max-tokens",
            "6",
        ];
        all.extend_from_slice(args);
        last_json(&ok(memtune(&all)))["completion_ids"].clone()
    };
    let with_adapter = generate(&[
        "--model",
        merged.to_str().unwrap(),
        "--adapter",
        tuned.join("adapter").to_str().unwrap(),
    ]);
    let from_merged = generate(&["--model", tuned.join("merged").to_str().unwrap()]);
    assert_eq!(with_adapter.as_array().map(Vec::len), Some(6));
    assert_eq!(with_adapter, from_merged);
}

#[test]
fn config_file_sets_the_run_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_file(dir.path());
    let out = dir.path().join("out");
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "model = \"tiny\"\nbudget_bytes = 1\n[knobs]\nseq = 32\nbatch = 2\n[knobs.lora]\nrank = 2\n\
             [hyper]\nlr = 0.01\n[data]\ntrain = {data:?}\npacking = \"pad\"\n[output]\ndir = {:?}\nmerged = false\n\
             [train]\nsteps = 5\n",
            out.display().to_string()
        ),
    )
    .unwrap();
    let o = last_json(&ok(memtune(&[
        "train",
        "--json",
        "--config",
        config.to_str().unwrap(),
        "--steps",
        "2",
    ])));
    assert_eq!(o["steps"], 2, "--steps overrides [train] steps");
    assert_eq!(o["config"]["knobs"]["seq"], 32);
    assert_eq!(o["config"]["knobs"]["lora"]["rank"], 2);
    assert_eq!(
        o["config"]["knobs"]["lora"]["alpha"], 16.0,
        "rank from a file keeps alpha"
    );
    assert_eq!(o["written"], serde_json::json!([out.join("adapter")]));
    // Padded: one window per example; 40 lines, the last 4 held out for evaluation.
    assert_eq!(
        (o["train_windows"].as_u64(), o["eval_windows"].as_u64()),
        (Some(36), Some(4))
    );

    std::fs::write(&config, "[output]\nevery = 3\n").unwrap();
    let o = memtune(&["train", "--config", config.to_str().unwrap()]);
    assert!(
        stderr(&o).contains("unknown field `every`"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_weights_and_adapters_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_file(dir.path());
    // Not a GGUF file at all.
    let fake = dir.path().join("fake.gguf");
    std::fs::write(&fake, b"definitely not gguf").unwrap();
    let o = memtune(&["train", "--model", fake.to_str().unwrap(), "--data", &data]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!("{}: not a readable GGUF file", fake.display())),
        "{}",
        stderr(&o)
    );
    // A folder whose weights lack a tensor the config implies.
    let base = dir.path().join("base");
    ok(train(&[
        "--data",
        &data,
        "--steps",
        "1",
        "--method",
        "full",
        "--output",
        base.to_str().unwrap(),
    ]));
    let merged = base.join("merged");
    let config_path = merged.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["num_hidden_layers"] = 3.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let o = memtune(&[
        "train",
        "--model",
        merged.to_str().unwrap(),
        "--data",
        &data,
        "--seq",
        "32",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no tensor `model.layers.2.input_layernorm.weight`"),
        "{}",
        stderr(&o)
    );
    // An adapter folder without its weights file.
    config["num_hidden_layers"] = 2.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let adapter = dir.path().join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(
        adapter.join("adapter_config.json"),
        r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"]}"#,
    )
    .unwrap();
    let o = memtune(&[
        "generate",
        "--model",
        merged.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("adapter_model.safetensors"),
        "{}",
        stderr(&o)
    );
    // Generation needs weights.
    let o = memtune(&["generate", "--model", "tiny", "--prompt", "x"]);
    assert!(
        stderr(&o).contains("holds no weights to generate with"),
        "{}",
        stderr(&o)
    );
}
