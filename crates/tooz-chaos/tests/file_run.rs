//! The whole run (orchestrator, client processes, nemesis, checker) on the file driver,
//! which needs no server: a short run must end with its closing line and no violation.

use std::process::Command;

fn chaos() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tooz-chaos"))
}

#[test]
fn a_short_file_run_has_no_violation() {
    let scratch = std::env::temp_dir().join(format!("tooz-chaos-test-{}", std::process::id()));
    let out = scratch.join("out");
    let url = format!("file://{}", scratch.join("data").display());
    let output = chaos()
        .args(["run", "--driver", "file", "--url", &url])
        .args(["--seconds", "6", "--seed", "3", "--clients", "3", "--out"])
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("cannot run tooz-chaos: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "status {}\n{stdout}\n{stderr}",
        output.status
    );
    let closing = stdout
        .lines()
        .rfind(|l| l.ends_with(" violations"))
        .unwrap_or_else(|| panic!("no closing line:\n{stdout}"));
    assert!(closing.ends_with(", 0 violations"), "{closing}");
    let ops: u64 = closing
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no op count in {closing}"));
    assert!(ops > 0, "{closing}");
    // The faults the file driver gets: client pauses and kills.
    assert!(stderr.contains("nemesis fault"), "{stderr}");
    // A clean run keeps nothing.
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn bad_input_is_a_clear_error() {
    let output = chaos()
        .args(["run", "--driver", "nosuch", "--url", "x://y"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run tooz-chaos: {e}"));
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("nosuch") && stderr.contains("redis"),
        "{stderr}"
    );
    let output = chaos()
        .args([
            "run",
            "--driver",
            "file",
            "--url",
            "file:///tmp/x",
            "--seconds",
            "1",
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run tooz-chaos: {e}"));
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--seconds"));
}
