//! Asynchronous file I/O on io_uring, with buffers the ring owns while the
//! kernel uses them.
//!
//! A [`Ring`] takes an [`IoBuf`] with each read or write and hands it back
//! with the completion, so no buffer can be dropped, moved or touched while
//! the kernel writes into it or reads from it; dropping the ring waits for
//! every operation still in flight first. Requests queued between two calls
//! of [`Ring::submit_and_wait`] reach the kernel with one system call (and
//! the device with one notification), which is what a server running many
//! requests on one thread gains over a thread per request.

use std::io;
use std::os::fd::RawFd;

/// Alignment of [`IoBuf`] memory: enough for O_DIRECT on any device.
pub const IO_ALIGN: usize = 4096;

/// A heap buffer whose memory starts on an [`IO_ALIGN`] boundary, for
/// O_DIRECT transfers. New buffers are zeroed.
pub struct IoBuf {
    v: Vec<u8>,
    start: usize,
    len: usize,
}

/// Buffers of at least this size are placed on huge pages where the
/// kernel has them (see [`IoBuf::new`]).
pub const IO_HUGE_MIN: usize = 256 << 10;
const HUGE: usize = 2 << 20;

impl IoBuf {
    /// A zeroed buffer of `len` bytes. From [`IO_HUGE_MIN`] up it starts on
    /// a 2 MiB boundary and asks for transparent huge pages: a 1 MiB
    /// O_DIRECT transfer into 4 KiB pages needs 256 memory segments, more
    /// than a virtio disk takes in one request (254 here), so the block
    /// layer splits it; in one huge page it is one segment.
    pub fn new(len: usize) -> IoBuf {
        if len >= IO_HUGE_MIN {
            // Zeroed by the allocator's fresh mapping: nothing is touched
            // before the advice, so the first fault can be a huge page.
            let v = vec![0u8; len + HUGE];
            let start = v.as_ptr().align_offset(HUGE);
            let advised = len.div_ceil(HUGE) * HUGE;
            if start + advised <= v.len() {
                // SAFETY: the range lies inside `v`'s allocation and is
                // 2 MiB aligned; MADV_HUGEPAGE only changes how the kernel
                // backs those pages, never their contents.
                unsafe {
                    libc::madvise(
                        v.as_ptr().add(start) as *mut libc::c_void,
                        advised,
                        libc::MADV_HUGEPAGE,
                    );
                }
            }
            return IoBuf { v, start, len };
        }
        let v = vec![0u8; len + IO_ALIGN];
        let start = v.as_ptr().align_offset(IO_ALIGN);
        IoBuf { v, start, len }
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Changes the length, keeping the memory when it is large enough
    /// (bytes past the old length are whatever the buffer held before).
    pub fn resize(&mut self, len: usize) {
        if self.start + len > self.v.len() {
            *self = IoBuf::new(len);
        } else {
            self.len = len;
        }
    }
    /// Bytes this buffer can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.v.len() - self.start
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.v[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.start..self.start + self.len]
    }
}

/// What a finished operation returns.
pub struct Completion {
    /// The token the operation was queued with.
    pub token: u64,
    /// Bytes transferred (reads and writes), or the poll's event mask.
    pub result: io::Result<usize>,
    /// The buffer of a read or write, back to its owner.
    pub buf: Option<IoBuf>,
}

struct Op {
    token: u64,
    buf: Option<IoBuf>,
}

/// An io_uring instance with the buffers of its operations in flight.
pub struct Ring {
    ring: io_uring::IoUring,
    ops: Vec<Option<Op>>,
    free: Vec<usize>,
    /// Operations queued or in the kernel.
    inflight: usize,
}

impl Ring {
    /// A ring with room for `entries` queued operations.
    pub fn new(entries: u32) -> io::Result<Ring> {
        Ok(Ring {
            ring: io_uring::IoUring::new(entries)?,
            ops: Vec::new(),
            free: Vec::new(),
            inflight: 0,
        })
    }

    /// Operations queued or in the kernel.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    fn slot(&mut self, op: Op) -> usize {
        self.inflight += 1;
        match self.free.pop() {
            Some(i) => {
                self.ops[i] = Some(op);
                i
            }
            None => {
                self.ops.push(Some(op));
                self.ops.len() - 1
            }
        }
    }

    /// Queues `entry` (its buffer, if any, already in `ops[slot]`),
    /// submitting what is queued first when the queue is full.
    fn push(&mut self, entry: io_uring::squeue::Entry, slot: usize) -> io::Result<()> {
        let entry = entry.user_data(slot as u64);
        loop {
            // SAFETY: every pointer in `entry` is into a buffer held in
            // `self.ops[slot]` until its completion is reaped (or the ring
            // is dropped, which waits for it), and the descriptor is only a
            // number to the kernel: a stale one fails with EBADF, it
            // cannot reach memory.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                return Ok(());
            }
            if let Err(e) = self.ring.submit() {
                // Never queued: the operation (and its buffer) is let go.
                self.ops[slot] = None;
                self.free.push(slot);
                self.inflight -= 1;
                return Err(e);
            }
        }
    }

    /// Queues a read of `buf.len()` bytes of `fd` at `offset` into `buf`.
    pub fn read(&mut self, fd: RawFd, offset: u64, mut buf: IoBuf, token: u64) -> io::Result<()> {
        let (ptr, len) = (buf.as_mut_ptr(), buf.len() as u32);
        let slot = self.slot(Op {
            token,
            buf: Some(buf),
        });
        let e = io_uring::opcode::Read::new(io_uring::types::Fd(fd), ptr, len)
            .offset(offset)
            .build();
        self.push(e, slot)
    }

    /// Queues a write of `buf` to `fd` at `offset`.
    pub fn write(&mut self, fd: RawFd, offset: u64, buf: IoBuf, token: u64) -> io::Result<()> {
        let (ptr, len) = (buf.as_ptr(), buf.len() as u32);
        let slot = self.slot(Op {
            token,
            buf: Some(buf),
        });
        let e = io_uring::opcode::Write::new(io_uring::types::Fd(fd), ptr, len)
            .offset(offset)
            .build();
        self.push(e, slot)
    }

    /// Queues a one-shot wait for `events` (`libc::POLLIN`, ...) on `fd`.
    pub fn poll(&mut self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let slot = self.slot(Op { token, buf: None });
        let e = io_uring::opcode::PollAdd::new(io_uring::types::Fd(fd), events).build();
        self.push(e, slot)
    }

    /// Submits what is queued and waits until at least `want` operations
    /// have completed (0: do not wait).
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && want > 0 => {
                    // Completions are waiting to be reaped.
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves the finished operations to `out`.
    pub fn complete(&mut self, out: &mut Vec<Completion>) {
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (slot, res) in done {
            let slot = slot as usize;
            let Some(op) = self.ops.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot);
            self.inflight -= 1;
            out.push(Completion {
                token: op.token,
                result: if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    Ok(res as usize)
                },
                buf: op.buf,
            });
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel may still use the buffers: wait for every operation
        // (polls on descriptors that never become ready are cancelled).
        let mut out = Vec::new();
        if self.inflight > 0 {
            let _ = self.ring.submitter().submit();
            for (i, op) in self.ops.iter().enumerate() {
                if op.as_ref().is_some_and(|o| o.buf.is_none()) {
                    let e = io_uring::opcode::PollRemove::new(i as u64)
                        .build()
                        .user_data(u64::MAX);
                    // SAFETY: a poll removal carries no buffer.
                    let _ = unsafe { self.ring.submission().push(&e) };
                }
            }
        }
        while self.inflight > 0 {
            let r = match self.ring.submit_and_wait(1) {
                // Interrupted by a signal, or completions to reap first.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {
                    Ok(0)
                }
                r => r,
            };
            if r.is_err() {
                // Cannot wait: leak the buffers rather than free memory
                // the kernel may still write.
                for op in self.ops.drain(..).flatten() {
                    std::mem::forget(op.buf);
                }
                return;
            }
            self.complete(&mut out);
            out.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn reads_and_writes_come_back_with_their_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 3 * IO_ALIGN]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut ring = Ring::new(8).unwrap();
        let mut w = IoBuf::new(IO_ALIGN);
        w.fill(9);
        ring.write(f.as_raw_fd(), IO_ALIGN as u64, w, 1).unwrap();
        ring.read(f.as_raw_fd(), 0, IoBuf::new(IO_ALIGN), 2)
            .unwrap();
        let mut out = Vec::new();
        while out.len() < 2 {
            ring.submit_and_wait(1).unwrap();
            ring.complete(&mut out);
        }
        out.sort_by_key(|c| c.token);
        assert_eq!(out[0].result.as_ref().unwrap(), &IO_ALIGN);
        assert!(out[1].buf.as_ref().unwrap().iter().all(|&b| b == 7));
        assert_eq!(ring.inflight(), 0);
        let mut r = IoBuf::new(IO_ALIGN);
        ring.read(f.as_raw_fd(), IO_ALIGN as u64, r, 3).unwrap();
        out.clear();
        while out.is_empty() {
            ring.submit_and_wait(1).unwrap();
            ring.complete(&mut out);
        }
        r = out.pop().unwrap().buf.unwrap();
        assert!(r.iter().all(|&b| b == 9));
        // A bad descriptor fails the operation, not the ring.
        ring.read(-1, 0, IoBuf::new(16), 4).unwrap();
        out.clear();
        while out.is_empty() {
            ring.submit_and_wait(1).unwrap();
            ring.complete(&mut out);
        }
        assert_eq!(
            out[0].result.as_ref().unwrap_err().raw_os_error(),
            Some(libc::EBADF)
        );
    }

    #[test]
    fn drop_waits_for_pending_polls_and_reads() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut ring = Ring::new(4).unwrap();
        ring.poll(a.as_raw_fd(), libc::POLLIN as u32, 1).unwrap();
        ring.submit_and_wait(0).unwrap();
        drop(ring); // returns: the poll that never fires is removed
    }
}
