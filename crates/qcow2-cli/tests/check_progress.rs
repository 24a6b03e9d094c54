//! `qcow2 check` shows a progress bar while it walks the L2 tables, only at
//! a terminal: under `script` (a pseudo-terminal) the bar appears and the
//! report that follows is qemu-img's; piped, stdout and stderr are exactly
//! qemu-img's (qemu-img check has no bar).

use std::process::Command;

fn out(c: &mut Command) -> (String, String) {
    let o = c.output().expect("run");
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn bar_at_a_terminal_only() {
    let Some(_) = qcow2_testutil::require("check_progress", &["qemu-img", "script"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("pb.qcow2");
    // 512 L2 tables: 512-byte clusters, 16 MiB, metadata preallocated.
    let (_, e) = out(Command::new("qemu-img").args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512,preallocation=metadata",
        img.to_str().unwrap(),
        "16M",
    ]));
    assert!(img.exists(), "{e}");
    let ours = env!("CARGO_BIN_EXE_qcow2");
    let (q_out, q_err) = out(Command::new("qemu-img").args(["check", img.to_str().unwrap()]));
    let (o_out, o_err) = out(Command::new(ours).args(["check", img.to_str().unwrap()]));
    assert_eq!(
        (&o_out, &o_err),
        (&q_out, &q_err),
        "piped: same as qemu-img"
    );
    assert!(!o_err.contains("L2 tables"));
    // At a terminal: the bar, then the same report.
    let cmd = format!("{ours} check {}", img.display());
    let (tty, _) = out(Command::new("script").args(["-qec", &cmd, "/dev/null"]));
    assert!(tty.contains("L2 tables"), "no bar at a terminal: {tty:?}");
    let report: String = tty.replace('\r', "");
    assert!(
        report.ends_with(&q_out),
        "report after the bar differs from qemu-img's:\n{report}\n--- qemu-img:\n{q_out}"
    );
    // Quiet: nothing at all, bar included.
    let cmd = format!("{ours} check -q {}", img.display());
    let (tty, _) = out(Command::new("script").args(["-qec", &cmd, "/dev/null"]));
    assert!(!tty.contains("L2 tables"), "bar shown with -q: {tty:?}");
}
