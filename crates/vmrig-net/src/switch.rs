//! The switch thread: one poll(2) loop per VLAN over the ports' sockets and a wake-up socket
//! for commands from [`crate::Vlan`]. A port is either a stream port (its own listening socket
//! and at most one QEMU connection on it) or a VDE port ([`vde_port`]: a control connection and
//! a datagram socket, created by a handshake on the VLAN's `ctl` socket). Both kinds share the
//! MAC table, the fault policy, the delay queue and the capture.

mod vde_port;

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

/// Frames queued towards one peer, each behind a 4-byte length prefix ([`encode_into`]): for a
/// stream port that is the wire format itself, for a VDE port it marks where each datagram ends.
#[derive(Default)]
struct OutQueue {
    buf: Vec<u8>,
    pos: usize,
}

impl OutQueue {
    fn queued(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn push(&mut self, frame: &[u8]) {
        encode_into(&mut self.buf, frame);
    }

    /// After a flush: reuse the buffer when it is empty, else drop what was sent once that is
    /// more than half of it (so the copy is amortised). Returns whether bytes are left.
    fn compact(&mut self) -> bool {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
            if self.buf.capacity() > OUT_LIMIT {
                self.buf.shrink_to(64 * 1024);
            }
            false
        } else {
            if self.pos > self.buf.len() / 2 {
                self.buf.drain(..self.pos);
                self.pos = 0;
            }
            true
        }
    }
}

struct Conn {
    stream: UnixStream,
    dec: Option<FrameDecoder>,
    out: OutQueue,
}

enum PortIo {
    /// A machine's own listening socket and, while its QEMU is connected, the connection.
    Stream {
        listener: UnixListener,
        conn: Option<Conn>,
    },
    /// A VDE client, for as long as its control connection is open.
    Vde(vde_port::VdeLink),
    /// A VDE port whose client left. The slot stays, unused, so that a [`PortId`] still held by
    /// the MAC table, the policy or the delay queue can never designate another port.
    Gone,
}

pub(crate) struct Port {
    pub(crate) name: String,
    /// Stream port: its listening socket. VDE port: the switch's datagram socket for it.
    pub(crate) path: PathBuf,
    io: PortIo,
    stats: PortStats,
}

impl Port {
    fn connected(&self) -> bool {
        match &self.io {
            PortIo::Stream { conn, .. } => conn.is_some(),
            PortIo::Vde(_) => true,
            PortIo::Gone => false,
        }
    }

    fn out(&self) -> Option<&OutQueue> {
        match &self.io {
            PortIo::Stream { conn, .. } => conn.as_ref().map(|c| &c.out),
            PortIo::Vde(l) => Some(&l.out),
            PortIo::Gone => None,
        }
    }

    fn out_mut(&mut self) -> Option<&mut OutQueue> {
        match &mut self.io {
            PortIo::Stream { conn, .. } => conn.as_mut().map(|c| &mut c.out),
            PortIo::Vde(l) => Some(&mut l.out),
            PortIo::Gone => None,
        }
    }
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
    vde: vde_port::VdeState,
    /// Receive buffer for datagrams (VDE ports), allocated on first use.
    dgram_buf: Vec<u8>,
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
            vde: vde_port::VdeState::default(),
            dgram_buf: Vec::new(),
            stop: false,
        }
    }

    // ---- commands ------------------------------------------------------------------------

    /// The socket path of the port named `name`, and whether it is a stream port.
    pub(crate) fn port_path(&self, name: &str) -> Option<(PathBuf, bool)> {
        self.by_name.get(name).map(|&p| {
            let port = &self.ports[p];
            let stream = matches!(port.io, PortIo::Stream { .. });
            (port.path.clone(), stream)
        })
    }

    pub(crate) fn add_port(&mut self, name: String, path: PathBuf, listener: UnixListener) {
        let id = self.ports.len();
        self.by_name.insert(name.clone(), id);
        self.ports.push(Port {
            name,
            path,
            io: PortIo::Stream {
                listener,
                conn: None,
            },
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

    /// Every socket file the switch made (or a VDE client left in its directory), to remove
    /// when the VLAN goes away.
    pub(crate) fn paths(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self
            .ports
            .iter()
            .filter(|p| !matches!(p.io, PortIo::Gone))
            .map(|p| p.path.clone())
            .collect();
        v.extend(self.vde_paths());
        v
    }

    pub(crate) fn stats(&self) -> Stats {
        let ports: BTreeMap<String, PortStats> = self
            .ports
            .iter()
            .filter(|p| !matches!(p.io, PortIo::Gone))
            .map(|p| {
                let mut s = p.stats.clone();
                s.connected = p.connected();
                s.queued_bytes = p.out().map_or(0, |o| o.queued() as u64);
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
            vde_rejected: self.vde.rejected,
            vde_error: self.vde.last_error.clone(),
        }
    }

    // ---- data path -----------------------------------------------------------------------

    fn accept(&mut self, p: PortId) {
        loop {
            let PortIo::Stream { listener, .. } = &self.ports[p].io else {
                return;
            };
            match listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    // A new connection replaces the old one (QEMU restarted for this machine).
                    let port = &mut self.ports[p];
                    if let PortIo::Stream { conn, .. } = &mut port.io {
                        *conn = Some(Conn {
                            stream,
                            dec: Some(FrameDecoder::new()),
                            out: OutQueue::default(),
                        });
                    }
                    port.stats.connections += 1;
                    self.macs.forget_port(p);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return, // WouldBlock, or a transient accept error
            }
        }
    }

    /// The peer is gone: a stream port waits for the next connection, a VDE port goes away.
    fn close(&mut self, p: PortId) {
        match &mut self.ports[p].io {
            PortIo::Stream { conn, .. } => {
                *conn = None;
                self.macs.forget_port(p);
            }
            PortIo::Vde(_) => self.remove_vde_port(p),
            PortIo::Gone => {}
        }
    }

    fn stream_conn(&self, p: PortId) -> Option<&Conn> {
        match &self.ports[p].io {
            PortIo::Stream { conn, .. } => conn.as_ref(),
            _ => None,
        }
    }

    fn stream_conn_mut(&mut self, p: PortId) -> Option<&mut Conn> {
        match &mut self.ports[p].io {
            PortIo::Stream { conn, .. } => conn.as_mut(),
            _ => None,
        }
    }

    fn read_port(&mut self, p: PortId, now: Instant) {
        let Some(mut dec) = self.stream_conn_mut(p).and_then(|c| c.dec.take()) else {
            return;
        };
        let mut close = false;
        for _ in 0..READS_PER_ROUND {
            let spare = dec.spare();
            let want = spare.len();
            let r = {
                let conn = self.stream_conn(p).expect("conn");
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
        } else if let Some(c) = self.stream_conn_mut(p) {
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
                    if dst != src && self.ports[dst].connected() && self.policy.link_up(dst) {
                        self.send_to(src, dst, frame);
                    }
                }
            }
        }
    }

    fn send_to(&mut self, src: PortId, dst: PortId, frame: &[u8]) {
        let ok = self.policy.egress(src, dst).is_ok();
        let port = &mut self.ports[dst];
        match port.out_mut() {
            Some(out) if ok && out.queued() < OUT_LIMIT => {
                out.push(frame);
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
        match self.ports[p].io {
            PortIo::Stream { .. } => self.flush_stream(p),
            PortIo::Vde(_) => self.flush_vde(p),
            PortIo::Gone => false,
        }
    }

    fn flush_stream(&mut self, p: PortId) -> bool {
        let Some(c) = self.stream_conn_mut(p) else {
            return false;
        };
        let out = &mut c.out;
        while out.pos < out.buf.len() {
            let rest = &out.buf[out.pos..];
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
                out.pos += n as usize;
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
        out.compact()
    }

    // ---- the loop ------------------------------------------------------------------------

    pub(crate) fn run(mut self, cmds: Receiver<Cmd>, wake: UnixStream) {
        #[derive(Clone, Copy)]
        enum Slot {
            Wake,
            Listen(PortId),
            Conn(PortId),
            VdeListen,
            VdePending,
            VdeCtl(PortId),
            VdeData(PortId),
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
                let out_ev = if pending_out[i] { libc::POLLOUT } else { 0 };
                match &port.io {
                    PortIo::Stream { listener, conn } => {
                        fds.push(pfd(listener.as_raw_fd(), libc::POLLIN));
                        slots.push(Slot::Listen(i));
                        if let Some(c) = conn {
                            fds.push(pfd(c.stream.as_raw_fd(), libc::POLLIN | out_ev));
                            slots.push(Slot::Conn(i));
                        }
                    }
                    PortIo::Vde(l) => {
                        fds.push(pfd(l.ctl_fd(), libc::POLLIN));
                        slots.push(Slot::VdeCtl(i));
                        fds.push(pfd(l.data_fd(), libc::POLLIN | out_ev));
                        slots.push(Slot::VdeData(i));
                    }
                    PortIo::Gone => {}
                }
            }
            if let Some(fd) = self.vde_listen_fd() {
                fds.push(pfd(fd, libc::POLLIN));
                slots.push(Slot::VdeListen);
            }
            for fd in self.vde_pending_fds() {
                fds.push(pfd(fd, libc::POLLIN));
                slots.push(Slot::VdePending);
            }
            let now = Instant::now();
            let next_timer = [
                self.delayed.peek().map(|d| d.0.at),
                self.vde_next_deadline(),
            ]
            .into_iter()
            .flatten()
            .min();
            let timeout = next_timer.map(|at| {
                let t = at.saturating_duration_since(now);
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
            let mut handshakes = false;
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
                        let same = self
                            .stream_conn(p)
                            .is_some_and(|c| c.stream.as_raw_fd() == fds[i].fd);
                        if !same {
                            continue;
                        }
                        if rev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                            self.read_port(p, now);
                        }
                    }
                    Slot::VdeListen => {
                        self.vde_accept(now);
                        handshakes = true;
                    }
                    Slot::VdePending => handshakes = true,
                    // A VDE port may have gone in this round (its fds closed, and maybe reused
                    // by a new port): act only if the port still has the polled fd.
                    Slot::VdeCtl(p) => {
                        if self.vde_link(p).is_some_and(|l| l.ctl_fd() == fds[i].fd) {
                            self.read_vde_ctl(p);
                        }
                    }
                    Slot::VdeData(p) => {
                        // Also on POLLERR: the recv collects (and so clears) a pending socket
                        // error, which poll would otherwise report again at once, for ever.
                        let same = self.vde_link(p).is_some_and(|l| l.data_fd() == fds[i].fd);
                        if same && rev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                            self.read_vde_data(p, now);
                        }
                    }
                }
            }
            // Handshakes in progress are few and short: serve them all (reads are
            // non-blocking), which also expires the ones that timed out.
            if handshakes || self.vde_next_deadline().is_some_and(|d| d <= now) {
                self.vde_handshakes(now);
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
