//! In-memory backend for unit tests.

use crate::Storage;
use std::io;
use std::sync::Mutex;

/// A growable byte vector behind a mutex.
#[derive(Default)]
pub struct MemStorage {
    data: Mutex<Vec<u8>>,
}

impl MemStorage {
    /// Empty storage.
    pub fn new() -> Self {
        Self::default()
    }
    /// Storage holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        MemStorage {
            data: Mutex::new(bytes),
        }
    }
    /// Copy of the contents.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.lock().clone()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn end_of(offset: u64, len: usize) -> io::Result<usize> {
    offset
        .checked_add(len as u64)
        .and_then(|e| usize::try_from(e).ok())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.lock();
        buf.fill(0);
        if offset < d.len() as u64 {
            let start = offset as usize;
            let n = buf.len().min(d.len() - start);
            buf[..n].copy_from_slice(&d[start..start + n]);
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = end_of(offset, buf.len())?;
        let mut d = self.lock();
        if d.len() < end {
            d.resize(end, 0);
        }
        d[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        let mut d = self.lock();
        let l = d.len() as u64;
        let s = offset.min(l) as usize;
        let e = offset.saturating_add(len).min(l) as usize;
        d[s..e].fill(0);
        Ok(true)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let n = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        self.lock().resize(n, 0);
        Ok(())
    }
}

/// QEMU's `null-co` device: a fixed size, writes go nowhere, reads leave
/// the buffer as it was (or fill it with zeroes, QEMU's `read-zeroes`).
pub struct NullStorage {
    size: u64,
    read_zeroes: bool,
}

impl NullStorage {
    /// A null device of `size` bytes.
    pub fn new(size: u64, read_zeroes: bool) -> Self {
        NullStorage { size, read_zeroes }
    }
}

impl Storage for NullStorage {
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
        if self.read_zeroes {
            buf.fill(0);
        }
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn punch_hole(&self, _offset: u64, _len: u64) -> io::Result<bool> {
        Ok(true)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.size)
    }
    fn set_len(&self, _len: u64) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_past_end_is_zero() {
        let m = MemStorage::new();
        m.write_at(b"abc", 2).unwrap();
        let mut b = [9u8; 8];
        m.read_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"\0\0abc\0\0\0");
        assert_eq!(m.len().unwrap(), 5);
        m.punch_hole(3, 10).unwrap();
        m.read_at(&mut b, 0).unwrap();
        assert_eq!(&b[..5], b"\0\0a\0\0");
    }
}
