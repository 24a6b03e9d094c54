//! An NBD server for qcow2 images (`qcow2 nbd`, a qemu-nbd drop-in).
//!
//! Each connection is served by one event loop on an io_uring [`Ring`]:
//! it reads requests off the socket, and the plain ones (a read of data
//! clusters or zeroes, a write into data clusters the image owns) are
//! planned by the engine ([`Image::try_map_read`], [`Image::try_map_write`])
//! and carried out by the loop itself, many at a time, with one system
//! call per batch. Everything else (allocation, copy-on-write, backing
//! file, compressed clusters, flush, trim, write-zeroes, FUA) runs on a
//! small pool of threads through the engine's ordinary calls, which keep
//! the ordering rules. Replies go out in completion order.
//!
//! The protocol: fixed newstyle handshake (`NBD_OPT_GO`, `NBD_OPT_INFO`,
//! `NBD_OPT_EXPORT_NAME`, `NBD_OPT_LIST`, `NBD_OPT_ABORT`), simple replies
//! (structured replies and meta contexts are refused, clients fall back),
//! commands READ, WRITE (FUA), DISC, FLUSH, TRIM (FUA), WRITE_ZEROES (FUA,
//! NO_HOLE, FAST_ZERO).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use crossbeam_channel::{Receiver, Sender};
use qcow2_ops::io::{Completion, IoBuf, RawFile, Ring, IO_HUGE_MIN};
use qcow2_ops::{
    Image, MapPiece, MappedRead, MappedWrite, REQ_FUA, REQ_MAY_UNMAP, REQ_NO_FALLBACK,
};
use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use qcow2_ops::io::nbd_proto::*;
use qcow2_ops::io::nbd_proto::{
    EINVAL as NBD_EINVAL, EIO as NBD_EIO, ENOMEM as NBD_ENOMEM, ENOSPC as NBD_ENOSPC,
    ENOTSUP as NBD_ENOTSUP, EOVERFLOW as NBD_EOVERFLOW, EPERM as NBD_EPERM,
};

/// The largest request served (and advertised as the maximum block size).
pub const MAX_REQUEST: usize = 32 << 20;
/// Requests a connection runs at once (with the replies not sent yet);
/// reading stops beyond it, or beyond `MAX_QUEUED_BYTES` of replies.
const MAX_INFLIGHT: usize = 256;
const MAX_QUEUED_BYTES: usize = 64 << 20;
/// Buffers kept for reuse: small ones, large ones (huge pages), and the
/// largest kept.
const SPARE_BUFFERS: usize = 256;
const SPARE_LARGE: usize = 16;
const SPARE_MAX: usize = 4 << 20;
/// Option payloads accepted during the handshake.
const MAX_OPTION: usize = 64 << 10;

/// How an export is served.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The export's name ("" by default, as qemu-nbd).
    pub export_name: String,
    /// Refuse writes (and advertise the export read-only).
    pub read_only: bool,
    /// One io_uring event loop per connection that moves the data of
    /// plain requests itself; `false` (qemu-nbd `--aio=threads`), or where
    /// io_uring cannot be set up: a reader thread per connection hands
    /// every request to the thread pool.
    pub mapped_io: bool,
    /// Threads per connection for the requests the loop does not carry out.
    pub workers: usize,
    /// How long an event loop with nothing in flight keeps reading the
    /// socket (yielding the CPU between reads) before it sleeps; zero, the
    /// default: it sleeps at once. Waking a sleeping thread can cost more
    /// than a request served from the page cache; polling takes CPU time
    /// the rest of the machine may need.
    pub poll: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            export_name: String::new(),
            read_only: false,
            mapped_io: true,
            workers: 4,
            poll: Duration::ZERO,
        }
    }
}

/// A client connection.
pub enum Conn {
    /// Over a Unix domain socket.
    Unix(UnixStream),
    /// Over TCP.
    Tcp(TcpStream),
}

impl Conn {
    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_nonblocking(on),
            Conn::Tcp(s) => s.set_nonblocking(on),
        }
    }
    fn fd(&self) -> RawFd {
        match self {
            Conn::Unix(s) => s.as_raw_fd(),
            Conn::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write_vectored(bufs),
            Conn::Tcp(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Serves one client until it disconnects: the handshake, then requests.
/// Returns when the client is gone; an error is the connection's (a
/// protocol violation, the socket), never a request's (those are replied).
pub fn serve(img: &Image, mut conn: Conn, opts: &ServeOptions) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    if !handshake(img, &mut conn, opts)? {
        return Ok(());
    }
    if opts.mapped_io && io_uring_available() {
        conn.set_nonblocking(true)?;
        return Loop::new(img, conn, opts)?.run();
    }
    serve_threads(img, conn, opts)
}

/// Whether io_uring can be set up here (kernels and sandboxes may refuse it).
pub fn io_uring_available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| Ring::new(2).is_ok())
}

/// Sends one reply on a blocking connection.
fn send_reply(conn: &mut Conn, r: &Reply) -> io::Result<()> {
    let data = r.data.bytes();
    let mut bufs = [IoSlice::new(&r.header), IoSlice::new(data)];
    let mut bufs = &mut bufs[..];
    while !bufs.is_empty() {
        match conn.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The thread model: this thread reads requests, the pool runs them and
/// sends the replies (one at a time on the socket).
fn serve_threads(img: &Image, conn: Conn, opts: &ServeOptions) -> io::Result<()> {
    let size = img.virtual_size();
    let writer = std::sync::Mutex::new(conn.try_clone()?);
    let mut conn = conn;
    let (jobs, rx) = crossbeam_channel::bounded::<Job>(MAX_INFLIGHT);
    let answer = |r: Reply| {
        let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
        // A client that is gone cannot be answered; reading ends it.
        let _ = send_reply(&mut w, &r);
    };
    std::thread::scope(|s| {
        for _ in 0..opts.workers.max(1) {
            let rx = rx.clone();
            let answer = &answer;
            s.spawn(move || {
                for job in rx.iter() {
                    answer(run_job(img, job));
                }
            });
        }
        let r = (|| -> io::Result<()> {
            loop {
                let mut h = [0u8; 28];
                match conn.read_exact(&mut h) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
                if be32(&h) != REQUEST_MAGIC {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "bad request magic",
                    ));
                }
                let req = Req {
                    flags: be16(&h[4..]),
                    typ: be16(&h[6..]),
                    cookie: be64(&h[8..]),
                    offset: be64(&h[16..]),
                    len: be32(&h[24..]),
                };
                let job = match req.typ {
                    CMD_DISC => return Ok(()),
                    CMD_WRITE => {
                        let len = req.len as usize;
                        if len > MAX_REQUEST {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("write of {len} bytes is larger than {MAX_REQUEST}"),
                            ));
                        }
                        let mut buf = IoBuf::new(len);
                        match conn.read_exact(&mut buf) {
                            Ok(()) => {}
                            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                            Err(e) => return Err(e),
                        }
                        Job::Write(req, buf)
                    }
                    CMD_READ => Job::Read(req),
                    CMD_FLUSH => Job::Flush(req),
                    CMD_TRIM => Job::Trim(req),
                    _ => Job::Zero(req),
                };
                if let Some(e) = refuse(&req, opts, size) {
                    answer(reply(req.cookie, e, Payload::None));
                    continue;
                }
                if jobs.send(job).is_err() {
                    return Ok(());
                }
            }
        })();
        // The pool finishes what it has, then ends.
        drop(jobs);
        r
    })
}

fn option_reply(conn: &mut Conn, opt: u32, typ: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    conn.write_all(&b)
}

fn tflags(opts: &ServeOptions) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
    if opts.read_only {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    f
}

/// The fixed newstyle handshake; `Ok(true)`: go on to transmission.
fn handshake(img: &Image, conn: &mut Conn, opts: &ServeOptions) -> io::Result<bool> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    conn.write_all(&hello)?;
    let mut b4 = [0u8; 4];
    conn.read_exact(&mut b4)?;
    let cflags = u32::from_be_bytes(b4);
    if cflags & !u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("client flags {cflags:#x} not understood"),
        ));
    }
    let no_zeroes = cflags & u32::from(FLAG_NO_ZEROES) != 0;
    let size = img.virtual_size();
    loop {
        let mut h = [0u8; 16];
        conn.read_exact(&mut h)?;
        if be64(&h) != IHAVEOPT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad option magic",
            ));
        }
        let opt = be32(&h[8..]);
        let len = be32(&h[12..]) as usize;
        if len > MAX_OPTION {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("option {opt} of {len} bytes is too long"),
            ));
        }
        let mut data = vec![0u8; len];
        conn.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                if data != opts.export_name.as_bytes() {
                    // No way to say why: the connection ends.
                    return Ok(false);
                }
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&size.to_be_bytes());
                b.extend_from_slice(&tflags(opts).to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                conn.write_all(&b)?;
                return Ok(true);
            }
            OPT_ABORT => {
                let _ = option_reply(conn, opt, REP_ACK, &[]);
                return Ok(false);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(conn, opt, REP_ERR_INVALID, b"")?;
                    continue;
                }
                let name = opts.export_name.as_bytes();
                let mut d = (name.len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(name);
                option_reply(conn, opt, REP_SERVER, &d)?;
                option_reply(conn, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                // name length, name, number of information requests, requests
                let parsed = (|| {
                    let n = be32(data.get(..4)?) as usize;
                    let name = data.get(4..4usize.checked_add(n)?)?;
                    let rest = &data[4 + n..];
                    let k = be16(rest.get(..2)?) as usize;
                    let reqs = rest.get(2..)?;
                    (reqs.len() == 2 * k).then_some(name)
                })();
                let Some(name) = parsed else {
                    option_reply(conn, opt, REP_ERR_INVALID, b"malformed request")?;
                    continue;
                };
                if name != opts.export_name.as_bytes() {
                    option_reply(conn, opt, REP_ERR_UNKNOWN, b"export not found")?;
                    continue;
                }
                let mut export = INFO_EXPORT.to_be_bytes().to_vec();
                export.extend_from_slice(&size.to_be_bytes());
                export.extend_from_slice(&tflags(opts).to_be_bytes());
                option_reply(conn, opt, REP_INFO, &export)?;
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                for v in [1u32, 4096, MAX_REQUEST as u32] {
                    bs.extend_from_slice(&v.to_be_bytes());
                }
                option_reply(conn, opt, REP_INFO, &bs)?;
                option_reply(conn, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(true);
                }
            }
            _ => option_reply(conn, opt, REP_ERR_UNSUP, b"")?,
        }
    }
}

/// The NBD error number for an OS errno, as qemu-nbd maps them
/// (anything without a counterpart is EINVAL).
fn wire_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS => NBD_EPERM,
        libc::EIO => NBD_EIO,
        libc::ENOMEM => NBD_ENOMEM,
        libc::EDQUOT | libc::EFBIG | libc::ENOSPC => NBD_ENOSPC,
        libc::EOVERFLOW => NBD_EOVERFLOW,
        libc::ENOTSUP => NBD_ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => NBD_EINVAL,
    }
}

/// The NBD error number for an engine error.
fn nbd_errno(e: &qcow2_ops::Error) -> u32 {
    wire_errno(-e.errno())
}

fn io_errno(e: &io::Error) -> u32 {
    wire_errno(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Why a request is refused before it runs, as qemu-nbd refuses it: an
/// unknown command or flag (EINVAL), a change to a read-only export
/// (EPERM), a range past the end (ENOSPC for writes and write-zeroes,
/// EINVAL otherwise), a read larger than the maximum block size.
fn refuse(req: &Req, opts: &ServeOptions, size: u64) -> Option<u32> {
    let allowed = match req.typ {
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        _ => return Some(NBD_EINVAL),
    };
    if req.flags & !allowed != 0 {
        return Some(NBD_EINVAL);
    }
    let mutating = matches!(req.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if mutating && opts.read_only {
        return Some(NBD_EPERM);
    }
    if req.typ == CMD_READ && req.len as usize > MAX_REQUEST {
        return Some(NBD_EINVAL);
    }
    if req.typ != CMD_FLUSH
        && req
            .offset
            .checked_add(u64::from(req.len))
            .is_none_or(|end| end > size)
    {
        return Some(if matches!(req.typ, CMD_WRITE | CMD_WRITE_ZEROES) {
            NBD_ENOSPC
        } else {
            NBD_EINVAL
        });
    }
    None
}

/// A request header off the wire.
#[derive(Clone, Copy, Debug)]
struct Req {
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

/// Work for the pool.
enum Job {
    Read(Req),
    Write(Req, IoBuf),
    Flush(Req),
    Trim(Req),
    Zero(Req),
}

/// A reply's payload.
enum Payload {
    None,
    Buf(IoBuf),
    Vec(Vec<u8>),
}

impl Payload {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::None => &[],
            Payload::Buf(b) => b,
            Payload::Vec(v) => v,
        }
    }
}

/// A reply waiting to be sent.
struct Reply {
    header: [u8; 16],
    data: Payload,
}

fn reply(cookie: u64, error: u32, data: Payload) -> Reply {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    header[4..8].copy_from_slice(&error.to_be_bytes());
    header[8..].copy_from_slice(&cookie.to_be_bytes());
    Reply { header, data }
}

/// Runs a job through the engine's ordinary calls.
fn run_job(img: &Image, job: Job) -> Reply {
    let err = |e: qcow2_ops::Error| nbd_errno(&e);
    match job {
        Job::Read(r) => {
            let mut v = vec![0u8; r.len as usize];
            match img.read(r.offset, &mut v) {
                Ok(()) => reply(r.cookie, 0, Payload::Vec(v)),
                Err(e) => reply(r.cookie, err(e), Payload::None),
            }
        }
        Job::Write(r, buf) => {
            let flags = if r.flags & CMD_FLAG_FUA != 0 {
                REQ_FUA
            } else {
                0
            };
            let res = img.write(r.offset, &buf, flags);
            reply(r.cookie, res.err().map_or(0, err), Payload::None)
        }
        Job::Flush(r) => reply(r.cookie, img.flush().err().map_or(0, err), Payload::None),
        Job::Trim(r) => {
            // The image's discard mode decides what a discard does.
            let mut res = img.discard(r.offset, u64::from(r.len));
            if res.is_ok() && r.flags & CMD_FLAG_FUA != 0 {
                res = img.flush();
            }
            reply(r.cookie, res.err().map_or(0, err), Payload::None)
        }
        Job::Zero(r) => {
            let mut flags = 0;
            if r.flags & CMD_FLAG_FUA != 0 {
                flags |= REQ_FUA;
            }
            if r.flags & CMD_FLAG_NO_HOLE == 0 {
                flags |= REQ_MAY_UNMAP;
            }
            if r.flags & CMD_FLAG_FAST_ZERO != 0 {
                flags |= REQ_NO_FALLBACK;
            }
            let res = img.write_zeroes(r.offset, u64::from(r.len), flags);
            reply(r.cookie, res.err().map_or(0, err), Payload::None)
        }
    }
}

/// A request the loop carries out itself.
enum Mapped<'a> {
    Read { req: Req, _map: MappedRead<'a> },
    Write { req: Req, map: MappedWrite<'a> },
}

/// Ring tokens of the loop's own waits.
const TOKEN_SOCKET_IN: u64 = u64::MAX;
const TOKEN_SOCKET_OUT: u64 = u64::MAX - 1;
const TOKEN_WAKER: u64 = u64::MAX - 2;

struct Loop<'a> {
    img: &'a Image,
    opts: &'a ServeOptions,
    conn: Conn,
    ring: Ring,
    raw: Option<RawFile>,
    size: u64,
    /// Bytes read off the socket: `inbuf[inpos..inend]` not parsed yet (the
    /// vector keeps its length, so a read zeroes nothing).
    inbuf: Vec<u8>,
    inpos: usize,
    inend: usize,
    /// A write whose payload is still arriving: (request, buffer, bytes in).
    partial: Option<(Req, IoBuf, usize)>,
    out: VecDeque<Reply>,
    /// Bytes of the front reply already sent.
    sent: usize,
    mapped: HashMap<u64, Mapped<'a>>,
    next_token: u64,
    /// Requests in flight (loop and pool).
    inflight: usize,
    readable: bool,
    writable: bool,
    armed_in: bool,
    armed_out: bool,
    armed_waker: bool,
    /// The socket reached its end: nothing more to read (what was read
    /// is still served).
    eof: bool,
    /// The client sent DISC (or cannot be answered): nothing more is
    /// taken; what is in flight finishes.
    disc: bool,
    /// Bytes of the replies waiting in `out`.
    out_bytes: usize,
    jobs: Option<Sender<Job>>,
    done: Receiver<Reply>,
    /// The pool's ends of the channels, until the pool starts.
    pool_ends: Option<(Receiver<Job>, Sender<Reply>)>,
    waker: UnixStream,
    waker_tx: UnixStream,
    /// Buffers of finished requests, reused (not zeroed again: every use
    /// fills the whole buffer before anything reads it): small ones, and
    /// large ones on huge pages.
    spare: Vec<IoBuf>,
    spare_large: Vec<IoBuf>,
}

impl<'a> Loop<'a> {
    fn new(img: &'a Image, conn: Conn, opts: &'a ServeOptions) -> io::Result<Loop<'a>> {
        let ring = Ring::new(256)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot set up io_uring: {e}")))?;
        let (waker, waker_tx) = UnixStream::pair()?;
        waker.set_nonblocking(true)?;
        waker_tx.set_nonblocking(true)?;
        let (jobs, jobs_rx) = crossbeam_channel::unbounded::<Job>();
        let (done_tx, done) = crossbeam_channel::unbounded::<Reply>();
        Ok(Loop {
            img,
            opts,
            conn,
            ring,
            raw: img.data_file(),
            size: img.virtual_size(),
            inbuf: vec![0; 256 << 10],
            inpos: 0,
            inend: 0,
            partial: None,
            out: VecDeque::new(),
            sent: 0,
            mapped: HashMap::new(),
            next_token: 0,
            inflight: 0,
            readable: true,
            writable: true,
            armed_in: false,
            armed_out: false,
            armed_waker: false,
            eof: false,
            disc: false,
            out_bytes: 0,
            jobs: Some(jobs),
            done,
            pool_ends: Some((jobs_rx, done_tx)),
            waker,
            waker_tx,
            spare: Vec::new(),
            spare_large: Vec::new(),
        })
    }

    fn run(mut self) -> io::Result<()> {
        std::thread::scope(|s| {
            let (jobs_rx, done_tx) = self.pool_ends.take().expect("the pool starts once");
            let img = self.img;
            // Everything that can fail first: a pool started and then
            // abandoned would wait for jobs for ever.
            let wakers = (0..self.opts.workers.max(1))
                .map(|_| self.waker_tx.try_clone())
                .collect::<io::Result<Vec<_>>>()?;
            for mut wake in wakers {
                let rx = jobs_rx.clone();
                let tx = done_tx.clone();
                s.spawn(move || {
                    for job in rx.iter() {
                        let r = run_job(img, job);
                        if tx.send(r).is_err() {
                            break;
                        }
                        // One byte is enough to wake the loop; a full
                        // socket means a wake-up is pending already.
                        let _ = wake.write(&[1]);
                    }
                });
            }
            drop(done_tx);
            let r = self.event_loop();
            // Stop the pool: it finishes what it has.
            self.jobs = None;
            r
        })
    }

    fn event_loop(&mut self) -> io::Result<()> {
        let mut done = Vec::new();
        loop {
            if self.readable && self.taking() {
                self.read_socket()?;
            }
            self.parse()?;
            while let Ok(r) = self.done.try_recv() {
                self.inflight -= 1;
                self.queue(r);
            }
            if self.writable && !self.out.is_empty() {
                self.send()?;
            }
            // After the end of the socket, parse has taken every complete
            // request it could (nothing in flight limits it any more).
            if (self.eof || self.disc) && self.inflight == 0 && self.out.is_empty() {
                return Ok(());
            }
            if !self.readable && !self.armed_in && self.taking() {
                self.ring
                    .poll(self.conn.fd(), libc::POLLIN as u32, TOKEN_SOCKET_IN)?;
                self.armed_in = true;
            }
            if !self.writable && !self.armed_out && !self.out.is_empty() {
                self.ring
                    .poll(self.conn.fd(), libc::POLLOUT as u32, TOKEN_SOCKET_OUT)?;
                self.armed_out = true;
            }
            if !self.armed_waker {
                self.ring
                    .poll(self.waker.as_raw_fd(), libc::POLLIN as u32, TOKEN_WAKER)?;
                self.armed_waker = true;
            }
            // Wait for something to happen only when nothing can be done now.
            let busy = (self.readable && self.taking())
                || (self.writable && !self.out.is_empty())
                || !self.done.is_empty();
            if !busy && self.inflight == 0 && self.out.is_empty() && self.poll_socket()? {
                continue;
            }
            self.ring.submit_and_wait(if busy { 0 } else { 1 })?;
            self.ring.complete(&mut done);
            for c in done.drain(..) {
                self.completed(c);
            }
        }
    }

    /// Whether more requests may be taken: no DISC, and fewer than
    /// `MAX_INFLIGHT` requests in flight or answered but not sent (a client
    /// that does not read its replies stops being read).
    fn room(&self) -> bool {
        !self.disc
            && self.inflight + self.out.len() < MAX_INFLIGHT
            && self.out_bytes < MAX_QUEUED_BYTES
    }

    /// Whether the socket is to be read.
    fn taking(&self) -> bool {
        !self.eof && self.room()
    }

    fn queue(&mut self, r: Reply) {
        self.out_bytes += r.data.bytes().len();
        self.out.push_back(r);
    }

    /// Reads the socket until bytes come or `opts.poll` has passed;
    /// whether any came (or the socket ended).
    fn poll_socket(&mut self) -> io::Result<bool> {
        if self.opts.poll.is_zero() || !self.taking() {
            return Ok(false);
        }
        let start = Instant::now();
        loop {
            if self.read_socket()? > 0 || self.eof {
                return Ok(true);
            }
            if start.elapsed() >= self.opts.poll {
                return Ok(false);
            }
            std::thread::yield_now();
        }
    }

    /// Reads what the socket has; the number of bytes read.
    fn read_socket(&mut self) -> io::Result<usize> {
        if let Some((_, buf, got)) = &mut self.partial {
            // A write's payload goes straight into its buffer.
            return match self.conn.read(&mut buf[*got..]) {
                Ok(0) => {
                    // A write cut short: dropped unanswered.
                    self.eof = true;
                    self.partial = None;
                    Ok(0)
                }
                Ok(n) => {
                    *got += n;
                    self.readable = *got == buf.len();
                    Ok(n)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    Ok(0)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
                Err(e) => Err(e),
            };
        }
        if self.inpos > 0 {
            self.inbuf.copy_within(self.inpos..self.inend, 0);
            self.inend -= self.inpos;
            self.inpos = 0;
        }
        if self.inbuf.len() - self.inend < (64 << 10) {
            self.inbuf.resize(self.inend + (64 << 10), 0);
        }
        let room = self.inbuf.len();
        match self.conn.read(&mut self.inbuf[self.inend..]) {
            Ok(0) => {
                self.eof = true;
                Ok(0)
            }
            Ok(n) => {
                self.inend += n;
                // A short read drained the socket: wait for more with a
                // poll (submitted with the next batch) instead of a read
                // that would fail with EAGAIN.
                self.readable = self.inend == room;
                Ok(n)
            }
            Err(e) => match e.kind() {
                io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    Ok(0)
                }
                io::ErrorKind::Interrupted => Ok(0),
                io::ErrorKind::ConnectionReset => {
                    self.eof = true;
                    Ok(0)
                }
                _ => Err(e),
            },
        }
    }

    /// Turns the bytes read into requests.
    fn parse(&mut self) -> io::Result<()> {
        loop {
            if let Some((req, buf, got)) = self.partial.take() {
                if got < buf.len() {
                    self.partial = Some((req, buf, got));
                    return Ok(());
                }
                self.write(req, buf);
                continue;
            }
            if !self.room() {
                return Ok(());
            }
            let avail = &self.inbuf[self.inpos..self.inend];
            if avail.len() < 28 {
                return Ok(());
            }
            if be32(avail) != REQUEST_MAGIC {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bad request magic",
                ));
            }
            let req = Req {
                flags: be16(&avail[4..]),
                typ: be16(&avail[6..]),
                cookie: be64(&avail[8..]),
                offset: be64(&avail[16..]),
                len: be32(&avail[24..]),
            };
            self.inpos += 28;
            if req.typ == CMD_WRITE {
                let len = req.len as usize;
                if len > MAX_REQUEST {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("write of {len} bytes is larger than {MAX_REQUEST}"),
                    ));
                }
                let mut buf = self.take_buf(len);
                let avail = &self.inbuf[self.inpos..self.inend];
                let n = avail.len().min(len);
                buf[..n].copy_from_slice(&avail[..n]);
                self.inpos += n;
                self.partial = Some((req, buf, n));
                continue;
            }
            self.dispatch(req);
        }
    }

    /// A buffer of `len` bytes, reused when one is spare.
    fn take_buf(&mut self, len: usize) -> IoBuf {
        let list = if len >= IO_HUGE_MIN {
            &mut self.spare_large
        } else {
            &mut self.spare
        };
        match list.iter().rposition(|b| b.capacity() >= len) {
            Some(i) => {
                let mut b = list.swap_remove(i);
                b.resize(len);
                b
            }
            None => IoBuf::new(len),
        }
    }

    fn give_buf(&mut self, b: IoBuf) {
        let (list, max) = if b.capacity() >= IO_HUGE_MIN {
            (&mut self.spare_large, SPARE_LARGE)
        } else {
            (&mut self.spare, SPARE_BUFFERS)
        };
        if list.len() < max && b.capacity() <= SPARE_MAX {
            list.push(b);
        }
    }

    fn reply_now(&mut self, cookie: u64, error: u32) {
        self.queue(reply(cookie, error, Payload::None));
    }

    fn send_to_pool(&mut self, job: Job) {
        self.inflight += 1;
        if let Some(j) = &self.jobs {
            let _ = j.send(job);
        }
    }

    fn dispatch(&mut self, req: Req) {
        if req.typ == CMD_DISC {
            self.disc = true;
            return;
        }
        if let Some(e) = refuse(&req, self.opts, self.size) {
            return self.reply_now(req.cookie, e);
        }
        match req.typ {
            CMD_READ => self.read(req),
            CMD_FLUSH => self.send_to_pool(Job::Flush(req)),
            CMD_TRIM => self.send_to_pool(Job::Trim(req)),
            _ => self.send_to_pool(Job::Zero(req)),
        }
    }

    fn token(&mut self) -> u64 {
        self.next_token = (self.next_token + 1) % (u64::MAX - 16);
        self.next_token
    }

    /// Whether a host range can be moved by the loop: offset and length
    /// aligned as the file needs (the buffers always are).
    fn direct_ok(&self, host: u64, len: usize) -> Option<RawFd> {
        let raw = self.raw?;
        let a = raw.align as u64;
        (host % a == 0 && len as u64 % a == 0).then_some(raw.fd)
    }

    fn read(&mut self, req: Req) {
        let len = req.len as usize;
        if self.raw.is_some() {
            match self.img.try_map_read(req.offset, len) {
                Ok(Some(map)) => {
                    let p = map.pieces();
                    if p.iter().all(|p| p.host.is_none()) {
                        drop(map);
                        return self.queue(reply(req.cookie, 0, Payload::Vec(vec![0; len])));
                    }
                    if let [MapPiece { host: Some(h), .. }] = *p {
                        if let Some(fd) = self.direct_ok(h, len) {
                            let token = self.token();
                            let buf = self.take_buf(len);
                            return match self.ring.read(fd, h, buf, token) {
                                Ok(()) => {
                                    self.inflight += 1;
                                    self.mapped.insert(token, Mapped::Read { req, _map: map });
                                }
                                Err(e) => self.reply_now(req.cookie, io_errno(&e)),
                            };
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => return self.reply_now(req.cookie, nbd_errno(&e)),
            }
        }
        self.send_to_pool(Job::Read(req))
    }

    fn write(&mut self, req: Req, buf: IoBuf) {
        if let Some(e) = refuse(&req, self.opts, self.size) {
            return self.reply_now(req.cookie, e);
        }
        if self.raw.is_some() && req.flags & CMD_FLAG_FUA == 0 && !buf.is_empty() {
            match self.img.try_map_write(req.offset, buf.len()) {
                Ok(Some(map)) => {
                    if let [(h, r)] = map.pieces() {
                        let h = *h;
                        if r.len() == buf.len() {
                            if self.raw.is_some_and(|r| r.align == 1) {
                                // Buffered: a copy into the page cache, done
                                // here (io_uring would hand it to a worker).
                                let err = map.write_now(&buf).err().map_or(0, |e| nbd_errno(&e));
                                self.give_buf(buf);
                                return self.reply_now(req.cookie, err);
                            }
                            if let Some(fd) = self.direct_ok(h, buf.len()) {
                                let token = self.token();
                                return match self.ring.write(fd, h, buf, token) {
                                    Ok(()) => {
                                        self.inflight += 1;
                                        self.mapped.insert(token, Mapped::Write { req, map });
                                    }
                                    Err(e) => {
                                        let errno = io_errno(&e);
                                        let _ = map.finish(Err(e));
                                        self.reply_now(req.cookie, errno);
                                    }
                                };
                            }
                        }
                    }
                    // Pieces the loop does not move: written through the
                    // engine after all (the mapping is let go unused).
                    let _ = map.finish(Ok(0));
                }
                Ok(None) => {}
                Err(e) => return self.reply_now(req.cookie, nbd_errno(&e)),
            }
        }
        self.send_to_pool(Job::Write(req, buf))
    }

    fn completed(&mut self, c: Completion) {
        match c.token {
            TOKEN_SOCKET_IN => {
                self.armed_in = false;
                self.readable = true;
                return;
            }
            TOKEN_SOCKET_OUT => {
                self.armed_out = false;
                self.writable = true;
                return;
            }
            TOKEN_WAKER => {
                self.armed_waker = false;
                let mut b = [0u8; 256];
                while matches!(self.waker.read(&mut b), Ok(n) if n > 0) {}
                return;
            }
            _ => {}
        }
        let Some(m) = self.mapped.remove(&c.token) else {
            return;
        };
        self.inflight -= 1;
        match m {
            Mapped::Read { req, _map } => {
                let buf = c.buf.expect("a read returns its buffer");
                match c.result {
                    Ok(n) if n == buf.len() => {
                        drop(_map);
                        self.queue(reply(req.cookie, 0, Payload::Buf(buf)));
                    }
                    Ok(_) => {
                        // Short (the file ends inside the range): the
                        // engine's own read says what the rest reads as.
                        drop(_map);
                        self.give_buf(buf);
                        self.send_to_pool(Job::Read(req));
                    }
                    Err(e) => {
                        self.give_buf(buf);
                        self.reply_now(req.cookie, io_errno(&e))
                    }
                }
            }
            Mapped::Write { req, map } => {
                let len = req.len as usize;
                let res = match c.result {
                    Ok(n) if n == len => Ok(n as u64),
                    Ok(n) => Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("short write: {n} of {len} bytes"),
                    )),
                    Err(e) => Err(e),
                };
                let err = map.finish(res).err().map_or(0, |e| nbd_errno(&e));
                if let Some(b) = c.buf {
                    self.give_buf(b);
                }
                self.reply_now(req.cookie, err);
            }
        }
    }

    /// Sends queued replies until the socket would block.
    fn send(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(64);
            let mut skip = self.sent;
            for r in self.out.iter().take(32) {
                for part in [&r.header[..], r.data.bytes()] {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    slices.push(IoSlice::new(&part[skip..]));
                    skip = 0;
                }
            }
            match self.conn.write_vectored(&slices) {
                Ok(n) => {
                    drop(slices);
                    let mut n = n + self.sent;
                    self.sent = 0;
                    while let Some(r) = self.out.front() {
                        let l = 16 + r.data.bytes().len();
                        if n < l {
                            self.sent = n;
                            break;
                        }
                        n -= l;
                        self.out_bytes -= l - 16;
                        if let Some(Reply {
                            data: Payload::Buf(b),
                            ..
                        }) = self.out.pop_front()
                        {
                            self.give_buf(b);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.writable = false;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    // The client is gone: nobody to answer.
                    self.out.clear();
                    self.out_bytes = 0;
                    self.sent = 0;
                    self.eof = true;
                    self.disc = true;
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
