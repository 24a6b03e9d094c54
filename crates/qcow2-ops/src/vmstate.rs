//! The VM state area (QEMU's `savevm` data, qemu-io's `read -b` /
//! `write -b`): guest offsets past the disk, from the first L1 entry that
//! maps none of it, through the same L1 and L2 tables. Writing there grows
//! the L1 table as a resize does (crash-safely); the virtual size does not
//! change.

use crate::error::{Error, Result};
use crate::image::Inner;

impl Inner {
    /// Guest offset of the VM state area (QEMU's qcow2_vm_state_offset).
    fn vm_state_offset(&self) -> u64 {
        let cov = self.geo.l2_coverage();
        self.header.size.div_ceil(cov) * cov
    }

    /// The guest range of `len` bytes at `pos` of the VM state area.
    fn vm_state_range(&self, pos: u64, len: u64) -> Result<u64> {
        let off = self.vm_state_offset().checked_add(pos);
        match off.and_then(|o| o.checked_add(len)) {
            Some(end) if end <= i64::MAX as u64 => Ok(off.unwrap_or(0)),
            _ => Err(Error::Invalid(format!(
                "'{}': VM state request at {pos} of {len} bytes is out of range",
                self.name
            ))),
        }
    }
}

impl crate::Image {
    /// Writes `buf` at byte `pos` of the VM state area.
    pub fn vmstate_write(&self, pos: u64, buf: &[u8]) -> Result<()> {
        let mut g = self.exclusive();
        g.check_writable()?;
        let off = g.vm_state_range(pos, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let cov = g.geo.l2_coverage();
        let need = (off + buf.len() as u64).div_ceil(cov);
        if need > g.l1.len() as u64 {
            g.grow_l1_table(need)?;
        }
        g.file.event(qcow2_io::DebugEvent::VmstateSave);
        g.write(off, buf)?;
        drop(g);
        if self.writethrough() {
            self.flush()?;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at byte `pos` of the VM state area (what was
    /// never written reads as zeroes).
    pub fn vmstate_read(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        let mut g = self.exclusive();
        let off = g.vm_state_range(pos, buf.len() as u64)?;
        let mapped = (g.l1.len() as u64 * g.geo.l2_coverage()).saturating_sub(off);
        let n = (buf.len() as u64).min(mapped) as usize;
        buf[n..].fill(0);
        if n > 0 {
            g.file.event(qcow2_io::DebugEvent::VmstateLoad);
            g.read(off, &mut buf[..n])?;
        }
        Ok(())
    }
}
