//! End-to-end tests of `memtune gpus` and `--target-gpu` on the tiny model: planning for a GPU from
//! CPU probes, with every figure labelled measured or estimated.

#[path = "common/bin.rs"]
mod bin;

use bin::{last_json, memtune, stderr, stdout};

#[test]
fn gpus_lists_the_catalog() {
    let o = memtune(&["gpus", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cards: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(cards.len(), 10);
    let rtx4090 = cards
        .iter()
        .find(|c| c["name"] == "rtx4090")
        .expect("rtx4090");
    assert_eq!(rtx4090["memory_bytes"].as_u64(), Some(24_564 << 20));

    let o = memtune(&["gpus"]);
    assert!(o.status.success());
    let text = stdout(&o);
    for name in ["t4", "rtx4090", "a100-80gb", "h200", "l40s"] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
}

#[test]
fn predict_for_a_card_says_what_is_measured_and_what_is_estimated() {
    let args = [
        "predict",
        "--model",
        "tiny",
        "--seq",
        "32",
        "--batch",
        "2",
        "--target-gpu",
        "RTX 4090",
        "--no-cache",
    ];
    let o = memtune(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    for label in [
        "planned for NVIDIA GeForce RTX 4090",
        "tensor bytes, measured",
        "measured: ",
        "estimated: context and library workspaces",
        "GPU peak",
        "tokens/s (roofline, no GPU measured)",
    ] {
        assert!(text.contains(label), "missing `{label}` in:\n{text}");
    }

    let mut json_args = args.to_vec();
    json_args.push("--json");
    let j = last_json(&memtune(&json_args));
    let plan = &j["gpu_plan"];
    assert_eq!(plan["card"], "rtx4090");
    let tensors = plan["measured"]["tensor_peak_bytes"].as_u64().expect("u64");
    let overhead = plan["estimated"]["runtime_overhead_bytes"]
        .as_u64()
        .expect("u64");
    let allowance = plan["estimated"]["allocator_allowance_bytes"]
        .as_u64()
        .expect("u64");
    let peak = plan["estimated"]["peak_bytes"].as_u64().expect("u64");
    assert_eq!(tensors + allowance + overhead, peak);
    assert_eq!(j["peak_bytes"].as_u64(), Some(peak));
    assert_eq!(overhead, 450 << 20);
    assert!(
        j["device"]
            .as_str()
            .is_some_and(|d| d.starts_with("rtx4090 (planned from probes on cpu")),
        "{j}"
    );
}

#[test]
fn tune_for_a_card_uses_its_memory_and_leaves_out_what_it_lacks() {
    let o = memtune(&[
        "tune",
        "--model",
        "tiny",
        "--target-gpu",
        "t4",
        "--seq",
        "32",
        "--effective-batch",
        "2",
        "--checkpointing",
        "none",
        "--loss",
        "chunked",
        "--no-cache",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = last_json(&o);
    // No --gpu-mem: the memory the T4 gives a process (14.75 GiB).
    assert_eq!(j["budget_bytes"].as_u64(), Some(15_104 << 20));
    // Turing has no bf16: it is left out of the search, and the policy says so.
    assert_ne!(j["chosen"]["precision"], "bf16");
    assert!(
        j["policy"].as_array().is_some_and(|p| p
            .iter()
            .any(|l| l.as_str().is_some_and(|l| l.contains("has no bf16")))),
        "{j}"
    );
    let plan = &j["target_gpu"];
    assert_eq!(plan["card"], "t4");
    assert!(plan["measured"]["tensor_peak_bytes"].as_u64().is_some());
    let peak = plan["estimated"]["peak_bytes"].as_u64().expect("u64");
    assert_eq!(j["predicted"]["peak_bytes"].as_u64(), Some(peak));
    assert!(peak <= 15_104 << 20);
}

#[test]
fn tune_for_a_card_in_text_labels_the_plan() {
    let o = memtune(&[
        "tune",
        "--model",
        "tiny",
        "--gpu-mem",
        "24G",
        "--target-gpu",
        "rtx4090",
        "--seq",
        "32",
        "--effective-batch",
        "2",
        "--precision",
        "fp32",
        "--checkpointing",
        "none",
        "--loss",
        "chunked",
        "--no-cache",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("Planned for NVIDIA GeForce RTX 4090 without a GPU"),
        "{text}"
    );
    assert!(
        text.contains("GPU plan for NVIDIA GeForce RTX 4090"),
        "{text}"
    );
    assert!(text.contains("measured: "), "{text}");
    assert!(text.contains("estimated"), "{text}");
    // 24 GiB is more than a 4090 gives a process; the plan keeps to the card.
    assert!(
        stderr(&o).contains("is more than rtx4090 gives a process"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn unknown_cards_and_missing_budgets_are_refused_plainly() {
    let o = memtune(&["tune", "--model", "tiny", "--target-gpu", "rtx4080"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("unknown GPU `rtx4080` (closest: rtx4090"),
        "{}",
        stderr(&o)
    );

    let o = memtune(&["tune", "--model", "tiny"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--gpu-mem"), "{}", stderr(&o));

    let o = memtune(&[
        "predict",
        "--model",
        "tiny",
        "--target-gpu",
        "t4",
        "--precision",
        "bf16",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("has no bf16"), "{}", stderr(&o));

    let o = memtune(&[
        "tune",
        "--model",
        "tiny",
        "--target-gpu",
        "h100",
        "--device",
        "cuda",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--target-gpu plans from CPU probes"),
        "{}",
        stderr(&o)
    );
}
