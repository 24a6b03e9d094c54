//! A client of the NBD protocol (fixed newstyle handshake, `NBD_OPT_GO`,
//! simple replies) as storage: an export served by `qemu-nbd`, nbdkit or
//! any NBD server, over a Unix socket or TCP. Requests are sent one at a
//! time on one connection.

use crate::Storage;
use std::io::{self, Read, Write};
use std::sync::Mutex;

use crate::nbd_proto::*;

/// Largest request sent at once (servers accept at least 32 MiB).
const MAX_REQUEST: usize = 32 << 20;

/// Where the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// A Unix socket path.
    Unix(String),
    /// A TCP host and port.
    Tcp(String, u16),
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

struct Conn {
    s: Box<dyn Stream>,
    handle: u64,
}

/// An NBD export as storage.
pub struct NbdStorage {
    conn: Mutex<Conn>,
    size: u64,
    flags: u16,
}

fn proto(m: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m.to_string())
}

fn read_u16(s: &mut dyn Stream) -> io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(s: &mut dyn Stream) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(s: &mut dyn Stream) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

impl NbdStorage {
    /// Connects and selects `export` (the empty name is the default one).
    pub fn connect(addr: &NbdAddress, export: &str) -> io::Result<NbdStorage> {
        let mut s: Box<dyn Stream> = match addr {
            NbdAddress::Unix(p) => Box::new(std::os::unix::net::UnixStream::connect(p)?),
            NbdAddress::Tcp(h, port) => {
                let t = std::net::TcpStream::connect((h.as_str(), *port))?;
                t.set_nodelay(true)?;
                Box::new(t)
            }
        };
        if read_u64(&mut *s)? != NBDMAGIC || read_u64(&mut *s)? != IHAVEOPT {
            return Err(proto("not an NBD server (or not the newstyle protocol)"));
        }
        let hflags = read_u16(&mut *s)?;
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(proto("server does not support the fixed newstyle protocol"));
        }
        let cflags = u32::from(hflags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        s.write_all(&cflags.to_be_bytes())?;
        // NBD_OPT_GO: the export name, no information requests.
        let name = export.as_bytes();
        if name.len() > 4096 {
            return Err(proto("export name too long"));
        }
        let mut opt = Vec::with_capacity(22 + name.len());
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(name);
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt)?;
        let (mut size, mut flags) = (None, 0u16);
        loop {
            if read_u64(&mut *s)? != REPLY_MAGIC {
                return Err(proto("bad option reply magic"));
            }
            let _opt = read_u32(&mut *s)?;
            let kind = read_u32(&mut *s)?;
            let len = read_u32(&mut *s)? as usize;
            if len > 1 << 20 {
                return Err(proto("option reply too long"));
            }
            let mut data = vec![0u8; len];
            s.read_exact(&mut data)?;
            match kind {
                REP_ACK => break,
                REP_INFO if len >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&data[2..10]);
                    size = Some(u64::from_be_bytes(b));
                    flags = u16::from_be_bytes([data[10], data[11]]);
                }
                REP_INFO => {}
                k if k & 0x8000_0000 != 0 => {
                    let msg = String::from_utf8_lossy(&data).into_owned();
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        if msg.is_empty() {
                            format!("Requested export not available (error {k:#x})")
                        } else {
                            msg
                        },
                    ));
                }
                _ => return Err(proto("unexpected option reply")),
            }
        }
        let size = size.ok_or_else(|| proto("server sent no export information"))?;
        Ok(NbdStorage {
            conn: Mutex::new(Conn { s, handle: 0 }),
            size,
            flags,
        })
    }

    /// Whether the export is read-only.
    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends one request and waits for its simple reply (reading `into`
    /// for a read).
    fn request(
        &self,
        cmd: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
        into: Option<&mut [u8]>,
    ) -> io::Result<()> {
        let mut c = self.lock();
        c.handle += 1;
        let handle = c.handle;
        let mut h = [0u8; 28];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[6..8].copy_from_slice(&cmd.to_be_bytes());
        h[8..16].copy_from_slice(&handle.to_be_bytes());
        h[16..24].copy_from_slice(&offset.to_be_bytes());
        h[24..28].copy_from_slice(&len.to_be_bytes());
        c.s.write_all(&h)?;
        c.s.write_all(payload)?;
        c.s.flush()?;
        if cmd == CMD_DISC {
            return Ok(());
        }
        if read_u32(&mut *c.s)? != SIMPLE_REPLY_MAGIC {
            return Err(proto("bad reply magic"));
        }
        let err = read_u32(&mut *c.s)?;
        if read_u64(&mut *c.s)? != handle {
            return Err(proto("reply for another request"));
        }
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err as i32));
        }
        if let Some(buf) = into {
            c.s.read_exact(buf)?;
        }
        Ok(())
    }
}

impl Drop for NbdStorage {
    fn drop(&mut self) {
        let _ = self.request(CMD_DISC, 0, 0, &[], None);
    }
}

impl Storage for NbdStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let n = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[n..].fill(0);
        let mut pos = 0;
        while pos < n {
            let k = (n - pos).min(MAX_REQUEST);
            self.request(
                CMD_READ,
                offset + pos as u64,
                k as u32,
                &[],
                Some(&mut buf[pos..pos + k]),
            )?;
            pos += k;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only() {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        if offset.saturating_add(buf.len() as u64) > self.size {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        for (i, chunk) in buf.chunks(MAX_REQUEST).enumerate() {
            let at = offset + (i * MAX_REQUEST) as u64;
            self.request(CMD_WRITE, at, chunk.len() as u32, chunk, None)?;
        }
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        if self.flags & TFLAG_SEND_FLUSH == 0 || self.read_only() {
            return Ok(());
        }
        self.request(CMD_FLUSH, 0, 0, &[], None)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        if self.flags & TFLAG_SEND_TRIM == 0 || self.read_only() {
            return Ok(false);
        }
        let end = offset.saturating_add(len).min(self.size);
        let mut pos = offset;
        while pos < end {
            let k = (end - pos).min(1 << 30);
            self.request(CMD_TRIM, pos, k as u32, &[], None)?;
            pos += k;
        }
        Ok(false)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.size)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len == self.size {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::ENOTSUP))
        }
    }
}

/// Parses QEMU's NBD file names: `nbd:unix:PATH[:exportname=NAME]`,
/// `nbd:HOST:PORT[:exportname=NAME]`, `nbd+unix:///NAME?socket=PATH` and
/// `nbd://HOST[:PORT]/NAME`. `None`: not an NBD name.
pub fn parse_nbd_name(name: &str) -> Option<Result<(NbdAddress, String), String>> {
    if let Some(rest) = name.strip_prefix("nbd+unix://") {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let export = path.trim_start_matches('/').to_string();
        let socket = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("socket="))
            .map(str::to_string);
        return Some(match socket {
            Some(s) => Ok((NbdAddress::Unix(s), export)),
            None => Err("NBD URI requires a socket= query for nbd+unix".into()),
        });
    }
    if let Some(rest) = name.strip_prefix("nbd://") {
        let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => match p.parse::<u16>() {
                Ok(p) => (h.to_string(), p),
                Err(_) => return Some(Err(format!("Invalid port in '{name}'"))),
            },
            None => (hostport.to_string(), 10809),
        };
        return Some(Ok((NbdAddress::Tcp(host, port), export.to_string())));
    }
    let rest = name.strip_prefix("nbd:")?;
    let (rest, export) = match rest.split_once(":exportname=") {
        Some((r, e)) => (r, e.to_string()),
        None => (rest, String::new()),
    };
    if let Some(path) = rest.strip_prefix("unix:") {
        return Some(Ok((NbdAddress::Unix(path.to_string()), export)));
    }
    Some(match rest.rsplit_once(':') {
        Some((h, p)) => match p.parse::<u16>() {
            Ok(p) => Ok((NbdAddress::Tcp(h.to_string(), p), export)),
            Err(_) => Err(format!("Invalid port in '{name}'")),
        },
        None => Ok((NbdAddress::Tcp(rest.to_string(), 10809), export)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let p = |n: &str| parse_nbd_name(n).unwrap().unwrap();
        assert_eq!(
            p("nbd:unix:/tmp/s"),
            (NbdAddress::Unix("/tmp/s".into()), String::new())
        );
        assert_eq!(
            p("nbd:unix:/tmp/s:exportname=x"),
            (NbdAddress::Unix("/tmp/s".into()), "x".into())
        );
        assert_eq!(
            p("nbd:localhost:10810"),
            (NbdAddress::Tcp("localhost".into(), 10810), String::new())
        );
        assert_eq!(
            p("nbd+unix:///exp?socket=/run/s"),
            (NbdAddress::Unix("/run/s".into()), "exp".into())
        );
        assert_eq!(
            p("nbd://h:99/e"),
            (NbdAddress::Tcp("h".into(), 99), "e".into())
        );
        assert!(parse_nbd_name("file.qcow2").is_none());
        assert!(parse_nbd_name("nbd+unix:///e").unwrap().is_err());
    }
}
