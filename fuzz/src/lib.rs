//! Shared harness pieces: how one fuzz input becomes a byte stream cut into reads of
//! fuzzer-chosen sizes, with injected I/O errors and (optionally) a large run of one byte, so
//! that small inputs can still reach the size limits of the code under test.
//!
//! Input layout:
//!
//! ```text
//! byte 0      header: bits 0-2  k, the number of pattern bytes that follow
//!                     bit 3     a fill descriptor follows the pattern
//!                     bit 4     target-specific flag (`Input::flag_a`)
//!                     bits 5-6  write behaviour after the first write (see `WriteMode`)
//!                     bit 7     target-specific flag (`Input::flag_b`)
//! k bytes     read pattern, cycled: 0..=3 inject an error (Interrupted, WouldBlock, TimedOut,
//!             ConnectionReset; at most MAX_ERRORS per input, then they count as 1-byte
//!             reads), 255 = as much as the reader asks for, p = p - 3 bytes otherwise
//!             (times 1024 inside the fill). k = 0: every read gets as much as it asks for.
//! 3 bytes     (bit 3 only) fill byte, fill length in units ((v + 1) * unit; in bytes,
//!             (v + 1), for a separator byte), fill position (v / 256 of the payload)
//! rest        payload
//! ```
//!
//! A seed is thus `\x00` followed by the text of a real conversation.
//!
//! Speed: a fill exists to reach the size bounds of the code under test, so each target picks
//! a unit of bound / 128 (the longest fill is twice the bound, and (v + 1) = 128 units is the
//! bound itself). A run of a *separator* (the byte that ends a line or frame for that target)
//! reaches no bound: it only makes thousands of empty lines or frames, each costing an
//! allocation and the target's checks (up to 160 ms per input before), and the payload
//! already holds runs of them. So it is counted in bytes, at most 256.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::Duration;

/// Injected read errors per input, at most (so that a reader that retries terminates).
pub const MAX_ERRORS: usize = 64;
/// Bytes of the client's writes kept for checking.
const MAX_WRITTEN: usize = 1 << 20;

/// One step of the read pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Up to this many bytes.
    Bytes(usize),
    /// As many bytes as asked for.
    All,
    /// An error instead of data.
    Error(io::ErrorKind),
}

/// What writes do after the first one succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    Ok,
    BrokenPipe,
    WouldBlock,
    /// `write` returns `Ok(0)` (`write_all` turns it into `WriteZero`).
    Zero,
}

/// A run of one byte inserted into the payload.
#[derive(Debug, Clone, Copy)]
pub struct Fill {
    pub byte: u8,
    pub len: usize,
    /// Offset in the payload where the run goes.
    pub at: usize,
}

#[derive(Debug, Clone)]
pub struct Input<'a> {
    header: u8,
    pub pattern: &'a [u8],
    pub fill: Option<Fill>,
    pub payload: &'a [u8],
}

impl<'a> Input<'a> {
    /// Decodes `data`; a fill is `(v + 1) * fill_unit` bytes long, or `v + 1` if its byte is
    /// one of `separators`.
    pub fn parse(data: &'a [u8], fill_unit: usize, separators: &[u8]) -> Input<'a> {
        let Some((&header, mut rest)) = data.split_first() else {
            return Input {
                header: 0,
                pattern: &[],
                fill: None,
                payload: &[],
            };
        };
        let k = ((header & 7) as usize).min(rest.len());
        let pattern = &rest[..k];
        rest = &rest[k..];
        let mut fill = None;
        if header & 8 != 0 && rest.len() >= 3 {
            let (d, payload) = rest.split_at(3);
            rest = payload;
            let unit = if separators.contains(&d[0]) {
                1
            } else {
                fill_unit
            };
            fill = Some(Fill {
                byte: d[0],
                len: (d[1] as usize + 1) * unit,
                at: rest.len() * d[2] as usize / 256,
            });
        }
        Input {
            header,
            pattern,
            fill,
            payload: rest,
        }
    }

    pub fn flag_a(&self) -> bool {
        self.header & 0x10 != 0
    }

    pub fn flag_b(&self) -> bool {
        self.header & 0x80 != 0
    }

    pub fn write_mode(&self) -> WriteMode {
        match (self.header >> 5) & 3 {
            0 => WriteMode::Ok,
            1 => WriteMode::BrokenPipe,
            2 => WriteMode::WouldBlock,
            _ => WriteMode::Zero,
        }
    }

    /// Total bytes the stream delivers.
    pub fn stream_len(&self) -> usize {
        self.payload.len() + self.fill.map_or(0, |f| f.len)
    }

    /// The whole stream as one buffer (payload with the fill inserted).
    pub fn bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.stream_len());
        match self.fill {
            None => v.extend_from_slice(self.payload),
            Some(f) => {
                v.extend_from_slice(&self.payload[..f.at]);
                v.resize(v.len() + f.len, f.byte);
                v.extend_from_slice(&self.payload[f.at..]);
            }
        }
        v
    }

    /// The read pattern, cycled forever (empty pattern: `Chunk::All` forever).
    pub fn chunks(&self) -> Chunks {
        Chunks {
            pattern: self.pattern.to_vec(),
            next: 0,
            errors: 0,
        }
    }

    /// Cuts `bytes` (the stream, [`Input::bytes`]) by the read pattern as [`FakeStream`] does:
    /// an error step becomes an empty piece, and a piece that starts inside the fill is 1024
    /// times longer (before, a fill read in 1-byte pieces made 100,000 pieces and took 75 ms).
    pub fn split<'b>(&self, bytes: &'b [u8]) -> Vec<&'b [u8]> {
        let fill = self.fill.map_or(0..0, |f| f.at..f.at + f.len);
        let mut out = Vec::new();
        let mut pos = 0;
        let mut chunks = self.chunks();
        while pos < bytes.len() {
            let n = match chunks.next_chunk() {
                Chunk::Bytes(n) if fill.contains(&pos) => n.saturating_mul(1024),
                Chunk::Bytes(n) => n,
                Chunk::All => bytes.len(),
                Chunk::Error(_) => 0,
            }
            .min(bytes.len() - pos);
            out.push(&bytes[pos..pos + n]);
            pos += n;
        }
        out
    }

    /// A fake peer that delivers the stream by the read pattern and records what it is sent.
    pub fn stream(&self) -> FakeStream {
        let mut segments = VecDeque::new();
        match self.fill {
            None => segments.push_back(Segment::Bytes(self.payload.to_vec(), 0)),
            Some(f) => {
                segments.push_back(Segment::Bytes(self.payload[..f.at].to_vec(), 0));
                segments.push_back(Segment::Fill(f.byte, f.len));
                segments.push_back(Segment::Bytes(self.payload[f.at..].to_vec(), 0));
            }
        }
        FakeStream {
            segments,
            chunks: self.chunks(),
            write_mode: self.write_mode(),
            writes: 0,
            written: Vec::new(),
            delivered: 0,
        }
    }
}

/// The read pattern as an endless sequence.
#[derive(Debug, Clone)]
pub struct Chunks {
    pattern: Vec<u8>,
    next: usize,
    errors: usize,
}

impl Chunks {
    pub fn next_chunk(&mut self) -> Chunk {
        if self.pattern.is_empty() {
            return Chunk::All;
        }
        let p = self.pattern[self.next % self.pattern.len()];
        self.next += 1;
        match p {
            0..=3 if self.errors < MAX_ERRORS => {
                self.errors += 1;
                Chunk::Error(
                    [
                        io::ErrorKind::Interrupted,
                        io::ErrorKind::WouldBlock,
                        io::ErrorKind::TimedOut,
                        io::ErrorKind::ConnectionReset,
                    ][p as usize],
                )
            }
            0..=3 => Chunk::Bytes(1),
            255 => Chunk::All,
            p => Chunk::Bytes(p as usize - 3),
        }
    }
}

#[derive(Debug)]
enum Segment {
    Bytes(Vec<u8>, usize),
    Fill(u8, usize),
}

/// An in-memory peer: reads come from the fuzz input, writes are recorded. Reads never block:
/// at the end of the input every read returns `Ok(0)` (the peer closed).
#[derive(Debug)]
pub struct FakeStream {
    segments: VecDeque<Segment>,
    chunks: Chunks,
    write_mode: WriteMode,
    writes: usize,
    /// The first `MAX_WRITTEN` bytes written (only successful writes).
    pub written: Vec<u8>,
    /// Bytes handed out by `read` so far.
    pub delivered: usize,
}

impl Read for FakeStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.segments.front() {
                None => return Ok(0),
                Some(Segment::Bytes(v, pos)) if *pos >= v.len() => {}
                Some(Segment::Fill(_, 0)) => {}
                Some(_) => break,
            }
            self.segments.pop_front();
        }
        let want = match self.chunks.next_chunk() {
            Chunk::Error(kind) => return Err(io::Error::new(kind, "injected by the fuzzer")),
            Chunk::All => buf.len(),
            Chunk::Bytes(n) => n.min(buf.len()),
        };
        let n = match self.segments.front_mut().expect("checked above") {
            Segment::Bytes(v, pos) => {
                let n = want.min(v.len() - *pos);
                buf[..n].copy_from_slice(&v[*pos..*pos + n]);
                *pos += n;
                n
            }
            Segment::Fill(b, left) => {
                // Runs are long: read them in larger pieces (a 1-byte read of each of millions
                // of bytes would only make the target slow).
                let n = want.saturating_mul(1024).min(buf.len()).min(*left);
                buf[..n].fill(*b);
                *left -= n;
                n
            }
        };
        self.delivered += n;
        Ok(n)
    }
}

impl Write for FakeStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writes += 1;
        if self.writes > 1 {
            match self.write_mode {
                WriteMode::Ok => {}
                WriteMode::BrokenPipe => return Err(io::ErrorKind::BrokenPipe.into()),
                WriteMode::WouldBlock => return Err(io::ErrorKind::WouldBlock.into()),
                WriteMode::Zero => return Ok(0),
            }
        }
        let keep = buf
            .len()
            .min(MAX_WRITTEN.saturating_sub(self.written.len()));
        self.written.extend_from_slice(&buf[..keep]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl vmrig_vm::backdoor::TimedStream for FakeStream {
    fn set_read_deadline(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        assert_ne!(
            timeout,
            Some(Duration::ZERO),
            "a zero timeout blocks forever"
        );
        Ok(())
    }
}

impl vmrig_vm::qmp::TimeoutStream for FakeStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        // Documented contract of the QMP client: it never passes a zero timeout.
        assert_ne!(
            timeout,
            Some(Duration::ZERO),
            "a zero timeout blocks forever"
        );
        Ok(())
    }

    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        assert_ne!(
            timeout,
            Some(Duration::ZERO),
            "a zero timeout blocks forever"
        );
        Ok(())
    }
}
