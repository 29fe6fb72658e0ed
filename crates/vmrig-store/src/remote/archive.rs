//! The object format of a store path in a remote cache: the path's directory as a tar
//! stream (GNU sparse entries for files with holes, so an ext4 root image that is mostly
//! holes stays small), compressed with zstd. Both directions stream: nothing is held in
//! memory beyond the compressor's window.

use std::io::{self, Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

/// zstd level: 3 (zstd's default) packs a root image at a few hundred MB/s on one core;
/// higher levels cost more CPU than they save in transfer on a LAN or a cloud region.
const ZSTD_LEVEL: i32 = 3;

/// Counts and hashes what passes through it (the compressed object, both ways).
pub struct Hashing<'a, T> {
    inner: T,
    hasher: Sha256,
    bytes: u64,
    /// Called with the running byte count, for progress bars.
    progress: &'a mut dyn FnMut(u64),
}

impl<'a, T> Hashing<'a, T> {
    pub fn new(inner: T, progress: &'a mut dyn FnMut(u64)) -> Hashing<'a, T> {
        Hashing {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
            progress,
        }
    }

    /// The byte count and the hex sha256 of everything seen.
    pub fn finish(self) -> (T, u64, String) {
        (self.inner, self.bytes, hex::encode(self.hasher.finalize()))
    }

    fn seen(&mut self, buf: &[u8]) {
        self.hasher.update(buf);
        self.bytes += buf.len() as u64;
        (self.progress)(self.bytes);
    }
}

impl<W: Write> Write for Hashing<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.seen(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen(&buf[..n]);
        Ok(n)
    }
}

/// Writes `dir`'s contents (not `dir` itself) as tar+zstd into `out`; returns `out`.
/// Symlinks stay symlinks (a kernel's `lib/modules/*/build` may dangle).
pub fn pack<W: Write>(dir: &Path, out: W) -> io::Result<W> {
    let encoder = zstd::Encoder::new(out, ZSTD_LEVEL)?;
    let mut tar = tar::Builder::new(encoder);
    tar.follow_symlinks(false);
    tar.sparse(true);
    tar.mode(tar::HeaderMode::Complete);
    tar.append_dir_all(".", dir)?;
    let encoder = tar.into_inner()?;
    encoder.finish()
}

/// Unpacks a tar+zstd stream from `input` into `dir` (which exists and is empty), then
/// reads `input` to its end so that a hashing reader has seen the whole object.
/// Entries that would land outside `dir` are refused by the tar crate.
pub fn unpack<R: Read>(input: R, dir: &Path) -> io::Result<R> {
    let decoder = zstd::Decoder::new(input)?;
    let mut archive = tar::Archive::new(decoder);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(false);
    archive.unpack(dir)?;
    let mut decoder = archive.into_inner();
    // Past the tar end marker: the rest of the zstd frame (must decode cleanly) ...
    io::copy(&mut decoder, &mut io::sink())?;
    // ... and anything after it, so the hash covers every byte of the object.
    let mut input = decoder.finish();
    io::copy(&mut input, &mut io::sink())?;
    Ok(input.into_inner())
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    fn sample(dir: &Path) {
        fs::create_dir_all(dir.join("lib/modules/6.1")).unwrap();
        fs::write(dir.join("vmlinuz"), b"kernel bytes").unwrap();
        fs::write(dir.join("lib/modules/6.1/modules.dep"), b"a.ko:\n").unwrap();
        fs::set_permissions(dir.join("vmlinuz"), fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink("/nonexistent/build", dir.join("lib/modules/6.1/build"))
            .unwrap();
    }

    fn pack_to_vec(dir: &Path) -> Vec<u8> {
        pack(dir, Vec::new()).unwrap()
    }

    #[test]
    fn round_trip_keeps_files_modes_and_symlinks() {
        let src = tempfile::tempdir().unwrap();
        sample(src.path());
        let object = pack_to_vec(src.path());
        let dst = tempfile::tempdir().unwrap();
        unpack(&object[..], dst.path()).unwrap();
        assert_eq!(
            fs::read(dst.path().join("vmlinuz")).unwrap(),
            b"kernel bytes"
        );
        let mode = fs::metadata(dst.path().join("vmlinuz")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            fs::read(dst.path().join("lib/modules/6.1/modules.dep")).unwrap(),
            b"a.ko:\n"
        );
        assert_eq!(
            fs::read_link(dst.path().join("lib/modules/6.1/build")).unwrap(),
            Path::new("/nonexistent/build")
        );
    }

    #[test]
    fn a_truncated_object_is_an_error() {
        let src = tempfile::tempdir().unwrap();
        sample(src.path());
        // Incompressible content, so the object is long enough to cut in the middle.
        let noise: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        fs::write(src.path().join("noise"), &noise).unwrap();
        let object = pack_to_vec(src.path());
        for cut in [object.len() / 3, object.len() - 1] {
            let dst = tempfile::tempdir().unwrap();
            assert!(
                unpack(&object[..cut], dst.path()).is_err(),
                "cut at {cut} of {}",
                object.len()
            );
        }
    }

    #[test]
    fn garbage_is_an_error() {
        let dst = tempfile::tempdir().unwrap();
        assert!(unpack(&b"not zstd at all"[..], dst.path()).is_err());
    }

    #[test]
    fn a_sparse_file_stays_sparse_and_the_object_small() {
        let src = tempfile::tempdir().unwrap();
        let image = src.path().join("root.img");
        let file = fs::File::create(&image).unwrap();
        // 1 GiB, as mke2fs leaves a root image: holes with a little data.
        file.set_len(1 << 30).unwrap();
        use std::os::unix::fs::FileExt;
        file.write_all_at(b"superblock", 1024).unwrap();
        file.write_all_at(&[7u8; 8192], 512 << 20).unwrap();
        drop(file);
        let object = pack_to_vec(src.path());
        assert!(object.len() < 64 * 1024, "object is {} bytes", object.len());

        let dst = tempfile::tempdir().unwrap();
        unpack(&object[..], dst.path()).unwrap();
        let out = dst.path().join("root.img");
        let meta = fs::metadata(&out).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        // Allocated blocks (512 B units): a few KiB of data, not a GiB.
        assert!(meta.blocks() * 512 < 4 << 20, "{} blocks", meta.blocks());
        let back = fs::File::open(&out).unwrap();
        let mut head = [1u8; 1034];
        back.read_exact_at(&mut head, 0).unwrap();
        assert!(head[..1024].iter().all(|&b| b == 0));
        assert_eq!(&head[1024..], b"superblock");
        let mut data = [0u8; 8192];
        back.read_exact_at(&mut data, 512 << 20).unwrap();
        assert_eq!(data, [7u8; 8192]);
    }
}
