// Shared helpers: a fake QEMU speaking the stream framing over a unix socket.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vmrig_net::frame::{encode, FrameDecoder};
use vmrig_net::Vlan;

pub const BCAST: [u8; 6] = [0xff; 6];

pub fn mac(n: u8) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x12, 0x01, n]
}

pub fn eth(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
    f.extend_from_slice(payload);
    f
}

pub struct FakeQemu {
    pub stream: UnixStream,
    dec: FrameDecoder,
}

impl FakeQemu {
    pub fn connect(sock: &Path) -> FakeQemu {
        let stream = UnixStream::connect(sock).expect("connect");
        FakeQemu {
            stream,
            dec: FrameDecoder::new(),
        }
    }

    /// Connect and wait until the switch has accepted the connection (connection number `nth`).
    pub fn join(vlan: &Vlan, machine: &str, nth: u64) -> FakeQemu {
        let sock = vlan.socket_path(machine).expect("port");
        let q = FakeQemu::connect(&sock);
        assert!(vlan.wait_connected(machine, nth, Duration::from_secs(5)));
        q
    }

    pub fn send(&mut self, frame: &[u8]) {
        self.stream.write_all(&encode(frame)).expect("send");
    }

    /// Next frame, or None if none arrives within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(f) = self.dec.next_frame().expect("switch sent a bad frame") {
                return Some(f.to_vec());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let spare = self.dec.spare();
            match self.stream.read(spare) {
                Ok(0) => return None,
                Ok(n) => self.dec.commit(n),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return None
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
    }

    /// Assert nothing arrives for a while.
    pub fn expect_silence(&mut self, what: &str) {
        if let Some(f) = self.recv(Duration::from_millis(150)) {
            panic!("{what}: unexpected frame {f:02x?}");
        }
    }
}

pub const T: Duration = Duration::from_secs(3);

/// A fake VDE client doing what libvdeplug (vdeplug4's `libvdeplug_vde.so`) does: bind a
/// datagram socket `<dir>/.<pid>-<n>`, connect to `<dir>/ctl`, send a `request_v3`, read the
/// switch's `sockaddr_un`, connect the datagram socket to it and (vdeplug4) unlink its own.
/// The request is built here by hand, not with `vmrig_net::vde`, so the two check each other.
pub struct FakeVde {
    pub ctl: std::os::unix::net::UnixStream,
    pub data: std::os::unix::net::UnixDatagram,
    pub own_path: std::path::PathBuf,
    pub switch_path: std::path::PathBuf,
}

static VDE_SOCKNO: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// `struct request_v3` as libvdeplug sends it: 122 bytes plus the description without NUL.
pub fn vde_request(version: u32, kind: u32, client: &Path, descr: &str) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut r = Vec::new();
    r.extend_from_slice(&0xfeed_faceu32.to_ne_bytes());
    r.extend_from_slice(&version.to_ne_bytes());
    r.extend_from_slice(&kind.to_ne_bytes());
    r.extend_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
    let mut sun_path = [0u8; 108];
    let p = client.as_os_str().as_bytes();
    sun_path[..p.len()].copy_from_slice(p);
    r.extend_from_slice(&sun_path);
    r.extend_from_slice(descr.as_bytes());
    r
}

impl FakeVde {
    /// A fresh client socket path in `dir`, libvdeplug style.
    pub fn own_path(dir: &Path) -> std::path::PathBuf {
        let n = VDE_SOCKNO.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        dir.join(format!(".{:05}-{n:05}", std::process::id()))
    }

    /// Send `request` (built for `own_path`) and complete the handshake; Err if the switch
    /// closed the control connection instead of answering.
    pub fn handshake(
        dir: &Path,
        own_path: &Path,
        request: &[u8],
        unlink_own: bool,
    ) -> Result<FakeVde, String> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::net::{UnixDatagram, UnixStream};
        let data = UnixDatagram::bind(own_path).expect("bind client socket");
        let mut ctl = UnixStream::connect(dir.join("ctl")).map_err(|e| e.to_string())?;
        ctl.write_all(request).map_err(|e| e.to_string())?;
        ctl.set_read_timeout(Some(T)).unwrap();
        let mut reply = [0u8; 110];
        let mut got = 0;
        while got < reply.len() {
            match ctl.read(&mut reply[got..]) {
                Ok(0) => {
                    let _ = std::fs::remove_file(own_path);
                    return Err(format!("switch closed ctl after {got} reply bytes"));
                }
                Ok(n) => got += n,
                Err(e) => return Err(format!("reading the reply: {e}")),
            }
        }
        assert_eq!(
            u16::from_ne_bytes([reply[0], reply[1]]),
            libc::AF_UNIX as u16
        );
        let end = reply[2..].iter().position(|&b| b == 0).expect("NUL") + 2;
        let switch_path = std::path::PathBuf::from(std::ffi::OsStr::from_bytes(&reply[2..end]));
        data.connect(&switch_path)
            .expect("connect to the switch's data socket");
        if unlink_own {
            std::fs::remove_file(own_path).unwrap();
        }
        Ok(FakeVde {
            ctl,
            data,
            own_path: own_path.to_path_buf(),
            switch_path,
        })
    }

    /// Join as vdeplug4 does for `vde_open(dir, descr)`: description `<descr> user=... PID=<pid>`.
    pub fn join_as(dir: &Path, descr: &str, pid: u32) -> FakeVde {
        let own = Self::own_path(dir);
        let req = vde_request(3, 0, &own, &format!("{descr} user=tester PID={pid}"));
        Self::handshake(dir, &own, &req, true).expect("VDE handshake")
    }

    /// Join as QEMU would (label `QEMU`), with this test process's pid.
    pub fn join(dir: &Path) -> FakeVde {
        Self::join_as(dir, "QEMU", std::process::id())
    }

    pub fn send(&self, frame: &[u8]) {
        self.data.send(frame).expect("send datagram");
    }

    pub fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        self.data.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = vec![0u8; 70_000];
        match self.data.recv(&mut buf) {
            Ok(n) => Some(buf[..n].to_vec()),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                None
            }
            Err(e) => panic!("recv: {e}"),
        }
    }

    pub fn expect_silence(&self, what: &str) {
        if let Some(f) = self.recv(Duration::from_millis(150)) {
            panic!("{what}: unexpected frame {f:02x?}");
        }
    }
}

/// Wait until `cond` holds for the VLAN's stats.
pub fn wait_stats(vlan: &Vlan, what: &str, cond: impl Fn(&vmrig_net::Stats) -> bool) {
    let deadline = Instant::now() + T;
    loop {
        let s = vlan.stats();
        if cond(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {s:#?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
