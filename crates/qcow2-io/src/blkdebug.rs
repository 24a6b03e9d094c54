//! Error injection at named debug events, with the rules and the state
//! machine of QEMU's blkdebug driver.
//!
//! A rule names a [`DebugEvent`]. When the event is reported (by the image
//! driver above, through [`Storage::event`]), the rules for it whose
//! `state` matches the current state act: an `inject-error` rule becomes
//! *active*, and from then on every request of its kinds (read, write,
//! discard, flush by default) that covers its sector, or any request when
//! it names no sector, fails with its errno — once, or until another
//! event's injection rules replace the active set; a `set-state` rule
//! moves the state machine (which starts in state 1) after all rules of
//! the event have acted. [`Blkdebug`] applies the rules to the requests
//! reaching a [`Storage`]; [`Rules`] alone serves a layer that is not a
//! `Storage` (a device above the image driver).

use crate::{DebugEvent, Storage};
use std::io;
use std::sync::Mutex;

/// Kinds of request a rule can fail (QEMU's `BlkdebugIOType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoType {
    /// A read.
    Read = 0,
    /// A write.
    Write = 1,
    /// A write of zeroes.
    WriteZeroes = 2,
    /// A discard (hole punch).
    Discard = 3,
    /// A flush.
    Flush = 4,
    /// A block-status query.
    BlockStatus = 5,
}

impl IoType {
    fn parse(s: &str) -> Option<IoType> {
        Some(match s {
            "read" => IoType::Read,
            "write" => IoType::Write,
            "write-zeroes" => IoType::WriteZeroes,
            "discard" => IoType::Discard,
            "flush" => IoType::Flush,
            "block-status" => IoType::BlockStatus,
            _ => return None,
        })
    }
}

/// What a rule does when its event is reported in its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Fail requests from now on.
    InjectError {
        /// The errno requests fail with (EIO by default).
        errno: i32,
        /// The byte offset a request must cover (`sector` × 512), or any.
        offset: Option<u64>,
        /// Remove the rule after its first failure.
        once: bool,
        /// QEMU fails the request without yielding first; accepted, the
        /// same here.
        immediately: bool,
        /// Bit mask of [`IoType`]s the rule fails.
        iotypes: u8,
    },
    /// Move the state machine to `new_state`.
    SetState {
        /// The state after the event.
        new_state: i64,
    },
    /// Suspend the request that reported the event until
    /// [`Rules::resume`] names `tag` (a breakpoint; used once).
    Suspend {
        /// The breakpoint's name.
        tag: String,
    },
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The event the rule waits for.
    pub event: DebugEvent,
    /// The state the machine must be in for the rule to act; 0: any.
    pub state: i64,
    /// What it does.
    pub action: Action,
}

const DEFAULT_IOTYPES: u8 = (1 << IoType::Read as u8)
    | (1 << IoType::Write as u8)
    | (1 << IoType::WriteZeroes as u8)
    | (1 << IoType::Discard as u8)
    | (1 << IoType::Flush as u8);

fn number(key: &str, v: &str) -> Result<i64, String> {
    let t = v.trim();
    let n = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()
    } else {
        t.parse::<i64>().ok()
    };
    n.ok_or_else(|| format!("Parameter '{key}' expects a number"))
}

fn boolean(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

impl Rule {
    /// A rule of `group` (`inject-error` or `set-state`) from its options,
    /// with QEMU's defaults and its messages for bad values. `accepts`
    /// says whether this engine reports the event; a rule naming an event
    /// it never reports would never act and is refused.
    pub fn from_options<'a>(
        group: &str,
        opts: impl IntoIterator<Item = (&'a str, &'a str)>,
        accepts: &dyn Fn(DebugEvent) -> bool,
    ) -> Result<Rule, String> {
        let inject = match group {
            "inject-error" => true,
            "set-state" => false,
            other => return Err(format!("There is no option group '{other}'")),
        };
        let mut event = None;
        let mut state = 0;
        let (mut errno, mut offset, mut once, mut immediately) = (libc::EIO, None, false, false);
        let mut iotypes = DEFAULT_IOTYPES;
        let mut new_state = 0;
        for (k, v) in opts {
            match (k, inject) {
                ("event", _) => {
                    event = Some(
                        DebugEvent::from_name(v)
                            .ok_or_else(|| format!("invalid parameter value: {v}"))?,
                    )
                }
                ("state", _) => state = number(k, v)?,
                ("errno", true) => {
                    errno = i32::try_from(number(k, v)?)
                        .map_err(|_| format!("Parameter '{k}' expects a number"))?
                }
                ("sector", true) => {
                    let s = number(k, v)?;
                    offset = if s == -1 {
                        None
                    } else {
                        Some(
                            u64::try_from(s)
                                .ok()
                                .and_then(|s| s.checked_mul(512))
                                .ok_or_else(|| format!("Parameter '{k}' expects a number"))?,
                        )
                    };
                }
                ("once", true) => once = boolean(k, v)?,
                ("immediately", true) => immediately = boolean(k, v)?,
                ("iotype", true) => {
                    iotypes = 1
                        << IoType::parse(v)
                            .ok_or_else(|| format!("invalid parameter value: {v}"))?
                            as u8
                }
                ("new_state", false) => new_state = number(k, v)?,
                _ => return Err(format!("Invalid parameter '{k}'")),
            }
        }
        let event = event.ok_or("Missing event name for rule")?;
        if !accepts(event) {
            return Err(format!(
                "blkdebug event '{event}' has no place in this engine: it never reports it, so the rule could not act"
            ));
        }
        let action = if inject {
            Action::InjectError {
                errno,
                offset,
                once,
                immediately,
                iotypes,
            }
        } else {
            Action::SetState { new_state }
        };
        Ok(Rule {
            event,
            state,
            action,
        })
    }

    /// The rules of a blkdebug configuration file (`[inject-error]` and
    /// `[set-state]` groups of `key = "value"` lines, `#` comments).
    pub fn parse_config(
        text: &str,
        accepts: &dyn Fn(DebugEvent) -> bool,
    ) -> Result<Vec<Rule>, String> {
        let mut groups: Vec<(String, Vec<(String, String)>)> = Vec::new();
        for line in text.lines() {
            let l = line.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            if let Some(g) = l.strip_prefix('[').and_then(|g| g.strip_suffix(']')) {
                groups.push((g.trim().to_string(), Vec::new()));
                continue;
            }
            let Some((k, v)) = l.split_once('=') else {
                return Err("Invalid parameter value: parse error".into());
            };
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .ok_or("invalid parameter value: ")?;
            let Some((_, kv)) = groups.last_mut() else {
                return Err("no group defined".into());
            };
            kv.push((k.trim().to_string(), v.to_string()));
        }
        groups
            .iter()
            .map(|(g, kv)| {
                Rule::from_options(g, kv.iter().map(|(k, v)| (k.as_str(), v.as_str())), accepts)
            })
            .collect()
    }
}

/// Takes the blkdebug rules out of flattened block options under `prefix`
/// (QEMU's `config` file and its `inject-error.N.KEY` / `set-state.N.KEY`
/// lists), leaving the other options in place.
pub fn take_rules(
    opts: &mut std::collections::BTreeMap<String, String>,
    prefix: &str,
    accepts: &dyn Fn(DebugEvent) -> bool,
) -> Result<Vec<Rule>, String> {
    let mut rules = match opts.remove(&format!("{prefix}config")) {
        Some(path) => {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                format!(
                    "Could not read blkdebug config file: {}",
                    strerror(e.raw_os_error().unwrap_or(libc::EIO))
                )
            })?;
            Rule::parse_config(&text, accepts)?
        }
        None => Vec::new(),
    };
    let mut lists: std::collections::BTreeMap<(&str, u64), Vec<(String, String)>> =
        Default::default();
    let keys: Vec<String> = opts.keys().cloned().collect();
    for k in keys {
        let Some(rest) = k.strip_prefix(prefix) else {
            continue;
        };
        let Some((group, tail)) = ["inject-error", "set-state"]
            .iter()
            .find_map(|g| rest.strip_prefix(g).map(|t| (*g, t)))
        else {
            continue;
        };
        let (i, key) = tail
            .strip_prefix('.')
            .and_then(|t| t.split_once('.'))
            .and_then(|(i, key)| Some((i.parse::<u64>().ok()?, key.to_string())))
            .ok_or_else(|| format!("Invalid parameter '{rest}'"))?;
        let v = opts.remove(&k).unwrap_or_default();
        lists.entry((group, i)).or_default().push((key, v));
    }
    for ((group, _), kv) in &lists {
        rules.push(Rule::from_options(
            group,
            kv.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            accepts,
        )?);
    }
    Ok(rules)
}

/// QEMU's blkdebug prints its breakpoint messages on standard output.
fn print_line(l: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{l}");
    let _ = out.flush();
}

/// The C library's text for `errno`.
fn strerror(errno: i32) -> String {
    io::Error::from_raw_os_error(errno)
        .to_string()
        .split(" (os error")
        .next()
        .unwrap_or_default()
        .to_string()
}

#[derive(Debug)]
struct State {
    /// Rules in the order they were given; `None` once removed.
    rules: Vec<Option<Rule>>,
    /// Active injection rules (indexes into `rules`), first match wins.
    active: Vec<usize>,
    state: i64,
    /// Tags of suspended requests, and whether each was resumed.
    suspended: Vec<(String, bool)>,
}

/// The rules and state of one blkdebug node.
#[derive(Debug)]
pub struct Rules {
    st: Mutex<State>,
    /// Signalled when a request is suspended or resumed.
    changed: std::sync::Condvar,
}

impl Rules {
    /// A node with `rules`, in state 1.
    pub fn new(rules: Vec<Rule>) -> Rules {
        Rules {
            st: Mutex::new(State {
                rules: rules.into_iter().map(Some).collect(),
                active: Vec::new(),
                state: 1,
                suspended: Vec::new(),
            }),
            changed: std::sync::Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The event happened: its rules for the current state act. A
    /// breakpoint on it suspends the calling thread (printing QEMU's
    /// "blkdebug: Suspended request 'TAG'") until it is resumed.
    pub fn event(&self, ev: DebugEvent) {
        let mut st = self.lock();
        let cur = st.state;
        let mut new_state = cur;
        let mut injected = false;
        let mut suspend: Vec<String> = Vec::new();
        // QEMU keeps each event's rules newest first and puts each
        // activated rule at the head of the active list.
        for i in (0..st.rules.len()).rev() {
            let Some(r) = &st.rules[i] else { continue };
            if r.event != ev || (r.state != 0 && r.state != cur) {
                continue;
            }
            match r.action.clone() {
                Action::InjectError { .. } => {
                    if !injected {
                        st.active.clear();
                        injected = true;
                    }
                    st.active.insert(0, i);
                }
                Action::SetState { new_state: n } => new_state = n,
                Action::Suspend { tag } => {
                    // A breakpoint acts once.
                    suspend.push(tag);
                    st.rules[i] = None;
                }
            }
        }
        st.state = new_state;
        for tag in suspend {
            st.suspended.push((tag.clone(), false));
            print_line(&format!("blkdebug: Suspended request '{tag}'"));
            self.changed.notify_all();
            loop {
                let pos = st.suspended.iter().position(|(t, _)| *t == tag);
                match pos {
                    Some(p) if st.suspended[p].1 => {
                        st.suspended.remove(p);
                        break;
                    }
                    Some(_) => {
                        st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                    None => break,
                }
            }
            print_line(&format!("blkdebug: Resuming request '{tag}'"));
        }
    }

    /// Adds a breakpoint: the next request reporting `ev` is suspended
    /// under `tag`.
    pub fn add_breakpoint(&self, ev: DebugEvent, tag: &str) {
        self.lock().rules.push(Some(Rule {
            event: ev,
            state: 0,
            action: Action::Suspend {
                tag: tag.to_string(),
            },
        }));
    }

    /// Removes the breakpoints named `tag`; whether there was one.
    pub fn remove_breakpoint(&self, tag: &str) -> bool {
        let mut st = self.lock();
        let mut found = false;
        for r in st.rules.iter_mut() {
            if matches!(r, Some(Rule { action: Action::Suspend { tag: t }, .. }) if t == tag) {
                *r = None;
                found = true;
            }
        }
        found
    }

    /// Resumes the request suspended under `tag`; whether there was one.
    pub fn resume(&self, tag: &str) -> bool {
        let mut st = self.lock();
        match st.suspended.iter_mut().find(|(t, r)| t == tag && !*r) {
            Some(s) => {
                s.1 = true;
                self.changed.notify_all();
                true
            }
            None => false,
        }
    }

    /// Resumes every suspended request (and those about to be: the
    /// breakpoints go too).
    pub fn resume_all(&self) {
        let mut st = self.lock();
        for r in st.rules.iter_mut() {
            if matches!(
                r,
                Some(Rule {
                    action: Action::Suspend { .. },
                    ..
                })
            ) {
                *r = None;
            }
        }
        for s in st.suspended.iter_mut() {
            s.1 = true;
        }
        self.changed.notify_all();
    }

    /// Whether a request is suspended under `tag`.
    pub fn is_suspended(&self, tag: &str) -> bool {
        self.lock().suspended.iter().any(|(t, r)| t == tag && !*r)
    }

    /// Waits until a request is suspended under `tag`, or until `gone`
    /// says none can be any more (checked every 10 ms). Whether one is.
    pub fn wait_suspended(&self, tag: &str, gone: &dyn Fn() -> bool) -> bool {
        let mut st = self.lock();
        loop {
            if st.suspended.iter().any(|(t, r)| t == tag && !*r) {
                return true;
            }
            if gone() {
                return false;
            }
            st = self
                .changed
                .wait_timeout(st, std::time::Duration::from_millis(10))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// A request of `kind` on `[offset, offset + len)` is about to be
    /// issued: the error of the first active rule that matches it.
    pub fn check(&self, kind: IoType, offset: u64, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        let hit = st.active.iter().position(|&i| {
            let Some(Rule {
                action:
                    Action::InjectError {
                        offset: at,
                        iotypes,
                        ..
                    },
                ..
            }) = &st.rules[i]
            else {
                return false;
            };
            let covers = match at {
                None => true,
                Some(at) => len > 0 && *at >= offset && *at - offset < len,
            };
            covers && iotypes & (1 << kind as u8) != 0
        });
        let Some(pos) = hit else { return Ok(()) };
        let i = st.active[pos];
        let Some(Rule {
            action: Action::InjectError { errno, once, .. },
            ..
        }) = st.rules[i]
        else {
            return Ok(());
        };
        if errno == 0 {
            return Ok(());
        }
        if once {
            st.active.remove(pos);
            st.rules[i] = None;
        }
        Err(io::Error::from_raw_os_error(errno))
    }

    /// The current state of the machine.
    pub fn state(&self) -> i64 {
        self.lock().state
    }
}

/// Storage whose requests fail as blkdebug [`Rules`] say. It reports the
/// generic block-layer events of a request itself (`pwritev` before a
/// write, `pwritev_done` after it, `flush_to_os` and `flush_to_disk`
/// before a sync), as QEMU's block layer does for the node.
pub struct Blkdebug<S> {
    inner: S,
    rules: std::sync::Arc<Rules>,
}

impl<S: Storage> Blkdebug<S> {
    /// `inner` under `rules`.
    pub fn new(inner: S, rules: Vec<Rule>) -> Self {
        Self::with_rules(inner, std::sync::Arc::new(Rules::new(rules)))
    }

    /// `inner` under rules shared with the caller (who may add
    /// breakpoints and resume requests).
    pub fn with_rules(inner: S, rules: std::sync::Arc<Rules>) -> Self {
        Blkdebug { inner, rules }
    }

    /// Events this layer reports by itself.
    pub const OWN_EVENTS: &'static [DebugEvent] = &[
        DebugEvent::Pwritev,
        DebugEvent::PwritevDone,
        DebugEvent::FlushToOs,
        DebugEvent::FlushToDisk,
    ];
}

impl<S: Storage> Storage for Blkdebug<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.rules.check(IoType::Read, offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_vectored_at(&[buf], offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.rules.event(DebugEvent::Pwritev);
        self.rules.check(IoType::Write, offset, len)?;
        self.inner.write_vectored_at(bufs, offset)?;
        self.rules.event(DebugEvent::PwritevDone);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.rules.event(DebugEvent::FlushToOs);
        self.rules.event(DebugEvent::FlushToDisk);
        self.rules.check(IoType::Flush, 0, 0)?;
        self.inner.sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.rules.check(IoType::Discard, offset, len)?;
        self.inner.punch_hole(offset, len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.rules.check(IoType::BlockStatus, offset, 1)?;
        self.inner.next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        self.rules.check(IoType::BlockStatus, offset, 1)?;
        self.inner.next_hole(offset)
    }
    fn allocated_size(&self) -> io::Result<Option<u64>> {
        self.inner.allocated_size()
    }
    fn event(&self, ev: DebugEvent) {
        self.rules.event(ev);
    }
}

/// QEMU's raw format driver as far as debug events go: it reports
/// `read_aio` before each read and `write_aio` before each write to the
/// storage below it (error injection under a raw node acts on those).
pub struct RawEvents<S>(pub S);

impl<S: Storage> RawEvents<S> {
    /// Events this layer reports.
    pub const EVENTS: &'static [DebugEvent] = &[DebugEvent::ReadAio, DebugEvent::WriteAio];
}

impl<S: Storage> Storage for RawEvents<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.event(DebugEvent::ReadAio);
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.event(DebugEvent::WriteAio);
        self.0.write_at(buf, offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        self.0.event(DebugEvent::WriteAio);
        self.0.write_vectored_at(bufs, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.0.sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.0.punch_hole(offset, len)
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.0.next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        self.0.next_hole(offset)
    }
    fn allocated_size(&self) -> io::Result<Option<u64>> {
        self.0.allocated_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStorage;

    fn any(_: DebugEvent) -> bool {
        true
    }

    #[test]
    fn config_file_rules_and_errors_as_qemu() {
        let r = Rule::parse_config(
            "# c\n[inject-error]\nevent = \"l2_load\"\nerrno = \"28\"\nonce =\"on\"\nsector = \"2048\"\n\n[set-state]\nevent = \"write_aio\"\nnew_state = \"2\"\n",
            &any,
        )
        .unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0].action,
            Action::InjectError {
                errno: 28,
                offset: Some(1 << 20),
                once: true,
                immediately: false,
                iotypes: DEFAULT_IOTYPES
            }
        );
        assert_eq!(r[1].action, Action::SetState { new_state: 2 });
        let err = |t: &str| Rule::parse_config(t, &any).unwrap_err();
        assert_eq!(
            err("[inject-error]\nevent = \"foo\""),
            "invalid parameter value: foo"
        );
        assert_eq!(
            err("[inject-error]\nerrno = \"5\""),
            "Missing event name for rule"
        );
        assert_eq!(
            err("[inject-error]\nevent = \"l2_load\"\nbogus = \"1\""),
            "Invalid parameter 'bogus'"
        );
        assert_eq!(
            err("[foo]\nevent = \"l2_load\""),
            "There is no option group 'foo'"
        );
        assert_eq!(err("event = \"x\""), "no group defined");
        assert_eq!(
            err("[inject-error]\nevent = \"l2_load\"\nonce = \"maybe\""),
            "Parameter 'once' expects 'on' or 'off'"
        );
        assert_eq!(
            err("[inject-error]\nevent = \"l2_load\"\nerrno = \"abc\""),
            "Parameter 'errno' expects a number"
        );
        let none = |e: DebugEvent| e != DebugEvent::L1ShrinkWriteTable;
        assert!(
            Rule::parse_config("[inject-error]\nevent = \"l1_shrink_write_table\"", &none)
                .unwrap_err()
                .contains("has no place in this engine")
        );
    }

    #[test]
    fn injection_waits_for_its_event_and_once_removes_it() {
        let rules = Rule::parse_config(
            "[inject-error]\nevent = \"l2_load\"\nerrno = \"28\"\nonce = \"on\"\n",
            &any,
        )
        .unwrap();
        let s = Blkdebug::new(MemStorage::default(), rules);
        s.write_at(&[1; 512], 0).unwrap();
        s.event(DebugEvent::WriteAio);
        s.write_at(&[1; 512], 0).unwrap();
        s.event(DebugEvent::L2Load);
        let e = s.write_at(&[1; 512], 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        s.write_at(&[1; 512], 0).unwrap();
        s.event(DebugEvent::L2Load);
        s.write_at(&[1; 512], 0).unwrap();
    }

    #[test]
    fn persistent_rule_sector_and_iotype() {
        let rules = Rule::parse_config(
            "[inject-error]\nevent = \"cor_write\"\nsector = \"2\"\niotype = \"read\"\n",
            &any,
        )
        .unwrap();
        let s = Blkdebug::new(MemStorage::default(), rules);
        s.event(DebugEvent::CorWrite);
        let mut b = [0u8; 512];
        s.read_at(&mut b, 0).unwrap();
        s.write_at(&b, 1024).unwrap();
        assert_eq!(s.read_at(&mut b, 1024).unwrap_err().raw_os_error(), Some(5));
        assert!(s.read_at(&mut b, 1024).is_err(), "not once: stays active");
        let mut big = [0u8; 2048];
        assert!(s.read_at(&mut big, 0).is_err(), "covers sector 2");
    }

    #[test]
    fn states_move_after_all_rules_of_the_event() {
        // As QEMU test 066: the first write_aio only moves to state 2; the
        // second one arms the error.
        let rules = vec![
            Rule::from_options(
                "set-state",
                [("event", "write_aio"), ("new_state", "2")],
                &any,
            )
            .unwrap(),
            Rule::from_options(
                "inject-error",
                [("event", "write_aio"), ("state", "2")],
                &any,
            )
            .unwrap(),
        ];
        let s = Blkdebug::new(MemStorage::default(), rules);
        s.event(DebugEvent::WriteAio);
        assert_eq!(s.rules.state(), 2);
        s.write_at(&[1; 512], 0).unwrap();
        s.event(DebugEvent::WriteAio);
        assert!(s.write_at(&[1; 512], 0).is_err());
    }
}
