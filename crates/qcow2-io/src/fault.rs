//! Fault injection and power-loss simulation.
//!
//! [`FaultStorage`] keeps two states: what is durable (reached stable storage
//! through a sync) and the writes issued since the last sync. A simulated
//! power loss keeps the durable state plus any subset of the unsynced writes,
//! each possibly torn at 512-byte sector boundaries.

use crate::Storage;
use std::io;
use std::sync::Mutex;

/// What to inject.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    /// Fail the Nth mutating operation (write, sync, punch, set_len; counted from 1)
    /// with this errno, once.
    pub fail_at: Option<(u64, i32)>,
    /// After this many mutating operations, the machine "loses power": every
    /// later operation fails with EIO and nothing more reaches the file.
    pub crash_after: Option<u64>,
}

#[derive(Default)]
struct State {
    durable: Vec<u8>,
    /// Current view (durable + unsynced writes applied in order).
    current: Vec<u8>,
    /// Unsynced operations since the last sync, in order.
    pending: Vec<Pending>,
    ops: u64,
    crashed: bool,
    plan: FaultPlan,
}

#[derive(Clone)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
    Punch { offset: u64, len: u64 },
}

/// In-memory storage with fault injection and power-loss simulation.
#[derive(Default)]
pub struct FaultStorage {
    st: Mutex<State>,
}

fn apply(buf: &mut Vec<u8>, p: &Pending) {
    match p {
        Pending::Write { offset, data } => {
            let end = *offset as usize + data.len();
            if buf.len() < end {
                buf.resize(end, 0);
            }
            buf[*offset as usize..end].copy_from_slice(data);
        }
        Pending::SetLen(l) => buf.resize(*l as usize, 0),
        Pending::Punch { offset, len } => {
            let l = buf.len();
            let s = (*offset as usize).min(l);
            let e = (offset.saturating_add(*len) as usize).min(l);
            buf[s..e].fill(0);
        }
    }
}

impl FaultStorage {
    /// Storage holding `bytes`, all durable.
    pub fn new(bytes: Vec<u8>) -> Self {
        FaultStorage {
            st: Mutex::new(State {
                durable: bytes.clone(),
                current: bytes,
                ..Default::default()
            }),
        }
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Sets the plan and resets the operation counter.
    pub fn set_plan(&self, plan: FaultPlan) {
        let mut s = self.lock();
        s.plan = plan;
        s.ops = 0;
        s.crashed = false;
    }
    /// Mutating operations seen since the plan was set.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }
    /// Whether the simulated power loss has happened.
    pub fn crashed(&self) -> bool {
        self.lock().crashed
    }
    /// The bytes as the running program sees them.
    pub fn current(&self) -> Vec<u8> {
        self.lock().current.clone()
    }
    /// The bytes after a power loss now: the durable state plus the unsynced
    /// operations chosen by `keep(i)` (index in issue order), a kept write
    /// being cut to its first `torn(i)` sectors when that returns `Some`.
    pub fn after_power_loss(
        &self,
        mut keep: impl FnMut(usize) -> bool,
        mut torn: impl FnMut(usize) -> Option<usize>,
    ) -> Vec<u8> {
        let s = self.lock();
        let mut img = s.durable.clone();
        for (i, p) in s.pending.iter().enumerate() {
            if !keep(i) {
                continue;
            }
            match (p, torn(i)) {
                (Pending::Write { offset, data }, Some(sectors)) => {
                    let n = (sectors * 512).min(data.len());
                    apply(
                        &mut img,
                        &Pending::Write {
                            offset: *offset,
                            data: data[..n].to_vec(),
                        },
                    );
                }
                _ => apply(&mut img, p),
            }
        }
        img
    }
    /// Number of unsynced operations.
    pub fn pending_len(&self) -> usize {
        self.lock().pending.len()
    }

    /// Counts a mutating op; returns the error to inject, if any.
    fn step(s: &mut State) -> io::Result<()> {
        if s.crashed {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        s.ops += 1;
        if let Some(n) = s.plan.crash_after {
            if s.ops > n {
                s.crashed = true;
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
        if let Some((n, errno)) = s.plan.fail_at {
            if s.ops == n {
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        Ok(())
    }

    fn push(s: &mut State, p: Pending) {
        apply(&mut s.current, &p);
        s.pending.push(p);
    }
}

impl Storage for FaultStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self.lock();
        if s.crashed {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        buf.fill(0);
        if offset < s.current.len() as u64 {
            let st = offset as usize;
            let n = buf.len().min(s.current.len() - st);
            buf[..n].copy_from_slice(&s.current[st..st + n]);
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.lock();
        Self::step(&mut s)?;
        if offset.saturating_add(buf.len() as u64) > (1 << 40) {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        Self::push(
            &mut s,
            Pending::Write {
                offset,
                data: buf.to_vec(),
            },
        );
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        let mut s = self.lock();
        Self::step(&mut s)?;
        s.durable = s.current.clone();
        s.pending.clear();
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        let mut s = self.lock();
        Self::step(&mut s)?;
        Self::push(&mut s, Pending::Punch { offset, len });
        Ok(true)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().current.len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.lock();
        Self::step(&mut s)?;
        if len > (1 << 40) {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        Self::push(&mut s, Pending::SetLen(len));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_loss_keeps_synced() {
        let f = FaultStorage::new(vec![0; 1024]);
        f.write_at(&[1; 512], 0).unwrap();
        f.sync().unwrap();
        f.write_at(&[2; 1024], 0).unwrap();
        let none = f.after_power_loss(|_| false, |_| None);
        assert_eq!(&none[..512], &[1; 512][..]);
        let torn = f.after_power_loss(|_| true, |_| Some(1));
        assert_eq!(&torn[..512], &[2; 512][..]);
        assert_eq!(&torn[512..], &[0; 512][..]);
    }

    #[test]
    fn injected_errors() {
        let f = FaultStorage::new(vec![]);
        f.set_plan(FaultPlan {
            fail_at: Some((2, libc::ENOSPC)),
            crash_after: Some(3),
        });
        f.write_at(b"a", 0).unwrap();
        assert_eq!(
            f.write_at(b"b", 1).unwrap_err().raw_os_error(),
            Some(libc::ENOSPC)
        );
        f.sync().unwrap();
        assert!(f.write_at(b"c", 2).is_err());
        assert!(f.crashed());
    }
}
