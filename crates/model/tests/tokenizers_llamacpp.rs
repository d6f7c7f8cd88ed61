//! Token ids of tokenizers rebuilt from GGUF vocabularies against llama.cpp's own
//! `llama-tokenize` (built by `../shared/tools/llamacpp.sh`) on the same bytes.
//!
//! The vocabularies are llama.cpp's vocab-only test files and re-labelled copies for
//! pre-tokenizers it ships none for (`scripts/fetch-vocabs.sh`), plus the SmolLM2 fixture.
//! `llama-tokenize` runs with `--no-escape` (the file's bytes, not escape-processed) and its
//! default `add_special = add_bos`, and parses special tokens, as it does by default; ours is
//! `encode_special` when the vocabulary adds BOS, else `encode`. A second run with `--no-bos`
//! on a mixed sample checks `encode` alone.

use adaptq_model::tokenizer::{
    encode, encode_special, from_gguf, from_gguf_or_companion, GgufVocab, Unsupported,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Compared on all six novels (the vocabularies issue 13 names).
const NOVEL_VOCABS: &[&str] = &[
    "vocab/ggml-vocab-llama-spm.gguf",
    "vocab/ggml-vocab-phi-3.gguf",
    "vocab/ggml-vocab-llama-bpe.gguf",
    "vocab/ggml-vocab-qwen2.gguf",
    "vocab/relabel-tekken.gguf",
    "vocab/ggml-vocab-gpt-2.gguf",
    "vocab/ggml-vocab-starcoder.gguf",
    "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "vocab/ggml-vocab-deepseek-llm.gguf",
];

/// Every other supported pre-tokenizer: compared on the mixed sample and the opening of a novel.
const OTHER_VOCABS: &[&str] = &[
    "gemma3/gemma-3-270m-q4_k_m.gguf",
    "vocab/ggml-vocab-gpt-neox.gguf",
    "vocab/ggml-vocab-mpt.gguf",
    "vocab/ggml-vocab-refact.gguf",
    "vocab/ggml-vocab-falcon.gguf",
    "vocab/ggml-vocab-command-r.gguf",
    "vocab/ggml-vocab-deepseek-coder.gguf",
    "vocab/ggml-vocab-qwen35.gguf",
    "vocab/relabel-gpt-4o.gguf",
    "vocab/relabel-deepseek-v3.gguf",
    "vocab/relabel-chameleon.gguf",
    "vocab/relabel-poro-chat.gguf",
    "vocab/relabel-viking.gguf",
    "vocab/relabel-jais-2.gguf",
    "vocab/relabel-seed-coder.gguf",
    "vocab/relabel-bailingmoe.gguf",
    "vocab/relabel-exaone-moe.gguf",
    "vocab/relabel-minicpm5.gguf",
    "vocab/relabel-youtu.gguf",
    "vocab/relabel-spark2_5.gguf",
    "vocab/relabel-laguna.gguf",
    "vocab/relabel-grok-2.gguf",
    "vocab/relabel-ufakzeka.gguf",
    "vocab/relabel-granite-embed-multi-97m.gguf",
    "vocab/relabel-dbrx.gguf",
    "vocab/relabel-chatglm-bpe.gguf",
];

const NOVELS: &[&str] = &[
    "emma.txt",
    "mansfieldpark.txt",
    "northangerabbey.txt",
    "persuasion.txt",
    "prideprejudice.txt",
    "sensesensibility.txt",
];

/// Special-token texts of several families, contractions, digit runs, whitespace runs longer
/// than any whitespace piece, CRLF, tabs, non-Latin scripts, combining marks, Unicode spaces,
/// case changes inside words, code and a backslash (kept: `--no-escape`).
const SAMPLE: &str = "<s>Hello</s> <|endoftext|><|im_start|>user\nHi there<|im_end|>\n<|end|>\n  \
<|user|>  text <|begin_of_text|>x<|eot_id|> <start_of_turn>model\n<end_of_turn>\n\
I'LL don't WE'RE we've it's 'tis O'Neil's\n\
numbers 1 12 123 1234 12345 3.14159 1,000,000 ١٢٣ ½\n\
   leading spaces, trailing spaces   \n\n\n\nfour newlines\r\nCRLF\t\ttabs \t \n\
                                        forty spaces then text\n\
Unicode: café naïve façade Ångström Übermensch 日本語のテキスト 中文字符 한국어 Ελληνικά \
Русский текст العربية हिन्दी 🎉🚀 e\u{301}t\u{301}e ﬁne\u{a0}nbsp\u{2003}em\u{3000}ideo\n\
CamelCaseWords XMLHttpRequest iPhone McDonald's ÉCOLE éCole\n\
code: fn main() { let x = vec![1, 2, 3]; println!(\"{x:?}\"); } // C:\\path\\to /a/b.rs\n\
symbols: $100 + 5% = ~3 ^caret | pipe `tick` <tag> @user #hash &amp; ... !!! ???\n\
<sentinel:12> IMGIMGABZ ▁already▁marked <0x41> [EOS] <eos> <unk>\nend with space ";

/// [`SAMPLE`] and a ladder of space runs between, before and after other pieces: SentencePiece
/// vocabularies give every run piece the same score, so these exercise the tie-break.
fn sample_text() -> String {
    let mut s = SAMPLE.to_string();
    for n in 1..=40 {
        let run = " ".repeat(n);
        s.push_str(&format!("a{run}b.{run}\n{run}\"{run}x{run}\n"));
    }
    s
}

/// `llama-tokenize`, built on first use by the shared script.
fn llama_tokenize() -> PathBuf {
    let bin = adaptq_testutil::llamacpp::bin_dir().join("llama-tokenize");
    assert!(bin.is_file(), "{} missing", bin.display());
    bin
}

fn vocab_path(rel: &str) -> PathBuf {
    let p = adaptq_testutil::fixtures().join(rel);
    assert!(
        p.is_file(),
        "fixture {} missing: run scripts/fetch-fixtures.sh (vocabularies: scripts/fetch-vocabs.sh, \
         Gemma 3: scripts/fetch-gemma.sh)",
        p.display()
    );
    p
}

fn vocab(path: &Path) -> GgufVocab {
    let blob = adaptq_source::blob::MmapBlob::open(path).unwrap();
    let header = adaptq_source::gguf::read_header(&blob).unwrap();
    GgufVocab::from_metadata(&header.metadata).unwrap()
}

/// Our tokenizer for a GGUF file and whether llama.cpp adds BOS for it.
fn ours(path: &Path) -> (tokenizers::Tokenizer, bool) {
    let v = vocab(path);
    let tok = from_gguf(&v).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
    (tok, v.adds_bos().unwrap())
}

fn encode_like_llama(tok: &tokenizers::Tokenizer, adds_bos: bool, text: &str) -> Vec<u32> {
    if adds_bos {
        encode_special(tok, text).unwrap()
    } else {
        encode(tok, text).unwrap()
    }
}

/// `llama-tokenize --ids` on a file, as a list of ids.
fn theirs(bin: &Path, model: &Path, text: &Path, no_bos: bool) -> Vec<u32> {
    let mut cmd = Command::new(bin);
    cmd.arg("-m").arg(model).arg("-f").arg(text);
    cmd.args(["--ids", "--log-disable", "--no-escape"]);
    if no_bos {
        cmd.arg("--no-bos");
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "llama-tokenize on {} failed: {}",
        model.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let list = stdout.lines().rev().find(|l| l.starts_with('[')).unwrap();
    let list = list.trim().trim_start_matches('[').trim_end_matches(']');
    list.split(", ")
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect()
}

/// `None` when equal, else where they part, with the tokens around it.
fn difference(tok: &tokenizers::Tokenizer, ours: &[u32], theirs: &[u32]) -> Option<String> {
    let at = ours.iter().zip(theirs).position(|(a, b)| a != b);
    let at = match at {
        None if ours.len() == theirs.len() => return None,
        None => ours.len().min(theirs.len()),
        Some(i) => i,
    };
    let show = |ids: &[u32]| -> String {
        let window = &ids[at.saturating_sub(4)..(at + 5).min(ids.len())];
        let pieces: Vec<String> = window
            .iter()
            .map(|&i| format!("{i}:{:?}", tok.id_to_token(i).unwrap_or_default()))
            .collect();
        pieces.join(" ")
    };
    Some(format!(
        "first difference at token {at} (ours {} tokens, llama.cpp {})\n      ours:      {}\n      llama.cpp: {}",
        ours.len(),
        theirs.len(),
        show(ours),
        show(theirs)
    ))
}

struct Job<'a> {
    vocab: &'a str,
    text_name: String,
    text: PathBuf,
    no_bos: bool,
}

/// Runs every job on two threads (one `llama-tokenize` beside one of ours) and fails with
/// every mismatch; prints the number of tokens compared per vocabulary.
fn compare_all(vocabs: &[&str], jobs: Vec<Job>) {
    let bin = llama_tokenize();
    let t0 = Instant::now();
    let toks: Vec<(&str, PathBuf, tokenizers::Tokenizer, bool)> = vocabs
        .iter()
        .map(|&v| {
            let p = vocab_path(v);
            let (t, bos) = ours(&p);
            (v, p, t, bos)
        })
        .collect();
    println!(
        "{} tokenizers built in {:.1} s",
        toks.len(),
        t0.elapsed().as_secs_f64()
    );
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                while let Some(job) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let (_, path, tok, bos) = toks.iter().find(|t| t.0 == job.vocab).unwrap();
                    let text = std::fs::read_to_string(&job.text).unwrap();
                    let t0 = Instant::now();
                    let mine = encode_like_llama(tok, *bos && !job.no_bos, &text);
                    let t1 = Instant::now();
                    let want = theirs(&bin, path, &job.text, job.no_bos);
                    let times = [t1 - t0, t1.elapsed()];
                    let diff = difference(tok, &mine, &want);
                    results.lock().unwrap().push((job, want.len(), diff, times));
                }
            });
        }
    });
    let results = results.into_inner().unwrap();
    let mut failures = Vec::new();
    for &v in vocabs {
        let mine: Vec<_> = results.iter().filter(|r| r.0.vocab == v).collect();
        let tokens: usize = mine.iter().map(|r| r.1).sum();
        let bad = mine.iter().filter(|r| r.2.is_some()).count();
        let secs = |k: usize| mine.iter().map(|r| r.3[k].as_secs_f64()).sum::<f64>();
        println!(
            "{v}: {tokens} tokens in {} texts, {bad} differ (ours {:.1} s, llama-tokenize {:.1} s)",
            mine.len(),
            secs(0),
            secs(1)
        );
        for (job, _, diff, _) in mine {
            if let Some(d) = diff {
                let bos = if job.no_bos { " --no-bos" } else { "" };
                failures.push(format!("{v} on {}{bos}: {d}", job.text_name));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} comparisons differ from llama-tokenize:\n  {}",
        failures.len(),
        results.len(),
        failures.join("\n  ")
    );
}

fn novel_jobs<'a>(vocabs: &[&'a str]) -> Vec<Job<'a>> {
    let mut jobs = Vec::new();
    for &n in NOVELS {
        for &v in vocabs {
            let text = adaptq_testutil::corpus(n);
            jobs.push(Job {
                vocab: v,
                text_name: n.into(),
                text,
                no_bos: false,
            });
        }
    }
    jobs
}

#[test]
fn novels_tokenize_as_llama_tokenize() {
    compare_all(NOVEL_VOCABS, novel_jobs(NOVEL_VOCABS));
}

#[test]
fn mixed_sample_and_other_pre_tokenizers_tokenize_as_llama_tokenize() {
    let dir = tempfile::tempdir().unwrap();
    let sample = dir.path().join("sample.txt");
    std::fs::write(&sample, sample_text()).unwrap();
    // The first 100 000 bytes of an ASCII novel: the others already run on all of them.
    let opening = dir.path().join("opening.txt");
    let novel = std::fs::read(adaptq_testutil::corpus("northangerabbey.txt")).unwrap();
    std::fs::write(&opening, &novel[..100_000]).unwrap();
    let all: Vec<&str> = NOVEL_VOCABS.iter().chain(OTHER_VOCABS).copied().collect();
    let mut jobs = Vec::new();
    for &v in &all {
        for no_bos in [false, true] {
            let text = sample.clone();
            jobs.push(Job {
                vocab: v,
                text_name: "the mixed sample".into(),
                text,
                no_bos,
            });
        }
    }
    for &v in OTHER_VOCABS {
        let text = opening.clone();
        jobs.push(Job {
            vocab: v,
            text_name: "the opening of Northanger Abbey".into(),
            text,
            no_bos: false,
        });
    }
    compare_all(&all, jobs);
}

#[test]
fn unsupported_kinds_are_named_and_fall_back_to_a_tokenizer_json() {
    let mut v = vocab(&vocab_path("vocab/ggml-vocab-gpt-2.gguf"));
    v.pre = "kimi-k2".into();
    let e = from_gguf(&v).unwrap_err();
    assert!(e.is::<Unsupported>(), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("pre-tokenizer 'kimi-k2'"), "{msg}");
    assert!(
        msg.contains("tokenizer.json next to the GGUF file"),
        "{msg}"
    );
    v.model = "t5".into();
    let msg = from_gguf(&v).unwrap_err().to_string();
    assert!(msg.contains("model 't5'"), "{msg}");

    let dir = tempfile::tempdir().unwrap();
    assert!(from_gguf_or_companion(&v, Some(dir.path())).is_err());
    let json = adaptq_testutil::minilm().join("tokenizer.json");
    std::fs::copy(json, dir.path().join("tokenizer.json")).unwrap();
    let tok = from_gguf_or_companion(&v, Some(dir.path())).unwrap();
    assert!(!encode(&tok, "hello").unwrap().is_empty());
}
