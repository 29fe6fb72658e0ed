//! The switch thread: one poll(2) loop per VLAN over the ports' listening sockets, their
//! connections and a wake-up socket for commands from [`crate::Vlan`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::io::{self, Read};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant, SystemTime};

use crate::frame::{encode_into, FrameDecoder, MIN_FRAME};
use crate::pcap::PcapWriter;
use crate::policy::{route, FaultPolicy, MacTable, PortId, Rng, Target};
use crate::{PortStats, Stats};

/// A command for the switch thread: runs on it, between two batches of frames.
pub(crate) type Cmd = Box<dyn FnOnce(&mut Core) + Send>;

/// Bytes queued towards one peer beyond which further frames for it are tail-dropped (its QEMU
/// is not reading: the guest's receive ring is full or the VM is paused).
const OUT_LIMIT: usize = 4 * 1024 * 1024;
/// read(2) calls per connection per poll round, so one busy peer cannot starve the others.
const READS_PER_ROUND: usize = 8;

struct Conn {
    stream: UnixStream,
    dec: Option<FrameDecoder>,
    out: Vec<u8>,
    out_pos: usize,
}

impl Conn {
    fn queued(&self) -> usize {
        self.out.len() - self.out_pos
    }
}

pub(crate) struct Port {
    pub(crate) name: String,
    pub(crate) path: PathBuf,
    listener: UnixListener,
    conn: Option<Conn>,
    stats: PortStats,
}

struct Delayed {
    at: Instant,
    seq: u64,
    src: PortId,
    target: Target,
    frame: Vec<u8>,
}

impl PartialEq for Delayed {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Delayed {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

pub(crate) struct Core {
    nr: u8,
    ports: Vec<Port>,
    by_name: HashMap<String, PortId>,
    macs: MacTable,
    policy: FaultPolicy,
    partitions: Vec<(Vec<String>, Vec<String>)>,
    rng: Rng,
    delayed: BinaryHeap<Reverse<Delayed>>,
    seq: u64,
    capture: Option<PcapWriter>,
    capture_error: Option<String>,
    stop: bool,
}

impl Core {
    pub(crate) fn new(nr: u8) -> Core {
        Core {
            nr,
            ports: Vec::new(),
            by_name: HashMap::new(),
            macs: MacTable::default(),
            policy: FaultPolicy::new(),
            partitions: Vec::new(),
            rng: Rng::from_entropy(nr as u64),
            delayed: BinaryHeap::new(),
            seq: 0,
            capture: None,
            capture_error: None,
            stop: false,
        }
    }

    // ---- commands ------------------------------------------------------------------------

    pub(crate) fn port_path(&self, name: &str) -> Option<PathBuf> {
        self.by_name.get(name).map(|&p| self.ports[p].path.clone())
    }

    pub(crate) fn add_port(&mut self, name: String, path: PathBuf, listener: UnixListener) {
        let id = self.ports.len();
        self.by_name.insert(name.clone(), id);
        self.ports.push(Port {
            name,
            path,
            listener,
            conn: None,
            stats: PortStats {
                link_up: true,
                ..PortStats::default()
            },
        });
        self.apply_partitions();
    }

    pub(crate) fn port_id(&self, name: &str) -> Option<PortId> {
        self.by_name.get(name).copied()
    }

    pub(crate) fn set_link(&mut self, port: PortId, up: bool) {
        self.policy.set_link(port, up);
        self.ports[port].stats.link_up = up;
    }

    pub(crate) fn policy_mut(&mut self) -> &mut FaultPolicy {
        &mut self.policy
    }

    pub(crate) fn partition(&mut self, a: Vec<String>, b: Vec<String>) {
        self.partitions.push((a, b));
        self.apply_partitions();
    }

    pub(crate) fn heal(&mut self) {
        self.partitions.clear();
        self.apply_partitions();
    }

    fn apply_partitions(&mut self) {
        self.policy.heal();
        for (a, b) in &self.partitions {
            let ids = |g: &Vec<String>| -> Vec<PortId> {
                g.iter()
                    .filter_map(|n| self.by_name.get(n).copied())
                    .collect()
            };
            self.policy.partition(ids(a), ids(b));
        }
    }

    pub(crate) fn set_capture(&mut self, w: Option<PcapWriter>) -> u64 {
        let mut n = 0;
        if let Some(mut old) = self.capture.take() {
            let _ = old.flush();
            n = old.records();
        }
        self.capture = w;
        self.capture_error = None;
        n
    }

    pub(crate) fn stop(&mut self) {
        self.stop = true;
    }

    pub(crate) fn paths(&self) -> Vec<PathBuf> {
        self.ports.iter().map(|p| p.path.clone()).collect()
    }

    pub(crate) fn stats(&self) -> Stats {
        let ports: BTreeMap<String, PortStats> = self
            .ports
            .iter()
            .map(|p| {
                let mut s = p.stats.clone();
                s.connected = p.conn.is_some();
                s.queued_bytes = p.conn.as_ref().map_or(0, |c| c.queued() as u64);
                (p.name.clone(), s)
            })
            .collect();
        Stats {
            vlan: self.nr,
            ports,
            delayed: self.delayed.len(),
            mac_entries: self.macs.len(),
            captured: self.capture.as_ref().map_or(0, |c| c.records()),
            capture_error: self.capture_error.clone(),
        }
    }

    // ---- data path -----------------------------------------------------------------------

    fn accept(&mut self, p: PortId) {
        loop {
            match self.ports[p].listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    // A new connection replaces the old one (QEMU restarted for this machine).
                    let port = &mut self.ports[p];
                    port.conn = Some(Conn {
                        stream,
                        dec: Some(FrameDecoder::new()),
                        out: Vec::new(),
                        out_pos: 0,
                    });
                    port.stats.connections += 1;
                    self.macs.forget_port(p);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return, // WouldBlock, or a transient accept error
            }
        }
    }

    fn close(&mut self, p: PortId) {
        self.ports[p].conn = None;
        self.macs.forget_port(p);
    }

    fn read_port(&mut self, p: PortId, now: Instant) {
        let Some(mut dec) = self.ports[p].conn.as_mut().and_then(|c| c.dec.take()) else {
            return;
        };
        let mut close = false;
        for _ in 0..READS_PER_ROUND {
            let spare = dec.spare();
            let want = spare.len();
            let r = {
                let conn = self.ports[p].conn.as_ref().expect("conn");
                (&conn.stream).read(spare)
            };
            let n = match r {
                Ok(0) => {
                    close = true; // EOF (possibly mid-frame: the rest is lost with the peer)
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    close = true;
                    break;
                }
            };
            dec.commit(n);
            loop {
                match dec.next_frame() {
                    Ok(Some(frame)) => self.ingress(p, frame, now),
                    Ok(None) => break,
                    Err(_) => {
                        self.ports[p].stats.protocol_errors += 1;
                        close = true;
                        break;
                    }
                }
            }
            if close || n < want {
                break;
            }
        }
        if close {
            self.close(p);
        } else if let Some(c) = self.ports[p].conn.as_mut() {
            c.dec = Some(dec);
        }
    }

    fn ingress(&mut self, src: PortId, frame: &[u8], now: Instant) {
        let st = &mut self.ports[src].stats;
        st.frames_in += 1;
        st.bytes_in += frame.len() as u64;
        if frame.len() < MIN_FRAME {
            st.malformed += 1;
            st.dropped_in += 1;
            return;
        }
        let sample = if self.policy.loss_percent() > 0.0 {
            self.rng.sample()
        } else {
            1.0
        };
        let delay = match self.policy.ingress(src, sample) {
            Ok(d) => d,
            Err(_) => {
                self.ports[src].stats.dropped_in += 1;
                return;
            }
        };
        if let Some(w) = self.capture.as_mut() {
            if let Err(e) = w.write(SystemTime::now(), frame) {
                self.capture_error = Some(e.to_string());
                self.capture = None;
            }
        }
        let target = route(&mut self.macs, frame, src, now);
        if delay.is_zero() {
            self.deliver(src, target, frame);
        } else {
            self.seq += 1;
            self.delayed.push(Reverse(Delayed {
                at: now + delay,
                seq: self.seq,
                src,
                target,
                frame: frame.to_vec(),
            }));
        }
    }

    fn deliver(&mut self, src: PortId, target: Target, frame: &[u8]) {
        match target {
            Target::Filter => {}
            Target::Unicast(dst) => self.send_to(src, dst, frame),
            Target::Flood => {
                for dst in 0..self.ports.len() {
                    if dst != src && self.ports[dst].conn.is_some() && self.policy.link_up(dst) {
                        self.send_to(src, dst, frame);
                    }
                }
            }
        }
    }

    fn send_to(&mut self, src: PortId, dst: PortId, frame: &[u8]) {
        let ok = self.policy.egress(src, dst).is_ok();
        let port = &mut self.ports[dst];
        match port.conn.as_mut() {
            Some(c) if ok && c.queued() < OUT_LIMIT => {
                encode_into(&mut c.out, frame);
                port.stats.frames_out += 1;
                port.stats.bytes_out += frame.len() as u64;
            }
            _ => port.stats.dropped_out += 1,
        }
    }

    fn release_due(&mut self, now: Instant) {
        while self.delayed.peek().is_some_and(|d| d.0.at <= now) {
            let Reverse(d) = self.delayed.pop().expect("peeked");
            self.deliver(d.src, d.target, &d.frame);
        }
    }

    /// Write queued output; returns whether the port still has bytes waiting.
    fn flush_port(&mut self, p: PortId) -> bool {
        let Some(c) = self.ports[p].conn.as_mut() else {
            return false;
        };
        while c.out_pos < c.out.len() {
            let rest = &c.out[c.out_pos..];
            // SAFETY: valid fd and buffer; MSG_NOSIGNAL so a dead peer is EPIPE, not SIGPIPE.
            let n = unsafe {
                libc::send(
                    c.stream.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                c.out_pos += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => break,
                _ => {
                    self.close(p);
                    return false;
                }
            }
        }
        if c.out_pos == c.out.len() {
            c.out.clear();
            c.out_pos = 0;
            if c.out.capacity() > OUT_LIMIT {
                c.out.shrink_to(64 * 1024);
            }
            false
        } else {
            if c.out_pos > c.out.len() / 2 {
                c.out.drain(..c.out_pos);
                c.out_pos = 0;
            }
            true
        }
    }

    // ---- the loop ------------------------------------------------------------------------

    pub(crate) fn run(mut self, cmds: Receiver<Cmd>, wake: UnixStream) {
        #[derive(Clone, Copy)]
        enum Slot {
            Wake,
            Listen(PortId),
            Conn(PortId),
        }
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let mut slots: Vec<Slot> = Vec::new();
        let mut pending_out: Vec<bool> = Vec::new();
        let mut junk = [0u8; 256];
        while !self.stop {
            fds.clear();
            slots.clear();
            let pfd = |fd, events| libc::pollfd {
                fd,
                events,
                revents: 0,
            };
            fds.push(pfd(wake.as_raw_fd(), libc::POLLIN));
            slots.push(Slot::Wake);
            pending_out.resize(self.ports.len(), false);
            for (i, port) in self.ports.iter().enumerate() {
                fds.push(pfd(port.listener.as_raw_fd(), libc::POLLIN));
                slots.push(Slot::Listen(i));
                if let Some(c) = &port.conn {
                    let mut ev = libc::POLLIN;
                    if pending_out[i] {
                        ev |= libc::POLLOUT;
                    }
                    fds.push(pfd(c.stream.as_raw_fd(), ev));
                    slots.push(Slot::Conn(i));
                }
            }
            let timeout = self.delayed.peek().map(|d| {
                let t = d.0.at.saturating_duration_since(Instant::now());
                libc::timespec {
                    tv_sec: t.as_secs() as libc::time_t,
                    tv_nsec: t.subsec_nanos() as libc::c_long,
                }
            });
            let tp = timeout
                .as_ref()
                .map_or(std::ptr::null(), |t| t as *const libc::timespec);
            // SAFETY: fds is a valid array of pollfd; tp is null or points to a live timespec.
            let r = unsafe {
                libc::ppoll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    tp,
                    std::ptr::null(),
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // Should not happen; do not spin.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let now = Instant::now();
            for (i, slot) in slots.iter().enumerate() {
                let rev = fds[i].revents;
                if rev == 0 {
                    continue;
                }
                match *slot {
                    Slot::Wake => {
                        while matches!((&wake).read(&mut junk), Ok(n) if n == junk.len()) {}
                        while let Ok(cmd) = cmds.try_recv() {
                            cmd(&mut self);
                        }
                        if self.stop {
                            return;
                        }
                        // Ports may have been added: the slot table is stale for them only, and
                        // they come last, so the remaining slots stay valid.
                    }
                    Slot::Listen(p) => self.accept(p),
                    Slot::Conn(p) => {
                        // The connection may have been replaced by an accept in this round;
                        // only act on the fd that was polled.
                        let same = self.ports[p]
                            .conn
                            .as_ref()
                            .is_some_and(|c| c.stream.as_raw_fd() == fds[i].fd);
                        if !same {
                            continue;
                        }
                        if rev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                            self.read_port(p, now);
                        }
                    }
                }
            }
            self.release_due(Instant::now());
            for p in 0..self.ports.len() {
                pending_out.resize(self.ports.len(), false);
                pending_out[p] = self.flush_port(p);
            }
            if let Some(w) = self.capture.as_mut() {
                if let Err(e) = w.flush() {
                    self.capture_error = Some(e.to_string());
                    self.capture = None;
                }
            }
        }
    }
}
