//! Helpers shared by the end-to-end tests that run the `memtune` binary (each test binary uses its
//! own subset of them).
#![allow(dead_code)]

use std::process::{Command, Output};

/// Runs the binary under test with `args`.
pub fn memtune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memtune"))
        .args(args)
        .output()
        .expect("run memtune")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The JSON object a `--json` command prints as its last line.
pub fn last_json(o: &Output) -> serde_json::Value {
    let out = stdout(o);
    let line = out
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no output; stderr: {}", stderr(o)));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}
