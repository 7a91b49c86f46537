//! The report from fixed, small CSV inputs: every chart is well-formed SVG with its title, units and
//! legend; the page names the charts, the chosen configuration, the budget and the measured error;
//! rendering is a pure function of the loaded data; charts without data are skipped and named.

use memtune::config::{Hyper, Knobs};
use memtune::cost::{Phase, Prediction};
use memtune::probe::{COMPONENT_NAMES, Components};
use memtune::report::charts::{configs_from_candidates, one_knob_alternatives};
use memtune::report::data::{
    CANDIDATES_HEADER, ConfigRef, InputKind, accuracy_csv as accuracy_csv_of,
};
use memtune::report::{load_report_inputs, render_report, write_report_dir};
use memtune::search::TunedConfig;
use memtune::search::write::CandidateRow;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// Two probes (six rows each) of the profile CSV schema; `p1` measured the pick of `candidates_csv`.
fn profile_csv() -> String {
    let mut text = String::from(memtune::report::profile_csv::PROFILE_HEADER);
    text.push('\n');
    let probes = [
        ("p1", "none", 2, 2, [1, 0, 0, 12, 7, 3], 24, 2811.0),
        ("p2", "full", 2, 1, [1, 0, 0, 1, 25, 3], 31, 2150.0),
    ];
    for (id, ckpt, batch, accum, parts, peak, speed) in probes {
        for (name, mib) in COMPONENT_NAMES.iter().zip(parts) {
            text.push_str(&format!(
                "{id},tiny,2,cpu,lora,8,16.0,q_proj v_proj,q4,fp32,{ckpt},{batch},{accum},256,adamw,chunked,{name},{},{},0.1,{speed},0.1.0\n",
                mib * MIB,
                peak * MIB
            ));
        }
    }
    text
}

fn timeline_csv() -> String {
    let marks = [
        (0.00, "step_start", "", 4),
        (0.01, "forward", "0", 9),
        (0.02, "forward", "1", 16),
        (0.03, "loss", "", 16),
        (0.05, "backward", "1", 17),
        (0.07, "backward", "0", 10),
        (0.08, "optimizer_step", "", 4),
    ];
    let mut text = String::from("probe_id,t_s,phase,layer,micro_batch,current_bytes,peak_bytes\n");
    let mut peak = 0;
    for (t, phase, layer, mib) in marks {
        peak = std::cmp::max(peak, mib + if phase == "backward" { 7 } else { 0 });
        text.push_str(&format!(
            "p1,{t},{phase},{layer},0,{},{}\n",
            mib * MIB,
            peak * MIB
        ));
    }
    text
}

/// Six candidates: the pick, four one-knob alternatives (checkpointing, precision, method,
/// micro-batch), and one that differs in two knobs.
fn candidates_csv() -> String {
    let rows = [
        // rank, method, rank, precision, ckpt, micro, accum, parts (MiB), tokens/s, fits
        (
            1,
            "lora",
            "8",
            "fp32",
            "none",
            2,
            2,
            [1, 0, 0, 10, 5, 3],
            3000.0,
            true,
        ),
        (
            2,
            "lora",
            "8",
            "fp32",
            "full",
            2,
            2,
            [1, 0, 0, 2, 5, 3],
            2400.0,
            true,
        ),
        (
            3,
            "lora",
            "8",
            "bf16",
            "none",
            2,
            2,
            [1, 0, 0, 5, 3, 3],
            2900.0,
            true,
        ),
        (
            4,
            "lora",
            "8",
            "bf16",
            "full",
            2,
            2,
            [1, 0, 0, 1, 3, 3],
            2300.0,
            true,
        ),
        (
            5,
            "full",
            "",
            "fp32",
            "none",
            2,
            2,
            [4, 4, 8, 12, 5, 3],
            2500.0,
            false,
        ),
        (
            6,
            "lora",
            "8",
            "fp32",
            "none",
            4,
            1,
            [1, 0, 0, 20, 9, 3],
            3000.0,
            false,
        ),
    ];
    let mut writer = csv::Writer::from_writer(Vec::new());
    for (rank, method, lora_rank, precision, ckpt, micro, accum, parts, speed, fits) in rows {
        let peak: u64 = parts.iter().sum::<u64>() * MIB;
        writer
            .serialize(CandidateRow {
                rank,
                method: method.into(),
                lora_rank: lora_rank.into(),
                quant: String::new(),
                precision: precision.into(),
                checkpointing: ckpt.into(),
                micro_batch: micro,
                accum,
                seq: 256,
                optimizer: "adamw".into(),
                loss: "chunked".into(),
                weights_bytes: parts[0] * MIB,
                gradients_bytes: parts[1] * MIB,
                optimizer_bytes: parts[2] * MIB,
                activations_bytes: parts[3] * MIB,
                transient_bytes: parts[4] * MIB,
                runtime_bytes: parts[5] * MIB,
                peak_bytes: peak,
                required_bytes: peak + peak / 10,
                step_s: 1.0,
                tokens_per_s: speed,
                fits,
                reason: if fits { "fits" } else { "does not fit" }.into(),
            })
            .unwrap();
    }
    String::from_utf8(writer.into_inner().unwrap()).unwrap()
}

/// Errors +10%, −10%, 0 and +50%: median |error| 10%, worst 50%.
fn accuracy_csv() -> String {
    "label,predicted_peak_bytes,measured_peak_bytes\n\
     L2 b1 a,110,100\nL2 b1 b,90,100\nL2 b1 c,100,100\nL2 b4 worst,150,100\n"
        .to_string()
}

/// The pick of `candidates_csv` as `tune` writes it, with a 30 MiB budget.
fn tuned_toml() -> String {
    let knobs = Knobs {
        batch: 2,
        accum: 2,
        ..Knobs::default()
    };
    TunedConfig {
        model: "tiny".into(),
        budget_bytes: 30 * MIB,
        margin: 0.1,
        policy: vec![],
        knobs,
        hyper: Hyper::default(),
        predicted: Prediction {
            components: Components::default(),
            peak_bytes: 19 * MIB,
            phase: Phase::Compute,
            step_s: 1.0,
            tokens_per_s: 3000.0,
        },
    }
    .to_toml()
    .unwrap()
}

fn write_inputs(dir: &Path) {
    std::fs::write(dir.join("profile.csv"), profile_csv()).unwrap();
    std::fs::write(dir.join("timeline.csv"), timeline_csv()).unwrap();
    std::fs::write(dir.join("candidates.csv"), candidates_csv()).unwrap();
    std::fs::write(dir.join("accuracy.csv"), accuracy_csv()).unwrap();
    std::fs::write(dir.join("tuned.toml"), tuned_toml()).unwrap();
    std::fs::write(dir.join("notes.txt"), "not an input").unwrap();
}

/// Whether `svg` is one `<svg>` element whose tags all close, in order.
fn well_formed(svg: &str) -> Result<(), String> {
    if !svg.starts_with("<svg") {
        return Err("does not start with <svg".into());
    }
    let mut open: Vec<String> = Vec::new();
    let mut rest = svg;
    while let Some(start) = rest.find('<') {
        let end = rest[start..].find('>').ok_or("unclosed <")? + start;
        let tag = &rest[start + 1..end];
        rest = &rest[end + 1..];
        if tag.starts_with('?') || tag.starts_with('!') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            match open.pop() {
                Some(top) if top == name.trim() => {}
                other => return Err(format!("</{name}> closes {other:?}")),
            }
        } else if !tag.ends_with('/') {
            let name = tag.split_whitespace().next().unwrap_or("").to_string();
            open.push(name);
        }
        if open.is_empty() && !rest.trim().is_empty() {
            return Err("content after </svg>".into());
        }
    }
    if open.is_empty() {
        Ok(())
    } else {
        Err(format!("unclosed: {open:?}"))
    }
}

fn loaded() -> memtune::report::ReportData {
    let dir = tempfile::tempdir().unwrap();
    write_inputs(dir.path());
    load_report_inputs(dir.path()).unwrap()
}

#[test]
fn inputs_are_recognised_by_header_and_the_tuned_pick_is_chosen() {
    let data = loaded();
    assert_eq!(data.profile.len(), 12);
    assert_eq!(data.timeline.len(), 7);
    assert_eq!(data.candidates.len(), 6);
    assert_eq!(data.accuracy.len(), 4);
    assert_eq!(data.budget_bytes, Some(30 * MIB));
    assert_eq!(data.margin, Some(0.1));
    assert_eq!(data.chosen, Some(ConfigRef::Candidate { rank: 1 }));
    assert_eq!(data.model.as_deref(), Some("tiny"));
    assert_eq!(accuracy_csv_of(&data.accuracy).unwrap(), accuracy_csv());
    // The header constant is the one the search's writer produces.
    assert_eq!(
        candidates_csv().lines().next(),
        Some(CANDIDATES_HEADER),
        "candidates.csv header drifted"
    );
    assert_eq!(
        InputKind::from_header(&format!("\u{feff}{CANDIDATES_HEADER}\r")),
        Some(InputKind::Candidates)
    );
}

#[test]
fn every_chart_is_well_formed_svg_with_its_title_units_and_legend() {
    let data = loaded();
    let report = render_report(&data).unwrap();
    let files: Vec<&str> = report.charts.iter().map(|c| c.file.as_str()).collect();
    assert_eq!(
        files,
        [
            "breakdown.svg",
            "measured.svg",
            "timeline.svg",
            "accuracy.svg",
            "frontier.svg",
            "knobs.svg"
        ]
    );
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    // The checker itself rejects what it should.
    assert!(well_formed("<svg><g></svg>").is_err());
    assert!(well_formed("<svg><g/><text>a</text></svg>").is_ok());
    for chart in &report.charts {
        well_formed(&chart.svg).unwrap_or_else(|e| panic!("{}: {e}", chart.file));
    }
    let svg = |file: &str| &report.charts.iter().find(|c| c.file == file).unwrap().svg;
    let expect = |file: &str, texts: &[&str]| {
        for t in texts {
            assert!(svg(file).contains(t), "{file} lacks `{t}`");
        }
    };
    for file in ["breakdown.svg", "measured.svg"] {
        expect(file, &COMPONENT_NAMES);
        expect(file, &["memory (MiB)", "budget 30.0 MiB"]);
    }
    expect(
        "breakdown.svg",
        &[
            "Predicted memory by component, per configuration",
            "#1 lora r8 · fp32 · ckpt none · 2 × 2 · adamw · chunked",
            "needs 20.9 MiB · 3000 tokens/s · chosen",
            "does not fit",
            "safety margin",
        ],
    );
    expect(
        "timeline.svg",
        &[
            "Memory over one training step",
            "time in the step (ms)",
            "memory (MiB)",
            "weights (whole step)",
            "runtime (whole step)",
            "peak 24.0 MiB (by the backward layer 1 mark)",
            "forward",
            "backward",
        ],
    );
    expect(
        "accuracy.svg",
        &[
            "Predicted vs measured peak, 4 configuration(s) not used in fitting",
            "median |error| 10.0%, worst 50.0% (L2 b4 worst)",
            "y = x (exact)",
        ],
    );
    expect(
        "frontier.svg",
        &[
            "Throughput vs memory, 6 evaluated configurations",
            "throughput (tokens/s)",
            "4 of 6 fit the budget of 30.0 MiB",
            "chosen: 3000 tokens/s, 20.9 MiB",
        ],
    );
    expect(
        "knobs.svg",
        &[
            "checkpointing: full",
            "precision: bf16",
            "method: full",
            "micro-batch × accumulation: 4 × 1",
            "change in throughput (tokens/s)",
            // 2400 − 3000 tokens/s, a fifth slower.
            "−600 (−20%)",
        ],
    );
    // One colour per component, the same in every chart that draws it: activations' red.
    for file in ["breakdown.svg", "measured.svg"] {
        assert!(svg(file).contains("#E15759"), "{file}");
    }
}

#[test]
fn alternatives_differ_from_the_pick_in_exactly_one_knob() {
    let data = loaded();
    let views = configs_from_candidates(&data.candidates);
    let alternatives = one_knob_alternatives(&views[0], &views);
    let found: Vec<(&str, &str)> = alternatives
        .iter()
        .map(|a| (a.knob, a.value.as_str()))
        .collect();
    // #4 changes precision and checkpointing together, so it is not among them; `full` has no rank,
    // which follows the method rather than counting as a second knob.
    assert_eq!(
        found,
        [
            ("method", "full"),
            ("precision", "bf16"),
            ("checkpointing", "full"),
            ("micro-batch × accumulation", "4 × 1"),
        ]
    );
}

#[test]
fn the_page_names_charts_pick_budget_and_measured_error() {
    let data = loaded();
    let html = render_report(&data).unwrap().index_html;
    for file in [
        "breakdown.svg",
        "measured.svg",
        "timeline.svg",
        "accuracy.svg",
        "frontier.svg",
        "knobs.svg",
    ] {
        assert!(html.contains(&format!("<img src=\"{file}\"")), "{file}");
    }
    for text in [
        "#1 lora r8 · fp32 · ckpt none · 2 × 2 · adamw · chunked — predicted peak 19.0 MiB, 20.9 MiB with the safety margin, 3000 tokens/s",
        "30.0 MiB with a 10% safety margin on the predicted peak",
        // (19 − 24) / 24 = −20.8%.
        "<dd id=\"measured\">peak 24.0 MiB, 2811 tokens/s (probe at 2 layer(s)); the prediction is -20.8% off, within the budget</dd>",
        "median |predicted − measured| / measured 10.0%, worst 50.0% (L2 b4 worst), over 4 configuration(s) not used in fitting",
        "<td>L2 b4 worst</td><td>0.0 MiB</td><td>0.0 MiB</td><td>+50.0%</td>",
    ] {
        assert!(html.contains(text), "page lacks `{text}`");
    }
    assert!(!html.contains("<script"), "no JavaScript");
}

#[test]
fn rendering_is_pure_and_the_folder_holds_exactly_the_rendered_files() {
    let data = loaded();
    let first = render_report(&data).unwrap();
    assert_eq!(first, render_report(&data).unwrap());
    assert_eq!(first, render_report(&loaded()).unwrap());
    let out = tempfile::tempdir().unwrap();
    let written = write_report_dir(&data, &out.path().join("report")).unwrap();
    assert_eq!(written.len(), 7);
    assert!(written.last().unwrap().ends_with("index.html"));
    for (name, contents) in first.files() {
        let on_disk = std::fs::read_to_string(out.path().join("report").join(name)).unwrap();
        assert_eq!(on_disk, contents, "{name}");
    }
    // No temporary files left behind.
    assert_eq!(
        std::fs::read_dir(out.path().join("report"))
            .unwrap()
            .count(),
        7
    );
}

#[test]
fn a_single_profile_csv_renders_what_it_can_and_names_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("probes.csv");
    std::fs::write(&path, profile_csv()).unwrap();
    let data = load_report_inputs(&path).unwrap();
    let report = render_report(&data).unwrap();
    let files: Vec<&str> = report.charts.iter().map(|c| c.file.as_str()).collect();
    assert_eq!(files, ["measured.svg", "frontier.svg"]);
    let skipped: Vec<&str> = report.skipped.iter().map(|s| s.chart.as_str()).collect();
    assert_eq!(
        skipped,
        ["breakdown", "timeline", "accuracy", "knob effect"]
    );
    for chart in &report.charts {
        well_formed(&chart.svg).unwrap_or_else(|e| panic!("{}: {e}", chart.file));
    }
    assert!(report.index_html.contains("Not drawn"));
    assert!(report.index_html.contains("not measured (no accuracy.csv"));
}

#[test]
fn an_unknown_csv_is_refused_with_the_schemas_it_could_have_been() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.csv");
    std::fs::write(&path, "a,b\n1,2\n").unwrap();
    let err = format!("{:#}", load_report_inputs(&path).unwrap_err());
    assert!(err.contains("not a memtune CSV"), "{err}");
    assert!(
        err.contains("label,predicted_peak_bytes,measured_peak_bytes"),
        "{err}"
    );
    let empty = tempfile::tempdir().unwrap();
    let err = format!("{:#}", load_report_inputs(empty.path()).unwrap_err());
    assert!(err.contains("no CSV files"), "{err}");
}

#[test]
fn reports_straight_from_a_probe_and_from_a_search() {
    use memtune::cost::{CostModel, calibration_plan, synthetic::SyntheticProber};
    use memtune::report::ReportData;
    use memtune::search::{PolicyRequest, SearchSpace, search};
    use memtune::spec::ModelSpec;

    let spec = ModelSpec::tiny();
    let probe = SyntheticProber::truth(
        &spec,
        &Knobs {
            accum: 2,
            ..Knobs::default()
        },
    );
    let data = ReportData::from_probe("p", &probe);
    assert_eq!(
        data.chosen,
        Some(ConfigRef::Probe {
            probe_id: "p".into()
        })
    );
    let report = render_report(&data).unwrap();
    let files: Vec<&str> = report.charts.iter().map(|c| c.file.as_str()).collect();
    assert_eq!(files, ["measured.svg", "timeline.svg"]);
    assert!(report.index_html.contains("measured peak"));

    let space = SearchSpace::from_request(&PolicyRequest {
        precisions: Some(vec![memtune::config::Precision::Fp32]),
        effective_batch: 4,
        seq: 128,
        ..PolicyRequest::default()
    })
    .unwrap();
    let probes = calibration_plan(&spec, &space)
        .iter()
        .map(|(s, k)| SyntheticProber::truth(s, k))
        .collect();
    let model = CostModel::fit(probes, "synthetic", Vec::new()).unwrap();
    let outcome = search(&model, &spec, &space, 64 * MIB, 0.1);
    let data = ReportData::from_outcome(&outcome, None);
    assert_eq!(data.budget_bytes, Some(64 * MIB));
    assert_eq!(data.candidates.len(), outcome.candidates.len());
    assert_eq!(data.chosen, Some(ConfigRef::Candidate { rank: 1 }));
    let report = render_report(&data).unwrap();
    let files: Vec<&str> = report.charts.iter().map(|c| c.file.as_str()).collect();
    assert_eq!(files, ["breakdown.svg", "frontier.svg", "knobs.svg"]);
}
