//! Minimal classic-pcap writer (microsecond timestamps, LINKTYPE_ETHERNET).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

pub const MAGIC: u32 = 0xa1b2_c3d4;
pub const LINKTYPE_ETHERNET: u32 = 1;
pub const SNAPLEN: u32 = 262_144;

pub struct PcapWriter {
    out: BufWriter<File>,
    records: u64,
    dirty: bool,
}

impl PcapWriter {
    /// Create (truncate) `path` and write the global header.
    pub fn create(path: &Path) -> io::Result<PcapWriter> {
        let mut out = BufWriter::with_capacity(256 * 1024, File::create(path)?);
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&MAGIC.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes()); // version major
        h.extend_from_slice(&4u16.to_le_bytes()); // version minor
        h.extend_from_slice(&0i32.to_le_bytes()); // thiszone
        h.extend_from_slice(&0u32.to_le_bytes()); // sigfigs
        h.extend_from_slice(&SNAPLEN.to_le_bytes());
        h.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        out.write_all(&h)?;
        out.flush()?;
        Ok(PcapWriter {
            out,
            records: 0,
            dirty: false,
        })
    }

    pub fn write(&mut self, ts: SystemTime, frame: &[u8]) -> io::Result<()> {
        let d = ts.duration_since(UNIX_EPOCH).unwrap_or_default();
        let caplen = frame.len().min(SNAPLEN as usize);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&(d.as_secs() as u32).to_le_bytes());
        h[4..8].copy_from_slice(&d.subsec_micros().to_le_bytes());
        h[8..12].copy_from_slice(&(caplen as u32).to_le_bytes());
        h[12..16].copy_from_slice(&(frame.len() as u32).to_le_bytes());
        self.out.write_all(&h)?;
        self.out.write_all(&frame[..caplen])?;
        self.records += 1;
        self.dirty = true;
        Ok(())
    }

    /// Push buffered records to the file (done by the switch after every batch, so the file can
    /// be read while the switch runs).
    pub fn flush(&mut self) -> io::Result<()> {
        if self.dirty {
            self.dirty = false;
            self.out.flush()?;
        }
        Ok(())
    }

    pub fn records(&self) -> u64 {
        self.records
    }
}

/// Parse a classic pcap file written by [`PcapWriter`] (little-endian, microseconds): returns
/// the link type and the frames. For tests and tooling.
pub fn read_pcap(data: &[u8]) -> Result<(u32, Vec<Vec<u8>>), String> {
    if data.len() < 24 {
        return Err("short global header".into());
    }
    let u32le = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap());
    if u32le(&data[0..4]) != MAGIC {
        return Err(format!("bad magic {:#x}", u32le(&data[0..4])));
    }
    let linktype = u32le(&data[20..24]);
    let mut frames = Vec::new();
    let mut p = 24;
    while p < data.len() {
        if data.len() - p < 16 {
            return Err("truncated record header".into());
        }
        let caplen = u32le(&data[p + 8..p + 12]) as usize;
        p += 16;
        if data.len() - p < caplen {
            return Err("truncated record".into());
        }
        frames.push(data[p..p + caplen].to_vec());
        p += caplen;
    }
    Ok((linktype, frames))
}
