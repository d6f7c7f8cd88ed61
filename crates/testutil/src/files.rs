//! Folders and special files as tests look at them: the sorted names in a folder, two folders
//! compared byte for byte, what a run left hidden, every file below a folder, and FIFOs; plus
//! [`within`], which fails a test whose reader blocks instead of hanging the suite.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The names in `dir`, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Asserts that `a` and `b` hold the same names with byte-identical contents (a deterministic
/// run twice); returns the names.
pub fn assert_same(a: &Path, b: &Path) -> Vec<String> {
    let names = names(a);
    assert_eq!(names, self::names(b), "different files");
    for n in &names {
        assert!(
            std::fs::read(a.join(n)).unwrap() == std::fs::read(b.join(n)).unwrap(),
            "{n} differs between identical runs"
        );
    }
    names
}

/// Asserts that `dir` holds no hidden entry (staging, scratch or moved-aside folders).
pub fn assert_none_hidden(dir: &Path) {
    let left: Vec<String> = names(dir)
        .into_iter()
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Every file below `dir` (none when it does not exist).
pub fn under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The files below `dir` whose bytes contain `needle`.
pub fn containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    under(dir)
        .into_iter()
        .filter(|p| {
            std::fs::read(p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
        })
        .collect()
}

/// Makes a FIFO at `p` (a reader that opens it without care blocks forever).
#[cfg(unix)]
pub fn mkfifo(p: &Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(p)
        .status()
        .expect("mkfifo runs")
        .success();
    assert!(ok, "mkfifo {}", p.display());
}

/// Two files that are not regular files, their folders made: `zero` a link to `/dev/zero`
/// (endless bytes), `fifo` a FIFO (a read that blocks); for tests that readers refuse both.
#[cfg(unix)]
pub fn zero_and_fifo(zero: &Path, fifo: &Path) {
    for p in [zero, fifo] {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).unwrap();
        }
    }
    std::os::unix::fs::symlink("/dev/zero", zero).unwrap();
    mkfifo(fifo);
}

/// Runs `f` on its own thread and fails the test if it has not returned within `secs`
/// seconds (a reader blocked on a FIFO), instead of hanging the suite.
pub fn within<T: Send + 'static>(
    what: &str,
    secs: u64,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} did not finish within {secs} s (blocked?)"))
}
