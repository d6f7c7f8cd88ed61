//! Byte access behind the format readers: a memory-mapped local file, or anything else that can
//! serve byte ranges (HTTP range requests live in `adaptq-remote`).
//!
//! The readers only ever ask for the header and then one tensor's bytes at a time, so a remote
//! model is read without downloading it first and without holding it in memory.

use crate::{Result, SourceError};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// A read-only byte container addressed by offset.
pub trait Blob: Send + Sync {
    /// Total length in bytes.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes `start..end`. Callers check the range against [`Blob::len`] first.
    fn read(&self, start: u64, end: u64) -> Result<Cow<'_, [u8]>>;
    /// Name used in error messages (a path, or a URL-like locator).
    fn label(&self) -> &Path;
    /// Hint: these tensor byte ranges will be read in this order. Remote blobs use it to fetch
    /// ahead while earlier tensors are being quantized; local files ignore it.
    fn plan(&self, _ranges: &[(u64, u64)]) {}
    /// Hint: the reader is done with bytes `start..end` (a tensor decoded to f32). A mapped
    /// file drops their pages from the process, so reading a model larger than memory tensor
    /// by tensor does not leave the whole file resident.
    fn release(&self, _start: u64, _end: u64) {}
}

/// Bytes a [`WholeBlob`] holds, and whether a range can be let go of.
pub trait Held: AsRef<[u8]> + Send + Sync {
    fn release(&self, _start: usize, _end: usize) {}
}

impl Held for Vec<u8> {}

impl Held for memmap2::Mmap {
    fn release(&self, start: usize, end: usize) {
        const PAGE: usize = 4096;
        let first = start.div_ceil(PAGE) * PAGE;
        let last = end.min(self.len()) / PAGE * PAGE;
        if first < last {
            // SAFETY: the map is read-only and file-backed; dropping its pages only makes a
            // later access fault them in again from the file, so slices into it stay valid.
            // A failure only means the pages stay resident.
            let _ = unsafe {
                self.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, last - first)
            };
        }
    }
}

/// Bytes held whole, mapped or in memory, named `label` in errors.
pub struct WholeBlob<B> {
    pub label: PathBuf,
    pub bytes: B,
}

/// A local file, memory-mapped: reading a tensor touches only its own pages.
pub type MmapBlob = WholeBlob<memmap2::Mmap>;

/// Bytes held in memory (tests, small downloaded files).
pub type MemBlob = WholeBlob<Vec<u8>>;

/// Opens `path` for reading if it is a regular file (symlinks followed). A FIFO would block the
/// open or the first read until some writer appears, and a device can be endless, so both are
/// refused. On Unix the open itself is non-blocking, so a path swapped for a FIFO after any
/// earlier check cannot hang it either; the type is then checked on the opened file.
pub fn open_regular(path: &Path) -> Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let f = opts.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => SourceError::NotFound {
            path: path.to_path_buf(),
        },
        _ => SourceError::io(path, e),
    })?;
    let meta = f.metadata().map_err(|e| SourceError::io(path, e))?;
    if !meta.is_file() {
        return Err(SourceError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file (a folder, FIFO, socket or device cannot be read as a model)",
            ),
        ));
    }
    Ok(f)
}

/// Reads a small companion file (an index, `config.json`, a model card) whole, refusing one
/// that is not a regular file or is larger than `limit` bytes rather than reading it all.
pub fn read_small(path: &Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = open_regular(path)?;
    let len = f.metadata().map_err(|e| SourceError::io(path, e))?.len();
    let too_big = || {
        SourceError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("larger than the {limit} bytes such a file may have"),
            ),
        )
    };
    if len > limit {
        return Err(too_big());
    }
    let mut out = Vec::with_capacity(len as usize);
    f.take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| SourceError::io(path, e))?;
    if out.len() as u64 > limit {
        return Err(too_big());
    }
    Ok(out)
}

impl MmapBlob {
    /// Maps a regular file; anything else (FIFO, device, folder) is refused.
    pub fn open(path: &Path) -> Result<Self> {
        let f = open_regular(path)?;
        // SAFETY: the map is read-only; adaptq never writes to its inputs. A file truncated by
        // another process while mapped would fault, as with every mmap-based model loader.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| SourceError::io(path, e))?;
        Ok(WholeBlob {
            label: path.to_path_buf(),
            bytes: map,
        })
    }
}

impl<B: Held> Blob for WholeBlob<B> {
    fn len(&self) -> u64 {
        self.bytes.as_ref().len() as u64
    }
    fn read(&self, start: u64, end: u64) -> Result<Cow<'_, [u8]>> {
        byte_range(self.bytes.as_ref(), start, end, &self.label)
    }
    fn label(&self) -> &Path {
        &self.label
    }
    fn release(&self, start: u64, end: u64) {
        if let (Ok(s), Ok(e)) = (usize::try_from(start), usize::try_from(end)) {
            self.bytes.release(s, e);
        }
    }
}

/// Bytes `start..end` of a blob held whole (mapped or in memory); an error naming `label`
/// when they lie past its end.
fn byte_range<'a>(bytes: &'a [u8], start: u64, end: u64, label: &Path) -> Result<Cow<'a, [u8]>> {
    usize::try_from(start)
        .ok()
        .zip(usize::try_from(end).ok())
        .and_then(|(s, e)| bytes.get(s..e))
        .map(Cow::Borrowed)
        .ok_or_else(|| {
            SourceError::corrupt(
                label,
                format!(
                    "bytes {start}..{end} lie past the end of the {}-byte file",
                    bytes.len()
                ),
            )
        })
}
