//! Tests of the nbdkit plugin `plugins/nbdkit/nbdkit-qcow2-plugin.c`.
//!
//! Each test builds the plugin with `cc -std=c11 -Wall -Wextra -Wpedantic
//! -Werror -fPIC -shared` against `include/qcow2.h` and the `libqcow2.so`
//! under test (found as `common::lib_dir` describes, like the C harness),
//! starts `nbdkit -U SOCKET -f` on a scratch image and drives it with QEMU's
//! NBD client (qemu-io, qemu-img) and libnbd's nbdinfo:
//!
//! - `qemu_io_scripts_match_local_qemu`: the same qemu-io script through NBD
//!   and on a local twin image; same output, then `qemu-img compare` equal,
//!   `qemu-img check` clean, same `qemu-img map` (host offsets dropped);
//! - `map_over_nbd_matches_engine`: `qemu-img map` and `nbdinfo --map` over
//!   NBD agree with the map of the file (qemu-img, and the `qcow2` CLI when
//!   it is built), backing chain included;
//! - `parallel_clients`: several qemu-io processes and `qemu-img bench` at
//!   once on disjoint ranges, every range verified afterwards; the same with
//!   nbdkit under valgrind (`parallel_clients_valgrind`: "ERROR SUMMARY: 0
//!   errors", definite leaks count) and with the plugin built with ASan+UBSan
//!   and the ASan runtime preloaded into nbdkit (`parallel_clients_asan`: no
//!   report in the log); skipped without valgrind / libasan;
//! - `bench_against_qemu_nbd` (ignored; `cargo test -p qcow2-capi --release
//!   --test nbdkit -- --ignored --nocapture`, or `plugins/nbdkit/bench.sh`):
//!   throughput next to `qemu-nbd`.
//!
//! Without nbdkit, its headers (`apt-get install nbdkit nbdkit-plugin-dev
//! libnbd-bin`), a C compiler or qemu-utils the tests print a note and pass.
//! Every server is stopped (SIGTERM, then SIGKILL) when its guard drops, so
//! also when a test fails; `--exit-with-parent` covers a killed test process.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PLUGIN_SRC: &str = "plugins/nbdkit/nbdkit-qcow2-plugin.c";

fn cc() -> Option<PathBuf> {
    if let Some(cc) = std::env::var_os("CC") {
        let p = PathBuf::from(cc);
        return if p.is_absolute() {
            Some(p)
        } else {
            common::which(&p.to_string_lossy(), &[])
        };
    }
    common::which("cc", &[]).or_else(|| common::which("gcc", &[]))
}

/// The tools every test needs, or a note saying what is missing.
fn tools(extra: &[&str]) -> Result<PathBuf, String> {
    let cc = cc().ok_or("no C compiler (cc/gcc/$CC)")?;
    for tool in ["nbdkit", "qemu-img", "qemu-io"].iter().chain(extra) {
        if common::which(tool, &[]).is_none() {
            return Err(format!(
                "{tool} not found (apt-get install -y nbdkit nbdkit-plugin-dev libnbd-bin qemu-utils)"
            ));
        }
    }
    // nbdkit-plugin-dev: the header the plugin includes.
    let probe = Command::new(&cc)
        .args(["-E", "-x", "c", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .unwrap()
                .write_all(b"#include <nbdkit-plugin.h>\n")?;
            c.wait()
        });
    if !matches!(probe, Ok(s) if s.success()) {
        return Err("nbdkit-plugin.h not found (apt-get install -y nbdkit-plugin-dev)".to_string());
    }
    Ok(cc)
}

/// Skips the calling test (returns None) with a printed note when tools are missing.
macro_rules! need_tools {
    ($($extra:expr),*) => {
        match tools(&[$($extra),*]) {
            Ok(cc) => cc,
            Err(note) => {
                qcow2_testutil::skip("nbdkit plugin test", &note);
                return;
            }
        }
    };
}

/// How the nbdkit server (and the plugin in it) is checked.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Check {
    /// nbdkit run directly, the plugin built with `-O2`.
    Plain,
    /// nbdkit run under valgrind's memcheck (it follows every thread of the
    /// process; nbdkit -f does not fork).
    Valgrind,
    /// The plugin built with ASan+UBSan; nbdkit itself is not instrumented,
    /// so the ASan runtime is preloaded (it must come first).
    Asan,
}

/// Builds the plugin into `dir`, linked to the libqcow2.so under test (rpath).
fn build_plugin(cc: &Path, dir: &Path) -> PathBuf {
    build_plugin_for(cc, dir, Check::Plain)
}

/// As [`build_plugin`], for a checked server: `-z nodelete` keeps the plugin
/// (and libqcow2 with it) mapped after nbdkit's dlclose at exit, so leak
/// reports keep their symbols and pointers held in the plugin's static data
/// still count as reachable; the ASan build is instrumented.
fn build_plugin_for(cc: &Path, dir: &Path, check: Check) -> PathBuf {
    let root = common::workspace_root();
    let lib = common::lib_dir();
    assert!(
        lib.join("libqcow2.so").is_file(),
        "{} missing: build it with `cargo build -p qcow2-capi` or set QCOW2_LIB_DIR",
        lib.join("libqcow2.so").display()
    );
    let out = match check {
        Check::Plain => dir.join("nbdkit-qcow2-plugin.so"),
        _ => dir.join(format!("nbdkit-qcow2-plugin-{check:?}.so").to_lowercase()),
    };
    let mut cmd = Command::new(cc);
    cmd.args([
        "-std=c11",
        "-Wall",
        "-Wextra",
        "-Wpedantic",
        "-Werror",
        "-fPIC",
        "-shared",
        "-g",
    ]);
    match check {
        Check::Plain => {
            cmd.arg("-O2");
        }
        Check::Valgrind => {
            cmd.args(["-O2", "-Wl,-z,nodelete"]);
        }
        Check::Asan => {
            cmd.args([
                "-O1",
                "-fsanitize=address,undefined",
                "-fno-omit-frame-pointer",
                "-Wl,-z,nodelete",
            ]);
        }
    }
    cmd.arg("-I")
        .arg(root.join("include"))
        .arg(root.join(PLUGIN_SRC))
        .arg("-o")
        .arg(&out)
        .arg("-L")
        .arg(&lib)
        .arg("-Wl,--disable-new-dtags")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lqcow2");
    let (ok, o, e) = common::run(&mut cmd);
    assert!(ok, "building the plugin failed: {cmd:?}\n{o}\n{e}");
    out
}

/// The ASan runtime of `cc` (to preload into nbdkit), if it has one.
fn libasan(cc: &Path) -> Option<PathBuf> {
    let out = Command::new(cc)
        .arg("-print-file-name=libasan.so")
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    // Without the library cc prints the bare name back.
    (p.is_absolute() && p.exists()).then_some(p)
}

/// An nbdkit leak of its own (1.32, also with its `memory` plugin): one
/// block allocated by nbdkit's code in a connection thread. Only blocks
/// malloc'd directly by nbdkit are matched, not the plugin's or libqcow2's.
const NBDKIT_VALGRIND_SUPP: &str = "{
   nbdkit-own-connection-thread-leak
   Memcheck:Leak
   match-leak-kinds: definite
   fun:malloc
   obj:*/nbdkit
   ...
   fun:start_thread
}
";

/// A running NBD server on a Unix socket; stopped when dropped.
struct Server {
    name: &'static str,
    child: Option<Child>,
    sock: PathBuf,
    log: PathBuf,
    /// Written by the server once it listens (nbdkit -P); None: probe the socket.
    pidfile: Option<PathBuf>,
}

impl Server {
    fn start(
        name: &'static str,
        mut cmd: Command,
        sock: PathBuf,
        log: PathBuf,
        pidfile: Option<PathBuf>,
    ) -> Server {
        let logf = std::fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            // The plugin must use the library under test, not a stale copy
            // on cargo's LD_LIBRARY_PATH.
            .env("LD_LIBRARY_PATH", common::lib_dir());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let mut s = Server {
            name,
            child: Some(child),
            sock,
            log,
            pidfile,
        };
        s.wait_ready(&cmd);
        s
    }

    /// nbdkit with the plugin serving `image`, plus plugin parameters.
    fn nbdkit(plugin: &Path, image: &Path, params: &[&str], dir: &Path) -> Server {
        Server::nbdkit_with(&[], plugin, image, params, dir)
    }

    /// As [`Server::nbdkit`], with nbdkit options (e.g. `-r`) before the plugin.
    fn nbdkit_with(
        nbdkit_opts: &[&str],
        plugin: &Path,
        image: &Path,
        params: &[&str],
        dir: &Path,
    ) -> Server {
        Server::nbdkit_checked(None, nbdkit_opts, plugin, image, params, dir)
    }

    /// As [`Server::nbdkit_with`], run as `checker` says (None: directly).
    fn nbdkit_checked(
        checker: Option<&Checker>,
        nbdkit_opts: &[&str],
        plugin: &Path,
        image: &Path,
        params: &[&str],
        dir: &Path,
    ) -> Server {
        let sock = dir.join("nbdkit.sock");
        let pidfile = dir.join("nbdkit.pid");
        let _ = std::fs::remove_file(&pidfile);
        // nbdkit leaves its socket behind; a second server in the same
        // directory would find the address in use.
        let _ = std::fs::remove_file(&sock);
        let mut cmd = match checker {
            None => Command::new("nbdkit"),
            Some(c) => c.command(),
        };
        cmd.arg("-U")
            .arg(&sock)
            .arg("-P")
            .arg(&pidfile)
            .args(["-f", "--exit-with-parent"])
            .args(nbdkit_opts)
            .arg(plugin)
            .arg(format!("file={}", image.display()))
            .args(params);
        Server::start("nbdkit", cmd, sock, dir.join("nbdkit.log"), Some(pidfile))
    }

    /// QEMU's own server on `image`.
    fn qemu_nbd(image: &Path, dir: &Path) -> Server {
        let sock = dir.join("qemu-nbd.sock");
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg("-k")
            .arg(&sock)
            .args([
                "-f",
                "qcow2",
                "--cache=writeback",
                "--discard=unmap",
                "-t",
                "-e",
                "0",
            ])
            .arg(image);
        Server::start("qemu-nbd", cmd, sock, dir.join("qemu-nbd.log"), None)
    }

    fn wait_ready(&mut self, cmd: &Command) {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "{cmd:?} exited with {status} before serving:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            let ready = match &self.pidfile {
                // nbdkit writes its pid file once it accepts connections (a
                // probing connect would make it log a handshake error).
                Some(p) => std::fs::metadata(p).is_ok_and(|m| m.len() > 0),
                // qemu-nbd -t: a probing connection is harmless.
                None => std::os::unix::net::UnixStream::connect(&self.sock).is_ok(),
            };
            if ready {
                return;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                let log = self.stop().1;
                panic!(
                    "{cmd:?} did not listen on {} in 20 s:\n{log}",
                    self.sock.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    /// SIGTERM (clean shutdown: the image is flushed and closed), SIGKILL
    /// after 30 s. Returns (clean exit, log).
    fn stop(&mut self) -> (bool, String) {
        let Some(mut child) = self.child.take() else {
            return (true, String::new());
        };
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let ok = status.is_some_and(|s| s.success());
        (ok, log)
    }

    /// Stops the server and asserts a clean exit without logged errors.
    fn stop_clean(&mut self) {
        let (ok, log) = self.stop();
        assert!(ok, "{} did not exit cleanly:\n{log}", self.name);
        assert!(
            !log.contains("error"),
            "{} logged errors:\n{log}",
            self.name
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn run_ok(cmd: &mut Command) -> String {
    let (ok, o, e) = common::run(cmd);
    assert!(ok, "{cmd:?} failed\n--- stdout\n{o}\n--- stderr\n{e}");
    o
}

fn qemu_img_create(path: &Path, size: &str, opts: &str) {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if !opts.is_empty() {
        cmd.args(["-o", opts]);
    }
    run_ok(cmd.arg(path).arg(size));
}

/// Runs qemu-io commands on `target`; returns stdout+stderr with the timing
/// lines removed (what is left: "wrote/read/discard N/N bytes at offset X",
/// errors, pattern mismatches).
fn qemu_io(open: &[&str], target: &str, cmds: &[String]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(open).arg(target);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-io: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .filter(|l| !l.contains(" ops; "))
        .map(|l| {
            // Error lines name the device; keep the message only.
            match l.find("failed: ") {
                Some(i) => l[i..].to_string(),
                None => l.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn qemu_io_nbd(server: &Server, cmds: &[String]) -> String {
    qemu_io(&["-f", "raw"], &server.uri(), cmds)
}

fn qemu_io_local(image: &Path, cmds: &[String]) -> String {
    qemu_io(
        &["-f", "qcow2", "-t", "writeback", "-d", "unmap"],
        &image.to_string_lossy(),
        cmds,
    )
}

// --- qemu-img map parsing ---------------------------------------------------

/// One entry of `qemu-img map --output=json` without its host offset.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MapEntry {
    start: u64,
    length: u64,
    depth: u64,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    has_offset: bool,
}

fn json_field<'a>(obj: &'a str, key: &str) -> Option<&'a str> {
    let k = format!("\"{key}\":");
    let i = obj.find(&k)? + k.len();
    let rest = obj[i..].trim_start();
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

/// Parses qemu-img's (and the qcow2 CLI's) JSON map: an array of flat objects.
fn parse_map(json: &str) -> Vec<MapEntry> {
    let mut v = Vec::new();
    for obj in json.split('{').skip(1) {
        let obj = &obj[..obj.find('}').expect("map object end")];
        let num = |k: &str| -> u64 {
            json_field(obj, k)
                .unwrap_or_else(|| panic!("map entry without {k}: {obj}"))
                .parse()
                .unwrap()
        };
        let flag = |k: &str| json_field(obj, k) == Some("true");
        v.push(MapEntry {
            start: num("start"),
            length: num("length"),
            depth: json_field(obj, "depth").map_or(0, |d| d.parse().unwrap()),
            present: flag("present"),
            zero: flag("zero"),
            data: flag("data"),
            compressed: flag("compressed"),
            has_offset: json_field(obj, "offset").is_some(),
        });
    }
    v
}

/// Merges adjacent entries that are equal but for start/length.
fn merge<T: Clone + PartialEq>(v: &[(u64, u64, T)]) -> Vec<(u64, u64, T)> {
    let mut out: Vec<(u64, u64, T)> = Vec::new();
    for (s, l, k) in v {
        if let Some(last) = out.last_mut() {
            if last.0 + last.1 == *s && last.2 == *k {
                last.1 += l;
                continue;
            }
        }
        out.push((*s, *l, k.clone()));
    }
    out
}

/// The map without host offsets, adjacent equal entries merged.
fn map_shape(entries: &[MapEntry]) -> Vec<(u64, u64, MapEntry)> {
    let v: Vec<_> = entries
        .iter()
        .map(|e| {
            let mut k = e.clone();
            k.start = 0;
            k.length = 0;
            (e.start, e.length, k)
        })
        .collect();
    merge(&v)
}

fn qemu_img_map_file(image: &Path) -> Vec<MapEntry> {
    parse_map(&run_ok(
        Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "qcow2"])
            .arg(image),
    ))
}

/// What a client may rely on: does the range read as zeroes?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Data,
    Zero,
}

/// present, zero, data, depth of a map entry.
type Shape = (bool, bool, bool, u64);

fn classes(v: &[(u64, u64, Class)]) -> Vec<(u64, u64, Class)> {
    merge(v)
}

fn check_clean(image: &Path) {
    run_ok(
        Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(image),
    );
}

// --- qemu-io scripts --------------------------------------------------------

/// A fixed script covering every write-zeroes flavour (64 KiB clusters),
/// with pattern reads checking the result.
fn fixed_script() -> Vec<String> {
    let k = 1024u64;
    let c = 64 * k;
    let mut s: Vec<String> = Vec::new();
    let mut p = |x: String| s.push(x);
    // Data: whole clusters, partial clusters, FUA, across a cluster boundary.
    p(format!("write -P 1 0 {}", 16 * c));
    p(format!("write -P 2 {} {}", 16 * c + 512, 3 * k));
    p(format!("write -f -P 3 {} {}", 20 * c - 4 * k, 8 * k));
    // write -z: whole clusters over data (zero-alloc), then unmapped.
    p(format!("write -z 0 {}", 2 * c));
    p(format!("write -z -u {} {}", c, 2 * c));
    // Partial cluster over data: falls back to writing zeroes.
    p(format!("write -z {} {}", 3 * c + 4 * k, 8 * k));
    p(format!("write -z -u {} {}", 4 * c + 4 * k, c));
    // Fast zero: aligned over data is fine; partial over data must fail with ENOTSUP.
    p(format!("write -z -n {} {}", 6 * c, 2 * c));
    p(format!("write -z -n -u {} {}", 8 * c, c));
    p(format!("write -z -n {} {}", 9 * c + 4 * k, 4 * k));
    // Fast zero, partial, rest of the cluster unallocated: fine.
    p(format!("write -z -n {} {}", 40 * c + 4 * k, 4 * k));
    // FUA write-zeroes.
    p(format!("write -z -f {} {}", 10 * c, c));
    p(format!("write -z -u -f {} {}", 11 * c, c));
    // Unallocated clusters zeroed (zero-plain) with and without MAY_UNMAP.
    p(format!("write -z {} {}", 30 * c, 2 * c));
    p(format!("write -z -u {} {}", 32 * c, 2 * c));
    // Discard: whole clusters, partial (no-op), over zero clusters.
    p(format!("discard {} {}", 12 * c, 2 * c));
    p(format!("discard {} {}", 14 * c + 512, 4 * k));
    p(format!("discard {} {}", 30 * c, c));
    // Data over zero clusters again, then zero a long mixed range.
    p(format!("write -P 4 {} {}", c, 8 * k));
    p(format!("write -P 5 {} {}", 50 * c, 5 * c));
    p(format!("write -z {} {}", 49 * c, 3 * c + 8 * k));
    // Reads that check the result.
    p(format!("read -P 0 0 {}", c));
    p(format!("read -P 4 {} {}", c, 8 * k));
    p(format!("read -P 0 {} {}", c + 8 * k, c - 8 * k));
    p(format!("read -P 1 {} {}", 3 * c, 4 * k));
    p(format!("read -P 0 {} {}", 3 * c + 4 * k, 8 * k));
    p(format!("read -P 1 {} {}", 3 * c + 12 * k, c - 12 * k));
    p(format!("read -P 0 {} {}", 6 * c, 3 * c));
    p(format!("read -P 1 {} {}", 9 * c, c));
    p(format!("read -P 0 {} {}", 10 * c, 4 * c));
    p(format!("read -P 1 {} {}", 14 * c, 2 * c));
    p(format!("read -P 2 {} {}", 16 * c + 512, 3 * k));
    p(format!("read -P 3 {} {}", 20 * c - 4 * k, 8 * k));
    p(format!("read -P 0 {} {}", 30 * c, 4 * c));
    p(format!("read -P 0 {} {}", 49 * c, 3 * c + 8 * k));
    p(format!("read -P 5 {} {}", 52 * c + 8 * k, 3 * c - 8 * k));
    s
}

/// A pseudo-random mix of writes, zeroes (all flags), discards and reads.
fn random_script(seed: u64, n: usize, span: u64) -> Vec<String> {
    let mut x = seed;
    let mut next = move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 33
    };
    let unit = 4096;
    let mut s = Vec::new();
    for _ in 0..n {
        let off = next() % (span / unit) * unit;
        let len = ((next() % 48) + 1) * unit;
        let len = len.min(span - off);
        let op = match next() % 8 {
            0..=2 => format!("write -P {} {off} {len}", 1 + next() % 200),
            3 => format!("write -z {off} {len}"),
            4 => format!("write -z -u {off} {len}"),
            5 => format!("write -z -n {off} {len}"),
            6 => format!("discard {off} {len}"),
            _ => format!("read {off} {len}"),
        };
        s.push(op);
    }
    s.push("flush".to_string());
    s
}

/// Runs `script` through the plugin and on a local twin, then compares.
fn script_vs_local(plugin: &Path, dir: &Path, create_opts: &str, script: &[String]) {
    let served = dir.join("served.qcow2");
    let twin = dir.join("twin.qcow2");
    qemu_img_create(&served, "8M", create_opts);
    std::fs::copy(&served, &twin).unwrap();

    let mut server = Server::nbdkit(plugin, &served, &[], dir);
    let nbd_out = qemu_io_nbd(&server, script);
    server.stop_clean();
    let local_out = qemu_io_local(&twin, script);

    assert!(
        !nbd_out.contains("Pattern verification failed"),
        "pattern mismatch over NBD ({create_opts}):\n{nbd_out}"
    );
    assert!(
        !local_out.contains("Pattern verification failed"),
        "pattern mismatch in local qemu-io ({create_opts}):\n{local_out}"
    );
    if nbd_out != local_out {
        let diff: Vec<_> = nbd_out
            .lines()
            .zip(local_out.lines())
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .take(10)
            .map(|(i, (a, b))| format!("line {i}: nbd {a:?} / local {b:?}"))
            .collect();
        panic!(
            "qemu-io output differs ({create_opts}):\n{}\n--- nbd\n{nbd_out}\n--- local\n{local_out}",
            diff.join("\n")
        );
    }

    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"])
            .arg(&served)
            .arg(&twin),
    );
    check_clean(&served);
    check_clean(&twin);
    let a = map_shape(&qemu_img_map_file(&served));
    let b = map_shape(&qemu_img_map_file(&twin));
    if a != b {
        let fmt = |v: &[(u64, u64, MapEntry)]| {
            v.iter()
                .map(|(s, l, e)| {
                    format!(
                        "{s:>10} {l:>10} present={} zero={} data={} offset={}",
                        e.present, e.zero, e.data, e.has_offset
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        panic!(
            "allocation map differs ({create_opts}):\n--- served (plugin)\n{}\n--- twin (qemu)\n{}",
            fmt(&a),
            fmt(&b)
        );
    }
    eprintln!(
        "{create_opts:?}: {} qemu-io commands, outputs, contents and maps ({} ranges) agree",
        script.len(),
        a.len()
    );
}

#[test]
fn qemu_io_scripts_match_local_qemu() {
    let cc = need_tools!();
    let tmp = common::ScratchDir::new("nbdkit-script");
    let plugin = build_plugin(&cc, tmp.path());
    let mut script = fixed_script();
    script.extend(random_script(0x5eed, 300, 8 << 20));
    for (i, opts) in [
        "",
        "cluster_size=4096",
        "extended_l2=on,cluster_size=131072",
        "compat=0.10",
    ]
    .iter()
    .enumerate()
    {
        let dir = tmp.path().join(format!("case{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        // The fixed part assumes 64 KiB clusters; other layouts get the random part.
        let s = if opts.is_empty() {
            script.clone()
        } else {
            random_script(0xabc + i as u64, 300, 8 << 20)
        };
        script_vs_local(&plugin, &dir, opts, &s);
    }
}

// --- map over NBD -------------------------------------------------------------

/// The qcow2 CLI in this profile's target directory, if built.
fn qcow2_cli() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("qcow2");
    p.is_file().then_some(p)
}

/// Expected NBD extent type (nbdinfo's number) of a file map entry, per the
/// plugin's contract: unallocated zero → hole|zero (3), zero clusters →
/// zero (2), data → 0.
fn expected_type(e: &MapEntry) -> u32 {
    if e.data || !e.zero {
        0
    } else if e.present {
        2
    } else {
        3
    }
}

#[test]
fn map_over_nbd_matches_engine() {
    let cc = need_tools!("nbdinfo");
    let tmp = common::ScratchDir::new("nbdkit-map");
    let dir = tmp.path();
    let plugin = build_plugin(&cc, dir);
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    let c = 65536u64;
    qemu_img_create(&base, "32M", "");
    qemu_io_local(
        &base,
        &[
            format!("write -P 7 {} {}", 100 * c, 10 * c),
            format!("write -P 8 {} {}", 200 * c, 3 * c),
        ],
    );
    qemu_img_create(&top, "32M", "backing_file=base.qcow2,backing_fmt=qcow2");
    let out = qemu_io_local(
        &top,
        &[
            format!("write -P 1 0 {}", 8 * c),
            format!("write -z {} {}", 2 * c, 2 * c),
            format!("write -z -u {} {}", 5 * c, c),
            format!("write -P 2 {} {}", 20 * c + 4096, 4096),
            format!("write -z {} {}", 30 * c, 4 * c),
            format!("write -z {} {}", 102 * c, 2 * c),
            format!("discard {} {}", 106 * c, c),
            format!("write -P 3 {} {}", 300 * c, 50 * c),
            format!("write -z -u {} {}", 310 * c, 10 * c),
            format!("write -z {} {}", 320 * c, 10 * c),
        ],
    );
    assert!(!out.contains("failed"), "{out}");

    let file_map = qemu_img_map_file(&top);
    let size = file_map.last().map(|e| e.start + e.length).unwrap();
    let expected_types = merge(
        &file_map
            .iter()
            .map(|e| (e.start, e.length, expected_type(e)))
            .collect::<Vec<_>>(),
    );
    let to_class = |t: u32| if t & 2 != 0 { Class::Zero } else { Class::Data };
    let expected_classes = classes(
        &expected_types
            .iter()
            .map(|&(s, l, t)| (s, l, to_class(t)))
            .collect::<Vec<_>>(),
    );

    // The engine's own map (qcow2 CLI), when built, must agree with qemu-img's.
    if let Some(cli) = qcow2_cli() {
        let (ok, o, e) = common::run(Command::new(&cli).args(["map", "--output=json"]).arg(&top));
        if ok {
            let ours = map_shape(&parse_map(&o));
            let theirs = map_shape(&file_map);
            let strip = |v: &[(u64, u64, MapEntry)]| -> Vec<(u64, u64, Shape)> {
                merge(
                    &v.iter()
                        .map(|(s, l, e)| (*s, *l, (e.present, e.zero, e.data, e.depth)))
                        .collect::<Vec<_>>(),
                )
            };
            assert_eq!(strip(&ours), strip(&theirs), "qcow2 map vs qemu-img map");
        } else {
            eprintln!(
                "note: {} map failed ({e}); engine map comparison skipped",
                cli.display()
            );
        }
    } else {
        eprintln!(
            "note: qcow2 CLI not built (cargo build -p qcow2-cli); compared with qemu-img map only"
        );
    }

    let mut server = Server::nbdkit(&plugin, &top, &["readonly=true"], dir);

    // nbdinfo --map: "offset length type description" per line.
    let out = run_ok(Command::new("nbdinfo").arg("--map").arg(server.uri()));
    let mut nbd_types = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        nbd_types.push((
            f[0].parse::<u64>().unwrap(),
            f[1].parse::<u64>().unwrap(),
            f[2].parse::<u32>().unwrap(),
        ));
    }
    let nbd_types = merge(&nbd_types);
    assert_eq!(
        nbd_types, expected_types,
        "nbdinfo --map vs file map\n{out}"
    );

    // qemu-img map over NBD: data/zero must agree.
    let json = run_ok(
        Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "raw"])
            .arg(server.uri()),
    );
    let nbd_map = parse_map(&json);
    assert_eq!(nbd_map.last().map(|e| e.start + e.length), Some(size));
    let nbd_classes = classes(
        &nbd_map
            .iter()
            .map(|e| {
                let c = if e.zero { Class::Zero } else { Class::Data };
                (e.start, e.length, c)
            })
            .collect::<Vec<_>>(),
    );
    assert_eq!(
        nbd_classes, expected_classes,
        "qemu-img map over NBD vs file map\n{json}"
    );
    // NBD's hole bit: "data": false exactly where the plugin reported a hole.
    for e in &nbd_map {
        for (s, l, t) in &expected_types {
            if *s < e.start + e.length && e.start < s + l {
                assert_eq!(
                    e.data,
                    t & 1 == 0,
                    "data flag over NBD at {}: {e:?} vs type {t}",
                    e.start
                );
            }
        }
    }

    // Reads through the server see the backing file's data.
    let out = qemu_io_nbd(
        &server,
        &[
            format!("read -P 7 {} {}", 100 * c, 2 * c),
            format!("read -P 0 {} {}", 102 * c, 2 * c),
            format!("read -P 7 {} {}", 104 * c, 2 * c),
            format!("read -P 8 {} {}", 200 * c, 3 * c),
        ],
    );
    assert!(
        !out.contains("failed"),
        "reads through the backing chain:\n{out}"
    );
    // Writes are refused on a read-only export.
    let out = qemu_io_nbd(&server, &["write -P 1 0 4096".to_string()]);
    assert!(
        out.contains("failed") || out.contains("Permission denied"),
        "write on readonly=true succeeded: {out}"
    );
    server.stop_clean();
    check_clean(&top);

    // QEMU's own server classifies the same ranges as zero/data (it reports
    // zero clusters as holes too, so only the zero bit is compared).
    if common::which("qemu-nbd", &[]).is_some() {
        let mut qemu = Server::qemu_nbd(&top, dir);
        let out = run_ok(Command::new("nbdinfo").arg("--map").arg(qemu.uri()));
        qemu.stop();
        let mut v = Vec::new();
        for line in out.lines().filter(|l| !l.trim().is_empty()) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let t: u32 = f[2].parse().unwrap();
            v.push((f[0].parse().unwrap(), f[1].parse().unwrap(), to_class(t)));
        }
        assert_eq!(
            classes(&v),
            expected_classes,
            "qemu-nbd's map vs the plugin's\n{out}"
        );
    } else {
        qcow2_testutil::skip("map over NBD vs qemu-nbd", "qemu-nbd not installed");
    }
    eprintln!(
        "map over NBD: {} extents agree (nbdinfo, qemu-img map)",
        expected_types.len()
    );
}

// --- read-only exports never write the image -----------------------------------

/// A lazy-refcount image left dirty by a killed qemu-io: the read-write open
/// would repair it (a write). `nbdkit -r`, `readonly=true` and a bare
/// `readonly=` must open it read-only, serve its data and leave every byte of
/// the file as it was.
/// An encrypted image (made by qemu-img, LUKS) served with `password=+FILE`:
/// NBD clients read what qemu-io wrote and write what qemu-io then reads
/// (sub-sector writes too); without the passphrase, or with a wrong one, the
/// open fails with the library's message in the server log.
#[test]
fn encrypted_image_over_nbd() {
    let cc = need_tools!();
    let tmp = common::ScratchDir::new("nbdkit-enc");
    let dir = tmp.path();
    let plugin = build_plugin(&cc, dir);
    let image = dir.join("enc.qcow2");
    let obj = "secret,id=sec0,data=astrochicken";
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "--object", obj, "-o"])
            .arg("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10")
            .arg(&image)
            .arg("4M"),
    );
    let spec = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        image.display()
    );
    let local = |cmds: &[&str]| {
        let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
        qemu_io(&["--object", obj, "--image-opts"], &spec, &cmds)
    };
    let out = local(&["write -P 0x5a 0 128k"]);
    assert!(out.contains("wrote 131072/131072"), "{out}");
    let pw = dir.join("pw");
    std::fs::write(&pw, "astrochicken").unwrap();
    let param = format!("password=+{}", pw.display());
    let mut server = Server::nbdkit(&plugin, &image, &[&param], dir);
    let out = qemu_io_nbd(
        &server,
        &[
            "read -P 0x5a 0 128k".to_string(),
            "write -P 0x6b 1000 3000".to_string(),
            "write -P 0x7c 1M 64k".to_string(),
        ],
    );
    assert!(!out.contains("fail"), "{out}");
    server.stop_clean();
    let out = local(&[
        "read -P 0x5a 0 1000",
        "read -P 0x6b 1000 3000",
        "read -P 0x5a 4000 127072",
        "read -P 0x7c 1M 64k",
        "read -P 0 2M 64k",
    ]);
    assert!(!out.contains("fail"), "{out}");
    assert_eq!(out.matches("read ").count(), 5, "{out}");
    // The image opens when the server starts: without the passphrase, or
    // with a wrong one, nbdkit exits with the library's message.
    for (param, want) in [
        (
            None,
            "Parameter 'encrypt.key-secret' is required for cipher",
        ),
        (
            Some("password=platypus"),
            "Invalid password, cannot unlock any keyslot",
        ),
    ] {
        let mut cmd = Command::new("timeout");
        cmd.args(["30", "nbdkit", "-f", "-U"])
            .arg(dir.join("neg.sock"))
            .arg(&plugin)
            .arg(format!("file={}", image.display()))
            .args(param)
            .env("LD_LIBRARY_PATH", common::lib_dir());
        let out = cmd.output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{param:?}: {log}");
        assert!(log.contains(want), "{param:?}: log lacks {want:?}:\n{log}");
    }
}

#[test]
fn read_only_export_never_writes() {
    let cc = need_tools!("nbdinfo");
    let tmp = common::ScratchDir::new("nbdkit-ro");
    let dir = tmp.path();
    let plugin = build_plugin(&cc, dir);
    let image = dir.join("dirty.qcow2");
    qemu_img_create(&image, "16M", "lazy_refcounts=on");
    // sigraise 9 kills qemu-io before it can clear the dirty bit.
    let _ = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 128k",
            "-c",
            "sigraise 9",
        ])
        .arg(&image)
        .output()
        .unwrap();
    let info = run_ok(
        Command::new("qemu-img")
            .args(["info", "--output=json", "-U"])
            .arg(&image),
    );
    assert!(
        info.contains("\"dirty-flag\": true"),
        "qemu-io did not leave the image dirty:\n{info}"
    );
    let before = std::fs::read(&image).unwrap();
    let cases: [(&[&str], &[&str]); 3] = [
        (&["-r"], &[]),
        (&[], &["readonly=true"]),
        (&[], &["readonly="]),
    ];
    for (opts, params) in cases {
        let mut server = Server::nbdkit_with(opts, &plugin, &image, params, dir);
        let out = qemu_io_nbd(
            &server,
            &[
                "read -P 0x5a 0 128k".to_string(),
                "read -P 0 128k 64k".to_string(),
            ],
        );
        assert!(
            !out.contains("failed"),
            "{opts:?} {params:?}: reads:\n{out}"
        );
        let out = qemu_io_nbd(&server, &["write -P 1 0 4096".to_string()]);
        assert!(
            out.contains("failed") || out.contains("Permission denied"),
            "{opts:?} {params:?}: write on a read-only export succeeded: {out}"
        );
        server.stop_clean();
        let after = std::fs::read(&image).unwrap();
        assert!(
            before == after,
            "{opts:?} {params:?}: the read-only export changed the image file"
        );
    }
}

// --- several clients at once ----------------------------------------------------

/// Runs nbdkit as a [`Check`] says and reads the checker's verdict.
struct Checker {
    check: Check,
    /// valgrind, or the ASan runtime preloaded into nbdkit.
    tool: PathBuf,
    /// valgrind's own log (kept apart from nbdkit's, which must not say "error").
    vg_log: PathBuf,
    vg_supp: PathBuf,
}

impl Checker {
    /// None for [`Check::Plain`]; Err(note) when the checker is missing here.
    fn new(check: Check, cc: &Path, dir: &Path) -> Result<Option<Checker>, String> {
        let tool = match check {
            Check::Plain => return Ok(None),
            Check::Valgrind => common::which("valgrind", &[]).ok_or("valgrind not installed")?,
            Check::Asan => libasan(cc).ok_or_else(|| {
                format!(
                    "{} has no libasan.so (apt-get install libasan8 / gcc)",
                    cc.display()
                )
            })?,
        };
        let vg_supp = dir.join("nbdkit.supp");
        std::fs::write(&vg_supp, NBDKIT_VALGRIND_SUPP).unwrap();
        Ok(Some(Checker {
            check,
            tool,
            vg_log: dir.join("valgrind.log"),
            vg_supp,
        }))
    }

    fn command(&self) -> Command {
        match self.check {
            Check::Plain => Command::new("nbdkit"),
            Check::Valgrind => {
                let mut c = Command::new(&self.tool);
                c.args([
                    "--error-exitcode=99",
                    "--leak-check=full",
                    "--errors-for-leak-kinds=definite",
                    "--track-origins=no",
                    "--num-callers=30",
                ])
                .arg(format!("--suppressions={}", self.vg_supp.display()))
                .arg(format!("--log-file={}", self.vg_log.display()))
                .arg("nbdkit");
                c
            }
            Check::Asan => {
                let mut c = Command::new("nbdkit");
                // nbdkit is not instrumented: the runtime must be loaded
                // first. No leak check: LeakSanitizer reports nbdkit's own
                // leak (see NBDKIT_VALGRIND_SUPP) and its suppressions match
                // any frame, so one for nbdkit would hide the plugin's leaks
                // as well (their callers are in nbdkit); the valgrind variant
                // checks leaks. Both sanitizers stop nbdkit at the first
                // report (after a recovered UBSan report nbdkit would not
                // exit on SIGTERM).
                c.env("LD_PRELOAD", &self.tool)
                    .env("ASAN_OPTIONS", "detect_leaks=0:halt_on_error=1")
                    .env("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1");
                c
            }
        }
    }

    /// The checked process really runs the plugin and libqcow2: both are
    /// mapped into it next to the checker's runtime.
    fn assert_loaded(&self, pid: u32, plugin: &Path) {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let runtime = match self.check {
            Check::Plain => "nbdkit",
            Check::Valgrind => "vgpreload_memcheck",
            Check::Asan => "libasan.so",
        };
        let plugin_name = plugin.file_name().unwrap().to_string_lossy();
        for want in [runtime, &plugin_name, "libqcow2.so"] {
            assert!(
                maps.contains(want),
                "{want} is not mapped into the {:?} nbdkit (pid {pid})",
                self.check
            );
        }
    }

    /// Asserts the checker found nothing, given the server's exit and log.
    fn assert_clean(&self, exit_ok: bool, log: &str) {
        match self.check {
            Check::Plain => {}
            Check::Valgrind => {
                let vg = std::fs::read_to_string(&self.vg_log).unwrap_or_default();
                assert!(
                    vg.contains("ERROR SUMMARY: 0 errors") && exit_ok,
                    "valgrind found errors in nbdkit (exit ok: {exit_ok}):\n{vg}\n--- nbdkit log\n{log}"
                );
                // The suppression is for nbdkit's own leak only.
                eprintln!(
                    "valgrind: {}",
                    vg.lines()
                        .filter(|l| l.contains("ERROR SUMMARY") || l.contains("definitely lost:"))
                        .map(|l| l.split_once("== ").map_or(l, |x| x.1))
                        .collect::<Vec<_>>()
                        .join("; ")
                );
            }
            Check::Asan => {
                assert!(
                    !log.contains("ERROR: AddressSanitizer")
                        && !log.contains("ERROR: LeakSanitizer")
                        && !log.contains("runtime error:"),
                    "ASan/UBSan reported errors in nbdkit (exit ok: {exit_ok}):\n{log}"
                );
                assert!(exit_ok, "ASan nbdkit did not exit cleanly:\n{log}");
            }
        }
    }
}

/// Samples the number of threads of `pid` until the returned flag is set;
/// the thread returns the most seen at once.
fn sample_threads(
    pid: u32,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<usize>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let h = std::thread::spawn(move || {
        let mut max = 0;
        while !s.load(Ordering::Relaxed) {
            if let Ok(d) = std::fs::read_dir(format!("/proc/{pid}/task")) {
                max = max.max(d.count());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        max
    });
    (stop, h)
}

/// A client saw an error: the checker's report comes first (a sanitizer
/// stops nbdkit at the first error, so the clients only see a dropped
/// connection), then `what` with the server's log.
fn fail(server: &mut Server, checker: Option<&Checker>, what: &str) -> ! {
    let (exit_ok, log) = server.stop();
    if let Some(c) = checker {
        c.assert_clean(exit_ok, &log);
    }
    panic!("{what}\n--- nbdkit log (exit ok: {exit_ok})\n{log}");
}

#[test]
fn parallel_clients() {
    parallel_clients_run(Check::Plain);
}

/// `parallel_clients` with nbdkit under valgrind (memcheck; definite leaks
/// are errors).
#[test]
fn parallel_clients_valgrind() {
    parallel_clients_run(Check::Valgrind);
}

/// `parallel_clients` with the plugin built with ASan+UBSan.
#[test]
fn parallel_clients_asan() {
    parallel_clients_run(Check::Asan);
}

/// Clients 0..4 each own an 8 MiB region, `qemu-img bench` 32M..40M, a reader
/// 40M..48M; all run at once, then every byte of the 64 MiB is verified over
/// NBD and in the file.
fn parallel_clients_run(check: Check) {
    let cc = need_tools!();
    let tmp = common::ScratchDir::new(&format!("nbdkit-parallel-{check:?}").to_lowercase());
    let dir = tmp.path();
    let checker = match Checker::new(check, &cc, dir) {
        Ok(c) => c,
        Err(note) => {
            qcow2_testutil::skip(&format!("parallel_clients ({check:?})"), &note);
            return;
        }
    };
    let plugin = build_plugin_for(&cc, dir, check);
    let image = dir.join("img.qcow2");
    qemu_img_create(&image, "64M", "");
    let t0 = Instant::now();
    let mut server = Server::nbdkit_checked(checker.as_ref(), &[], &plugin, &image, &[], dir);
    let pid = server.child.as_ref().unwrap().id();
    let uri = server.uri();
    let mib = 1u64 << 20;
    let k = 1024u64;
    // 64 KiB chunks written per client, 4 KiB bench writes, 128 KiB reads.
    // (The same under valgrind: it serialises nbdkit's threads, yet the
    // whole run takes about 6 s with a debug libqcow2.)
    let chunks = 128u64;
    let bench_count = 2048u64;
    let reads = 64u64;

    let (stop_sampling, sampler) = sample_threads(pid);
    // Clients 0..4: region i*8M..(i+1)*8M, 64 KiB writes of pattern i+1, then
    // every fourth 64 KiB zeroed (alternating with and without MAY_UNMAP),
    // every eighth 4 KiB at +8K discarded-then-rewritten by a partial write.
    let mut children = Vec::new();
    for i in 0..4u64 {
        let base = i * 8 * mib;
        let mut cmds = Vec::new();
        for j in 0..chunks {
            cmds.push(format!(
                "write -P {} {} {}",
                i + 1,
                base + j * 64 * k,
                64 * k
            ));
        }
        for j in (0..chunks).step_by(4) {
            let u = if j % 8 == 0 { "-u " } else { "" };
            cmds.push(format!("write -z {u}{} {}", base + j * 64 * k, 64 * k));
        }
        for j in (1..chunks).step_by(8) {
            cmds.push(format!(
                "write -P {} {} {}",
                i + 11,
                base + j * 64 * k + 8 * k,
                4 * k
            ));
        }
        cmds.push("flush".to_string());
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]).arg(&uri);
        for c in &cmds {
            cmd.arg("-c").arg(c);
        }
        children.push((
            format!("qemu-io client {i}"),
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        ));
    }
    // qemu-img bench: 4 KiB writes, 8 in flight, from 32M on, pattern 0x55.
    let mut bench = Command::new("qemu-img");
    bench
        .args([
            "bench", "-f", "raw", "-w", "-t", "none", "-d", "8", "-s", "4k",
        ])
        .args(["-c", &bench_count.to_string(), "--pattern=85", "-o"])
        .arg((32 * mib).to_string())
        .arg(&uri);
    children.push((
        "qemu-img bench".to_string(),
        bench
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    // A reader hammering 40M..48M (unallocated) while the others write.
    let mut reader = Command::new("qemu-io");
    reader.args(["-f", "raw"]).arg(&uri);
    for j in 0..reads {
        reader
            .arg("-c")
            .arg(format!("read -P 0 {} {}", 40 * mib + j * 128 * k, 128 * k));
    }
    children.push((
        "reader".to_string(),
        reader
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    for (name, child) in children {
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() || text.contains("failed") {
            fail(
                &mut server,
                checker.as_ref(),
                &format!("{name} failed:\n{text}"),
            );
        }
    }
    stop_sampling.store(true, std::sync::atomic::Ordering::Relaxed);
    let max_threads = sampler.join().unwrap();
    // Six clients, each served by its own nbdkit threads.
    assert!(
        max_threads > 6,
        "nbdkit ({check:?}) ran at most {max_threads} threads at once"
    );
    if let Some(c) = &checker {
        c.assert_loaded(pid, &plugin);
    }
    let t_clients = t0.elapsed();

    // The expected content of every range.
    let mut verify = Vec::new();
    for i in 0..4u64 {
        let base = i * 8 * mib;
        for j in 0..chunks {
            let off = base + j * 64 * k;
            if j % 4 == 0 {
                verify.push(format!("read -P 0 {off} {}", 64 * k));
            } else if j % 8 == 1 {
                verify.push(format!("read -P {} {off} {}", i + 1, 8 * k));
                verify.push(format!("read -P {} {} {}", i + 11, off + 8 * k, 4 * k));
                verify.push(format!("read -P {} {} {}", i + 1, off + 12 * k, 52 * k));
            } else {
                verify.push(format!("read -P {} {off} {}", i + 1, 64 * k));
            }
        }
    }
    verify.push(format!("read -P 85 {} {}", 32 * mib, 8 * mib));
    verify.push(format!("read -P 0 {} {}", 40 * mib, 24 * mib));
    let out = qemu_io_nbd(&server, &verify);
    if out.contains("failed") {
        fail(
            &mut server,
            checker.as_ref(),
            &format!("verification over NBD:\n{out}"),
        );
    }
    let (exit_ok, log) = server.stop();
    if let Some(c) = &checker {
        c.assert_clean(exit_ok, &log);
    }
    assert!(exit_ok, "nbdkit did not exit cleanly:\n{log}");
    assert!(!log.contains("error"), "nbdkit logged errors:\n{log}");
    let t_total = t0.elapsed();
    check_clean(&image);
    let out = qemu_io(&["-f", "qcow2", "-r"], &image.to_string_lossy(), &verify);
    assert!(!out.contains("failed"), "verification of the file:\n{out}");
    // Zeroed clusters are zero in the file's map too.
    let map = qemu_img_map_file(&image);
    for i in 0..4u64 {
        for j in (0..chunks).step_by(4) {
            let off = i * 8 * mib + j * 64 * k;
            let e = map
                .iter()
                .find(|e| e.start <= off && off < e.start + e.length)
                .unwrap();
            assert!(
                e.zero && !e.data,
                "cluster at {off} not zero in the map: {e:?}"
            );
        }
    }
    eprintln!(
        "parallel clients ({check:?}): 4 qemu-io writers ({chunks} x 64 KiB), qemu-img bench \
         ({bench_count} x 4 KiB), 1 reader; up to {max_threads} nbdkit threads; every range \
         verified; clients {:.1} s, server total {:.1} s",
        t_clients.as_secs_f64(),
        t_total.as_secs_f64()
    );
}

// --- throughput against qemu-nbd ------------------------------------------------

/// Runs plugins/nbdkit/bench.sh with the plugin built here (slow; ignored).
#[test]
#[ignore = "benchmark: run with --ignored --nocapture, or plugins/nbdkit/bench.sh"]
fn bench_against_qemu_nbd() {
    let cc = need_tools!("qemu-nbd");
    let tmp = common::ScratchDir::new("nbdkit-bench");
    let plugin = build_plugin(&cc, tmp.path());
    let script = common::workspace_root().join("plugins/nbdkit/bench.sh");
    let status = Command::new("bash")
        .arg(&script)
        .env("PLUGIN", &plugin)
        .env("LD_LIBRARY_PATH", common::lib_dir())
        .env("WORKDIR", tmp.path())
        .status()
        .unwrap();
    assert!(status.success(), "{} failed", script.display());
}

// --- options and errors ---------------------------------------------------------

#[test]
fn options_and_errors() {
    let cc = need_tools!();
    let tmp = common::ScratchDir::new("nbdkit-options");
    let dir = tmp.path();
    let plugin = build_plugin(&cc, dir);
    let image = dir.join("img.qcow2");
    qemu_img_create(&image, "4M", "");
    let c = 65536u64;
    for (i, cache) in ["writeback", "writethrough", "unsafe", "none"]
        .iter()
        .enumerate()
    {
        for discard in ["unmap", "ignore"] {
            let params = [format!("cache={cache}"), format!("discard={discard}")];
            let params: Vec<&str> = params.iter().map(|s| s.as_str()).collect();
            let mut server = Server::nbdkit(&plugin, &image, &params, dir);
            let off = i as u64 * 4 * c;
            let out = qemu_io_nbd(
                &server,
                &[
                    format!("write -P {} {off} {}", i + 1, 2 * c),
                    format!("write -f -P {} {} 4096", i + 20, off + 2 * c),
                    format!("discard {off} {c}"),
                    format!("write -z -u {} {c}", off + c),
                    "flush".to_string(),
                ],
            );
            assert!(
                !out.contains("failed"),
                "cache={cache} discard={discard}: {out}"
            );
            server.stop_clean();
            // discard=ignore: the discard did nothing, unmap: it zeroed the cluster.
            let p = if discard == "unmap" { 0 } else { i + 1 };
            let out = qemu_io(
                &["-f", "qcow2", "-r"],
                &image.to_string_lossy(),
                &[
                    format!("read -P {p} {off} {c}"),
                    format!("read -P 0 {} {c}", off + c),
                    format!("read -P {} {} 4096", i + 20, off + 2 * c),
                ],
            );
            assert!(
                !out.contains("failed"),
                "cache={cache} discard={discard}: {out}"
            );
            check_clean(&image);
        }
    }

    // Bad parameters and a missing image: nbdkit refuses to start, with a
    // message naming the problem.
    let missing = dir.join("missing.qcow2");
    let not_qcow2 = dir.join("garbage.qcow2");
    std::fs::write(&not_qcow2, vec![0x5au8; 1 << 20]).unwrap();
    let cases: [(Vec<String>, &str); 5] = [
        (
            vec![format!("file={}", image.display()), "cache=bogus".into()],
            "cache=bogus",
        ),
        (
            vec![format!("file={}", image.display()), "discard=maybe".into()],
            "discard=maybe",
        ),
        (
            vec![format!("file={}", image.display()), "colour=red".into()],
            "colour",
        ),
        (vec![format!("file={}", missing.display())], "missing.qcow2"),
        (
            vec![format!("file={}", not_qcow2.display())],
            "is not a qcow2 image",
        ),
    ];
    for (params, expect) in cases {
        let out = Command::new("nbdkit")
            .arg("-U")
            .arg(dir.join("bad.sock"))
            .args(["-f", "--exit-with-parent"])
            .arg(&plugin)
            .args(&params)
            .env("LD_LIBRARY_PATH", common::lib_dir())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(expect),
            "nbdkit {params:?}: status {}, stderr {err}",
            out.status
        );
        assert!(
            out.status.code().is_some(),
            "nbdkit {params:?} crashed: {err}"
        );
    }

    // An engine error at serving time is reported (message naming the image,
    // errno to the client), not a crash: an L2 entry pointing at a misaligned
    // host offset.
    qemu_img_create(&image, "4M", "");
    let out = qemu_io_local(&image, &[format!("write -P 9 {} {c}", 32 * c)]);
    assert!(!out.contains("failed"), "{out}");
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .unwrap();
        let mut be = [0u8; 8];
        f.seek(SeekFrom::Start(40)).unwrap();
        f.read_exact(&mut be).unwrap();
        let l1 = u64::from_be_bytes(be);
        f.seek(SeekFrom::Start(l1)).unwrap();
        f.read_exact(&mut be).unwrap();
        let l2 = u64::from_be_bytes(be) & 0x00ff_ffff_ffff_fe00;
        assert_ne!(l2, 0, "no L2 table");
        f.seek(SeekFrom::Start(l2 + 32 * 8)).unwrap();
        f.write_all(&(0x8000_0000_0001_2345u64).to_be_bytes())
            .unwrap();
    }
    let mut server = Server::nbdkit(&plugin, &image, &[], dir);
    let out = qemu_io_nbd(&server, &[format!("read {} {c}", 32 * c)]);
    let (ok, log) = server.stop();
    eprintln!("read of a corrupt cluster: client {out:?}; server log {log:?}");
    assert!(
        out.contains("failed"),
        "read of a corrupt cluster succeeded: {out}"
    );
    assert!(
        ok,
        "nbdkit did not exit cleanly after an engine error:\n{log}"
    );
    assert!(
        log.contains("img.qcow2") && log.contains("read at offset"),
        "the server log does not name the image and the request:\n{log}"
    );
    // The engine's own message (qcow2_last_error), not only the errno text.
    assert!(
        log.contains("qcow2_read: ") && log.contains("Cluster allocation offset 0x12200 unaligned"),
        "the server log lacks libqcow2's message:\n{log}"
    );
}
