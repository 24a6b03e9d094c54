//! `qcow2 nbd`: serve an image over NBD, with qemu-nbd's options.

use crate::{check_format, open_image, Fail};
use clap::Args;
use qcow2_nbd::{Conn, ServeOptions};
use qcow2_ops::{CacheMode, DiscardMode, OpenOptions};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Arguments of `qcow2 nbd` (qemu-nbd's names).
#[derive(Args, Debug)]
pub struct NbdArgs {
    /// Listen on this Unix domain socket (instead of TCP).
    #[arg(short = 'k', long = "socket")]
    socket: Option<PathBuf>,
    /// TCP port to listen on.
    #[arg(short = 'p', long = "port", default_value_t = 10809)]
    port: u16,
    /// Address to listen on.
    #[arg(short = 'b', long = "bind", default_value = "0.0.0.0")]
    bind: String,
    /// Image format (qcow2 only).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Export name ("" by default).
    #[arg(short = 'x', long = "export-name", default_value = "")]
    export_name: String,
    /// Export read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Keep serving after the last client disconnects.
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// Clients served at once (0: any number).
    #[arg(short = 'e', long = "shared", default_value_t = 1)]
    shared: usize,
    /// Cache mode: none, writeback, writethrough, directsync, unsafe.
    #[arg(long = "cache", default_value = "writeback")]
    cache: String,
    /// Same as --cache=none.
    #[arg(short = 'n', long = "nocache")]
    nocache: bool,
    /// io_uring or native: one io_uring event loop per connection moves the
    /// data of plain reads and writes, a thread pool runs the rest; threads:
    /// a reader thread per connection hands every request to the pool (also
    /// where io_uring cannot be set up).
    #[arg(long = "aio", default_value = "io_uring")]
    aio: String,
    /// Discard requests: ignore (or off) or unmap (or on).
    #[arg(short = 'd', long = "discard", default_value = "ignore")]
    discard: String,
    /// Write the server's process id to this file.
    #[arg(long = "pid-file")]
    pid_file: Option<PathBuf>,
    /// Threads per connection for requests the loop does not carry out.
    #[arg(long = "workers", default_value_t = 4)]
    workers: usize,
    /// Microseconds an idle connection keeps reading its socket before it
    /// sleeps (0, the default: sleep at once; not in qemu-nbd).
    #[arg(long = "poll-us", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    poll_us: u64,
    /// The image.
    image: PathBuf,
}

/// Ends a connection from outside (shuts its socket down).
type Closer = Box<dyn Fn() + Send + Sync>;

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> std::io::Result<(Conn, Closer)> {
        Ok(match self {
            Listener::Unix(l) => {
                let (s, _) = l.accept()?;
                let c = s.try_clone()?;
                (
                    Conn::Unix(s),
                    Box::new(move || {
                        let _ = c.shutdown(std::net::Shutdown::Both);
                    }),
                )
            }
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                let _ = s.set_nodelay(true);
                let c = s.try_clone()?;
                (
                    Conn::Tcp(s),
                    Box::new(move || {
                        let _ = c.shutdown(std::net::Shutdown::Both);
                    }),
                )
            }
        })
    }
    fn set_nonblocking(&self) -> std::io::Result<()> {
        match self {
            Listener::Unix(l) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
    }
}

/// Runs the server until the last client leaves (or for ever with
/// `--persistent`); a termination signal closes the connections and the
/// image cleanly.
pub fn run(a: NbdArgs) -> Result<u8, Fail> {
    check_format(&a.format)?;
    let cache = if a.nocache {
        CacheMode::None
    } else {
        CacheMode::parse(&a.cache)
            .ok_or_else(|| Fail::new(format!("Invalid cache mode '{}'", a.cache)))?
    };
    let discard = DiscardMode::parse(&a.discard)
        .ok_or_else(|| Fail::new(format!("Invalid discard mode '{}'", a.discard)))?;
    let mapped_io = match a.aio.as_str() {
        "threads" => false,
        "native" | "io_uring" => true,
        other => return Err(Fail::new(format!("Invalid aio mode '{other}'"))),
    };
    let opts = OpenOptions {
        writable: !a.read_only,
        cache,
        discard,
        ..OpenOptions::default()
    };
    let img = open_image(&a.image, &opts)?;
    let listener =
        match &a.socket {
            Some(p) => {
                let _ = std::fs::remove_file(p);
                Listener::Unix(UnixListener::bind(p).map_err(|e| {
                    Fail::new(format!("Failed to bind socket to {}: {e}", p.display()))
                })?)
            }
            None => Listener::Tcp(
                TcpListener::bind((a.bind.as_str(), a.port))
                    .map_err(|e| Fail::new(format!("Failed to bind {}:{}: {e}", a.bind, a.port)))?,
            ),
        };
    listener
        .set_nonblocking()
        .map_err(|e| Fail::new(format!("listening socket: {e}")))?;
    qcow2_ops::io::catch_termination()
        .map_err(|e| Fail::new(format!("cannot catch termination signals: {e}")))?;
    if let Some(p) = &a.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| Fail::new(format!("Failed to write pid file {}: {e}", p.display())))?;
    }
    if mapped_io && !qcow2_nbd::io_uring_available() {
        eprintln!("qcow2: warning: io_uring cannot be set up here: serving with --aio=threads");
    }
    let serve = ServeOptions {
        export_name: a.export_name.clone(),
        read_only: a.read_only,
        mapped_io,
        workers: a.workers.max(1),
        poll: std::time::Duration::from_micros(a.poll_us),
    };
    let active = AtomicUsize::new(0);
    let served = AtomicUsize::new(0);
    let closers: Mutex<Vec<(usize, Closer)>> = Mutex::new(Vec::new());
    let failed = Mutex::new(None::<String>);
    std::thread::scope(|s| loop {
        if qcow2_ops::io::termination().is_some() {
            for (_, close) in closers.lock().unwrap().iter() {
                close();
            }
            break;
        }
        let n = active.load(Ordering::SeqCst);
        if !a.persistent && served.load(Ordering::SeqCst) > 0 && n == 0 {
            break;
        }
        if a.shared != 0 && n >= a.shared {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match listener.accept() {
            Ok((conn, close)) => {
                let id = served.fetch_add(1, Ordering::SeqCst);
                active.fetch_add(1, Ordering::SeqCst);
                closers.lock().unwrap().push((id, close));
                let (img, serve, active, closers, failed) =
                    (&img, &serve, &active, &closers, &failed);
                s.spawn(move || {
                    if let Err(e) = qcow2_nbd::serve(img, conn, serve) {
                        if e.kind() != std::io::ErrorKind::UnexpectedEof {
                            eprintln!("qcow2: client {id}: {e}");
                            if e.kind() != std::io::ErrorKind::InvalidData {
                                *failed.lock().unwrap() = Some(e.to_string());
                            }
                        }
                    }
                    closers.lock().unwrap().retain(|(i, _)| *i != id);
                    active.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                *failed.lock().unwrap() = Some(format!("accept: {e}"));
                break;
            }
        }
    });
    if let Some(p) = &a.socket {
        let _ = std::fs::remove_file(p);
    }
    if let Some(p) = &a.pid_file {
        let _ = std::fs::remove_file(p);
    }
    let closed = img.close().map_err(|e| {
        Fail::new(format!(
            "{}: close failed: {}",
            a.image.display(),
            crate::error_text(&e)
        ))
    });
    closed?;
    match failed.into_inner().unwrap() {
        Some(m) => Err(Fail::new(m)),
        None => Ok(0),
    }
}
