//! The seeded mutation engine of the readers' mutation tests (`crates/source/tests/mutation.rs`,
//! `crates/loader/tests/mutation.rs`): byte- and JSON-level mutation operators, an allocator
//! that refuses single requests above [`ALLOC_LIMIT`], and [`run`], which runs the cases in a
//! child process and reports the failing seeds.
//!
//! A test binary installs the allocator itself (`#[global_allocator] static A: Capped = Capped;`)
//! and names each case `<reader>:<seed>`; `ADAPTQ_MUTATION_CASE=<reader>:<seed>` reruns one
//! case uncaught, with its backtrace.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::io::Write as _;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Once;
use std::time::Instant;

/// SplitMix64 from fixed seeds: every case is reproducible from its seed.
pub use adaptq_quant::rng::Rng;

/// The issue's memory bound: no input may make a reader ask for more than 2 GiB at once.
pub const ALLOC_LIMIT: usize = 2 << 30;

thread_local! {
    /// The case running on this thread, named when an allocation is refused.
    static CASE: Cell<(&'static str, u64)> = const { Cell::new(("", 0)) };
    /// Set while a case runs: its panic is recorded instead of printed.
    static QUIET: Cell<bool> = const { Cell::new(false) };
    static LAST: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The system allocator, refusing single requests above `LIMIT` bytes ([`ALLOC_LIMIT`]
/// unless a test names a tighter bound). A refusal aborts the process (that is what an
/// out-of-memory does to a reader too), so it first names the case, formatted without
/// allocating.
pub struct Capped<const LIMIT: usize = ALLOC_LIMIT>;

fn refused(size: usize, limit: usize) {
    let mut msg = Fixed([0; 256], 0);
    let (reader, seed) = CASE.try_with(Cell::get).unwrap_or(("?", 0));
    let _ = write!(
        msg,
        "\nmutation test: refused an allocation of {size} bytes (limit {limit}) in \
         reader '{reader}', seed {seed:#018x}; rerun with ADAPTQ_MUTATION_CASE={reader}:{seed:#x}\n"
    );
    let _ = std::io::stderr().write_all(&msg.0[..msg.1]);
}

struct Fixed([u8; 256], usize);
impl std::fmt::Write for Fixed {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.0.len() - self.1);
        self.0[self.1..self.1 + n].copy_from_slice(&s.as_bytes()[..n]);
        self.1 += n;
        Ok(())
    }
}

impl<const LIMIT: usize> Capped<LIMIT> {
    /// Whether a request of `size` bytes must be refused (after naming the case).
    fn refuses(size: usize) -> bool {
        if size > LIMIT {
            refused(size, LIMIT);
        }
        size > LIMIT
    }
}

unsafe impl<const LIMIT: usize> GlobalAlloc for Capped<LIMIT> {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if Self::refuses(l.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if Self::refuses(l.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if Self::refuses(new) {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(p, l, new) }
    }
}

fn install_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let prev = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if QUIET.with(Cell::get) {
                let msg = info.payload_as_str().unwrap_or("(non-string panic)");
                let at = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                // The innermost adaptq frame outside this harness: the site in std says little.
                let bt = std::backtrace::Backtrace::force_capture().to_string();
                let inner = bt
                    .lines()
                    .filter_map(|l| l.trim().split_once(": ").map(|x| x.1))
                    .find(|f| f.starts_with("adaptq_") && !f.starts_with("adaptq_testutil"))
                    .map(|f| format!(" in {f}"))
                    .unwrap_or_default();
                LAST.with(|s| *s.borrow_mut() = Some(format!("{msg} at {at}{inner}")));
            } else {
                prev(info)
            }
        }));
    });
}

pub struct Report {
    pub reader: &'static str,
    pub ran: usize,
    /// Inputs the reader accepted (so the checks after parsing ran on them too).
    pub accepted: usize,
    /// (seed, mutations applied, panic site and message).
    pub panics: Vec<(u64, String, String)>,
}

impl Report {
    /// The first failing seeds, grouped by panic site, for the assertion message.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{}: {} of {} inputs panicked\n",
            self.reader,
            self.panics.len(),
            self.ran
        );
        for (seed, muts, msg) in self.panics.iter().take(8) {
            let msg: String = msg.chars().take(400).collect();
            let _ = writeln!(
                s,
                "  ADAPTQ_MUTATION_CASE={}:{seed:#x}  [{muts}]\n      {msg}",
                self.reader
            );
        }
        s
    }
}

/// Runs `n` cases of `reader`: case `i` builds its input from a generator seeded by
/// (`base`, `i`) and hands it to `check`, which must not panic and says whether the reader
/// accepted the input.
///
/// The cases run in a child process (this test binary again, filtered to `test`): an
/// input that aborts the process (a refused allocation, a stack overflow) is then reported
/// like a panic, and the cases after it still run.
pub fn run<T>(
    reader: &'static str,
    test: &str,
    n: usize,
    base: u64,
    make: impl Fn(&mut Rng, &mut String) -> T,
    check: impl Fn(&T) -> bool,
) -> Report {
    install_hook();
    let seeds: Vec<u64> = (0..n as u64)
        .map(|i| Rng(base ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03)).next())
        .collect();
    let mut report = Report {
        reader,
        ran: 0,
        accepted: 0,
        panics: Vec::new(),
    };
    if let Ok(case) = std::env::var("ADAPTQ_MUTATION_CASE") {
        // One case, uncaught, so its panic prints with a backtrace.
        let (r, s) = case
            .split_once(':')
            .expect("ADAPTQ_MUTATION_CASE=<reader>:<seed>");
        if r == reader {
            let seed = parse_seed(s);
            let mut log = String::new();
            let input = make(&mut Rng(seed), &mut log);
            eprintln!("{reader} {seed:#x}: {log}");
            CASE.with(|c| c.set((reader, seed)));
            eprintln!("accepted: {}", check(&input));
            report.ran = 1;
        }
        return report;
    }
    if std::env::var("ADAPTQ_MUTATION_CHILD").as_deref() == Ok(reader) {
        let from: usize = std::env::var("ADAPTQ_MUTATION_FROM")
            .ok()
            .and_then(|f| f.parse().ok())
            .unwrap_or(0);
        let mut err = std::io::stderr();
        let mut accepted = 0;
        for (i, &seed) in seeds.iter().enumerate().skip(from) {
            let _ = writeln!(err, "MUTATION-START {i}");
            let mut log = String::new();
            let input = make(&mut Rng(seed), &mut log);
            CASE.with(|c| c.set((reader, seed)));
            QUIET.with(|q| q.set(true));
            let r = panic::catch_unwind(AssertUnwindSafe(|| check(&input)));
            QUIET.with(|q| q.set(false));
            if let Ok(ok) = r {
                accepted += ok as usize;
            } else {
                let msg = LAST.with(|s| s.borrow_mut().take()).unwrap_or_default();
                let _ = writeln!(
                    err,
                    "MUTATION-PANIC\t{i}\t{}\t{}",
                    log.escape_debug(),
                    msg.escape_debug()
                );
            }
        }
        let _ = writeln!(err, "MUTATION-DONE {accepted}");
        // The parent reports; this process only ran the cases.
        return report;
    }
    let t = Instant::now();
    let mut from = 0;
    let mut deaths = 0;
    loop {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env("ADAPTQ_MUTATION_CHILD", reader)
            .env("ADAPTQ_MUTATION_FROM", from.to_string())
            .output()
            .expect("re-run the test binary");
        let err = String::from_utf8_lossy(&out.stderr);
        let (mut last, mut done) = (None, false);
        let mut other = Vec::new();
        for line in err.lines() {
            if let Some(i) = line.strip_prefix("MUTATION-START ") {
                last = i.parse::<usize>().ok();
            } else if let Some(p) = line.strip_prefix("MUTATION-PANIC\t") {
                let f: Vec<&str> = p.splitn(3, '\t').collect();
                let i: usize = f[0].parse().unwrap();
                report.panics.push((
                    seeds[i],
                    f[1].to_string(),
                    f.get(2).unwrap_or(&"").to_string(),
                ));
            } else if let Some(a) = line.strip_prefix("MUTATION-DONE ") {
                report.accepted += a.parse::<usize>().unwrap_or(0);
                done = true;
            } else if !line.trim().is_empty() {
                other.push(line);
            }
        }
        report.ran = last.map_or(from, |i| i + 1);
        if done {
            break;
        }
        let Some(i) = last else {
            panic!(
                "the mutation child for {reader} did not start: {}\n{err}",
                out.status
            );
        };
        // What it said before dying, less the backtrace.
        let said: Vec<&str> = other
            .iter()
            .map(|l| l.trim())
            .filter(|l| {
                !(l.starts_with("note:")
                    || l.starts_with("stack backtrace")
                    || l.split_once(':')
                        .is_some_and(|(n, _)| n.parse::<u32>().is_ok()))
            })
            .collect();
        let tail = said[said.len().saturating_sub(3)..].join(" | ");
        report.panics.push((
            seeds[i],
            "(see ADAPTQ_MUTATION_CASE)".into(),
            format!("process died ({}): {tail}", out.status),
        ));
        deaths += 1;
        from = i + 1;
        if from >= n || deaths >= 8 {
            break;
        }
    }
    eprintln!(
        "mutation {reader}: {} inputs, {} accepted, {} failing, {:.2?}",
        report.ran,
        report.accepted,
        report.panics.len(),
        t.elapsed()
    );
    report
}

fn parse_seed(s: &str) -> u64 {
    let s = s.trim();
    s.strip_prefix("0x")
        .map(|h| u64::from_str_radix(h, 16))
        .unwrap_or_else(|| s.parse())
        .expect("ADAPTQ_MUTATION_CASE=<reader>:<seed>")
}

/// Values that sit on the edges of the integer widths and of the size checks.
pub const BOUNDARY: [u64; 16] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0xffff,
    1 << 31,
    (1 << 31) - 1,
    u32::MAX as u64,
    1 << 32,
    1 << 61,
    1 << 62,
    1 << 63,
    u64::MAX - 1,
    u64::MAX,
];

/// Applies 1 to 4 random byte-level mutations; `fields` lists (offset, width) of the
/// format's integer fields, which get boundary values.
pub fn mutate_bytes(b: &mut Vec<u8>, fields: &[(usize, usize)], rng: &mut Rng, log: &mut String) {
    for _ in 0..1 + rng.below(4) {
        let len = b.len();
        let at = rng.below(len.max(1));
        let op = rng.below(if fields.is_empty() { 9 } else { 12 });
        let _ = write!(log, "{op}@{at} ");
        match op {
            0 if len > 0 => b[at] ^= 1 << rng.below(8),
            1 if len > 0 => b[at] = *rng.pick(&[0x00, 0xff, 0x7f, 0x80]),
            2 if len > 0 => b[at] = rng.next() as u8,
            3 if len >= 4 => {
                let at = rng.below(len - 3);
                let v = *rng.pick(&BOUNDARY) as u32;
                b[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            4 if len >= 8 => {
                let at = rng.below(len - 7);
                let v = *rng.pick(&BOUNDARY);
                b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            5 => {
                let n = 1 + rng.below(64);
                let ins: Vec<u8> = if len > 0 && rng.below(2) == 0 {
                    let s = rng.below(len);
                    b[s..(s + n).min(len)].to_vec()
                } else {
                    (0..n).map(|_| rng.next() as u8).collect()
                };
                b.splice(at.min(len)..at.min(len), ins);
            }
            6 if len > 0 => {
                let e = (at + 1 + rng.below(64)).min(len);
                b.drain(at..e);
            }
            7 => b.truncate(at),
            8 if len > 0 => {
                let e = (at + 1 + rng.below(256)).min(len);
                let chunk = b[at..e].to_vec();
                let p = rng.below(len + 1);
                b.splice(p..p, chunk);
            }
            9..=11 => {
                let (off, w) = *rng.pick(fields);
                let v = *rng.pick(&BOUNDARY);
                if off + w <= len {
                    b[off..off + w].copy_from_slice(&v.to_le_bytes()[..w]);
                }
            }
            _ => {}
        }
    }
}

/// (start, end, is_string) of every string and number token of a JSON text.
fn json_tokens(t: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < t.len() {
        match t[i] {
            b'"' => {
                let mut j = i + 1;
                while j < t.len() && t[j] != b'"' {
                    j += if t[j] == b'\\' { 2 } else { 1 };
                }
                let end = (j + 1).min(t.len());
                out.push((i, end, true));
                i = end;
            }
            b'-' | b'0'..=b'9' => {
                let mut j = i + 1;
                while j < t.len() && matches!(t[j], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
                {
                    j += 1;
                }
                out.push((i, j, false));
                i = j;
            }
            _ => i += 1,
        }
    }
    out
}

const NUMBERS: [&str; 22] = [
    "0",
    "1",
    "-1",
    "2",
    "3",
    "17",
    "255",
    "256",
    "65536",
    "2147483648",
    "4294967295",
    "4294967296",
    "2305843009213693952",
    "4611686018427387904",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "1e400",
    "1.5",
    "-0",
    "123456789012345678901234567890",
];

const STRINGS: [&str; 18] = [
    r#""""#,
    r#""../x""#,
    r#""../../../../tmp/evil""#,
    r#""/etc/passwd""#,
    r#""a\\b""#,
    r#""C:x""#,
    r#"".hidden""#,
    r#""a\u0000b""#,
    r#""a\nb""#,
    r#""\ud800""#,
    r#""é""#,
    r#""shard-00000.bin""#,
    r#""shard-99999.bin""#,
    r#""rans""#,
    r#""F32""#,
    r#""I64""#,
    r#""codes""#,
    r#""codebook""#,
];

const VALUES: [&str; 10] = [
    "null",
    "true",
    "{}",
    "[]",
    "[0]",
    "[1,2]",
    "[0,0,0]",
    r#"{"a":1}"#,
    r#"[[1]]"#,
    r#""x""#,
];

/// Applies 1 to 3 JSON-aware mutations: numbers and strings set to boundary values and
/// hostile names, tokens dropped, duplicated or swapped, structure broken or nested deeply.
pub fn json_mutate(text: &mut Vec<u8>, rng: &mut Rng, log: &mut String) {
    for _ in 0..1 + rng.below(3) {
        let toks = json_tokens(text);
        let op = rng.below(12);
        let _ = write!(log, "j{op} ");
        let num: Vec<_> = toks.iter().filter(|t| !t.2).collect();
        let strs: Vec<_> = toks.iter().filter(|t| t.2).collect();
        let splice = |text: &mut Vec<u8>, (s, e): (usize, usize), with: &[u8]| {
            text.splice(s..e, with.iter().copied());
        };
        match op {
            0..=2 if !num.is_empty() => {
                let &&(s, e, _) = rng.pick(&num);
                splice(text, (s, e), rng.pick(&NUMBERS).as_bytes());
            }
            3 | 4 if !strs.is_empty() => {
                let &&(s, e, _) = rng.pick(&strs);
                if rng.below(8) == 0 {
                    let long = format!("\"{}\"", "x".repeat(1 + rng.below(5000)));
                    splice(text, (s, e), long.as_bytes());
                } else {
                    splice(text, (s, e), rng.pick(&STRINGS).as_bytes());
                }
            }
            5 if !toks.is_empty() => {
                let &(s, e, _) = rng.pick(&toks);
                splice(text, (s, e), rng.pick(&VALUES).as_bytes());
            }
            6 if !toks.is_empty() => {
                let &(s, e, _) = rng.pick(&toks);
                splice(text, (s, e), b"");
            }
            7 if toks.len() >= 2 => {
                // Duplicate a run of tokens (a key with its value, a whole entry).
                let a = rng.below(toks.len());
                let b = (a + 1 + rng.below(8)).min(toks.len() - 1);
                let chunk = text[toks[a].0..toks[b].1].to_vec();
                let at = toks[b].1;
                let mut ins = b", ".to_vec();
                ins.extend(chunk);
                text.splice(at..at, ins);
            }
            8 if toks.len() >= 2 => {
                let a = *rng.pick(&toks);
                let b = *rng.pick(&toks);
                let (x, y) = if a.0 < b.0 { (a, b) } else { (b, a) };
                if x.1 <= y.0 {
                    let (xs, ys) = (text[x.0..x.1].to_vec(), text[y.0..y.1].to_vec());
                    text.splice(y.0..y.1, xs);
                    text.splice(x.0..x.1, ys);
                }
            }
            9 => {
                let at = rng.below(text.len() + 1);
                let s = *rng.pick(&["{", "}", "[", "]", ",", ":", "\"", "\\", "null", "\u{0}"]);
                text.splice(at..at, s.bytes());
            }
            10 if !toks.is_empty() => {
                let &(s, e, _) = rng.pick(&toks);
                let d = *rng.pick(&[64usize, 127, 128, 129, 4000]);
                let deep = format!("{}{}", "[".repeat(d), "]".repeat(d));
                splice(text, (s, e), deep.as_bytes());
            }
            _ => mutate_bytes(text, &[], rng, log),
        }
    }
}

/// Fails with the first panicking seeds of every reader.
pub fn finish(reports: &[Report]) {
    let bad: Vec<String> = reports
        .iter()
        .filter(|r| !r.panics.is_empty())
        .map(Report::describe)
        .collect();
    assert!(
        bad.is_empty(),
        "readers panicked on hostile input:\n{}",
        bad.join("\n")
    );
}

/// Writes one seed file of a fuzz target: `put(target, name, bytes)` stores `bytes` as
/// `<ADAPTQ_FUZZ_SEEDS>/<target>/<name>` (`scripts/fuzz.sh` sets the folder and runs the
/// tests' ignored `write_fuzz_seeds`).
pub fn fuzz_seed_writer() -> impl Fn(&str, &str, &[u8]) {
    let root = PathBuf::from(std::env::var_os("ADAPTQ_FUZZ_SEEDS").expect("ADAPTQ_FUZZ_SEEDS"));
    move |target, name, bytes| {
        let d = root.join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), bytes).unwrap();
    }
}
