//! The server's side of the NBD protocol, driven byte by byte over a
//! socket pair: handshake replies, error numbers, request validation, and
//! data that goes through the event loop and the pool alike.

use qcow2_nbd::{serve, Conn, ServeOptions};
use qcow2_ops::{CreateOptions, Image, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

struct Client {
    s: UnixStream,
}

impl Client {
    fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        self.s.read_exact(&mut b).unwrap();
        u16::from_be_bytes(b)
    }
    fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.s.read_exact(&mut b).unwrap();
        u32::from_be_bytes(b)
    }
    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.s.read_exact(&mut b).unwrap();
        u64::from_be_bytes(b)
    }
    fn greet(&mut self) {
        assert_eq!(self.u64(), 0x4e42_444d_4147_4943, "NBDMAGIC");
        assert_eq!(self.u64(), IHAVEOPT);
        assert_eq!(self.u16(), 3, "fixed newstyle, no zeroes");
        self.s.write_all(&3u32.to_be_bytes()).unwrap();
    }
    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }
    /// (reply type, data)
    fn option_reply(&mut self, opt: u32) -> (u32, Vec<u8>) {
        assert_eq!(self.u64(), REPLY_MAGIC);
        assert_eq!(self.u32(), opt);
        let typ = self.u32();
        let len = self.u32() as usize;
        let mut d = vec![0u8; len];
        self.s.read_exact(&mut d).unwrap();
        (typ, d)
    }
    fn go_data(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    }
    /// NBD_OPT_GO for `name`: returns the export's (size, flags).
    fn go(&mut self, name: &str) -> (u64, u16) {
        self.option(7, &Self::go_data(name));
        let mut export = None;
        loop {
            let (typ, d) = self.option_reply(7);
            match typ {
                3 => {
                    if u16::from_be_bytes([d[0], d[1]]) == 0 {
                        let size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                        let flags = u16::from_be_bytes([d[10], d[11]]);
                        export = Some((size, flags));
                    }
                }
                1 => return export.expect("NBD_INFO_EXPORT before the ACK"),
                t => panic!("unexpected reply {t:#x}"),
            }
        }
    }
    fn request(&mut self, typ: u16, flags: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }
    /// A simple reply: (error, cookie).
    fn reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), 0x6744_6698, "simple reply magic");
        let err = self.u32();
        (err, self.u64())
    }
}

fn image(dir: &tempfile::TempDir, cluster_size: u64) -> std::path::PathBuf {
    let p = dir.path().join("t.qcow2");
    let o = CreateOptions {
        cluster_size,
        ..CreateOptions::default()
    };
    Image::create(&p, 4 << 20, &o).unwrap();
    p
}

/// Runs `f` as the client of a server for `img` with `opts`; returns what
/// `serve` returned.
fn with_server(
    img: &Image,
    opts: ServeOptions,
    f: impl FnOnce(&mut Client) + Send,
) -> std::io::Result<()> {
    let (a, b) = UnixStream::pair().unwrap();
    std::thread::scope(|s| {
        let h = s.spawn(move || {
            let mut c = Client { s: b };
            f(&mut c);
        });
        let r = serve(img, Conn::Unix(a), &opts);
        h.join().unwrap();
        r
    })
}

#[test]
fn handshake_options_and_errors() {
    for mapped_io in [true, false] {
        handshake_options_and_errors_in(mapped_io);
    }
}

/// `mapped_io`: the io_uring event loop, else the thread model.
fn handshake_options_and_errors_in(mapped_io: bool) {
    let dir = tempfile::tempdir().unwrap();
    let p = image(&dir, 65536);
    let img = Image::open(&p, &OpenOptions::read_write()).unwrap();
    let opts = ServeOptions {
        export_name: "disk".into(),
        mapped_io,
        ..ServeOptions::default()
    };
    with_server(&img, opts, |c| {
        c.greet();
        // Structured replies are refused: the client falls back to simple ones.
        c.option(8, &[]);
        assert_eq!(c.option_reply(8).0, 1 | 1 << 31, "NBD_REP_ERR_UNSUP");
        // LIST names the one export.
        c.option(3, &[]);
        let (typ, d) = c.option_reply(3);
        assert_eq!(typ, 2, "NBD_REP_SERVER");
        assert_eq!(&d[4..], b"disk");
        assert_eq!(c.option_reply(3).0, 1);
        // An unknown name, then a malformed GO.
        c.option(7, &Client::go_data("other"));
        assert_eq!(c.option_reply(7).0, 6 | 1 << 31, "NBD_REP_ERR_UNKNOWN");
        c.option(7, &[0, 0, 0, 9, b'x']);
        assert_eq!(c.option_reply(7).0, 3 | 1 << 31, "NBD_REP_ERR_INVALID");
        let (size, flags) = c.go("disk");
        assert_eq!(size, 4 << 20);
        assert_eq!(flags & 0x2, 0, "writable");
        assert_ne!(flags & (1 << 2 | 1 << 3 | 1 << 5 | 1 << 6), 0);

        // Write (allocating: through the pool), read back, overwrite in
        // place (through the loop), read past the end, unknown command.
        c.request(1, 0, 1, 65536, 4096, &[0x5a; 4096]);
        assert_eq!(c.reply(), (0, 1));
        c.request(1, 0, 2, 65536, 4096, &[0x6b; 4096]);
        assert_eq!(c.reply(), (0, 2));
        c.request(0, 0, 3, 65536 - 512, 1024, &[]);
        assert_eq!(c.reply(), (0, 3));
        let mut d = vec![0u8; 1024];
        c.s.read_exact(&mut d).unwrap();
        assert!(d[..512].iter().all(|&b| b == 0));
        assert!(d[512..].iter().all(|&b| b == 0x6b));
        c.request(0, 0, 4, (4 << 20) - 512, 1024, &[]);
        assert_eq!(c.reply(), (22, 4), "EINVAL past the end");
        c.request(1, 0, 5, (4 << 20) - 512, 1024, &[1; 1024]);
        assert_eq!(c.reply(), (28, 5), "ENOSPC past the end, payload consumed");
        c.request(6, 0, 51, (4 << 20) - 512, 1024, &[]);
        assert_eq!(c.reply(), (28, 51), "ENOSPC past the end");
        c.request(4, 0, 52, (4 << 20) - 512, 1024, &[]);
        assert_eq!(c.reply(), (22, 52), "EINVAL past the end");
        // Flags the command does not take: DF (not negotiated), NO_HOLE on a write.
        c.request(0, 4, 53, 0, 512, &[]);
        assert_eq!(c.reply(), (22, 53));
        c.request(1, 2, 54, 0, 512, &[7; 512]);
        assert_eq!(c.reply(), (22, 54));
        c.request(42, 0, 6, 0, 0, &[]);
        assert_eq!(c.reply(), (22, 6), "EINVAL for an unknown command");
        // Write-zeroes, trim, flush.
        c.request(6, 0, 7, 65536, 4096, &[]);
        assert_eq!(c.reply(), (0, 7));
        c.request(4, 1, 8, 0, 65536, &[]);
        assert_eq!(c.reply(), (0, 8));
        c.request(3, 0, 9, 0, 0, &[]);
        assert_eq!(c.reply(), (0, 9));
        c.request(0, 0, 10, 65536, 4096, &[]);
        assert_eq!(c.reply(), (0, 10));
        let mut d = vec![1u8; 4096];
        c.s.read_exact(&mut d).unwrap();
        assert!(d.iter().all(|&b| b == 0), "zeroed");
        c.request(2, 0, 11, 0, 0, &[]);
    })
    .unwrap();
    img.close().unwrap();
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(&dir, 512);
    let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
    let opts = ServeOptions {
        read_only: true,
        ..ServeOptions::default()
    };
    with_server(&img, opts, |c| {
        c.greet();
        let (_, flags) = c.go("");
        assert_ne!(flags & 0x2, 0, "read-only flag");
        c.request(1, 0, 1, 0, 512, &[1; 512]);
        assert_eq!(c.reply(), (1, 1), "EPERM");
        c.request(6, 0, 2, 0, 512, &[]);
        assert_eq!(c.reply(), (1, 2), "EPERM");
        c.request(0, 0, 3, 0, 512, &[]);
        assert_eq!(c.reply(), (0, 3));
        let mut d = vec![1u8; 512];
        c.s.read_exact(&mut d).unwrap();
        assert!(d.iter().all(|&b| b == 0));
        c.request(2, 0, 4, 0, 0, &[]);
    })
    .unwrap();
}

#[test]
fn protocol_violations_end_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(&dir, 65536);
    let img = Image::open(&p, &OpenOptions::read_write()).unwrap();
    let r = with_server(&img, ServeOptions::default(), |c| {
        c.greet();
        c.go("");
        c.s.write_all(&[0xde; 28]).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(c.s.read(&mut b).unwrap(), 0, "closed");
    });
    assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
    let r = with_server(&img, ServeOptions::default(), |c| {
        c.greet();
        c.go("");
        c.request(1, 0, 1, 0, 64 << 20, &[]);
        let mut b = [0u8; 1];
        assert_eq!(c.s.read(&mut b).unwrap(), 0, "closed");
    });
    assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
    // A client that leaves in the middle of the handshake.
    let r = with_server(&img, ServeOptions::default(), |c| {
        c.greet();
        c.option(7, &[0, 0]);
    });
    assert!(r.is_err());
}

#[test]
fn requests_read_before_the_end_are_all_served() {
    // The event loop polling its socket before it sleeps, and sleeping at
    // once; the thread model.
    let poll = std::time::Duration::from_micros(50);
    for (mapped_io, poll) in [(true, poll), (true, Default::default()), (false, poll)] {
        requests_read_before_the_end_are_all_served_in(mapped_io, poll);
    }
}

fn requests_read_before_the_end_are_all_served_in(mapped_io: bool, poll: std::time::Duration) {
    // More requests than run at once, then DISC and the end of the
    // socket: every one is carried out and answered.
    let dir = tempfile::tempdir().unwrap();
    let p = image(&dir, 512);
    let img = Image::open(&p, &OpenOptions::read_write()).unwrap();
    const N: u64 = 600;
    let opts = ServeOptions {
        mapped_io,
        poll,
        ..ServeOptions::default()
    };
    with_server(&img, opts, |c| {
        c.greet();
        c.go("");
        let mut w = Client {
            s: c.s.try_clone().unwrap(),
        };
        let writer = std::thread::spawn(move || {
            for i in 0..N {
                w.request(1, 0, i, i * 4096, 512, &[(i % 250) as u8 + 1; 512]);
            }
            w.request(2, 0, N, 0, 0, &[]);
            w.s.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut seen = std::collections::HashSet::new();
        for _ in 0..N {
            let (err, cookie) = c.reply();
            assert_eq!(err, 0);
            assert!(seen.insert(cookie));
        }
        writer.join().unwrap();
        let mut b = [0u8; 1];
        assert_eq!(c.s.read(&mut b).unwrap(), 0, "closed after the last reply");
    })
    .unwrap();
    let mut b = [0u8; 512];
    for i in 0..N {
        img.read(i * 4096, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == (i % 250) as u8 + 1), "write {i}");
    }
    img.close().unwrap();
}

#[test]
fn a_client_that_reads_no_replies_stops_being_read() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(&dir, 65536);
    let img = Image::open(&p, &OpenOptions::read_write()).unwrap();
    with_server(&img, ServeOptions::default(), |c| {
        c.greet();
        c.go("");
        c.s.set_nonblocking(true).unwrap();
        // 64 KiB reads, never answered by reading: the server stops taking
        // them once its queue is full, so the socket fills up.
        let mut sent = 0u64;
        let mut req = Vec::new();
        let mut blocked = 0;
        while sent < 20_000 && blocked < 20 {
            req.clear();
            req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
            req.extend_from_slice(&0u16.to_be_bytes());
            req.extend_from_slice(&0u16.to_be_bytes());
            req.extend_from_slice(&sent.to_be_bytes());
            req.extend_from_slice(&0u64.to_be_bytes());
            req.extend_from_slice(&65536u32.to_be_bytes());
            match c.s.write(&req) {
                Ok(28) => {
                    sent += 1;
                    blocked = 0;
                }
                Ok(n) => panic!("short write of {n}"),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    blocked += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(
            sent < 20_000,
            "the server read all {sent} requests without anyone reading a reply"
        );
        c.s.shutdown(std::net::Shutdown::Both).unwrap();
    })
    .unwrap();
}
