//! Where adaptq puts what it writes: every result is built under a temporary name beside its
//! target and swapped in only when complete, and an existing target is replaced only when the
//! caller forces it *and* adaptq wrote everything in it (a bundle holding only the files its
//! manifest lists, a folder whose [`MARKER`] lists its entries, or a file the caller's
//! recogniser accepts). A user's folder handed over by mistake — the one holding the source
//! model, say, or a bundle the user added notes to — is refused, never deleted.
//!
//! Staging names carry the process id (`.NAME.partial-PID`), so concurrent runs never share one,
//! and each run holds an exclusive lock on its staging folder or file while it works. The next
//! run towards the same target removes staging nobody holds a lock on: a run killed at any
//! point leaves nothing that blocks or confuses a later one, and a live run's staging is never
//! touched, whatever its PID namespace or host. On Linux a folder is swapped in with
//! `renameat2(RENAME_EXCHANGE)`, so the target holds the old or the new result at every
//! instant; elsewhere (and on file systems without it) the old folder is moved aside first, and
//! a run killed in between has its old folder put back by the next run.

use crate::{BundleError, Result, MANIFEST};
use std::path::{Path, PathBuf};

/// Written into folders adaptq creates that are not bundles (Hugging Face exports), listing
/// their entries one per line, so a later forced run knows it may replace them ([`Staged::mark`]).
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
    /// The open staging folder or file, exclusively locked while this run lives.
    lock: Option<std::fs::File>,
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
            match foreign_folder(target) {
                None => Ok(()),
                Some(why) => Err(not_ours(&why)),
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

/// Why `dir` is not a folder adaptq may replace, or `None` when it is: empty, a bundle (its
/// manifest names adaptq) holding only the files the manifest lists, or a folder whose
/// [`MARKER`] lists every entry in it.
fn foreign_folder(dir: &Path) -> Option<String> {
    let entries = match list(dir) {
        Ok(e) => e,
        Err(e) => return Some(format!("it cannot be listed: {e}")),
    };
    if entries.is_empty() {
        return None;
    }
    let listed = if entries.iter().any(|e| e == MANIFEST) {
        bundle_listing(dir)
    } else if entries.iter().any(|e| e == MARKER) {
        read_small(&dir.join(MARKER)).map(|b| {
            String::from_utf8_lossy(&b)
                .lines()
                .map(str::to_string)
                .chain([MARKER.to_string()])
                .collect()
        })
    } else {
        None
    };
    let Some(listed) = listed else {
        return Some(
            "it is a folder that is neither empty, nor a bundle, nor one adaptq wrote".into(),
        );
    };
    let extra: Vec<&String> = entries.iter().filter(|e| !listed.contains(e)).collect();
    if extra.is_empty() {
        None
    } else {
        let shown: Vec<&str> = extra.iter().take(5).map(|e| e.as_str()).collect();
        Some(format!(
            "it also holds {} file(s) adaptq did not write there: {}{}",
            extra.len(),
            shown.join(", "),
            if extra.len() > 5 { ", …" } else { "" }
        ))
    }
}

/// The names a bundle's manifest accounts for (itself, its shards, its side files), if the
/// manifest names adaptq as its generator.
fn bundle_listing(dir: &Path) -> Option<Vec<String>> {
    let v: serde_json::Value = serde_json::from_slice(&read_small(&dir.join(MANIFEST))?).ok()?;
    if v.pointer("/generator/name").and_then(|n| n.as_str()) != Some("adaptq") {
        return None;
    }
    let names = |key: &str| -> Vec<String> {
        v.get(key)
            .and_then(|a| a.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.get("file").and_then(|f| f.as_str()))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut all = names("shards");
    all.extend(names("files"));
    all.push(MANIFEST.to_string());
    Some(all)
}

/// A small regular file's bytes (manifests and markers); `None` for anything else.
fn read_small(p: &Path) -> Option<Vec<u8>> {
    // A manifest is small; anything past this bound is not one of ours.
    const MAX: u64 = 256 << 20;
    let m = std::fs::symlink_metadata(p).ok()?;
    if !m.is_file() || m.len() > MAX {
        return None;
    }
    std::fs::read(p).ok()
}

/// Entry names of `dir`, sorted.
fn list(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        v.push(e?.file_name().to_string_lossy().into_owned());
    }
    v.sort();
    Ok(v)
}

impl Staged {
    /// Starts building `target`: checks that it may be replaced (so a refusal comes before the
    /// work, not after), clears stale staging left by killed runs, and names the temporary
    /// path. For a folder the temporary folder is created; for a file only named.
    pub fn new(target: &Path, force: bool, kind: Kind) -> Result<Staged> {
        let folder = matches!(kind, Kind::Folder);
        Self::beside(target, force, folder, "", Some(kind))
    }

    /// A scratch folder beside `target` for intermediate results (`.NAME.partial-PID-work`),
    /// removed when dropped; it is never committed.
    pub fn scratch(target: &Path) -> Result<Staged> {
        Self::beside(target, false, true, "-work", None)
    }

    /// Sweeps stale staging beside `target` (which may put an interrupted swap's old result
    /// back), then checks the target against `kind` if given, then creates and locks the
    /// staging entry.
    fn beside(
        target: &Path,
        force: bool,
        folder: bool,
        suffix: &str,
        kind: Option<Kind>,
    ) -> Result<Staged> {
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
        if let Some(kind) = kind {
            check_replaceable(target, force, kind)?;
        }
        let tmp = parent.join(format!(".{name}.partial-{}{suffix}", std::process::id()));
        // Left by a dead run of the same id, or held by a live one with the same id in another
        // PID namespace: only the former may be removed.
        if std::fs::symlink_metadata(&tmp).is_ok() {
            if unheld(&tmp).is_none() {
                return Err(BundleError::Invalid(format!(
                    "{} is held by another running adaptq",
                    tmp.display()
                )));
            }
            remove_any(&tmp);
        }
        let lock = if folder {
            std::fs::create_dir(&tmp).map_err(crate::io_err(&tmp))?;
            std::fs::File::open(&tmp).map_err(crate::io_err(&tmp))?
        } else {
            // Created (empty) here so it can be locked; the caller's File::create truncates the
            // same file, which keeps the lock.
            std::fs::File::create(&tmp).map_err(crate::io_err(&tmp))?
        };
        lock.try_lock().map_err(|e| {
            BundleError::Invalid(format!("{}: cannot lock the staging: {e}", tmp.display()))
        })?;
        Ok(Staged {
            target: target.to_path_buf(),
            tmp,
            folder,
            force,
            committed: false,
            lock: Some(lock),
        })
    }

    /// Writes [`MARKER`] listing the staging folder's entries, so a later forced run may replace
    /// this folder (and only while it holds nothing else). For folders that are not bundles.
    pub fn mark(&self) -> Result<()> {
        let mut names = list(&self.tmp).map_err(crate::io_err(&self.tmp))?;
        names.retain(|n| n != MARKER);
        let mut text = names.join("\n");
        text.push('\n');
        let p = self.tmp.join(MARKER);
        std::fs::write(&p, text).map_err(crate::io_err(&p))
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
        self.lock = None;
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
    match std::fs::rename(&old, new) {
        // Another run's sweep already removed the old folder: nothing left to do.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r.map_err(crate::io_err(new)),
    }
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

/// Clears what runs that no longer hold their lock left beside `target` (named `name` in
/// `parent`): `.NAME.partial-PID` and `-work` entries are removed; a `-old` folder (the previous
/// result, moved aside by a swap that was cut short) is put back when the target is missing,
/// and removed otherwise. Only names of exactly these forms are touched: adaptq is the only
/// writer of them.
fn sweep_stale(parent: &Path, name: &str) {
    let prefix = format!(".{name}.partial-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let mut olds = Vec::new();
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(rest) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else {
            continue;
        };
        let (digits, old) = match rest.strip_suffix("-old") {
            Some(d) => (d, true),
            None => (rest.strip_suffix("-work").unwrap_or(rest), false),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if old {
            olds.push((e.path(), parent.join(format!("{prefix}{digits}"))));
        } else if let Some(_held) = unheld(&e.path()) {
            remove_any(&e.path());
        }
    }
    let target = parent.join(name);
    for (old, staging) in olds {
        // Its run is alive while it holds its staging; then the swap is still in progress.
        if std::fs::symlink_metadata(&staging).is_ok() && unheld(&staging).is_none() {
            continue;
        }
        if std::fs::symlink_metadata(&target).is_err() {
            let _ = std::fs::rename(&old, &target);
        } else {
            remove_any(&old);
        }
    }
}

/// The staging entry at `p`, locked by us, if no live run holds its lock.
fn unheld(p: &Path) -> Option<std::fs::File> {
    let f = std::fs::File::open(p).ok()?;
    f.try_lock().ok()?;
    Some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOLDER: Kind<'static> = Kind::Folder;

    fn bundle_like(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join(MANIFEST),
            r#"{"generator": {"name": "adaptq", "version": "0"},
                "shards": [{"file": "shard-00000.bin"}], "files": []}"#,
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
                std::fs::write(out.join(MARKER), b"shard-00000.bin\n").unwrap();
            } else {
                bundle_like(&out);
            }
            std::fs::write(out.join("shard-00000.bin"), b"old").unwrap();
            let s = Staged::new(&out, true, FOLDER).unwrap();
            std::fs::write(s.path().join("new.bin"), b"new").unwrap();
            s.commit(FOLDER).unwrap();
            assert!(out.join("new.bin").exists() && !out.join("shard-00000.bin").exists());
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
    fn unlocked_staging_is_swept_and_locked_or_foreign_names_kept() {
        let t = tempfile::tempdir().unwrap();
        let dead = t.path().join(".b.partial-4294967295");
        let dead_work = t.path().join(".b.partial-4294967293-work");
        let held = t.path().join(".b.partial-4294967292");
        let foreign = t.path().join(".b.partial-notes");
        let other = t.path().join(".c.partial-4294967295");
        for d in [&dead, &dead_work, &held, &foreign, &other] {
            bundle_like(d);
        }
        // Another run (here: another open file description) holds its staging.
        let lock = std::fs::File::open(&held).unwrap();
        lock.try_lock().unwrap();
        let s = Staged::new(&t.path().join("b"), false, FOLDER).unwrap();
        let live = t.path().join(format!(".b.partial-{}", std::process::id()));
        assert_eq!(s.path(), live.as_path());
        assert!(!dead.exists() && !dead_work.exists());
        assert!(held.exists() && foreign.exists() && other.exists());
        // Our own staging is locked against other runs' sweeps.
        assert!(unheld(&live).is_none());
        drop(s);
        assert!(!live.exists(), "dropped staging is removed");
    }

    #[test]
    fn a_swap_cut_short_gets_its_old_folder_back() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("b");
        let old = t.path().join(".b.partial-4294967295-old");
        bundle_like(&old);
        std::fs::write(old.join("shard-00000.bin"), b"old").unwrap();
        let s = Staged::new(&out, true, FOLDER).unwrap();
        assert!(out.join("shard-00000.bin").exists(), "old bundle put back");
        assert!(!old.exists());
        drop(s);
        // With the target present, a stale moved-aside folder is just removed.
        bundle_like(&old);
        let _s = Staged::new(&out, true, FOLDER).unwrap();
        assert!(!old.exists() && out.join("shard-00000.bin").exists());
    }

    #[test]
    fn a_bundle_or_export_holding_user_files_is_not_replaced() {
        let t = tempfile::tempdir().unwrap();
        let b = t.path().join("b");
        std::fs::create_dir(&b).unwrap();
        std::fs::write(
            b.join(MANIFEST),
            r#"{"generator": {"name": "adaptq"}, "shards": [{"file": "shard-00000.bin"}],
                "files": [{"file": "model.meta"}]}"#,
        )
        .unwrap();
        std::fs::write(b.join("shard-00000.bin"), b"x").unwrap();
        std::fs::write(b.join("model.meta"), b"{}").unwrap();
        assert!(check_replaceable(&b, true, FOLDER).is_ok());
        std::fs::write(b.join("eval-notes.txt"), b"mine").unwrap();
        let e = check_replaceable(&b, true, FOLDER)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("eval-notes.txt"), "{e}");

        let out = t.path().join("hf");
        let s = Staged::new(&out, false, FOLDER).unwrap();
        std::fs::write(s.path().join("config.json"), b"{}").unwrap();
        s.mark().unwrap();
        s.commit(FOLDER).unwrap();
        assert!(check_replaceable(&out, true, FOLDER).is_ok());
        std::fs::write(out.join("README.md"), b"my notes").unwrap();
        assert!(check_replaceable(&out, true, FOLDER).is_err());
    }
}
