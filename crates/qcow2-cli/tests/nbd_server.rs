//! `qcow2 nbd` against `qemu-nbd`: the same client script (qemu-io over
//! NBD) through both servers on copies of one image, same output, images
//! identical and clean by qemu-img; real clients at depth (fio with
//! verification) on the event loop's path and the pool's; a termination
//! signal closes the image cleanly.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    /// `None` once waited for.
    child: Option<Child>,
    sock: PathBuf,
}

impl Drop for Server {
    /// A server left running by a failing test is killed with it.
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Server {
    /// Starts `qcow2 nbd` (`ours`) or `qemu-nbd` on `image` in `dir`.
    fn start(dir: &Path, ours: bool, image: &str, args: &[&str]) -> Server {
        let sock = dir.join(if ours { "ours.sock" } else { "qemu.sock" });
        let _ = std::fs::remove_file(&sock);
        let mut cmd = if ours {
            let mut c = Command::new(qcow2_bin());
            c.arg("nbd");
            c
        } else {
            Command::new("qemu-nbd")
        };
        cmd.arg("-k")
            .arg(&sock)
            .args(["-f", "qcow2"])
            .args(args)
            .arg(image);
        let mut child = cmd
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the server");
        let t0 = Instant::now();
        while !sock.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("server exited early: {st}");
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "no socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Server {
            child: Some(child),
            sock,
        }
    }
    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }
    /// Waits for the server to exit by itself; its status and stderr.
    fn wait(mut self) -> (i32, String) {
        let child = self.child.take().expect("running");
        let o = child.wait_with_output().unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }
    fn terminate(self) -> (i32, String) {
        let pid = self.child.as_ref().expect("running").id();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        self.wait()
    }
}

/// qemu-io's commands through the server (`-f raw` over NBD); the result
/// lines and the exit status.
fn qemu_io_over(dir: &Path, srv: &Server, cmds: &[String]) -> (Vec<String>, i32) {
    let uri = srv.uri();
    let mut args: Vec<&str> = vec!["-f", "raw"];
    args.extend(io_args(cmds, &uri));
    let r = qemu_io(dir, &args);
    let mut lines = result_lines(&r.stdout);
    lines.extend(r.stderr.lines().map(str::to_string));
    // The socket's name differs between the two servers.
    let sock = srv.sock.display().to_string();
    let lines = lines.iter().map(|l| l.replace(&sock, "SOCKET")).collect();
    (lines, r.code)
}

/// `qemu-img create -f qcow2 [opts] a.qcow2 size` in `dir`.
fn create_a(dir: &Path, opts: &[&str], size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(opts);
    args.extend_from_slice(&["a.qcow2", size]);
    qemu_img(dir, &args).ok("create");
}

/// qemu-io's `-c CMD` arguments for `cmds`, then `image`.
fn io_args<'a>(cmds: &'a [impl AsRef<str>], image: &'a str) -> Vec<&'a str> {
    let mut args = Vec::with_capacity(2 * cmds.len() + 1);
    for c in cmds {
        args.push("-c");
        args.push(c.as_ref());
    }
    args.push(image);
    args
}

fn tools(test: &str) -> bool {
    qcow2_testutil::require(test, &["qemu-img", "qemu-io", "qemu-nbd"]).is_some()
}

fn script() -> Vec<String> {
    [
        "read -P 0x11 0 1M",
        "read -P 0x22 2M 64k",
        // Overwrites of allocated data (the event loop's path when aligned).
        "write -P 0x33 4k 8k",
        "write -P 0x34 64k 64k",
        "write -P 0x35 128k 4k",
        "write -P 0x36 136k 4k",
        "write -P 0x37 512k 64k",
        // Unaligned and allocating writes (the pool's).
        "write -P 0x44 10M 1M",
        "write -P 0x45 5M 3k",
        "write -P 0x46 6143k 2k",
        "write -f -P 0x47 7M 4k",
        "write -z 2M 4k",
        "write -z -u 10M 64k",
        "discard 3M 64k",
        "write -z 12M 128k",
        "flush",
        "read -P 0x33 4k 8k",
        "read -P 0x34 64k 64k",
        "read -P 0x35 128k 4k",
        "read -P 0x36 136k 4k",
        "read -P 0x37 512k 64k",
        "read -P 0x45 5M 3k",
        "read -P 0x46 6143k 2k",
        "read -P 0 10M 64k",
        "read -P 0 12M 128k",
        "read -P 0 20M 4M",
        "read 63M 1M",
        "read 62M 2M",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// One case: image options, pre-population, server options.
fn case(create: &[&str], prep: &[&str], server: &[&str], snapshot: bool) {
    let what = format!("create {create:?} server {server:?} snapshot {snapshot}");
    let d = tmpdir();
    let dir = d.path();
    create_a(dir, create, "64M");
    qemu_io(dir, &io_args(prep, "a.qcow2")).ok("prepare");
    if snapshot {
        qemu_img(dir, &["snapshot", "-c", "s1", "a.qcow2"]).ok("snapshot");
    }
    copy(dir, "a.qcow2", "b.qcow2");
    let s = script();
    let ours = Server::start(dir, true, "a.qcow2", server);
    let (out_a, code_a) = qemu_io_over(dir, &ours, &s);
    let (st, err) = ours.wait();
    assert_eq!(st, 0, "{what}: qcow2 nbd exit status; stderr: {err}");
    let qemu = Server::start(dir, false, "b.qcow2", server);
    let (out_b, code_b) = qemu_io_over(dir, &qemu, &s);
    qemu.wait();
    assert_eq!(
        out_a, out_b,
        "{what}: qemu-io output through the two servers"
    );
    assert_eq!(code_a, code_b, "{what}");
    assert!(
        !out_a
            .iter()
            .any(|l| l.contains("failed") || l.contains("mismatch")),
        "{what}: {out_a:?}"
    );
    assert_qemu_check_clean(dir, "a.qcow2", &what);
    let r = qemu_img(
        dir,
        &[
            "compare", "-f", "qcow2", "-F", "qcow2", "a.qcow2", "b.qcow2",
        ],
    );
    assert_eq!(r.code, 0, "{what}: {}{}", r.stdout, r.stderr);
}

const PREP: &[&str] = &[
    "write -P 0x11 0 1M",
    "write -P 0x22 2M 64k",
    "write -c -P 0x23 8M 128k",
    "write -z 9M 64k",
];

#[test]
fn same_as_qemu_nbd() {
    if !tools("nbd_server::same_as_qemu_nbd") {
        return;
    }
    for cache in ["--cache=none", "--cache=writeback"] {
        case(&[], PREP, &[cache, "--discard=unmap"], false);
    }
    case(&["-o", "cluster_size=512"], PREP, &["--cache=none"], false);
    case(
        &["-o", "cluster_size=2M,extended_l2=on"],
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 2M 64k",
            "write -c -P 0x23 8M 2M",
            "write -z 12M 64k",
        ],
        &["--cache=none", "--discard=unmap"],
        false,
    );
    case(
        &["-o", "extended_l2=on"],
        PREP,
        &["--cache=writeback"],
        true,
    );
    case(
        &["-o", "preallocation=full"],
        &["write -P 0x11 0 1M", "write -P 0x22 2M 64k"],
        &["--cache=none"],
        false,
    );
    case(&[], PREP, &["--cache=none", "--aio=threads"], false);
}

#[test]
fn backing_file_and_read_only_export() {
    if !tools("nbd_server::backing_file_and_read_only_export") {
        return;
    }
    let d = tmpdir();
    let dir = d.path();
    qemu_create(dir, "base.qcow2", 64 << 20, &ImgOpts::default(), None);
    qemu_io(dir, &["-c", "write -P 0x11 0 4M", "base.qcow2"]).ok("base data");
    for n in ["a.qcow2", "b.qcow2"] {
        let base = Some(("base.qcow2", "qcow2"));
        qemu_create(dir, n, 64 << 20, &ImgOpts::default(), base);
    }
    let s: Vec<String> = [
        "read -P 0x11 0 64k",
        "write -P 0x22 4k 4k",
        "read -P 0x11 0 4k",
        "read -P 0x22 4k 4k",
        "read -P 0x11 8k 56k",
        "write -P 0x33 64k 64k",
        "write -P 0x34 64k 4k",
        "read -P 0x34 64k 4k",
        "read -P 0x33 68k 60k",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let ours = Server::start(dir, true, "a.qcow2", &["--cache=none"]);
    let (out_a, _) = qemu_io_over(dir, &ours, &s);
    assert_eq!(ours.wait().0, 0);
    let qemu = Server::start(dir, false, "b.qcow2", &["--cache=none"]);
    let (out_b, _) = qemu_io_over(dir, &qemu, &s);
    qemu.wait();
    assert_eq!(out_a, out_b);
    assert_qemu_check_clean(dir, "a.qcow2", "backing");
    let r = qemu_img(dir, &["compare", "a.qcow2", "b.qcow2"]);
    assert_eq!(r.code, 0, "{}", r.stdout);

    // Read-only: the same refusal as qemu-nbd -r.
    let s: Vec<String> = vec!["read -P 0x22 4k 4k".into(), "write 0 4k".into()];
    let ours = Server::start(dir, true, "a.qcow2", &["-r"]);
    let (out_a, code_a) = qemu_io_over(dir, &ours, &s);
    ours.wait();
    let qemu = Server::start(dir, false, "b.qcow2", &["-r"]);
    let (out_b, code_b) = qemu_io_over(dir, &qemu, &s);
    qemu.wait();
    assert_eq!((out_a, code_a), (out_b, code_b));
}

/// fio over NBD at depth 32 with every block verified after it is written.
fn fio_verify(dir: &Path, srv: &Server, bs: &str, what: &str) {
    let r = run_in(
        dir,
        "fio",
        &[
            "--name=v",
            "--ioengine=nbd",
            &format!("--uri={}", srv.uri()),
            "--rw=randwrite",
            &format!("--bsrange={bs}"),
            "--iodepth=32",
            "--size=32M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--randrepeat=0",
        ],
    );
    assert_eq!(r.code, 0, "{what}: fio:\n{}\n{}", r.stdout, r.stderr);
    assert!(!r.stdout.contains("verify: bad"), "{what}: {}", r.stdout);
}

#[test]
fn fio_at_depth_verifies() {
    if !tools("nbd_server::fio_at_depth_verifies")
        || qcow2_testutil::require("nbd_server::fio_at_depth_verifies", &["fio"]).is_none()
    {
        return;
    }
    for (create, server, bs) in [
        // Every request on the event loop (allocated clusters, aligned).
        (
            &["-o", "preallocation=full"][..],
            &["--cache=none"][..],
            "4k-64k",
        ),
        // Allocations on the pool meeting overwrites on the loop.
        (
            &["-o", "cluster_size=512"][..],
            &["--cache=none"][..],
            "4k-16k",
        ),
        (
            &["-o", "extended_l2=on"][..],
            &["--cache=writeback"][..],
            "512-64k",
        ),
        (&[][..], &["--cache=none", "--aio=threads"][..], "4k-128k"),
    ] {
        let what = format!("{create:?} {server:?} {bs}");
        let d = tmpdir();
        let dir = d.path();
        create_a(dir, create, "32M");
        let mut sargs = vec!["-t", "-e", "0"];
        sargs.extend_from_slice(server);
        let srv = Server::start(dir, true, "a.qcow2", &sargs);
        fio_verify(dir, &srv, bs, &what);
        let (st, err) = srv.terminate();
        assert_eq!(st, 0, "{what}: {err}");
        assert_qemu_check_clean(dir, "a.qcow2", &what);
    }
}

#[test]
fn termination_signal_closes_cleanly() {
    if !tools("nbd_server::termination_signal_closes_cleanly") {
        return;
    }
    let d = tmpdir();
    let dir = d.path();
    let o = ImgOpts {
        cluster_size: 4096,
        ..ImgOpts::default()
    };
    qemu_create(dir, "a.qcow2", 64 << 20, &o, None);
    let srv = Server::start(dir, true, "a.qcow2", &["-t", "--cache=writeback"]);
    // Allocating writes, never flushed by the client: only the server's
    // close writes their L2 tables and refcounts.
    let cmds: Vec<String> = (0..64)
        .map(|i| format!("write -P {} {}k 4k", i + 1, i * 260))
        .collect();
    let (out, code) = qemu_io_over(dir, &srv, &cmds);
    assert_eq!(code, 0, "{out:?}");
    // A second client while it runs (persistent): still served.
    let (out, code) = qemu_io_over(dir, &srv, &["read -P 1 0 4k".to_string()]);
    assert_eq!(code, 0, "{out:?}");
    let (st, err) = srv.terminate();
    assert_eq!(st, 0, "stderr: {err}");
    assert!(!dir.join("ours.sock").exists(), "socket removed");
    let r = qemu_img(dir, &["check", "a.qcow2"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("No errors were found"), "{}", r.stdout);
    let checks: Vec<String> = (0..64)
        .map(|i| format!("read -P {} {}k 4k", i + 1, i * 260))
        .collect();
    let r = qemu_io(dir, &io_args(&checks, "a.qcow2"));
    assert!(
        !r.stdout.contains("mismatch") && r.code == 0,
        "{}",
        r.stdout
    );
}
