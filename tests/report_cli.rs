//! `memtune report` end to end: a folder of inputs in, charts and index.html out, skipped charts said.

use std::process::Command;

#[test]
fn report_renders_a_profile_csv_into_a_folder_and_names_what_it_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("profile.csv");
    let mut text = String::from(memtune::report::profile_csv::PROFILE_HEADER);
    text.push('\n');
    for (i, name) in memtune::probe::COMPONENT_NAMES.iter().enumerate() {
        text.push_str(&format!(
            "p1,tiny,2,cpu,lora,8,16.0,q_proj,q4,fp32,none,1,1,256,adamw,chunked,{name},{},{},0.1,2500.0,0.1.0\n",
            (i as u64 + 1) << 20,
            21u64 << 20
        ));
    }
    std::fs::write(&input, text).unwrap();
    let out = dir.path().join("report");
    let o = Command::new(env!("CARGO_BIN_EXE_memtune"))
        .args(["report", "--from"])
        .arg(&input)
        .arg("--out")
        .arg(&out)
        .args(["--budget", "32M"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let written: Vec<&str> = stdout.lines().collect();
    assert_eq!(written.len(), 2, "{stdout}");
    assert!(written[0].ends_with("measured.svg") && written[1].ends_with("index.html"));
    assert!(
        stderr.contains("skipped accuracy: no accuracy.csv"),
        "{stderr}"
    );
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(html.contains("<dd id=\"budget\">32.0 MiB</dd>"), "{html}");
    assert!(
        std::fs::read_to_string(out.join("measured.svg"))
            .unwrap()
            .contains("budget 32.0 MiB")
    );
}

#[test]
fn report_refuses_a_missing_input_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_memtune"))
        .args(["report", "--from"])
        .arg(dir.path().join("nope"))
        .arg("--out")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("--from") && stderr.contains("no such file or folder"),
        "{stderr}"
    );
}
