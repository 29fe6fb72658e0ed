//! The VDE switch handshake (vde2's `vde_switch`, spoken by libvdeplug 2.x and by vdeplug4's
//! `libvdeplug_vde.so`, which QEMU's `-netdev vde` uses), free of I/O.
//!
//! A VDE "switch" is a directory holding a unix stream socket `ctl`. A client:
//!
//! 1. binds its own unix datagram socket (libvdeplug: `<dir>/.<pid %05d>-<n %05d>`),
//! 2. connects a stream socket to `<dir>/ctl` and sends one `struct request_v3` (below),
//! 3. reads back one `struct sockaddr_un`: the switch's datagram socket for this port, which
//!    it `connect`s its datagram socket to (vdeplug4 then unlinks its own socket file, so the
//!    switch must have connected to it *before* replying).
//!
//! From then on every Ethernet frame is one datagram between the two datagram sockets, with no
//! header. The port lives as long as the `ctl` connection stays open.
//!
//! ```text
//! struct request_v3 {                 // __attribute__((packed)), host byte order
//!     uint32_t magic;                 //   0  0xfeedface
//!     uint32_t version;               //   4  3
//!     enum request_type type;         //   8  REQ_NEW_CONTROL (0) | requested port << 8,
//!                                     //      or REQ_NEW_PORT0 (1)
//!     struct sockaddr_un sock;        //  12  sa_family_t (u16) + sun_path[108]
//!     char description[MAXDESCR];     // 122  MAXDESCR = 128; only strlen() bytes are sent
//! };
//! ```
//!
//! The client sends `sizeof(request_v3) - MAXDESCR + strlen(description)` bytes, without the
//! description's NUL, so a request is 122 to 250 bytes long and has no terminator: the receiver
//! takes whatever arrived once the fixed part is there. (The client writes it with one `send`,
//! which a unix stream socket delivers to one `read`.) libvdeplug builds the description as
//! `"<descr> user=<login> PID=<pid>"` (plus ` SSH=<ip>` under ssh); vdeplug4 4.0.1 (Debian 12's
//! `libvdeplug2`) writes ` pid=<pid>` in lower case instead, and `user=<uid>` when the login is
//! unknown. QEMU's `descr` is the fixed string `QEMU`.
//!
//! Sources: vde2 `src/lib/libvdeplug.c` and `src/vde_switch/datasock.c`, vdeplug4
//! `libvdeplug4/libvdeplug_vde.c`, QEMU `net/vde.c`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// `SWITCH_MAGIC`.
pub const SWITCH_MAGIC: u32 = 0xfeed_face;
/// The only request version spoken (vde2 >= 2.0, vdeplug4).
pub const VERSION: u32 = 3;
/// `MAXDESCR`: room for the description in a request.
pub const MAXDESCR: usize = 128;
/// `sizeof(sun_path)` on Linux.
pub const SUN_PATH_LEN: usize = 108;
/// `sizeof(struct sockaddr_un)`: `sa_family_t` + `sun_path`. Also the size of the reply.
pub const SOCKADDR_UN_LEN: usize = 2 + SUN_PATH_LEN;
/// The fixed part of a request: magic, version, type, client address.
pub const HEADER_LEN: usize = 12 + SOCKADDR_UN_LEN;
/// A request with the longest description.
pub const MAX_REQUEST_LEN: usize = HEADER_LEN + MAXDESCR;

/// Longest path a `sun_path` holds with its NUL.
const MAX_PATH: usize = SUN_PATH_LEN - 1;
const REQ_NEW_CONTROL: u32 = 0;
const REQ_NEW_PORT0: u32 = 1;
const AF_UNIX: u16 = libc::AF_UNIX as u16;

/// Which switch port the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortRequest {
    /// Any free port (the usual case).
    Any,
    /// A port number (`-netdev vde,port=N`; vde_switch's port numbers). The high 24 bits of the
    /// type field.
    Number(u32),
    /// `REQ_NEW_PORT0`: vde_switch's management port 0 (libvdeplug `sock[0]`, vdeplug4
    /// `port=-1`).
    Port0,
}

/// A parsed `request_v3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VdeRequest {
    pub port: PortRequest,
    /// The client's datagram socket, which frames for it are sent to.
    pub client_path: PathBuf,
    /// The description, as sent (lossy UTF-8, at most [`MAXDESCR`] bytes, cut at a NUL).
    pub description: String,
}

impl VdeRequest {
    /// The first word of the description: the `descr` the client passed to `vde_open` (`QEMU`
    /// for QEMU), before libvdeplug's ` user=... PID=...`.
    pub fn label(&self) -> &str {
        self.description.split_whitespace().next().unwrap_or("")
    }

    /// The client's process id, from libvdeplug's ` PID=<pid>` (vde2) or ` pid=<pid>`
    /// (vdeplug4 4.0) in the description.
    pub fn pid(&self) -> Option<u32> {
        self.description
            .split_whitespace()
            .find_map(|w| w.strip_prefix("PID=").or_else(|| w.strip_prefix("pid=")))
            .and_then(|p| p.parse().ok())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VdeError {
    #[error(
        "VDE request too short: {0} bytes, a version 3 request has at least {HEADER_LEN} \
         (magic, version, type, client socket address)"
    )]
    Short(usize),
    #[error("not a VDE request: magic {0:#010x}, expected {SWITCH_MAGIC:#010x}")]
    BadMagic(u32),
    #[error(
        "VDE request of protocol version 1 (vde 1.x libvdeplug), which is not supported: \
         only version 3 is (libvdeplug of vde2 >= 2.0, vdeplug4)"
    )]
    Version1,
    #[error(
        "VDE request version {0} is not supported: only version 3 is (libvdeplug of \
         vde2 >= 2.0, vdeplug4)"
    )]
    UnsupportedVersion(u32),
    #[error(
        "unknown VDE request type {kind} (type field {raw:#x}); known: 0 (new port), 1 (port 0)"
    )]
    BadType { kind: u32, raw: u32 },
    #[error("VDE client socket address family {0}, expected AF_UNIX ({AF_UNIX})")]
    AddressFamily(u16),
    #[error(
        "VDE client socket has no path name (unnamed or abstract address); only path names \
         are supported"
    )]
    UnnamedClient,
    #[error("VDE client socket path fills all {SUN_PATH_LEN} bytes of sun_path without a NUL")]
    UnterminatedPath,
    #[error(
        "socket path {} is longer than {MAX_PATH} bytes, the limit of a unix socket address",
        .0.display()
    )]
    PathTooLong(PathBuf),
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Parse a client's request. `bytes` is what arrived on the `ctl` connection: at least
/// [`HEADER_LEN`] bytes for a valid request; bytes past [`MAX_REQUEST_LEN`] are ignored (a
/// client sends nothing else on `ctl`). Never panics.
pub fn parse_request(bytes: &[u8]) -> Result<VdeRequest, VdeError> {
    // Check magic and version before the length, so that an old client gets told its version
    // rather than "too short" (a version 1 request is shorter).
    let magic = u32_at(bytes, 0).ok_or(VdeError::Short(bytes.len()))?;
    if magic != SWITCH_MAGIC {
        return Err(VdeError::BadMagic(magic));
    }
    let version = u32_at(bytes, 4).ok_or(VdeError::Short(bytes.len()))?;
    match version {
        VERSION => {}
        // A version 1 request has its type (0 or 1) where version 3 has the version, which is
        // how vde_switch tells them apart.
        0 | 1 => return Err(VdeError::Version1),
        v => return Err(VdeError::UnsupportedVersion(v)),
    }
    if bytes.len() < HEADER_LEN {
        return Err(VdeError::Short(bytes.len()));
    }
    let raw = u32_at(bytes, 8).ok_or(VdeError::Short(bytes.len()))?;
    let port = match (raw & 0xff, raw >> 8) {
        (REQ_NEW_CONTROL, 0) => PortRequest::Any,
        (REQ_NEW_CONTROL, n) => PortRequest::Number(n),
        // vde_switch ignores the number with REQ_NEW_PORT0.
        (REQ_NEW_PORT0, _) => PortRequest::Port0,
        (kind, _) => return Err(VdeError::BadType { kind, raw }),
    };
    let family = u16::from_ne_bytes([bytes[12], bytes[13]]);
    if family != AF_UNIX {
        return Err(VdeError::AddressFamily(family));
    }
    let sun_path = &bytes[14..HEADER_LEN];
    let path_len = sun_path
        .iter()
        .position(|&b| b == 0)
        .ok_or(VdeError::UnterminatedPath)?;
    if path_len == 0 {
        return Err(VdeError::UnnamedClient);
    }
    let client_path = PathBuf::from(OsStr::from_bytes(&sun_path[..path_len]));
    let descr = &bytes[HEADER_LEN..bytes.len().min(MAX_REQUEST_LEN)];
    let descr = &descr[..descr.iter().position(|&b| b == 0).unwrap_or(descr.len())];
    Ok(VdeRequest {
        port,
        client_path,
        description: String::from_utf8_lossy(descr).into_owned(),
    })
}

/// A `struct sockaddr_un` naming `path`.
fn sockaddr_un(path: &Path) -> Result<[u8; SOCKADDR_UN_LEN], VdeError> {
    let p = path.as_os_str().as_bytes();
    // One byte stays for the NUL: clients treat sun_path as a C string.
    if p.len() >= SUN_PATH_LEN || p.contains(&0) {
        return Err(VdeError::PathTooLong(path.to_path_buf()));
    }
    let mut a = [0u8; SOCKADDR_UN_LEN];
    a[..2].copy_from_slice(&AF_UNIX.to_ne_bytes());
    a[2..2 + p.len()].copy_from_slice(p);
    Ok(a)
}

/// The switch's answer to a request: a `struct sockaddr_un` ([`SOCKADDR_UN_LEN`] bytes) naming
/// the port's datagram socket `data_path`. Fails if the path does not fit in `sun_path`.
pub fn encode_reply(data_path: &Path) -> Result<Vec<u8>, VdeError> {
    Ok(sockaddr_un(data_path)?.to_vec())
}

/// Decode a reply (the client side of [`encode_reply`], for fake clients and tests).
pub fn parse_reply(bytes: &[u8]) -> Option<PathBuf> {
    if bytes.len() < SOCKADDR_UN_LEN || u16::from_ne_bytes([bytes[0], bytes[1]]) != AF_UNIX {
        return None;
    }
    let p = &bytes[2..SOCKADDR_UN_LEN];
    let n = p.iter().position(|&b| b == 0)?;
    Some(PathBuf::from(OsStr::from_bytes(&p[..n])))
}

/// A request exactly as libvdeplug sends it (the client side, for fake clients and tests): the
/// description is cut to `MAXDESCR - 1` bytes and sent without its NUL.
pub fn encode_request(
    port: PortRequest,
    client_path: &Path,
    description: &str,
) -> Result<Vec<u8>, VdeError> {
    let kind = match port {
        PortRequest::Any => REQ_NEW_CONTROL,
        PortRequest::Number(n) => REQ_NEW_CONTROL + (n << 8),
        PortRequest::Port0 => REQ_NEW_PORT0,
    };
    let mut v = Vec::with_capacity(MAX_REQUEST_LEN);
    v.extend_from_slice(&SWITCH_MAGIC.to_ne_bytes());
    v.extend_from_slice(&VERSION.to_ne_bytes());
    v.extend_from_slice(&kind.to_ne_bytes());
    v.extend_from_slice(&sockaddr_un(client_path)?);
    let d = description.as_bytes();
    let d = &d[..d.iter().position(|&b| b == 0).unwrap_or(d.len())];
    v.extend_from_slice(&d[..d.len().min(MAXDESCR - 1)]);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request as vdeplug4's `vde_vde_open` builds it for QEMU (`descr` "QEMU", switch
    /// directory `/tmp/sw`, pid 4242, user "alice"), byte for byte on a little-endian host: the
    /// packed struct up to the description, then `strlen(description)` bytes and no NUL.
    #[cfg(target_endian = "little")]
    fn recorded_qemu_request() -> Vec<u8> {
        let mut b: Vec<u8> = vec![
            0xce, 0xfa, 0xed, 0xfe, // magic 0xfeedface
            0x03, 0x00, 0x00, 0x00, // version 3
            0x00, 0x00, 0x00, 0x00, // REQ_NEW_CONTROL, no port
            0x01, 0x00, // AF_UNIX
        ];
        let path = b"/tmp/sw/.04242-00000";
        b.extend_from_slice(path);
        b.extend(std::iter::repeat_n(0u8, SUN_PATH_LEN - path.len()));
        b.extend_from_slice(b"QEMU user=alice PID=4242");
        assert_eq!(b.len(), 122 + 24);
        b
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn golden_qemu_request() {
        let b = recorded_qemu_request();
        let r = parse_request(&b).unwrap();
        assert_eq!(
            r,
            VdeRequest {
                port: PortRequest::Any,
                client_path: PathBuf::from("/tmp/sw/.04242-00000"),
                description: "QEMU user=alice PID=4242".into(),
            }
        );
        assert_eq!(r.label(), "QEMU");
        assert_eq!(r.pid(), Some(4242));
        // Our client-side encoder produces the very same bytes.
        let e = encode_request(
            PortRequest::Any,
            Path::new("/tmp/sw/.04242-00000"),
            "QEMU user=alice PID=4242",
        )
        .unwrap();
        assert_eq!(e, b);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn golden_port_variants() {
        // `-netdev vde,port=5`: type = REQ_NEW_CONTROL + (5 << 8).
        let mut b = recorded_qemu_request();
        b[8..12].copy_from_slice(&[0x00, 0x05, 0x00, 0x00]);
        assert_eq!(parse_request(&b).unwrap().port, PortRequest::Number(5));
        // REQ_NEW_PORT0.
        b[8..12].copy_from_slice(&[0x01, 0x00, 0x00, 0x00]);
        assert_eq!(parse_request(&b).unwrap().port, PortRequest::Port0);
        // Unknown type.
        b[8..12].copy_from_slice(&[0x02, 0x01, 0x00, 0x00]);
        assert_eq!(
            parse_request(&b).unwrap_err(),
            VdeError::BadType {
                kind: 2,
                raw: 0x102
            }
        );
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn golden_reply() {
        let r = encode_reply(Path::new("/tmp/sw/1.port")).unwrap();
        assert_eq!(r.len(), 110);
        assert_eq!(&r[..2], &[0x01, 0x00]);
        assert_eq!(&r[2..16], b"/tmp/sw/1.port");
        assert!(r[16..].iter().all(|&b| b == 0));
        assert_eq!(parse_reply(&r), Some(PathBuf::from("/tmp/sw/1.port")));
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn bad_requests() {
        let good = recorded_qemu_request();
        // Truncated anywhere inside the fixed part.
        for n in [0, 3, 4, 7] {
            assert_eq!(parse_request(&good[..n]), Err(VdeError::Short(n)));
        }
        for n in [8, 12, 100, HEADER_LEN - 1] {
            assert_eq!(parse_request(&good[..n]), Err(VdeError::Short(n)));
        }
        // Only the fixed part: valid, empty description.
        let r = parse_request(&good[..HEADER_LEN]).unwrap();
        assert_eq!((r.description.as_str(), r.label(), r.pid()), ("", "", None));

        let mut b = good.clone();
        b[0] = 0xcf;
        assert_eq!(parse_request(&b), Err(VdeError::BadMagic(0xfeedfacf)));
        let mut b = good.clone();
        b[..4].copy_from_slice(&[0xfe, 0xed, 0xfa, 0xce]); // other byte order
        assert_eq!(parse_request(&b), Err(VdeError::BadMagic(0xcefaedfe)));

        for (v, e) in [
            (1u32, VdeError::Version1),
            (0, VdeError::Version1),
            (2, VdeError::UnsupportedVersion(2)),
            (4, VdeError::UnsupportedVersion(4)),
        ] {
            let mut b = good.clone();
            b[4..8].copy_from_slice(&v.to_le_bytes());
            assert_eq!(parse_request(&b), Err(e.clone()));
            // Even when short: the version is the better message.
            assert_eq!(parse_request(&b[..40]), Err(e));
        }
        assert!(VdeError::Version1.to_string().contains("version 1"));

        let mut b = good.clone();
        b[12] = 2; // AF_INET
        assert_eq!(parse_request(&b), Err(VdeError::AddressFamily(2)));
        let mut b = good.clone();
        b[14] = 0; // abstract / unnamed
        assert_eq!(parse_request(&b), Err(VdeError::UnnamedClient));
        let mut b = good.clone();
        b[14..HEADER_LEN].fill(b'x');
        assert_eq!(parse_request(&b), Err(VdeError::UnterminatedPath));
    }

    #[test]
    fn description_limits() {
        let p = Path::new("/s/.1-0");
        // Longest description: 127 bytes sent (libvdeplug's snprintf into 128), more is cut.
        let long = "d".repeat(300);
        let e = encode_request(PortRequest::Any, p, &long).unwrap();
        assert_eq!(e.len(), HEADER_LEN + MAXDESCR - 1);
        assert_eq!(parse_request(&e).unwrap().description.len(), 127);
        // 128 bytes without NUL (strncpy of a longer descr) and trailing junk: cut at 128.
        let mut e = encode_request(PortRequest::Any, p, "").unwrap();
        e.extend(std::iter::repeat_n(b'e', 200));
        assert_eq!(parse_request(&e).unwrap().description, "e".repeat(128));
        // A NUL ends it; invalid UTF-8 is replaced.
        let mut e = encode_request(PortRequest::Any, p, "").unwrap();
        e.extend_from_slice(b"ab\xffc\0junk");
        assert_eq!(parse_request(&e).unwrap().description, "ab\u{fffd}c");
    }

    #[test]
    fn label_and_pid() {
        let r = |d: &str| VdeRequest {
            port: PortRequest::Any,
            client_path: "/x".into(),
            description: d.into(),
        };
        assert_eq!(r("vde_plug user=u PID=7 SSH=1.2.3.4").pid(), Some(7));
        // As Debian 12's vdeplug4 4.0.1 writes it for QEMU (recorded from a real QEMU 7.2).
        assert_eq!(r("QEMU user=root pid=717").pid(), Some(717));
        assert_eq!(r("QEMU user=root pid=717").label(), "QEMU");
        assert_eq!(r("node1 user=u PID=x").pid(), None);
        assert_eq!(r("node1 user=u PID=x").label(), "node1");
        assert_eq!(r("  ").label(), "");
    }

    #[test]
    fn reply_path_limits() {
        let ok = format!("/{}", "p".repeat(106));
        assert_eq!(encode_reply(Path::new(&ok)).unwrap().len(), SOCKADDR_UN_LEN);
        let long = format!("/{}", "p".repeat(107));
        assert!(matches!(
            encode_reply(Path::new(&long)),
            Err(VdeError::PathTooLong(_))
        ));
        assert_eq!(parse_reply(&[1, 0]), None);
        assert_eq!(parse_reply(&[0; SOCKADDR_UN_LEN]), None);
    }
}
