//! Seeded mutation test of the no_std bundle loader: the manifest and its layout check
//! ([`Loader::new`]), shards fed in hostile pieces ([`Loader::feed`]) and the tensors they
//! decode to, the rANS decoder and the codebook decoder. Thousands of damaged variants of
//! valid inputs must each give `Ok`/`Err` (`Some`/`None`): never a panic, never an allocation
//! above 2 GiB.
//!
//! Manifests are re-hashed after each mutation (the global digest over the shard list, then
//! `manifest_digest`), and mutated shards get their hashes recomputed, so the checks behind
//! the digests run on hostile values instead of stopping at the first hash. Deterministic
//! (SplitMix64 from fixed seeds); `ADAPTQ_MUTATION_CASE=<reader>:<seed>` reruns one case
//! uncaught. The libFuzzer targets in `fuzz/` search the same entry points open-endedly.

use adaptq_bundle::manifest::SourceRef;
use adaptq_bundle::{blake3_hex, sha256_hex, BundleWriter, Encoding, WriterOptions};
use adaptq_loader::codebook::{self, StageRef};
use adaptq_loader::{manifest_digest, rans, shard_list_digest, Loader};
use adaptq_quant::Grid;
use harness::{json_mutate, mutate_bytes, run, Report, Rng, BOUNDARY};
use serde_json::Value;
use std::sync::OnceLock;

#[global_allocator]
static ALLOC: harness::Capped = harness::Capped;

/// The mutation engine. The source crate's `tests/mutation.rs` carries the same module: the two
/// crates share no test-only dependency, and this is test code.
mod harness {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::{Cell, RefCell};
    use std::fmt::Write as _;
    use std::io::Write as _;
    use std::panic::{self, AssertUnwindSafe};
    use std::sync::Once;
    use std::time::Instant;

    /// The issue's memory bound: no input may make a reader ask for more than 2 GiB at once.
    pub const ALLOC_LIMIT: usize = 2 << 30;

    /// SplitMix64: small, seedable and identical on every platform.
    pub struct Rng(pub u64);
    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// Uniform in `0..n` (0 when `n == 0`).
        pub fn below(&mut self, n: usize) -> usize {
            if n == 0 {
                0
            } else {
                (self.next() % n as u64) as usize
            }
        }
        pub fn pick<'a, T>(&mut self, s: &'a [T]) -> &'a T {
            &s[self.below(s.len())]
        }
    }

    thread_local! {
        /// The case running on this thread, named when an allocation is refused.
        static CASE: Cell<(&'static str, u64)> = const { Cell::new(("", 0)) };
        /// Set while a case runs: its panic is recorded instead of printed.
        static QUIET: Cell<bool> = const { Cell::new(false) };
        static LAST: RefCell<Option<String>> = const { RefCell::new(None) };
    }

    /// The system allocator, refusing single requests above [`ALLOC_LIMIT`]. A refusal aborts
    /// the process (that is what an out-of-memory does to a reader too), so it first names the
    /// case, formatted without allocating.
    pub struct Capped;

    fn refused(size: usize) {
        let mut msg = Fixed([0; 256], 0);
        let (reader, seed) = CASE.try_with(Cell::get).unwrap_or(("?", 0));
        let _ = write!(
            msg,
            "\nmutation test: refused an allocation of {size} bytes (limit {ALLOC_LIMIT}) in \
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

    unsafe impl GlobalAlloc for Capped {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            if l.size() > ALLOC_LIMIT {
                refused(l.size());
                return std::ptr::null_mut();
            }
            unsafe { System.alloc(l) }
        }
        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            if l.size() > ALLOC_LIMIT {
                refused(l.size());
                return std::ptr::null_mut();
            }
            unsafe { System.alloc_zeroed(l) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            unsafe { System.dealloc(p, l) }
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            if new > ALLOC_LIMIT {
                refused(new);
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
                    // The innermost adaptq frame: the site in std says little.
                    let bt = std::backtrace::Backtrace::force_capture().to_string();
                    let inner = bt
                        .lines()
                        .filter_map(|l| l.trim().split_once(": ").map(|x| x.1))
                        .find(|f| f.starts_with("adaptq_"))
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
    pub fn mutate_bytes(
        b: &mut Vec<u8>,
        fields: &[(usize, usize)],
        rng: &mut Rng,
        log: &mut String,
    ) {
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
                    while j < t.len()
                        && matches!(t[j], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
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
}

/// A bundle as the loader receives it: manifest text and (file, bytes) shards.
#[derive(Clone)]
struct Bundle {
    manifest: String,
    shards: Vec<(String, Vec<u8>)>,
}

/// Skewed codes (mostly the middle of the range), so the lossless stage codes them.
fn skewed(n: usize, bits: u8, seed: u64) -> Vec<u16> {
    let mut r = Rng(seed);
    let k = 1u64 << bits;
    (0..n)
        .map(|_| {
            let v = if r.below(4) == 0 { r.next() % k } else { k / 2 };
            v as u16
        })
        .collect()
}

fn f16s(n: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed);
    (0..n)
        .flat_map(|_| half::f16::from_f32((r.below(2000) as f32 - 1000.0) / 1000.0).to_le_bytes())
        .collect()
}

/// Every encoding the loader knows (int grids symmetric and asymmetric, per group and per
/// channel, a two-stage codebook, f16, f32, raw, GGML blocks) over 512-byte shards, with the
/// lossless stage on; and a small plain one.
fn bundles() -> &'static [Bundle] {
    static B: OnceLock<Vec<Bundle>> = OnceLock::new();
    B.get_or_init(|| vec![build(512, true, true), build(1024, false, false)])
}

fn build(shard: u64, lossless: bool, all: bool) -> Bundle {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("b");
    let mut w = BundleWriter::create(
        &d,
        WriterOptions {
            shard_max_bytes: shard,
            force: false,
            lossless,
        },
    )
    .unwrap();
    let mut int = |name: &str, bits: u8, gs: usize, grid: Grid, rows: usize, cols: usize| {
        let codes: Vec<u8> = skewed(rows * cols, bits, bits as u64)
            .into_iter()
            .map(|c| c as u8)
            .collect();
        let codes = adaptq_loader::pack::pack(&codes, bits);
        let groups = rows
            * if gs == 0 || gs >= cols {
                1
            } else {
                cols.div_ceil(gs)
            };
        let scales = f16s(groups, 1);
        let mins = f16s(groups, 2);
        let mut parts: Vec<(&str, &[u8])> = vec![("codes", &codes), ("scales", &scales)];
        if grid == Grid::Asymmetric {
            parts.push(("mins", &mins));
        }
        let enc = Encoding::Int {
            bits,
            group_size: gs,
            grid,
        };
        w.add_tensor(name, &[rows, cols], "linear", "rtn", enc, &parts)
            .unwrap();
    };
    int("blk.0.attn_k.weight", 2, 32, Grid::Symmetric, 16, 64);
    if all {
        int("blk.0.attn_q.weight", 4, 32, Grid::Symmetric, 12, 96);
        int("blk.0.ffn_down.weight", 3, 0, Grid::Asymmetric, 10, 100);
        // A two-stage codebook, 64 x 40 in vectors of 4.
        let (rows, cols, dim, bits) = (64usize, 40usize, 4usize, [4u8, 2]);
        let nv = codebook::vectors_per_row(cols, dim);
        let mut parts: Vec<(&str, Vec<u8>)> = vec![
            ("row_scale", f16s(rows, 3)),
            ("row_mean", f16s(rows, 4)),
            ("col_scale", f16s(cols, 5)),
        ];
        for (s, &b) in bits.iter().enumerate() {
            parts.push((
                ["codebook0", "codebook1"][s],
                f16s((1 << b) * dim, 6 + s as u64),
            ));
            let codes = codebook::pack(&skewed(rows * nv, b, 8 + s as u64), b);
            parts.push((["codes0", "codes1"][s], codes));
        }
        let refs: Vec<(&str, &[u8])> = parts.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        let enc = Encoding::Codebook {
            dim,
            stage_bits: bits.to_vec(),
        };
        w.add_tensor(
            "blk.0.attn_v.weight",
            &[rows, cols],
            "linear",
            "novaq",
            enc,
            &refs,
        )
        .unwrap();
        let blocks: Vec<u8> = (0..2 * 34u32).map(|i| (i * 13 % 251) as u8).collect();
        let q8 = adaptq_quant::ggml::BlockType::Q8_0;
        w.add_tensor(
            "blk.1.attn_q.weight",
            &[2, 32],
            "linear",
            "rtn",
            Encoding::Ggml { ggml_type: q8 },
            &[("blocks", &blocks)],
        )
        .unwrap();
        let raw: Vec<u8> = (0..32u8).collect();
        let enc = Encoding::Raw {
            dtype: "I64".into(),
            byte_len: 32,
        };
        w.add_tensor(
            "position_ids",
            &[4],
            "other",
            "none",
            enc,
            &[("data", &raw)],
        )
        .unwrap();
    }
    w.add_tensor(
        "token_embd.weight",
        &[8, 16],
        "embedding",
        "none",
        Encoding::F16,
        &[("data", &f16s(128, 9))],
    )
    .unwrap();
    let norm: Vec<u8> = (0..16)
        .flat_map(|i| (i as f32 / 16.0).to_le_bytes())
        .collect();
    w.add_tensor(
        "output_norm.weight",
        &[16],
        "norm",
        "none",
        Encoding::F32,
        &[("data", &norm)],
    )
    .unwrap();
    w.finish(
        "t",
        SourceRef {
            locator: "file:t.gguf".into(),
            format: "gguf".into(),
            tensor_count: 8,
        },
        serde_json::json!({"seed": 0}),
    )
    .unwrap();
    let manifest = std::fs::read_to_string(d.join("manifest.json")).unwrap();
    let v: Value = serde_json::from_str(&manifest).unwrap();
    let shards = v["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let f = s["file"].as_str().unwrap().to_string();
            let b = std::fs::read(d.join(&f)).unwrap();
            (f, b)
        })
        .collect();
    Bundle { manifest, shards }
}

/// Replaces the string value after `key` (`"name": "`) in place; `None` without the key.
fn set_string(text: &str, key: &str, value: &str) -> Option<String> {
    let start = text.find(key)? + key.len();
    let end = start + text[start..].find('"')?;
    Some(format!("{}{value}{}", &text[..start], &text[end..]))
}

/// Re-hashes a manifest the way the writer does: the global digest over whatever shard list
/// it now holds, then its own digest, so only the checks after the digests can refuse it.
fn rehash(text: &str) -> String {
    let mut t = text.to_string();
    let v: Option<Value> = serde_json::from_str(text).ok();
    let list: Option<Vec<(&str, u64, &str, &str)>> = v
        .as_ref()
        .and_then(|v| v.get("shards")?.as_array())
        .and_then(|sh| {
            sh.iter()
                .map(|s| {
                    Some((
                        s.get("file")?.as_str()?,
                        s.get("bytes")?.as_u64()?,
                        s.get("sha256")?.as_str()?,
                        s.get("blake3")?.as_str()?,
                    ))
                })
                .collect()
        });
    if let Some(list) = list {
        let g = shard_list_digest(list);
        t = set_string(&t, "\"global_digest\": \"", &g).unwrap_or(t);
    }
    if let Some(d) = manifest_digest(&t) {
        t = set_string(&t, "\"manifest_digest\": \"", &d).unwrap_or(t);
    }
    t
}

/// JSON pointers of every value in `v`, the root excluded.
fn pointers(v: &Value, at: &mut String, out: &mut Vec<String>) {
    let len = at.len();
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                at.push('/');
                at.push_str(&k.replace('~', "~0").replace('/', "~1"));
                out.push(at.clone());
                pointers(x, at, out);
                at.truncate(len);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                at.push_str(&format!("/{i}"));
                out.push(at.clone());
                pointers(x, at, out);
                at.truncate(len);
            }
        }
        _ => {}
    }
}

/// Sets one to three values of the manifest (a shape, a bit width, a part length, a segment,
/// a shard size, a name) to boundary or hostile values, or drops or repeats an array item.
fn value_mutate(v: &mut Value, rng: &mut Rng, log: &mut String) {
    for _ in 0..1 + rng.below(3) {
        let mut ptrs = Vec::new();
        pointers(v, &mut String::new(), &mut ptrs);
        // Mostly the tensor table and shard list: that is what the layout check reads.
        let focus: Vec<&String> = ptrs
            .iter()
            .filter(|p| p.starts_with("/tensors") || p.starts_with("/shards"))
            .collect();
        let pool: Vec<&String> = if focus.is_empty() || rng.below(8) == 0 {
            ptrs.iter().collect()
        } else {
            focus
        };
        if pool.is_empty() {
            return;
        }
        let p = rng.pick(&pool).to_string();
        let p = p.as_str();
        let op = rng.below(8);
        log.push_str(&format!("v{op}{p} "));
        let (parent, idx) = p.rsplit_once('/').unwrap();
        match op {
            0..=3 => {
                let new = match rng.below(6) {
                    0..=2 => Value::from(*rng.pick(&BOUNDARY)),
                    3 => Value::from(*rng.pick(&[-1i64, i64::MIN, 3, 9, 16, 17, 64, 65])),
                    4 => Value::from(*rng.pick(&[1.5f64, -0.0, 1e300])),
                    _ => Value::from(*rng.pick(&[
                        "../x",
                        "",
                        "shard-00000.bin",
                        "rans",
                        "zstd",
                        "codes",
                        "a\u{0}b",
                    ])),
                };
                *v.pointer_mut(p).unwrap() = new;
            }
            4 => {
                let new = rng
                    .pick(&[
                        Value::Null,
                        Value::Bool(true),
                        Value::Array(vec![]),
                        serde_json::json!({}),
                        serde_json::json!([0]),
                    ])
                    .clone();
                *v.pointer_mut(p).unwrap() = new;
            }
            5 | 6 => {
                // Drop or repeat an item of an array (a dimension, a part, a segment, a shard).
                if let Some(Value::Array(a)) = v.pointer_mut(parent) {
                    if let Ok(i) = idx.parse::<usize>() {
                        if op == 5 {
                            a.remove(i);
                        } else {
                            let x = a[i].clone();
                            a.insert(i, x);
                        }
                    }
                } else if let Some(Value::Object(m)) = v.pointer_mut(parent) {
                    if op == 5 {
                        m.remove(&idx.replace("~1", "/").replace("~0", "~"));
                    }
                }
            }
            _ => {
                // Off by one from the value it had.
                let x = v.pointer_mut(p).unwrap();
                if let Some(n) = x.as_u64() {
                    *x = Value::from(if rng.below(2) == 0 {
                        n.wrapping_add(1)
                    } else {
                        n.wrapping_sub(1)
                    });
                }
            }
        }
    }
}

/// Hands everything a verified bundle offers to the caller: each tensor packed and as f32.
/// Contract: an f32 tensor has as many values as its shape.
fn exercise(l: &Loader) {
    for name in l.tensor_names() {
        let shape = l.tensor_packed(name).ok().map(|p| p.shape);
        if let Ok(v) = l.tensor_f32(name) {
            let numel = shape.and_then(|s| s.iter().try_fold(1usize, |a, &d| a.checked_mul(d)));
            if let Some(n) = numel {
                assert_eq!(v.len(), n, "invariant: '{name}' decodes to its shape");
            }
        }
    }
}

/// The layout check, and when it passes, the bundle's own shards fed and every tensor read.
fn check_manifest(text: &[u8], b: &Bundle) -> bool {
    let Ok(mut l) = Loader::new(text) else {
        return false;
    };
    let missing: Vec<String> = l.missing().iter().map(|s| s.to_string()).collect();
    for m in &missing {
        if let Some((_, bytes)) = b.shards.iter().find(|(f, _)| f == m) {
            let _ = l.feed(m, bytes);
        }
    }
    exercise(&l);
    true
}

#[test]
fn manifest_layout_check_survives_mutated_manifests() {
    for b in bundles() {
        let mut l = Loader::new(b.manifest.as_bytes()).unwrap();
        assert_eq!(
            rehash(&b.manifest),
            b.manifest,
            "re-hashing is the writer's hashing"
        );
        for (f, s) in &b.shards {
            l.feed(f, s).unwrap();
        }
        exercise(&l);
    }
    assert!(
        bundles()[0].manifest.contains("\"lossless\""),
        "the seed bundle exercises the rANS stage"
    );
    let r = run(
        "manifest",
        "manifest_layout_check_survives_mutated_manifests",
        16000,
        0x3a41_f357,
        |rng, log| {
            let bi = rng.below(bundles().len());
            let b = &bundles()[bi];
            let text = if rng.below(2) == 0 {
                let mut t = b.manifest.clone().into_bytes();
                json_mutate(&mut t, rng, log);
                match String::from_utf8(t) {
                    Ok(s) => rehash(&s),
                    Err(e) => return (bi, e.into_bytes()),
                }
            } else {
                let mut v: Value = serde_json::from_str(&b.manifest).unwrap();
                value_mutate(&mut v, rng, log);
                rehash(&(serde_json::to_string_pretty(&v).unwrap() + "\n"))
            };
            (bi, text.into_bytes())
        },
        |(bi, text)| check_manifest(text, &bundles()[*bi]),
    );
    finish(&[r]);
}

/// A bundle whose shards were damaged after writing and re-hashed: the hashes hold, so what
/// is checked is what the loader does with hostile shard contents.
struct FeedCase {
    manifest: String,
    shards: Vec<(String, Vec<u8>)>,
    plan: u64,
}

fn feed_case(rng: &mut Rng, log: &mut String) -> FeedCase {
    let b = &bundles()[rng.below(bundles().len())];
    let mut shards = b.shards.clone();
    let mut v: Value = serde_json::from_str(&b.manifest).unwrap();
    for _ in 0..1 + rng.below(2) {
        let i = rng.below(shards.len());
        let _ = std::fmt::Write::write_fmt(log, format_args!("s{i}:"));
        let s = &mut shards[i].1;
        if s.is_empty() {
            continue;
        }
        if rng.below(5) == 0 {
            mutate_bytes(s, &[], rng, log);
        } else {
            // Same length, so segments still fit: bit flips and boundary values only.
            for _ in 0..1 + rng.below(6) {
                let at = rng.below(s.len());
                match rng.below(3) {
                    0 => s[at] ^= 1 << rng.below(8),
                    1 => s[at] = *rng.pick(&[0, 0xff, 0x7f, 0x80]),
                    _ if s.len() >= at + 8 => {
                        s[at..at + 8].copy_from_slice(&rng.pick(&BOUNDARY).to_le_bytes())
                    }
                    _ => s[at] = rng.next() as u8,
                }
            }
        }
        let e = &mut v["shards"][i];
        e["bytes"] = Value::from(s.len() as u64);
        e["sha256"] = Value::from(sha256_hex(s));
        e["blake3"] = Value::from(blake3_hex(s));
    }
    FeedCase {
        manifest: rehash(&(serde_json::to_string_pretty(&v).unwrap() + "\n")),
        shards,
        plan: rng.next(),
    }
}

/// Feeds every shard, in a random order and in random pieces, between hostile calls (unknown
/// names, a corrupt copy, bytes past the end, a repeat after verification), then reads every
/// tensor. Contract: a shard sent whole and intact after any of that is verified.
fn check_feed(c: &FeedCase) -> bool {
    let Ok(mut l) = Loader::new(c.manifest.as_bytes()) else {
        return false;
    };
    let mut rng = Rng(c.plan);
    let mut order: Vec<usize> = (0..c.shards.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    for &i in &order {
        let (name, bytes) = &c.shards[i];
        match rng.below(6) {
            0 => {
                let bad =
                    *rng.pick(&["shard-99999.bin", "../shard-00000.bin", "", "manifest.json"]);
                let _ = l.feed(bad, bytes);
            }
            1 if !bytes.is_empty() => {
                let mut bad = bytes.clone();
                let at = rng.below(bad.len());
                bad[at] ^= 0x20;
                let _ = l.feed(name, &bad);
            }
            2 => {
                let _ = l.feed(name, &[bytes.as_slice(), b"x"].concat());
            }
            _ => {}
        }
        let mut rest: &[u8] = bytes;
        loop {
            let n = (1 + rng.below(400)).min(rest.len());
            let r = l.feed(name, &rest[..n]);
            rest = &rest[n..];
            if rest.is_empty() {
                assert!(r.is_ok(), "invariant: intact {name} refused: {r:?}");
                break;
            }
        }
        if rng.below(4) == 0 {
            let _ = l.feed(name, &bytes[..bytes.len().min(3)]);
        }
    }
    assert!(
        l.is_complete(),
        "invariant: all shards sent intact, yet {:?} missing",
        l.missing()
    );
    exercise(&l);
    true
}

#[test]
fn feed_and_tensor_decode_survive_hostile_shards() {
    let r = run(
        "feed",
        "feed_and_tensor_decode_survive_hostile_shards",
        6000,
        0xfeed_0000,
        feed_case,
        check_feed,
    );
    finish(&[r]);
}

/// A rANS stream, its raw length, and (offset, width) of its header fields.
type RansSeed = (Vec<u8>, usize, Vec<(usize, usize)>);

/// Streams of widths 1 to 12 and 0 to 1000 symbols.
fn rans_seeds() -> Vec<RansSeed> {
    let mut out = Vec::new();
    for (k, bits) in [1u8, 2, 3, 4, 5, 8, 11, 12].into_iter().enumerate() {
        for n in [0usize, 1, 7, 100, 1000] {
            let packed = codebook::pack(&skewed(n, bits, k as u64 * 31 + n as u64), bits);
            let s = rans::encode(&packed, bits, n).unwrap();
            let mut fields = vec![(0, 1), (1, 8)];
            // The frequency table: one LEB128 per symbol, then the 32-bit state.
            let mut pos = 9;
            for _ in 0..(1usize << bits).min(64) {
                if n == 0 || pos >= s.len() {
                    break;
                }
                let w = s[pos..].iter().position(|b| b & 0x80 == 0).unwrap_or(0) + 1;
                fields.push((pos, w.min(4)));
                pos += w;
            }
            if n > 0 && bits <= 6 {
                fields.push((pos, 4));
            }
            out.push((s, packed.len(), fields));
        }
    }
    out
}

/// The raw length the loader would accept for this stream's header: what `packed_len` gives
/// in release builds (wrapping), so a hostile count is not stopped by a mismatched length.
fn consistent_len(s: &[u8]) -> usize {
    match s.get(1..9) {
        Some(n) => {
            let n = u64::from_le_bytes(n.try_into().unwrap()) as usize;
            n.wrapping_mul(s[0] as usize).div_ceil(8)
        }
        None => 0,
    }
}

#[test]
fn rans_decoder_survives_mutated_streams() {
    let seeds = rans_seeds();
    for (s, raw, _) in &seeds {
        assert_eq!(rans::decode(s, *raw).map(|v| v.len()), Some(*raw));
    }
    let r = run(
        "rans",
        "rans_decoder_survives_mutated_streams",
        20000,
        0x4a45_0000,
        |rng, log| {
            let (s, raw, fields) = rng.pick(&seeds);
            let mut s = s.clone();
            mutate_bytes(&mut s, fields, rng, log);
            let raw = match rng.below(8) {
                0..=3 => *raw,
                4..=6 => consistent_len(&s),
                _ => *rng.pick(&BOUNDARY) as usize,
            };
            (s, raw)
        },
        |(s, raw)| {
            let out = rans::decode(s, *raw);
            if let Some(v) = &out {
                assert_eq!(v.len(), *raw, "invariant: decodes to the recorded length");
            }
            out.is_some()
        },
    );
    finish(&[r]);
}

/// Arguments of `codebook::decode`, owned.
#[derive(Clone)]
struct Cb {
    rows: usize,
    cols: usize,
    dim: usize,
    stages: Vec<(u8, Vec<f32>, Vec<u8>)>,
    row_scale: Vec<f32>,
    row_mean: Vec<f32>,
    col_scale: Vec<f32>,
}

fn floats(n: usize, r: &mut Rng) -> Vec<f32> {
    (0..n)
        .map(|_| (r.below(2000) as f32 - 1000.0) / 500.0)
        .collect()
}

/// A valid codebook tensor of random size, 1 to 4 stages of 1 to 8 bits (rarely 12 to 16).
fn cb_valid(r: &mut Rng) -> Cb {
    let (rows, cols, dim) = (1 + r.below(6), 1 + r.below(24), 1 + r.below(6));
    let nv = codebook::vectors_per_row(cols, dim);
    let stages = (0..1 + r.below(4))
        .map(|_| {
            let bits = if r.below(16) == 0 {
                12 + r.below(5)
            } else {
                1 + r.below(8)
            } as u8;
            let codes: Vec<u16> = (0..rows * nv).map(|_| r.below(1 << bits) as u16).collect();
            (
                bits,
                floats((1 << bits) * dim, r),
                codebook::pack(&codes, bits),
            )
        })
        .collect();
    Cb {
        rows,
        cols,
        dim,
        stages,
        row_scale: floats(rows, r),
        row_mean: floats(rows, r),
        col_scale: floats(cols, r),
    }
}

fn cb_mutate(c: &mut Cb, r: &mut Rng, log: &mut String) {
    const SIZES: [usize; 8] = [0, 1, 2, 3, usize::MAX, 1 << 32, 1 << 61, usize::MAX / 2 + 1];
    for _ in 0..1 + r.below(3) {
        let op = r.below(10);
        log.push_str(&format!("c{op} "));
        let s = r.below(c.stages.len().max(1));
        match op {
            0 => c.rows = *r.pick(&SIZES),
            1 => c.cols = *r.pick(&SIZES),
            2 => c.dim = *r.pick(&SIZES),
            3 => {
                let d = *r.pick(&[1isize, -1]);
                match r.below(3) {
                    0 => c.rows = c.rows.wrapping_add_signed(d),
                    1 => c.cols = c.cols.wrapping_add_signed(d),
                    _ => c.dim = c.dim.wrapping_add_signed(d),
                }
            }
            4 if !c.stages.is_empty() => {
                c.stages[s].0 = *r.pick(&[0u8, 1, 2, 8, 15, 16, 17, 31, 32, 63, 64, 65, 128, 255]);
            }
            5 => {
                // A slice one short, one long, empty or doubled.
                let v: &mut Vec<f32> = match r.below(4) {
                    0 => &mut c.row_scale,
                    1 => &mut c.row_mean,
                    2 => &mut c.col_scale,
                    _ if !c.stages.is_empty() => &mut c.stages[s].1,
                    _ => &mut c.col_scale,
                };
                match r.below(4) {
                    0 => {
                        v.pop();
                    }
                    1 => v.push(1.0),
                    2 => v.clear(),
                    _ => v.extend(v.clone()),
                }
            }
            6 if !c.stages.is_empty() => {
                let codes = &mut c.stages[s].2;
                match r.below(3) {
                    0 => {
                        codes.pop();
                    }
                    1 => codes.push(0xff),
                    _ => codes.iter_mut().for_each(|b| *b = 0xff),
                }
            }
            7 if !c.stages.is_empty() => {
                let v = &mut c.stages[s].1;
                if !v.is_empty() {
                    let at = r.below(v.len());
                    v[at] = *r.pick(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX]);
                }
            }
            8 => {
                if r.below(2) == 0 {
                    c.stages.pop();
                } else if let Some(x) = c.stages.first().cloned() {
                    c.stages.push(x);
                }
            }
            _ => {}
        }
    }
}

#[test]
fn codebook_decoder_survives_mutated_tensors() {
    let r = run(
        "codebook",
        "codebook_decoder_survives_mutated_tensors",
        10000,
        0xc0de_b00c,
        |rng, log| {
            let mut c = cb_valid(rng);
            cb_mutate(&mut c, rng, log);
            c
        },
        |c| {
            let stages: Vec<StageRef> = c
                .stages
                .iter()
                .map(|(bits, centroids, codes)| StageRef {
                    bits: *bits,
                    centroids,
                    codes,
                })
                .collect();
            let out = codebook::decode(
                c.rows,
                c.cols,
                c.dim,
                &stages,
                &c.row_scale,
                &c.row_mean,
                &c.col_scale,
            );
            if let (Some(v), Some(n)) = (&out, c.rows.checked_mul(c.cols)) {
                assert_eq!(v.len(), n, "invariant: decodes to rows x cols");
            }
            out.is_some()
        },
    );
    finish(&[r]);
}

/// Writes valid inputs as seed corpora of the fuzz targets, into the folder named by
/// `ADAPTQ_FUZZ_SEEDS` (`scripts/fuzz.sh` runs this): real manifests, whole bundles in the
/// feed target's layout (manifest, NUL, shards), rANS streams and codebook tensors in the
/// codebook target's layout.
#[test]
#[ignore = "writes fuzz seeds; run by scripts/fuzz.sh"]
fn write_fuzz_seeds() {
    let root =
        std::path::PathBuf::from(std::env::var_os("ADAPTQ_FUZZ_SEEDS").expect("ADAPTQ_FUZZ_SEEDS"));
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let d = root.join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), bytes).unwrap();
    };
    for (i, b) in bundles().iter().enumerate() {
        put(
            "manifest",
            &format!("bundle{i}.json"),
            b.manifest.as_bytes(),
        );
        let mut whole = b.manifest.clone().into_bytes();
        whole.push(0);
        for (_, s) in &b.shards {
            whole.extend(s);
        }
        // Piece sizes for the feed target: 1 + 37 x byte.
        whole.extend([3, 0, 200, 7]);
        put("feed", &format!("bundle{i}.bin"), &whole);
    }
    for (i, (s, _, _)) in rans_seeds().iter().enumerate().filter(|(i, _)| i % 3 == 0) {
        put("rans_decode", &format!("stream{i}.bin"), s);
    }
    // rows, cols, dim, stage count, widths, flags (u16), then the pool values come from.
    for (i, head) in [
        &[3u8, 10, 4, 2, 4, 2, 0, 0][..],
        &[8, 33, 3, 1, 8, 0, 0],
        &[1, 1, 1, 4, 1, 1, 1, 1, 0, 0],
    ]
    .iter()
    .enumerate()
    {
        let mut b = head.to_vec();
        b.extend((0..96u32).map(|j| (j * 89 % 251) as u8));
        put("codebook_decode", &format!("tensor{i}.bin"), &b);
    }
}

/// Fails with the first panicking seeds of every reader.
fn finish(reports: &[Report]) {
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
