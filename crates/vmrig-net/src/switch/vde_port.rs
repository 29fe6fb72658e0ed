//! VDE ports on the switch thread: the `ctl` listener, handshakes in progress, the ports they
//! create and their datagram data path. The wire format is in [`crate::vde`].
//!
//! A VDE port is a switch port like a stream port (learning, link state, loss, delay,
//! partitions and capture apply the same), except that it exists only while its client keeps
//! the control connection open: when that closes, the port is removed.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Core, OutQueue, Port, PortIo, READS_PER_ROUND};
use crate::frame::{MAX_FRAME, PREFIX};
use crate::policy::PortId;
use crate::vde::{self, VdeError, HEADER_LEN, MAX_REQUEST_LEN};
use crate::{valid_name, NetError, PortStats, MAX_SOCKET_PATH};

/// A client that connects to `ctl` and sends no complete request within this is dropped, so a
/// stuck or foreign client cannot hold a file descriptor for ever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at most; beyond it the oldest is dropped (bounds the fds used).
const MAX_PENDING: usize = 64;
/// What libvdeplug appends to the (realpath'd) switch directory for its own datagram socket:
/// `/.<pid %05d>-<n %05d>`, with a pid of up to 7 digits (`PID_MAX_LIMIT` = 4194304). vdeplug4
/// does not check that this fits in `sun_path`, it silently binds a truncated name, so the
/// directory must leave room for it.
const CLIENT_SOCKET_EXAMPLE: &str = ".4194304-00000";
/// The label QEMU gives every VDE connection: it names no machine.
const QEMU_LABEL: &str = "QEMU";

pub(crate) struct VdeLink {
    ctl: UnixStream,
    data: UnixDatagram,
    client_path: PathBuf,
    pid: Option<u32>,
    /// Named after a machine (by pid or description), not an anonymous `vde<k>`.
    named: bool,
    pub(super) out: OutQueue,
}

impl VdeLink {
    pub(super) fn ctl_fd(&self) -> RawFd {
        self.ctl.as_raw_fd()
    }

    pub(super) fn data_fd(&self) -> RawFd {
        self.data.as_raw_fd()
    }
}

struct Pending {
    stream: UnixStream,
    buf: Vec<u8>,
    since: Instant,
}

struct Server {
    /// As the caller named it (returned by `Vlan::vde_dir`).
    dir: PathBuf,
    /// Canonical: what libvdeplug sees after realpath(3), and what our replies name, since the
    /// client resolves them against its own working directory.
    canon: PathBuf,
    ctl_path: PathBuf,
    listener: UnixListener,
    pending: Vec<Pending>,
}

/// What a named VDE port leaves behind when its client goes, so that the machine's next
/// connection (a restarted QEMU) continues like a stream port's reconnection does: same link
/// state, connection count going on.
struct Retired {
    connections: u64,
    link_up: bool,
}

#[derive(Default)]
pub(crate) struct VdeState {
    server: Option<Server>,
    /// VDE clients admitted so far: numbers the data sockets and the anonymous names.
    seq: u64,
    /// Client pid -> machine, from `Vlan::name_vde_client`.
    pids: HashMap<u32, String>,
    retired: HashMap<String, Retired>,
    pub(super) rejected: u64,
    pub(super) last_error: Option<String>,
}

enum Progress {
    /// No complete request yet.
    Wait,
    /// The client closed (or broke) the connection before sending one.
    Closed,
    /// Enough bytes to decide.
    Done,
}

/// Read what has arrived. A request has no terminator: it is complete once the fixed part is
/// there and the socket has nothing more to give (libvdeplug sends it with one `send`).
fn read_request(p: &mut Pending) -> Progress {
    let mut tmp = [0u8; MAX_REQUEST_LEN];
    loop {
        let room = MAX_REQUEST_LEN - p.buf.len();
        if room == 0 {
            return Progress::Done;
        }
        match (&p.stream).read(&mut tmp[..room]) {
            Ok(0) if p.buf.len() >= HEADER_LEN => return Progress::Done,
            Ok(0) => return Progress::Closed,
            Ok(n) => p.buf.extend_from_slice(&tmp[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // A wrong magic or version is known from 8 bytes: say so right away rather
                // than after the timeout.
                return match vde::parse_request(&p.buf) {
                    Err(VdeError::Short(_)) => Progress::Wait,
                    _ => Progress::Done,
                };
            }
            Err(_) => return Progress::Closed,
        }
    }
}

impl Core {
    // ---- commands ------------------------------------------------------------------------

    /// Serve VDE in `dir` (created) unless already serving; returns the directory.
    pub(crate) fn start_vde(&mut self, dir: PathBuf) -> Result<PathBuf, NetError> {
        if let Some(s) = &self.vde.server {
            return Ok(s.dir.clone());
        }
        let nr = self.nr;
        let io_err = |what, path: &Path, source| NetError::Io {
            vlan: nr,
            what,
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(|e| io_err("cannot create directory", &dir, e))?;
        let canon =
            std::fs::canonicalize(&dir).map_err(|e| io_err("cannot resolve directory", &dir, e))?;
        let longest = canon.join(CLIENT_SOCKET_EXAMPLE);
        if longest.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(NetError::PathTooLong(longest));
        }
        let ctl_path = canon.join("ctl");
        let _ = std::fs::remove_file(&ctl_path); // stale socket of an earlier run
        let listener =
            UnixListener::bind(&ctl_path).map_err(|e| io_err("cannot bind", &ctl_path, e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| io_err("cannot configure", &ctl_path, e))?;
        self.vde.server = Some(Server {
            dir: dir.clone(),
            canon,
            ctl_path,
            listener,
            pending: Vec::new(),
        });
        Ok(dir)
    }

    /// The VDE client of process `pid` is `machine`: its port gets that name, now if it is
    /// already connected under an anonymous name. Returns false if that name is taken by
    /// another port (the client then keeps its `vde<k>` name).
    pub(crate) fn name_vde_client(&mut self, pid: u32, machine: String) -> bool {
        self.vde.pids.insert(pid, machine.clone());
        let anonymous = self
            .ports
            .iter()
            .position(|p| matches!(&p.io, PortIo::Vde(l) if l.pid == Some(pid) && !l.named));
        let Some(id) = anonymous else {
            return true;
        };
        if self.by_name.contains_key(&machine) {
            return false;
        }
        let old = std::mem::replace(&mut self.ports[id].name, machine.clone());
        self.by_name.remove(&old);
        self.by_name.insert(machine.clone(), id);
        if let PortIo::Vde(l) = &mut self.ports[id].io {
            l.named = true;
        }
        self.inherit(id, &machine);
        self.apply_partitions();
        true
    }

    pub(super) fn vde_paths(&self) -> Vec<PathBuf> {
        let Some(s) = &self.vde.server else {
            return Vec::new();
        };
        let mut v = vec![s.ctl_path.clone()];
        for p in &self.ports {
            if let PortIo::Vde(l) = &p.io {
                if self.is_client_socket_in_dir(&l.client_path) {
                    v.push(l.client_path.clone());
                }
            }
        }
        v
    }

    // ---- poll plumbing -------------------------------------------------------------------

    pub(super) fn vde_listen_fd(&self) -> Option<RawFd> {
        self.vde.server.as_ref().map(|s| s.listener.as_raw_fd())
    }

    pub(super) fn vde_pending_fds(&self) -> Vec<RawFd> {
        self.vde.server.as_ref().map_or(Vec::new(), |s| {
            s.pending.iter().map(|p| p.stream.as_raw_fd()).collect()
        })
    }

    pub(super) fn vde_next_deadline(&self) -> Option<Instant> {
        let s = self.vde.server.as_ref()?;
        s.pending.iter().map(|p| p.since + HANDSHAKE_TIMEOUT).min()
    }

    pub(super) fn vde_link(&self, p: PortId) -> Option<&VdeLink> {
        match &self.ports[p].io {
            PortIo::Vde(l) => Some(l),
            _ => None,
        }
    }

    // ---- handshakes ----------------------------------------------------------------------

    fn reject(&mut self, why: String) {
        self.vde.rejected += 1;
        self.vde.last_error = Some(why);
    }

    pub(super) fn vde_accept(&mut self, now: Instant) {
        let mut dropped = 0;
        if let Some(s) = self.vde.server.as_mut() {
            loop {
                match s.listener.accept() {
                    Ok((stream, _)) => {
                        if stream.set_nonblocking(true).is_err() {
                            continue;
                        }
                        if s.pending.len() >= MAX_PENDING {
                            s.pending.remove(0);
                            dropped += 1;
                        }
                        s.pending.push(Pending {
                            stream,
                            buf: Vec::new(),
                            since: now,
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break, // WouldBlock, or a transient accept error
                }
            }
        }
        for _ in 0..dropped {
            self.reject(format!(
                "more than {MAX_PENDING} VDE handshakes at once: dropped the oldest"
            ));
        }
    }

    /// Read every handshake in progress; complete, reject or expire them.
    pub(super) fn vde_handshakes(&mut self, now: Instant) {
        let Some(s) = self.vde.server.as_mut() else {
            return;
        };
        let pending = std::mem::take(&mut s.pending);
        let mut keep = Vec::with_capacity(pending.len());
        for mut p in pending {
            match read_request(&mut p) {
                Progress::Wait if now.saturating_duration_since(p.since) >= HANDSHAKE_TIMEOUT => {
                    self.reject(format!(
                        "VDE client sent no complete request within {HANDSHAKE_TIMEOUT:?}"
                    ));
                }
                Progress::Wait => keep.push(p),
                Progress::Closed => self.reject(format!(
                    "VDE client closed the connection after {} bytes, before a complete request",
                    p.buf.len()
                )),
                Progress::Done => {
                    if let Err(e) = self.vde_new_port(p.stream, &p.buf) {
                        self.reject(e);
                    }
                }
            }
        }
        if let Some(s) = self.vde.server.as_mut() {
            s.pending = keep;
        }
    }

    /// A client socket the switch may unlink: one in its own directory with libvdeplug's
    /// hidden name. The switch's own sockets there (`ctl`, `<k>.port`) never start with '.'.
    fn is_client_socket_in_dir(&self, path: &Path) -> bool {
        let Some(s) = &self.vde.server else {
            return false;
        };
        path.parent() == Some(s.canon.as_path())
            && path
                .file_name()
                .is_some_and(|n| n.as_bytes().first() == Some(&b'.'))
    }

    /// Answer a complete request: a datagram socket for the port, connected to the client's,
    /// then the reply, then the port. Errors are for `Stats::vde_error`.
    fn vde_new_port(&mut self, ctl: UnixStream, bytes: &[u8]) -> Result<(), String> {
        let req = vde::parse_request(bytes).map_err(|e| e.to_string())?;
        let canon = self
            .vde
            .server
            .as_ref()
            .ok_or("not serving VDE")?
            .canon
            .clone();
        // A client path naming one of the switch's own sockets would make it send frames to
        // itself and later unlink that socket: refuse.
        if req.client_path.parent() == Some(canon.as_path())
            && !self.is_client_socket_in_dir(&req.client_path)
        {
            return Err(format!(
                "VDE client socket {} is one of the switch's own names",
                req.client_path.display()
            ));
        }
        // Counted only once the client is in, so that `vde<k>` numbers the ports made.
        let k = self.vde.seq + 1;
        let data_path = canon.join(format!("{k}.port"));
        let _ = std::fs::remove_file(&data_path);
        let data = UnixDatagram::bind(&data_path)
            .map_err(|e| format!("cannot bind {}: {e}", data_path.display()))?;
        // Connect before replying: vdeplug4 unlinks its socket file as soon as it has the
        // reply, and a connected socket keeps reaching it after that. It also makes the kernel
        // deliver to this socket only what the client sends.
        let setup = data
            .connect(&req.client_path)
            .map_err(|e| {
                format!(
                    "cannot connect to the VDE client's socket {}: {e}",
                    req.client_path.display()
                )
            })
            .and_then(|()| data.set_nonblocking(true).map_err(|e| e.to_string()))
            .and_then(|()| vde::encode_reply(&data_path).map_err(|e| e.to_string()))
            .and_then(|reply| match (&ctl).write(&reply) {
                Ok(n) if n == reply.len() => Ok(()),
                Ok(n) => Err(format!(
                    "VDE reply cut short ({n} of {} bytes)",
                    reply.len()
                )),
                Err(e) => Err(format!("cannot send the VDE reply: {e}")),
            });
        if let Err(e) = setup {
            let _ = std::fs::remove_file(&data_path);
            return Err(e);
        }

        self.vde.seq = k;
        let pid = req.pid();
        let (name, named) = self.vde_port_name(&req, k);
        let id = self.ports.len();
        self.by_name.insert(name.clone(), id);
        self.ports.push(Port {
            name: name.clone(),
            path: data_path,
            io: PortIo::Vde(VdeLink {
                ctl,
                data,
                client_path: req.client_path,
                pid,
                named,
                out: OutQueue::default(),
            }),
            stats: PortStats {
                connections: 1,
                link_up: true,
                vde_description: Some(req.description),
                ..PortStats::default()
            },
        });
        self.policy.set_link(id, true);
        if named {
            self.inherit(id, &name);
        }
        self.apply_partitions();
        Ok(())
    }

    /// The port name of a new VDE client: the machine registered for its pid, else the label
    /// of its description (the `descr` it gave libvdeplug) when that is a valid machine name
    /// other than QEMU's fixed `QEMU`, else `vde<k>`. A name some port already has is skipped.
    fn vde_port_name(&self, req: &vde::VdeRequest, k: u64) -> (String, bool) {
        let by_pid = req.pid().and_then(|p| self.vde.pids.get(&p).cloned());
        let label = req.label();
        let by_label = (valid_name(label) && label != QEMU_LABEL).then(|| label.to_string());
        if let Some(n) = [by_pid, by_label]
            .into_iter()
            .flatten()
            .find(|n| !self.by_name.contains_key(n))
        {
            return (n, true);
        }
        let mut k = k;
        loop {
            let n = format!("vde{k}");
            if !self.by_name.contains_key(&n) {
                return (n, false);
            }
            k += 1;
        }
    }

    /// Take over what the previous port of this name left (see [`Retired`]).
    fn inherit(&mut self, id: PortId, name: &str) {
        if let Some(r) = self.vde.retired.remove(name) {
            let st = &mut self.ports[id].stats;
            st.connections = r.connections + 1;
            st.link_up = r.link_up;
            self.policy.set_link(id, r.link_up);
        }
    }

    // ---- the data path -------------------------------------------------------------------

    /// The control connection: nothing is expected on it after the request; its end is the
    /// port's end.
    pub(super) fn read_vde_ctl(&mut self, p: PortId) {
        let mut junk = [0u8; 256];
        // Bounded per round, so a chatty client cannot hold up the switch.
        for _ in 0..READS_PER_ROUND {
            let Some(l) = self.vde_link(p) else {
                return;
            };
            match (&l.ctl).read(&mut junk) {
                Ok(0) => return self.remove_vde_port(p),
                Ok(_) => continue, // ignored
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => return self.remove_vde_port(p),
            }
        }
    }

    pub(super) fn remove_vde_port(&mut self, p: PortId) {
        let PortIo::Vde(link) = std::mem::replace(&mut self.ports[p].io, PortIo::Gone) else {
            return;
        };
        let _ = std::fs::remove_file(&self.ports[p].path);
        // A client that died without cleaning up (vde2's libvdeplug unlinks only in
        // vde_close) leaves its socket in our directory.
        if self.is_client_socket_in_dir(&link.client_path) {
            let _ = std::fs::remove_file(&link.client_path);
        }
        let Port { name, stats, .. } = &self.ports[p];
        let name = name.clone();
        if link.named {
            let r = Retired {
                connections: stats.connections,
                link_up: stats.link_up,
            };
            self.vde.retired.insert(name.clone(), r);
        }
        // A pid is not reused while its process lives, but may be afterwards.
        if let Some(pid) = link.pid {
            if self.vde.pids.get(&pid) == Some(&name) {
                self.vde.pids.remove(&pid);
            }
        }
        if self.by_name.get(&name) == Some(&p) {
            self.by_name.remove(&name);
        }
        self.macs.forget_port(p);
        self.policy.set_link(p, true);
        self.apply_partitions();
    }

    pub(super) fn read_vde_data(&mut self, p: PortId, now: Instant) {
        let mut buf = std::mem::take(&mut self.dgram_buf);
        if buf.is_empty() {
            buf = vec![0; MAX_FRAME];
        }
        for _ in 0..READS_PER_ROUND {
            let Some(l) = self.vde_link(p) else {
                break;
            };
            // SAFETY: valid fd and buffer. MSG_TRUNC makes recv return the datagram's real
            // length, so an oversized one is recognised rather than passed on cut.
            let n = unsafe {
                libc::recv(
                    l.data_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break; // WouldBlock; a dead client is noticed on its control connection
            }
            let n = n as usize;
            if n > buf.len() {
                let st = &mut self.ports[p].stats;
                st.frames_in += 1;
                st.bytes_in += n as u64;
                st.malformed += 1;
                st.dropped_in += 1;
                continue;
            }
            self.ingress(p, &buf[..n], now);
        }
        self.dgram_buf = buf;
    }

    /// Send queued frames, one datagram each; returns whether some are still waiting (the
    /// client's socket is full: poll for POLLOUT).
    pub(super) fn flush_vde(&mut self, p: PortId) -> bool {
        let Port { io, stats, .. } = &mut self.ports[p];
        let PortIo::Vde(l) = io else {
            return false;
        };
        let out = &mut l.out;
        while out.pos < out.buf.len() {
            let at = out.pos;
            let len = u32::from_be_bytes(out.buf[at..at + PREFIX].try_into().expect("4 bytes"));
            let end = at + PREFIX + len as usize;
            let frame = &out.buf[at + PREFIX..end];
            // SAFETY: valid fd and buffer; MSG_NOSIGNAL for symmetry with the stream path.
            let n = unsafe {
                libc::send(
                    l.data.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                match io::Error::last_os_error().kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => break,
                    // The client's socket is gone (or refuses this datagram): lose this frame,
                    // not the port; the control connection says when the port ends.
                    _ => stats.dropped_out += 1,
                }
            }
            out.pos = end;
        }
        out.compact()
    }
}
