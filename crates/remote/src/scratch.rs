//! Files on their way to disk: downloads written through a locked partial file, and private
//! temp folders that a killed run leaves for the next run to sweep.
//!
//! Whether a writer is alive is told by an OS file lock, which the kernel releases when its
//! process ends, however it ends. A pid in the name would not do: pids are reused, and a
//! folder such as `/tmp` may be shared by processes in other pid namespaces.

use adaptq_source::{Result, SourceError};
use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

/// The folder, inside the root a file is written under, that holds its partial.
///
/// Keeping partials out of the tree they are renamed into means no name from a repository
/// can collide with one, and everything in here is ours to sweep.
pub const PARTIAL_DIR: &str = ".adaptq-partial";

/// The lock file of a private temp folder.
const LOCK_NAME: &str = ".adaptq-lock";

/// Writes `root/rel` through the fixed partial `root/.adaptq-partial/rel`, renamed into
/// place only once `fill` succeeded, so a file that exists is complete. `rel` must already
/// be a checked plain relative name.
///
/// The partial is locked while it is written. A second process fetching the same file waits
/// for the first and then, when `keep_existing` is set, uses its result instead of writing
/// again. A partial left by a killed run is unlocked: the next fetch of that file simply
/// truncates and rewrites it, and [`sweep_partials`] removes it in between. On error the
/// partial is removed.
pub fn write_via_partial(
    root: &Path,
    rel: &str,
    keep_existing: bool,
    fill: impl FnOnce(&mut File) -> Result<()>,
) -> Result<()> {
    let dest = root.join(rel);
    if keep_existing && dest.exists() {
        return Ok(());
    }
    let part = root.join(PARTIAL_DIR).join(rel);
    for p in [&dest, &part] {
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| SourceError::io(parent, e))?;
        }
    }
    let Some(mut f) = lock_partial(&part, &dest, keep_existing)? else {
        return Ok(());
    };
    let written = f
        .set_len(0)
        .map_err(|e| SourceError::io(&part, e))
        .and_then(|()| fill(&mut f))
        .and_then(|()| f.sync_all().map_err(|e| SourceError::io(&part, e)))
        .and_then(|()| std::fs::rename(&part, &dest).map_err(|e| SourceError::io(&dest, e)));
    if written.is_err() {
        // Still locked: nobody else can be writing it.
        let _ = std::fs::remove_file(&part);
    }
    written
}

/// Opens and locks `part`; `None` when, after waiting for another writer, `dest` exists and
/// may be kept.
fn lock_partial(part: &Path, dest: &Path, keep_existing: bool) -> Result<Option<File>> {
    let io = |e| SourceError::io(part, e);
    loop {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(part)
            .map_err(io)?;
        match f.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                eprintln!(
                    "note: waiting for another adaptq process that is writing {}",
                    dest.display()
                );
                f.lock().map_err(io)?;
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        if keep_existing && dest.exists() {
            if same_file(&f, part) {
                // Locked, so an empty partial we just made or one a dead run left.
                let _ = std::fs::remove_file(part);
            }
            return Ok(None);
        }
        // The holder we waited for renamed or removed the file this handle was opened on (or
        // a sweep removed it before we locked it): writing to it would be lost, or worse,
        // change the finished file. Open the name afresh.
        if same_file(&f, part) {
            return Ok(Some(f));
        }
    }
}

#[cfg(unix)]
fn same_file(f: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &File, path: &Path) -> bool {
    // Elsewhere an open file can be neither renamed nor removed.
    path.exists()
}

/// Removes the partials under `root/.adaptq-partial` that no live process holds (those of
/// killed runs). Best effort: a file that cannot be opened or removed is left.
pub fn sweep_partials(root: &Path) {
    fn walk(dir: &Path, depth: u32) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            let p = e.path();
            if t.is_dir() && depth < 16 {
                walk(&p, depth + 1);
            } else if t.is_file() {
                if let Ok(f) = OpenOptions::new().write(true).open(&p) {
                    // Removed while locked, so a writer that opened it meanwhile sees a
                    // different file when it gets the lock and starts again.
                    if f.try_lock().is_ok() {
                        let _ = std::fs::remove_file(&p);
                    }
                }
            }
        }
    }
    // Without inode checks a writer could not tell its partial was swept away.
    if cfg!(unix) {
        walk(&root.join(PARTIAL_DIR), 0);
    }
}

/// A private temp folder, removed on drop. A killed run cannot run its drop, so each new
/// folder of a prefix also removes the folders of that prefix whose owner is gone.
pub struct TempFolder {
    /// Dropped first, so the folder goes while its lock is still held.
    dir: tempfile::TempDir,
    _lock: File,
}

impl TempFolder {
    /// Makes `{temp}/{prefix}XXXXXX`, holding `.adaptq-lock` in it locked for its lifetime,
    /// then sweeps stale folders of the same prefix.
    pub fn new(prefix: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .map_err(|e| SourceError::io(Path::new("temp folder"), e))?;
        // Locked under another name and then renamed, so a lock file that a sweep can see
        // is always held by its owner until that owner ends.
        let fresh = dir.path().join(".adaptq-lock-new");
        let lock = File::create(&fresh).map_err(|e| SourceError::io(&fresh, e))?;
        lock.try_lock()
            .map_err(|e| SourceError::io(&fresh, std::io::Error::other(e.to_string())))?;
        let lockp = dir.path().join(LOCK_NAME);
        std::fs::rename(&fresh, &lockp).map_err(|e| SourceError::io(&lockp, e))?;
        sweep_temp_folders(prefix, dir.path());
        Ok(TempFolder { dir, _lock: lock })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Removes `{temp}/{prefix}*` folders, other than `ours`, whose lock file exists and is not
/// held: their owner ended without removing them. Only folders with our lock file are
/// touched (and, on Unix, only those owned by the same user as `ours`). Best effort.
fn sweep_temp_folders(prefix: &str, ours: &Path) {
    let Some(parent) = ours.parent() else { return };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let owner = owner_of(ours);
    for e in entries.flatten() {
        let p: PathBuf = e.path();
        let ours_named = e
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(prefix));
        let is_dir = std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir());
        if !ours_named || !is_dir || p == ours || owner_of(&p) != owner {
            continue;
        }
        let lockp = p.join(LOCK_NAME);
        if !std::fs::symlink_metadata(&lockp).is_ok_and(|m| m.is_file()) {
            continue;
        }
        if let Ok(f) = File::open(&lockp) {
            if f.try_lock().is_ok() {
                let _ = std::fs::remove_dir_all(&p);
            }
        }
    }
}

#[cfg(unix)]
fn owner_of(p: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p).ok().map(|m| m.uid())
}

#[cfg(not(unix))]
fn owner_of(_: &Path) -> Option<u32> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_is_renamed_on_success_and_removed_on_error() {
        use std::io::Write;
        let t = tempfile::tempdir().unwrap();
        // Writes `bytes` to `name` through a partial; returns what `name` then holds.
        let put = |name: &str, keep: bool, bytes: &[u8]| {
            write_via_partial(t.path(), name, keep, |f| {
                f.write_all(bytes).map_err(|e| SourceError::io(t.path(), e))
            })
            .unwrap();
            std::fs::read(t.path().join(name)).unwrap()
        };
        assert_eq!(put("sub/dir/a.bin", true, b"abc"), b"abc");
        let part = t.path().join(PARTIAL_DIR).join("sub/dir/b.bin");
        let e = write_via_partial(t.path(), "sub/dir/b.bin", true, |f| {
            f.write_all(b"half").unwrap();
            Err(SourceError::io(
                Path::new("x"),
                std::io::Error::other("broke"),
            ))
        });
        assert!(e.is_err());
        assert!(!part.exists() && !t.path().join("sub/dir/b.bin").exists());
        // A partial left by a killed run (unlocked, stale bytes) is rewritten, not appended to.
        std::fs::write(&part, b"stale stale stale").unwrap();
        assert_eq!(put("sub/dir/b.bin", true, b"new"), b"new");
        // `keep_existing == false` replaces (a ref that moved).
        assert_eq!(put("sub/dir/b.bin", false, b"newer"), b"newer");
    }

    #[cfg(unix)]
    #[test]
    fn sweep_removes_only_unlocked_partials() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join(PARTIAL_DIR).join("snapshots/c");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("stale.gguf"), b"x").unwrap();
        let live = File::create(dir.join("live.gguf")).unwrap();
        live.lock().unwrap();
        sweep_partials(t.path());
        assert!(!dir.join("stale.gguf").exists());
        assert!(dir.join("live.gguf").exists());
    }

    #[test]
    fn stale_temp_folders_are_swept_live_ones_kept() {
        let prefix = format!("adaptq-sweeptest-{}-", std::process::id());
        let live = TempFolder::new(&prefix).unwrap();
        // A folder whose owner died: its lock file exists but nobody holds it.
        let dead = tempfile::Builder::new()
            .prefix(&prefix)
            .tempdir()
            .unwrap()
            .keep();
        std::fs::write(dead.join(LOCK_NAME), b"").unwrap();
        std::fs::write(dead.join("config.json"), b"{}").unwrap();
        // A folder without our lock file is not ours to judge.
        let foreign = tempfile::Builder::new().prefix(&prefix).tempdir().unwrap();
        let next = TempFolder::new(&prefix).unwrap();
        assert!(!dead.exists(), "stale folder kept");
        assert!(live.path().is_dir() && next.path().is_dir() && foreign.path().is_dir());
        let (a, b) = (live.path().to_path_buf(), next.path().to_path_buf());
        drop((live, next));
        assert!(!a.exists() && !b.exists());
    }
}
