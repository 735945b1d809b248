//! End-to-end checks of the `dataset` binary: synth then stats on the result and on the real
//! samples, malformed input ending with a clear message and exit code 1, and a closed stdout
//! ending the tool quietly.
mod common;

use common::{run_err, scratch, shared_data, stdout_ok};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dataset"))
}

#[test]
fn synth_then_stats_reads_all_three_layouts() {
    let dir = scratch("dataset", "synth");
    let out = stdout_ok(
        bin()
            .args([
                "synth", "--images", "6", "--seed", "1", "--size", "64", "--out",
            ])
            .arg(&dir),
    );
    assert!(out.contains("wrote 5 train + 1 val images"), "{out}");
    let stats = stdout_ok(bin().arg("stats").arg(&dir));
    for expected in [
        "instances_train.json",
        "instances_val.json",
        "Pascal VOC",
        "ADE20K training",
        "circle",
    ] {
        assert!(stats.contains(expected), "missing {expected} in\n{stats}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn stats_on_the_real_coco_sample() {
    let data = shared_data();
    let stats = stdout_ok(
        bin()
            .arg("stats")
            .arg(data.join("coco-val2014-100/instances_val2014_100.json")),
    );
    assert!(
        stats.contains("images: 100 (0 without annotations)"),
        "{stats}"
    );
    assert!(stats.contains("annotations: 839 (9 crowd)"), "{stats}");
}

#[test]
fn malformed_json_names_the_field() {
    let dir = scratch("dataset", "bad");
    let file = dir.join("instances_bad.json");
    std::fs::write(&file, r#"{"images": [{"id": 1, "file_name": "a.jpg", "width": "640", "height": 480}], "categories": []}"#).unwrap();
    let stderr = run_err(bin().arg("stats").arg(&file));
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(
        stderr.contains("instances_bad.json: at `images[0].width`"),
        "{stderr}"
    );
    let stderr = run_err(bin().arg("stats").arg(dir.join("missing")));
    assert!(stderr.contains("no such file or folder"), "{stderr}");
    let stderr = run_err(bin().args(["synth", "--images", "0", "--out"]).arg(&dir));
    assert!(stderr.contains("at least one image"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(unix)]
#[test]
fn closed_stdout_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let data = shared_data();
    // The reader is gone before the tool writes, as with `dataset stats ... | head -0`.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = bin()
        .arg("stats")
        .arg(data.join("coco-val2014-100/instances_val2014_100.json"))
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.signal(), Some(libc::SIGPIPE), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}
