//! Where adaptq puts what it writes: every result is built under a temporary name beside its
//! target and swapped in only when complete, and an existing target is replaced only when the
//! caller forces it *and* adaptq wrote it (a bundle, a folder carrying [`MARKER`], or a file the
//! caller's recogniser accepts). A user's folder handed over by mistake — the one holding the
//! source model, say — is refused, never deleted.
//!
//! Staging names carry the process id (`.NAME.partial-PID`), so concurrent runs never share one,
//! and the next run towards the same target removes those of processes that no longer run:
//! a run killed at any point leaves nothing that blocks or confuses a later one. On Linux a
//! folder is swapped in with `renameat2(RENAME_EXCHANGE)`, so the target holds the old or the
//! new result at every instant; elsewhere the old folder is moved aside first.

use crate::{BundleError, Result, MANIFEST};
use std::path::{Path, PathBuf};

/// Written into folders adaptq creates that are not bundles (Hugging Face exports), so a later
/// forced run knows it may replace them.
pub const MARKER: &str = ".adaptq-output";

/// What a forced run may replace at the target path.
#[derive(Clone, Copy)]
pub enum Kind<'a> {
    /// A folder: an adaptq bundle, a folder carrying [`MARKER`], or an empty folder.
    Folder,
    /// A file that `is_ours` recognises as adaptq's (e.g. a GGUF it wrote).
    File { is_ours: &'a dyn Fn(&Path) -> bool },
}

/// A result being built under a temporary name; dropped without [`Staged::commit`], it is removed.
pub struct Staged {
    target: PathBuf,
    tmp: PathBuf,
    folder: bool,
    force: bool,
    committed: bool,
}

/// Refuses `target` unless it is absent, or `force` is set and adaptq wrote what is there.
pub fn check_replaceable(target: &Path, force: bool, kind: Kind) -> Result<()> {
    let meta = match std::fs::symlink_metadata(target) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(crate::io_err(target)(e)),
    };
    if !force {
        return Err(BundleError::Exists(target.to_path_buf()));
    }
    let not_ours = |why: &str| BundleError::NotOurs {
        path: target.to_path_buf(),
        why: why.to_string(),
    };
    let ft = meta.file_type();
    if ft.is_symlink() {
        return Err(not_ours("it is a symbolic link"));
    }
    match kind {
        Kind::Folder => {
            if !ft.is_dir() {
                return Err(not_ours("it is not a folder"));
            }
            if is_adaptq_folder(target) {
                Ok(())
            } else {
                Err(not_ours(
                    "it is a folder that is neither empty, nor a bundle, nor one adaptq wrote",
                ))
            }
        }
        Kind::File { is_ours } => {
            if !ft.is_file() {
                return Err(not_ours("it is not a regular file"));
            }
            if is_ours(target) {
                Ok(())
            } else {
                Err(not_ours("it is a file adaptq did not write"))
            }
        }
    }
}

/// An empty folder, a bundle (its manifest names adaptq as generator) or a folder with [`MARKER`].
fn is_adaptq_folder(dir: &Path) -> bool {
    let Ok(mut entries) = std::fs::read_dir(dir) else {
        return false;
    };
    if entries.next().is_none() {
        return true;
    }
    let regular = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file());
    if regular(&dir.join(MARKER)) {
        return true;
    }
    let manifest = dir.join(MANIFEST);
    if !regular(&manifest) {
        return false;
    }
    // A manifest is small; anything past this bound is not one of ours.
    const MAX_MANIFEST: u64 = 256 << 20;
    if std::fs::metadata(&manifest).map_or(true, |m| m.len() > MAX_MANIFEST) {
        return false;
    }
    let Ok(bytes) = std::fs::read(&manifest) else {
        return false;
    };
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .is_ok_and(|v| v.pointer("/generator/name").and_then(|n| n.as_str()) == Some("adaptq"))
}

impl Staged {
    /// Starts building `target`: checks that it may be replaced (so a refusal comes before the
    /// work, not after), clears stale staging left by killed runs, and names the temporary
    /// path. For a folder the temporary folder is created; for a file only named.
    pub fn new(target: &Path, force: bool, kind: Kind) -> Result<Staged> {
        check_replaceable(target, force, kind)?;
        let folder = matches!(kind, Kind::Folder);
        Self::beside(target, force, folder, "")
    }

    /// A scratch folder beside `target` for intermediate results (`.NAME.partial-PID-work`),
    /// removed when dropped; it is never committed.
    pub fn scratch(target: &Path) -> Result<Staged> {
        Self::beside(target, false, true, "-work")
    }

    fn beside(target: &Path, force: bool, folder: bool, suffix: &str) -> Result<Staged> {
        let name = target
            .file_name()
            .filter(|n| !n.is_empty() && *n != "." && *n != "..")
            .ok_or_else(|| BundleError::Invalid(format!("{} names no file", target.display())))?
            .to_string_lossy()
            .into_owned();
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(crate::io_err(&parent))?;
        sweep_stale(&parent, &name);
        let tmp = parent.join(format!(".{name}.partial-{}{suffix}", std::process::id()));
        remove_any(&tmp);
        if folder {
            std::fs::create_dir(&tmp).map_err(crate::io_err(&tmp))?;
        }
        Ok(Staged {
            target: target.to_path_buf(),
            tmp,
            folder,
            force,
            committed: false,
        })
    }

    /// Where to write the result.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Puts the finished result at the target. What is there now is checked again (it may
    /// have appeared during the run) and replaced only under the same rule as at the start.
    pub fn commit(mut self, kind: Kind) -> Result<()> {
        check_replaceable(&self.target, self.force, kind)?;
        let exists = std::fs::symlink_metadata(&self.target).is_ok();
        if !exists || !self.folder {
            // rename(2) onto a file is atomic; onto nothing there is nothing to keep.
            std::fs::rename(&self.tmp, &self.target).map_err(crate::io_err(&self.target))?;
        } else {
            swap_folder(&self.tmp, &self.target)?;
            // The staging path now holds the old folder.
            remove_any(&self.tmp);
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staged {
    /// An unfinished result (error, panic, interrupt) is removed rather than left half-written.
    fn drop(&mut self) {
        if !self.committed {
            remove_any(&self.tmp);
        }
    }
}

#[cfg(target_os = "linux")]
fn swap_folder(new: &Path, target: &Path) -> Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| BundleError::Invalid(format!("{}: path holds a NUL byte", p.display())))
    };
    let (a, b) = (c(new)?, c(target)?);
    // SAFETY: both arguments are valid NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        // Kernels or file systems without the exchange flag: fall back to moving aside.
        Some(libc::ENOSYS) | Some(libc::EINVAL) => swap_aside(new, target),
        _ => Err(crate::io_err(target)(err)),
    }
}

#[cfg(not(target_os = "linux"))]
fn swap_folder(new: &Path, target: &Path) -> Result<()> {
    swap_aside(new, target)
}

/// Moves the old folder to the staging name and the new one into place. Between the two renames
/// the target is missing; the old folder then sits at the staging path until the caller
/// removes it.
fn swap_aside(new: &Path, target: &Path) -> Result<()> {
    let name = new
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let old = new.with_file_name(format!("{name}-old"));
    remove_any(&old);
    std::fs::rename(target, &old).map_err(crate::io_err(target))?;
    if let Err(e) = std::fs::rename(new, target) {
        let _ = std::fs::rename(&old, target);
        return Err(crate::io_err(target)(e));
    }
    std::fs::rename(&old, new).map_err(crate::io_err(new))
}

fn remove_any(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

/// Removes `.NAME.partial-PID` (and `-old`, `-work`) staging entries in `parent` whose process
/// is gone.
/// Only names of exactly that form are touched: adaptq is the only writer of them.
fn sweep_stale(parent: &Path, name: &str) {
    let prefix = format!(".{name}.partial-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(rest) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else {
            continue;
        };
        let digits = ["-old", "-work"]
            .iter()
            .find_map(|s| rest.strip_suffix(s))
            .unwrap_or(rest);
        let Ok(pid) = digits.parse::<u32>() else {
            continue;
        };
        if digits.starts_with('+') || pid == std::process::id() || process_alive(pid) {
            continue;
        }
        remove_any(&e.path());
    }
}

/// Whether a process with this id exists. Where that cannot be told, assume it does, so
/// nothing of a live run is ever removed.
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOLDER: Kind<'static> = Kind::Folder;

    fn bundle_like(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join(MANIFEST),
            r#"{"generator": {"name": "adaptq", "version": "0"}}"#,
        )
        .unwrap();
    }

    #[test]
    fn refuses_existing_target_without_force() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("b");
        bundle_like(&out);
        assert!(matches!(
            Staged::new(&out, false, FOLDER),
            Err(BundleError::Exists(_))
        ));
    }

    #[test]
    fn forced_run_keeps_a_folder_adaptq_did_not_write() {
        let t = tempfile::tempdir().unwrap();
        let user = t.path().join("models");
        std::fs::create_dir(&user).unwrap();
        std::fs::write(user.join("model.safetensors"), b"precious").unwrap();
        let e = Staged::new(&user, true, FOLDER).err().unwrap();
        assert!(matches!(e, BundleError::NotOurs { .. }), "{e}");
        assert_eq!(
            std::fs::read(user.join("model.safetensors")).unwrap(),
            b"precious"
        );
        // Also refused when the folder appears during the run.
        let late = t.path().join("late");
        let s = Staged::new(&late, true, FOLDER).unwrap();
        std::fs::create_dir(&late).unwrap();
        std::fs::write(late.join("notes.txt"), b"mine").unwrap();
        assert!(s.commit(FOLDER).is_err());
        assert_eq!(std::fs::read(late.join("notes.txt")).unwrap(), b"mine");
        let leftovers: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".partial-"))
            .collect();
        assert!(leftovers.is_empty(), "staging left behind");
    }

    #[test]
    fn forced_run_replaces_a_bundle_and_a_marked_folder() {
        let t = tempfile::tempdir().unwrap();
        for (i, marked) in [false, true].into_iter().enumerate() {
            let out = t.path().join(format!("o{i}"));
            if marked {
                std::fs::create_dir(&out).unwrap();
                std::fs::write(out.join(MARKER), b"").unwrap();
            } else {
                bundle_like(&out);
            }
            std::fs::write(out.join("old.bin"), b"old").unwrap();
            let s = Staged::new(&out, true, FOLDER).unwrap();
            std::fs::write(s.path().join("new.bin"), b"new").unwrap();
            s.commit(FOLDER).unwrap();
            assert!(out.join("new.bin").exists() && !out.join("old.bin").exists());
        }
        let names: Vec<String> = std::fs::read_dir(t.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    }

    #[test]
    fn files_are_replaced_only_when_recognised() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("m.gguf");
        std::fs::write(&out, b"theirs").unwrap();
        let no = |_: &Path| false;
        let yes = |_: &Path| true;
        let e = Staged::new(&out, true, Kind::File { is_ours: &no })
            .err()
            .unwrap();
        assert!(matches!(e, BundleError::NotOurs { .. }));
        let s = Staged::new(&out, true, Kind::File { is_ours: &yes }).unwrap();
        std::fs::write(s.path(), b"ours").unwrap();
        s.commit(Kind::File { is_ours: &yes }).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"ours");
        // A symlink at the target is never followed or replaced.
        let link = t.path().join("l.gguf");
        std::os::unix::fs::symlink(&out, &link).unwrap();
        assert!(Staged::new(&link, true, Kind::File { is_ours: &yes }).is_err());
    }

    #[test]
    fn stale_staging_of_dead_runs_is_swept_and_live_or_foreign_names_kept() {
        let t = tempfile::tempdir().unwrap();
        // A pid far above Linux's pid_max is never alive.
        let dead = t.path().join(".b.partial-4294967295");
        let dead_old = t.path().join(".b.partial-4294967294-old");
        let dead_work = t.path().join(".b.partial-4294967293-work");
        let live = t.path().join(format!(".b.partial-{}", std::process::id()));
        let foreign = t.path().join(".b.partial-notes");
        let other = t.path().join(".c.partial-4294967295");
        for d in [&dead, &dead_old, &dead_work, &foreign, &other] {
            bundle_like(d);
        }
        let s = Staged::new(&t.path().join("b"), false, FOLDER).unwrap();
        assert_eq!(s.path(), live.as_path());
        assert!(!dead.exists() && !dead_old.exists() && !dead_work.exists());
        assert!(foreign.exists() && other.exists());
        drop(s);
        assert!(!live.exists(), "dropped staging is removed");
    }
}
