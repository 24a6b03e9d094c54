//! An image as the storage of another image (QEMU's nested formats, a
//! qcow2 image whose "file" is itself a qcow2 image): the outer image's
//! file is the inner image's guest disk.

use crate::Image;
use qcow2_io::Storage;
use std::io;

/// The errno of an engine error, as the file layer would report it.
fn to_io(e: crate::Error) -> io::Error {
    io::Error::from_raw_os_error(-e.errno())
}

impl Storage for Image {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Past the end of the disk reads as zeroes, as past a file's end.
        let size = self.virtual_size();
        let n = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[n..].fill(0);
        if n > 0 {
            self.read(offset, &mut buf[..n]).map_err(to_io)?;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        // A disk does not grow by being written past its end.
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.virtual_size())
        {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.write(offset, buf, 0).map_err(to_io)
    }
    fn sync(&self) -> io::Result<()> {
        self.flush().map_err(to_io)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        let end = offset.saturating_add(len).min(self.virtual_size());
        if end > offset {
            self.write_zeroes(offset, end - offset, crate::REQ_MAY_UNMAP)
                .map_err(to_io)?;
        }
        Ok(true)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.virtual_size())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len <= self.virtual_size() {
            // The outer image cuts its tail: the disk keeps its size.
            return Ok(());
        }
        self.resize(len, crate::Prealloc::Off, false).map_err(to_io)
    }
}
