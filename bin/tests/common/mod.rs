//! Helpers shared by the command-line tests (each test binary uses a subset).
#![allow(dead_code)]
use std::path::PathBuf;
use std::process::{Command, Output};

#[path = "../../../testing/shared_data.rs"]
mod shared_data;
#[allow(unused_imports)]
pub use shared_data::{shared_cases, shared_data};

/// A fresh, empty folder for one test.
pub fn scratch(tool: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{tool}-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs a command that must succeed.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Standard output of a command that must succeed.
pub fn stdout_ok(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run_ok(cmd).stdout).into_owned()
}

/// Runs a command that must fail cleanly: exit code 1, an `error: ` line, no panic. Returns stderr.
pub fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{cmd:?} should fail cleanly: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.lines().any(|l| l.starts_with("error: ")), "{stderr}");
    stderr
}
