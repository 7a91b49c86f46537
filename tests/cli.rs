//! End-to-end tests of the `memtune` binary on the tiny model, in temporary folders.

#[path = "common/bin.rs"]
mod bin;

use bin::{last_json, memtune, stderr, stdout};
use std::path::Path;

fn text_file(dir: &Path) -> String {
    let path = dir.join("data.txt");
    let para = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. ";
    let text: String = (0..40).map(|i| format!("{para}{i}\n\n")).collect();
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn models_lists_exact_counts_as_json() {
    let o = memtune(&["models", "--json"]);
    assert!(o.status.success());
    let rows: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(rows.len() >= 11);
    let qwen = rows
        .iter()
        .find(|r| r["name"] == "Qwen/Qwen2.5-0.5B")
        .unwrap();
    assert_eq!(qwen["params"].as_u64(), Some(494_032_768));
    let llama = rows
        .iter()
        .find(|r| r["name"] == "meta-llama/Llama-2-7b-hf")
        .unwrap();
    assert_eq!(llama["params"].as_u64(), Some(6_738_415_616));
}

#[test]
fn train_lowers_the_loss_with_every_memory_knob_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = text_file(dir.path());
    let out = dir.path().join("run");
    let o = memtune(&[
        "train",
        "--model",
        "tiny",
        "--data",
        &data,
        "--steps",
        "30",
        "--method",
        "lora",
        "--checkpointing",
        "full",
        "--optimizer",
        "adamw8bit",
        "--precision",
        "bf16",
        "--seq",
        "64",
        "--batch",
        "2",
        "--json",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = last_json(&o);
    let (initial, fin) = (
        j["initial_loss"].as_f64().unwrap(),
        j["final_loss"].as_f64().unwrap(),
    );
    assert!(fin < initial, "final {fin} !< initial {initial}");
    assert_eq!(j["steps"], 30);
    assert!(j["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(j["config"]["knobs"]["optimizer"], "adamw8bit");
    let log = std::fs::read_to_string(out.join("loss_log.csv")).unwrap();
    assert_eq!(log.lines().count(), 31, "header + one row per step");
}

#[test]
fn train_updates_in_backward_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let data = text_file(dir.path());
    let o = memtune(&[
        "train",
        "--model",
        "tiny",
        "--data",
        &data,
        "--steps",
        "10",
        "--method",
        "full",
        "--lr",
        "3e-3",
        "--clip",
        "0",
        "--update-in-backward",
        "--seq",
        "32",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = last_json(&o);
    assert_eq!(j["config"]["hyper"]["update_in_backward"], true);
    let (initial, fin) = (
        j["initial_loss"].as_f64().unwrap(),
        j["final_loss"].as_f64().unwrap(),
    );
    assert!(fin < initial, "final {fin} !< initial {initial}");
}

#[test]
fn bad_input_gets_clear_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let data = text_file(dir.path());
    let cases: &[(&[&str], &str)] = &[
        (
            &["train", "--model", "qwen2.5-0.6b", "--data", &data],
            "Qwen/Qwen2.5-0.5B",
        ),
        (
            &["train", "--model", "tiny", "--data", &data, "--rank", "0"],
            "--rank",
        ),
        (
            &["train", "--model", "tiny", "--data", &data, "--batch", "0"],
            "--batch",
        ),
        (
            &[
                "train",
                "--model",
                "tiny",
                "--data",
                &data,
                "--checkpointing",
                "every:0",
            ],
            "every:K",
        ),
        (
            &[
                "train", "--model", "tiny", "--data", &data, "--seq", "100000",
            ],
            "max_position_embeddings",
        ),
        (
            &[
                "train",
                "--model",
                "tiny",
                "--data",
                "/nonexistent/file.txt",
            ],
            "--data",
        ),
        (
            &[
                "train",
                "--model",
                "tiny",
                "--data",
                &data,
                "--optimizer",
                "adam",
            ],
            "adamw8bit",
        ),
        (
            &[
                "train",
                "--model",
                "tiny",
                "--data",
                &data,
                "--update-in-backward",
            ],
            "--update-in-backward needs --clip 0",
        ),
        (
            &[
                "profile",
                "--model",
                "tiny",
                "--clip",
                "0",
                "--accum",
                "2",
                "--update-in-backward",
            ],
            "--update-in-backward needs --accum 1",
        ),
        (&["profile", "--model", "tiny", "--layers", "9"], "--layers"),
        (&["profile", "--model", "tiny", "--device", "cuda"], "CUDA"),
    ];
    for (args, expected) in cases {
        let o = memtune(args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(
            err.contains(expected),
            "{args:?}: expected `{expected}` in:\n{err}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
    }
}

#[test]
fn malformed_config_names_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, r#"{"model_type":"llama","hidden_size":"abc"}"#).unwrap();
    let o = memtune(&["profile", "--model", cfg.to_str().unwrap()]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("config.json") && err.contains("hidden_size"),
        "{err}"
    );
    std::fs::write(&cfg, r#"{"model_type":"gpt2"}"#).unwrap();
    let err = stderr(&memtune(&["profile", "--model", cfg.to_str().unwrap()]));
    assert!(err.contains("llama") && err.contains("qwen2"), "{err}");
}

#[test]
fn profile_json_and_csv_append() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("p.csv");
    let tl = dir.path().join("t.csv");
    for method in ["lora", "full"] {
        let o = memtune(&[
            "profile",
            "--model",
            "tiny",
            "--method",
            method,
            "--seq",
            "32",
            "--batch",
            "2",
            "--json",
            "--csv",
            csv.to_str().unwrap(),
            "--timeline-csv",
            tl.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let j = last_json(&o);
        let peak = j["peak_bytes"].as_u64().unwrap();
        let parts: u64 = j["components"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(parts, peak, "components explain the measured peak exactly");
        assert!(j["components"]["weights"].as_u64().unwrap() > 0);
        assert_eq!(j["config"]["method"], method);
        assert_eq!(j["clip"], 1.0, "profile clips as train does");
        assert_eq!(j["update_in_backward"], false);
    }
    let text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(
        text.lines().count(),
        1 + 2 * 6,
        "one header, six rows per probe"
    );
    let rows = memtune::report::profile_csv::read_profile(&csv).unwrap();
    assert_eq!(rows.len(), 12);
    let timeline = std::fs::read_to_string(&tl).unwrap();
    assert!(
        timeline.lines().any(|l| l.contains(",forward,1,")),
        "{timeline}"
    );
}

#[test]
fn tune_writes_a_config_that_trains_and_says_what_is_closest_when_nothing_fits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tuned");
    let tune = |budget: &str, json: bool| {
        let mut args = vec![
            "tune",
            "--model",
            "tiny",
            "--gpu-mem",
            budget,
            "--seq",
            "32",
            "--effective-batch",
            "2",
            "--no-cache",
            "--out",
            out.to_str().unwrap(),
        ];
        if json {
            args.push("--json");
        }
        memtune(&args)
    };
    let o = tune("64M", true);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = last_json(&o);
    assert_eq!(j["budget_bytes"].as_u64(), Some(64 << 20));
    let chosen = &j["chosen"];
    assert_eq!(
        chosen["batch"].as_u64().unwrap() * chosen["accum"].as_u64().unwrap(),
        2,
        "{chosen}"
    );
    let peak = j["predicted"]["peak_bytes"].as_u64().unwrap();
    assert!(peak > 0 && peak < 64 << 20, "{peak}");
    assert!(j["candidates_evaluated"].as_u64().unwrap() >= 2);
    let csv = std::fs::read_to_string(out.join("candidates.csv")).unwrap();
    assert!(csv.lines().count() > 2, "{csv}");

    // The pick runs as it is.
    let run = dir.path().join("run");
    let o = memtune(&[
        "train",
        "--config",
        out.join("tuned.toml").to_str().unwrap(),
        "--data",
        &text_file(dir.path()),
        "--steps",
        "2",
        "--output",
        run.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(run.join("adapter").exists());

    // Too small for anything: the closest configuration and by how much it is over, not a panic.
    let o = tune("200K", false);
    assert!(!o.status.success());
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(text.contains("Nothing fits. Closest:"), "{text}");
    assert!(text.contains("over budget by"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
}
