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
