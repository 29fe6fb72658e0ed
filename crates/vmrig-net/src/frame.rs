//! The framing QEMU's `-netdev stream` (and the older `-netdev socket`) uses on a stream socket:
//! every Ethernet frame is preceded by its length as a 4-byte big-endian integer, no padding, no
//! virtio-net header (QEMU 7.2 `net/stream.c` + `net_fill_rstate()` in `net/net.c`, with
//! `vnet_hdr = false`).

/// Largest frame QEMU itself accepts on a stream socket (`NET_BUFSIZE` = 4096 + 65536). A peer
/// announcing more than this is broken and gets disconnected.
pub const MAX_FRAME: usize = 4096 + 65536;

/// Shortest valid Ethernet frame as far as the switch is concerned (two MACs and an ethertype).
pub const MIN_FRAME: usize = 14;

/// Size of the length prefix.
pub const PREFIX: usize = 4;

/// A peer sent a length prefix no sane QEMU can send: the stream is unusable from there on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("frame length {0} exceeds the maximum of {MAX_FRAME} bytes")]
pub struct FrameTooLarge(pub u64);

/// Append one frame, with its length prefix, to `out`.
pub fn encode_into(out: &mut Vec<u8>, frame: &[u8]) {
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
}

/// One frame with its length prefix.
pub fn encode(frame: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(frame.len() + PREFIX);
    encode_into(&mut v, frame);
    v
}

/// Incremental decoder for a length-prefixed frame stream. Bytes go in through [`spare`] +
/// [`commit`] (read(2) straight into the buffer, no copy) or [`feed`]; whole frames come out of
/// [`next_frame`] as slices into the buffer. Frames of any length up to [`MAX_FRAME`] are returned
/// (including too-short ones: classifying them is the caller's business); a longer length prefix
/// is an error that sticks.
///
/// [`spare`]: FrameDecoder::spare
/// [`commit`]: FrameDecoder::commit
/// [`feed`]: FrameDecoder::feed
/// [`next_frame`]: FrameDecoder::next_frame
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    broken: Option<FrameTooLarge>,
}

/// Buffer size: room for a few maximal frames so that a read(2) can pull many small ones at once.
const BUF_SIZE: usize = 4 * (MAX_FRAME + PREFIX);
/// Keep at least this much free space in front of a read (one whole maximal frame).
const MIN_SPARE: usize = MAX_FRAME + PREFIX;

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    pub fn new() -> Self {
        FrameDecoder {
            buf: vec![0; BUF_SIZE],
            start: 0,
            end: 0,
            broken: None,
        }
    }

    /// Bytes received but not yet returned as frames (a partial frame, typically).
    pub fn pending(&self) -> usize {
        self.end - self.start
    }

    /// Free space to read into; always at least one maximal frame long.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < MIN_SPARE {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// Declare `n` bytes of [`spare`](FrameDecoder::spare) filled.
    pub fn commit(&mut self, n: usize) {
        assert!(self.end + n <= self.buf.len(), "commit past the buffer");
        self.end += n;
    }

    /// Copy `data` in (for tests and non-socket sources). Call [`next_frame`] until it returns
    /// `Ok(None)` before feeding more than one maximal frame's worth.
    ///
    /// [`next_frame`]: FrameDecoder::next_frame
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let spare = self.spare();
            let n = spare.len().min(data.len());
            spare[..n].copy_from_slice(&data[..n]);
            self.commit(n);
            data = &data[n..];
            if !data.is_empty() && self.buf.len() == self.end {
                // The caller did not drain frames: grow rather than lose data.
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
    }

    /// The next complete frame, if one has fully arrived.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameTooLarge> {
        if let Some(e) = self.broken {
            return Err(e);
        }
        let avail = self.end - self.start;
        if avail < PREFIX {
            return Ok(None);
        }
        let s = self.start;
        let len = u32::from_be_bytes([
            self.buf[s],
            self.buf[s + 1],
            self.buf[s + 2],
            self.buf[s + 3],
        ]) as usize;
        if len > MAX_FRAME {
            let e = FrameTooLarge(len as u64);
            self.broken = Some(e);
            return Err(e);
        }
        if avail < PREFIX + len {
            return Ok(None);
        }
        self.start += PREFIX + len;
        Ok(Some(&self.buf[s + PREFIX..s + PREFIX + len]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_partial() {
        let mut d = FrameDecoder::new();
        let mut wire = encode(&[1; 20]);
        wire.extend(encode(&[]));
        wire.extend(encode(&[2; 1500]));
        d.feed(&wire[..3]);
        assert_eq!(d.next_frame().unwrap(), None);
        d.feed(&wire[3..30]);
        assert_eq!(d.next_frame().unwrap().unwrap(), &[1; 20][..]);
        assert_eq!(d.next_frame().unwrap().unwrap(), &[][..]);
        assert_eq!(d.next_frame().unwrap(), None);
        d.feed(&wire[30..]);
        assert_eq!(d.next_frame().unwrap().unwrap(), &[2; 1500][..]);
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn too_large_sticks() {
        let mut d = FrameDecoder::new();
        d.feed(&((MAX_FRAME + 1) as u32).to_be_bytes());
        assert_eq!(d.next_frame(), Err(FrameTooLarge(MAX_FRAME as u64 + 1)));
        d.feed(&encode(&[0; 20]));
        assert!(d.next_frame().is_err());
    }

    #[test]
    fn max_frame_is_accepted() {
        let mut d = FrameDecoder::new();
        let f = vec![7u8; MAX_FRAME];
        d.feed(&encode(&f));
        assert_eq!(d.next_frame().unwrap().unwrap().len(), MAX_FRAME);
    }
}
