//! vmrig-net: vmrig's own Ethernet switch, one per VLAN, that QEMU joins over unix stream
//! sockets (`-netdev stream`, QEMU >= 7.2) or as a VDE client (`-netdev vde`). No root, no TAP,
//! no vde2.
//!
//! Each machine gets its own listening socket per VLAN (`<run_dir>/vlan<N>/<machine>.sock`), so
//! the switch knows which port is which machine. QEMU connects as a client
//! (`server=off`); frames travel with a 4-byte big-endian length prefix ([`frame`]).
//!
//! ```no_run
//! # use std::path::Path;
//! let vlan = vmrig_net::Vlan::start(1, Path::new("/tmp/run"))?;
//! let sock = vlan.add_port("client")?;
//! // qemu-system-x86_64 ... -netdev stream,id=vlan1,server=off,addr.type=unix,addr.path=<sock>
//! //     -device virtio-net-pci,netdev=vlan1,mac=...   (vmrig-vm's `cmdline::stream_netdev`)
//! # Ok::<(), vmrig_net::NetError>(())
//! ```
//!
//! The same switch also speaks vde_switch's protocol ([`vde`]), for command lines that say
//! `-netdev vde,sock=<dir>` (NixOS start scripts, via `QEMU_VDE_SOCKET_<n>`):
//! [`Vlan::vde_dir`] returns the directory (`<run_dir>/vlan<N>/vde`, holding `ctl`), and every
//! client that connects there becomes a port of its own, alive while the client is connected.
//! Such a port is named after a machine when [`Vlan::name_vde_client`] registered the client's
//! pid, or when the client's description starts with a valid machine name other than `QEMU`
//! (QEMU always says `QEMU`); otherwise it is `vde<k>`.
//!
//! ```no_run
//! # use std::path::Path;
//! let vlan = vmrig_net::Vlan::start(1, Path::new("/tmp/run"))?;
//! let dir = vlan.vde_dir()?;
//! // QEMU_VDE_SOCKET_1=<dir> run-client-vm, or -netdev vde,id=vlan1,sock=<dir>;
//! // then, with the child's pid: vlan.name_vde_client(pid, "client")?;
//! # Ok::<(), vmrig_net::NetError>(())
//! ```

pub mod frame;
pub mod pcap;
pub mod policy;
mod switch;
pub mod vde;

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use switch::{Cmd, Core};

/// Longest path a unix socket address can hold (`sun_path` is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("vlan {vlan}: {what} {path}: {source}")]
    Io {
        vlan: u8,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vlan {vlan}: cannot start the switch thread: {source}")]
    Thread {
        vlan: u8,
        #[source]
        source: io::Error,
    },
    #[error("invalid machine name {0:?} (must be non-empty, without '/', NUL or leading '.')")]
    InvalidName(String),
    #[error(
        "socket path {0} is longer than {MAX_SOCKET_PATH} bytes, the limit of a unix socket address; use a shorter run directory"
    )]
    PathTooLong(PathBuf),
    #[error("vlan {vlan}: no port for machine {machine:?}")]
    UnknownPort { vlan: u8, machine: String },
    #[error("vlan {vlan}: the name {machine:?} is taken by another port (stream or VDE)")]
    NameTaken { vlan: u8, machine: String },
    #[error("vlan {0}: the switch thread is gone")]
    SwitchGone(u8),
}

/// Counters of one port (one machine's NIC on this VLAN).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortStats {
    /// A QEMU is connected right now.
    pub connected: bool,
    /// Connections accepted so far (1 after the first boot, 2 after a QEMU restart, ...).
    pub connections: u64,
    /// Link state set by [`Vlan::set_link`].
    pub link_up: bool,
    /// Frames (and their bytes) received from this port's peer, malformed ones included.
    pub frames_in: u64,
    pub bytes_in: u64,
    /// Frames (and bytes) queued for this port's peer.
    pub frames_out: u64,
    pub bytes_out: u64,
    /// Frames from this peer dropped as a whole: malformed, link down, random loss.
    pub dropped_in: u64,
    /// Frames meant for this peer not delivered: link down (unicast), partition, not connected
    /// (unicast), or its output queue full (the peer does not read).
    pub dropped_out: u64,
    /// Frames shorter than 14 bytes, or (VDE) datagrams longer than [`frame::MAX_FRAME`]; also
    /// counted in `dropped_in`.
    pub malformed: u64,
    /// Connections cut because the peer broke the framing (length prefix over
    /// [`frame::MAX_FRAME`]).
    pub protocol_errors: u64,
    /// Bytes waiting to be written to the peer.
    pub queued_bytes: u64,
    /// For a VDE port, the description its client sent (QEMU: `QEMU user=<login> pid=<pid>`).
    pub vde_description: Option<String>,
}

/// Snapshot of a VLAN's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub vlan: u8,
    pub ports: BTreeMap<String, PortStats>,
    /// Frames waiting in the delay queue.
    pub delayed: usize,
    /// Entries in the MAC table.
    pub mac_entries: usize,
    /// Records written to the current capture file.
    pub captured: u64,
    /// Why capture stopped by itself (write error), if it did.
    pub capture_error: Option<String>,
    /// VDE clients turned away (bad request, unreachable client socket, timeout, ...).
    pub vde_rejected: u64,
    /// Why the last one was.
    pub vde_error: Option<String>,
}

/// One VLAN's switch. Owns a thread; dropping it stops the thread and removes the sockets.
///
/// Every setter is synchronous: when it returns, the switch applies the new setting to every
/// frame it reads from then on.
pub struct Vlan {
    nr: u8,
    dir: PathBuf,
    cmds: Sender<Cmd>,
    wake: UnixStream,
    thread: Option<JoinHandle<()>>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\0'])
}

impl Vlan {
    /// Start the switch of VLAN `nr`; its sockets live in `<run_dir>/vlan<nr>/` (created).
    pub fn start(nr: u8, run_dir: &Path) -> Result<Vlan, NetError> {
        let dir = run_dir.join(format!("vlan{nr}"));
        std::fs::create_dir_all(&dir).map_err(|source| NetError::Io {
            vlan: nr,
            what: "cannot create directory",
            path: dir.clone(),
            source,
        })?;
        let (wake, wake_rx) =
            UnixStream::pair().map_err(|source| NetError::Thread { vlan: nr, source })?;
        for s in [&wake, &wake_rx] {
            s.set_nonblocking(true)
                .map_err(|source| NetError::Thread { vlan: nr, source })?;
        }
        let (tx, rx) = mpsc::channel::<Cmd>();
        let core = Core::new(nr);
        let thread = std::thread::Builder::new()
            .name(format!("vmrig-vlan{nr}"))
            .spawn(move || core.run(rx, wake_rx))
            .map_err(|source| NetError::Thread { vlan: nr, source })?;
        Ok(Vlan {
            nr,
            dir,
            cmds: tx,
            wake,
            thread: Some(thread),
        })
    }

    pub fn nr(&self) -> u8 {
        self.nr
    }

    /// `<run_dir>/vlan<nr>`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Run `f` on the switch thread and wait for its result.
    fn exec<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Core) -> R + Send + 'static,
    ) -> Result<R, NetError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.cmds
            .send(Box::new(move |core: &mut Core| {
                let _ = tx.send(f(core));
            }))
            .map_err(|_| NetError::SwitchGone(self.nr))?;
        // A full wake socket means a wake-up is already pending: fine.
        let _ = (&self.wake).write(&[1]);
        rx.recv().map_err(|_| NetError::SwitchGone(self.nr))
    }

    fn port_id(&self, machine: &str) -> Result<usize, NetError> {
        let m = machine.to_string();
        self.exec(move |c| c.port_id(&m))?
            .ok_or_else(|| NetError::UnknownPort {
                vlan: self.nr,
                machine: machine.to_string(),
            })
    }

    /// Create `machine`'s port: a listening socket `<dir>/<machine>.sock`, returned, for QEMU's
    /// `-netdev stream,server=off,addr.path=`. It listens before this returns, so QEMU can be
    /// started right away; QEMU 7.2 connects once at start-up (it has no `reconnect`), so the
    /// port must exist before QEMU starts. A later connection on the same socket (QEMU restarted)
    /// replaces the previous one. Adding an existing port again returns its path.
    pub fn add_port(&self, machine: &str) -> Result<PathBuf, NetError> {
        if !valid_name(machine) {
            return Err(NetError::InvalidName(machine.to_string()));
        }
        let m = machine.to_string();
        match self.exec(move |c| c.port_path(&m))? {
            Some((p, true)) => return Ok(p),
            Some((_, false)) => {
                return Err(NetError::NameTaken {
                    vlan: self.nr,
                    machine: machine.to_string(),
                })
            }
            None => {}
        }
        let path = self.dir.join(format!("{machine}.sock"));
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(NetError::PathTooLong(path));
        }
        let _ = std::fs::remove_file(&path); // stale socket of an earlier run
        let io_err = |what, source| NetError::Io {
            vlan: self.nr,
            what,
            path: path.clone(),
            source,
        };
        let listener = UnixListener::bind(&path).map_err(|e| io_err("cannot bind", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| io_err("cannot configure", e))?;
        let (m, p) = (machine.to_string(), path.clone());
        self.exec(move |c| c.add_port(m, p, listener))?;
        Ok(path)
    }

    /// The socket path of `machine`'s port, if it has one (for a VDE port: the switch's
    /// datagram socket of that port).
    pub fn socket_path(&self, machine: &str) -> Option<PathBuf> {
        let m = machine.to_string();
        self.exec(move |c| c.port_path(&m))
            .ok()
            .flatten()
            .map(|(p, _)| p)
    }

    /// The VLAN's VDE switch directory, `<run_dir>/vlan<nr>/vde`, for QEMU's
    /// `-netdev vde,sock=<dir>` (vmrig-vm's `cmdline::vde_netdev`) or a NixOS start script's
    /// `QEMU_VDE_SOCKET_<n>`. The first call creates it and its `ctl` socket, listening before
    /// this returns; later calls return the same path.
    ///
    /// Each client that completes the handshake becomes a port of the switch, like a stream
    /// port in every respect (learning, [`set_link`](Vlan::set_link), loss, delay, partitions,
    /// capture, [`stats`](Vlan::stats)), that is removed when the client closes its control
    /// connection (QEMU exits). Its name: the machine registered for the client's pid with
    /// [`name_vde_client`](Vlan::name_vde_client); else the first word of the client's
    /// description if that is a valid machine name other than `QEMU` (which is all QEMU
    /// sends); else `vde<k>` (k counting the VLAN's VDE clients from 1). A name some port
    /// already has is skipped. When a named port's client comes back (QEMU restarted), the new
    /// port keeps the old one's link state and counts on its `connections`, as a stream port
    /// does. A requested port number (`port=`) is accepted and ignored.
    ///
    /// Errors with [`NetError::PathTooLong`] when the directory leaves no room for libvdeplug's
    /// own socket in it (`<dir>/.<pid>-<n>`, up to 15 more bytes, within 107).
    pub fn vde_dir(&self) -> Result<PathBuf, NetError> {
        let dir = self.dir.join("vde");
        self.exec(move |c| c.start_vde(dir))?
    }

    /// Name the VDE port of the client process `pid` `machine` (QEMU's pid: libvdeplug puts it
    /// in the description, as `PID=` or `pid=`; a NixOS start script `exec`s QEMU, so it is the
    /// script's pid). Call it right after starting that QEMU: a client that connected before is
    /// renamed on the spot, one that connects later is named when it does. Fails with
    /// [`NetError::NameTaken`] if the client is connected and another port has that name.
    pub fn name_vde_client(&self, pid: u32, machine: &str) -> Result<(), NetError> {
        if !valid_name(machine) {
            return Err(NetError::InvalidName(machine.to_string()));
        }
        let m = machine.to_string();
        if self.exec(move |c| c.name_vde_client(pid, m))? {
            Ok(())
        } else {
            Err(NetError::NameTaken {
                vlan: self.nr,
                machine: machine.to_string(),
            })
        }
    }

    /// Link up/down (the driver's `block()`/`unblock()`): a down port neither sends nor receives.
    /// Frames already in the delay queue towards it are dropped when they come due.
    pub fn set_link(&self, machine: &str, up: bool) -> Result<(), NetError> {
        let id = self.port_id(machine)?;
        self.exec(move |c| c.set_link(id, up))
    }

    /// Drop this percentage (0-100, clamped) of the frames entering the switch, at random.
    pub fn set_loss(&self, percent: f64) -> Result<(), NetError> {
        self.exec(move |c| c.policy_mut().set_loss_percent(percent))
    }

    /// Delay every frame by `delay` (on a timer queue: other traffic is not held up by it, and
    /// frames keep their order while the delay does not change).
    pub fn set_delay(&self, delay: Duration) -> Result<(), NetError> {
        self.exec(move |c| c.policy_mut().set_delay(delay))
    }

    /// No frame crosses between a machine of `a` and one of `b`, either way. Machines in neither
    /// group are not affected. Adds to partitions already in force; names that have no port
    /// (yet) take effect when the port is added.
    pub fn partition<S: AsRef<str>>(&self, a: &[S], b: &[S]) -> Result<(), NetError> {
        let names = |g: &[S]| g.iter().map(|s| s.as_ref().to_string()).collect::<Vec<_>>();
        let (a, b) = (names(a), names(b));
        self.exec(move |c| c.partition(a, b))
    }

    /// Lift every partition.
    pub fn heal(&self) -> Result<(), NetError> {
        self.exec(|c| c.heal())
    }

    /// Write every frame the switch accepts from now on (after the sender's link state and
    /// random loss, before delay and partitions) to `pcap_path` (classic pcap,
    /// LINKTYPE_ETHERNET). Replaces any capture in progress. The file is flushed after every
    /// batch of frames, so it can be read while the switch runs.
    pub fn capture(&self, pcap_path: &Path) -> Result<(), NetError> {
        let w = pcap::PcapWriter::create(pcap_path).map_err(|source| NetError::Io {
            vlan: self.nr,
            what: "cannot create capture file",
            path: pcap_path.to_path_buf(),
            source,
        })?;
        self.exec(move |c| {
            c.set_capture(Some(w));
        })
    }

    /// Stop capturing; returns the number of frames written.
    pub fn stop_capture(&self) -> Result<u64, NetError> {
        self.exec(|c| c.set_capture(None))
    }

    /// Counters per port.
    pub fn stats(&self) -> Stats {
        self.exec(|c| c.stats()).unwrap_or_else(|_| Stats {
            vlan: self.nr,
            ..Stats::default()
        })
    }

    /// Wait until a QEMU is connected to `machine`'s port (at least `min_connections`
    /// connections made so far: 1 for the first boot, n+1 after a restart).
    pub fn wait_connected(&self, machine: &str, min_connections: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self
                .stats()
                .ports
                .get(machine)
                .is_some_and(|p| p.connected && p.connections >= min_connections);
            if ok {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Vlan {
    fn drop(&mut self) {
        let paths = self.exec(|c| c.paths()).unwrap_or_default();
        let _ = self.exec(|c| {
            c.set_capture(None);
            c.stop();
        });
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for p in paths {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_dir(self.dir.join("vde")); // only if empty
        let _ = std::fs::remove_dir(&self.dir); // only if empty
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("client"));
        assert!(valid_name("node-1_x"));
        assert!(!valid_name(""));
        assert!(!valid_name("../x"));
        assert!(!valid_name("a/b"));
    }
}

#[cfg(test)]
mod assert_traits {
    fn send_sync<T: Send + Sync>() {}
    #[test]
    fn vlan_is_send_and_sync() {
        send_sync::<super::Vlan>();
    }
}
