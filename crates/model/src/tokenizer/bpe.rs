//! Byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`) as llama.cpp tokenizes them
//! (`llm_tokenizer_bpe_session`): the text is split by the regexes that `tokenizer.ggml.pre`
//! names, each regex applied to the pieces of the one before, matches and the gaps between them
//! both kept; each piece is byte-encoded and merged by rank. That is a `Sequence` of `Split`
//! pre-tokenizers (behaviour `Isolated`) and a regex-free ByteLevel in the `tokenizers` crate.
//!
//! The regexes are llama.cpp's own (its adaptations of the originals in the models'
//! tokenizer.json). llama.cpp runs most of them on a "collapsed" text where every non-ASCII
//! code point stands for its Unicode category, so `\p{Lu}`, `\p{Ll}` … all mean "any letter"
//! there; they are rewritten to `\p{L}` here to match. Its hand-written splitters for the gpt2,
//! llama3, qwen2 and qwen35 regexes follow the regexes themselves.

use super::{unsupported, Parts};
use anyhow::Result;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};

/// What a `tokenizer.ggml.pre` name sets in llama.cpp.
pub(crate) struct PreTokenizer {
    names: &'static [&'static str],
    splits: &'static [&'static str],
    /// A piece that is itself a vocabulary token is taken whole, without merging.
    ignore_merges: bool,
    /// BOS is added unless `tokenizer.ggml.add_bos_token` says otherwise.
    pub add_bos: bool,
    /// No default BOS id (ChatGLM): only `tokenizer.ggml.bos_token_id` gives one.
    pub no_default_bos: bool,
}

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const HAN_KANA: &str = r"[\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+";
const POINTS: &str = r" ?[^(\s|.,!?\x{2026}\x{3002}\x{FF0C}\x{3001}\x{964}\x{6D4}\x{60C})]+";

const fn pre(names: &'static [&'static str], splits: &'static [&'static str]) -> PreTokenizer {
    PreTokenizer {
        names,
        splits,
        ignore_merges: false,
        add_bos: false,
        no_default_bos: false,
    }
}

/// llama.cpp's pre-tokenizer names and regexes (`llama_vocab::impl::load` and
/// `llm_tokenizer_bpe`). Left out are the ones whose splitter is hand-written code rather than
/// its regex (kimi-k2, afmoe, tiny_aya), that split on empty matches (superbpe), that set
/// per-token flags by name (jina-v2, modern-bert) or that tokenize raw UTF-8 (gemma4, sarvam).
static PRE_TOKENIZERS: &[PreTokenizer] = &[
    pre(
        &["default"],
        &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
    ),
    PreTokenizer {
        ignore_merges: true,
        add_bos: true,
        ..pre(
            &[
                "llama3",
                "llama-v3",
                "llama-bpe",
                "falcon3",
                "falcon-h1",
                "pixtral",
                "midm-2.0",
                "lfm2",
                "jina-v5-nano",
            ],
            &[LLAMA3],
        )
    },
    pre(&["dbrx", "smaug-bpe"], &[LLAMA3]),
    PreTokenizer {
        no_default_bos: true,
        ..pre(&["chatglm-bpe"], &[LLAMA3])
    },
    PreTokenizer {
        no_default_bos: true,
        ignore_merges: true,
        ..pre(&["glm4", "glm5"], &[LLAMA3])
    },
    pre(
        &[
            "gpt-2",
            "gpt2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "a.x-4.0",
            "mellum",
            "jina-v1-en",
            "roberta-bpe",
            "exaone4",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
        ],
        &[GPT2],
    ),
    pre(
        &[
            "starcoder",
            "refact",
            "command-r",
            "smollm",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ],
        &[r"\p{N}", GPT2],
    ),
    pre(
        &["falcon"],
        &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"],
    ),
    pre(
        &[
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "stablelm2",
            "hunyuan",
            "solar-open",
            "megrez",
            "grok-2",
        ],
        &[QWEN2],
    ),
    pre(
        &["qwen35"],
        &[
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
    ),
    pre(&["laguna"], &[r"[^\n]+|[\n]+", QWEN2]),
    pre(
        &["ufakzeka"],
        &[r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    ),
    pre(
        &["deepseek-llm"],
        &[
            "[\r\n]",
            r"\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+",
            r"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+",
            r"\s+$",
            r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+",
            r"\p{N}+",
        ],
    ),
    pre(
        &["deepseek-coder"],
        &[
            "[\r\n]",
            r"\s?\p{L}+",
            r"\s?\p{P}+",
            r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+",
            r"\p{N}",
        ],
    ),
    pre(
        &["deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"],
        &[
            r"\p{N}{1,3}",
            HAN_KANA,
            r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
        ],
    ),
    pre(
        &["spark2_5"],
        &[
            r"\p{N}{1,3}",
            HAN_KANA,
            r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+"##,
            r"\p{N}",
        ],
    ),
    PreTokenizer {
        ignore_merges: true,
        ..pre(
            &["youtu"],
            &[
                r"[\x{AC00}-\x{D7A3}\x{3131}-\x{318E}]+|[\x{FF01}\x{2026}\x{201C}\x{201D}\x{2018}\x{2019}\x{2014}\x{FF1A}\x{FF1B}\x{FF0C}\x{3001}-\x{303F}\x{FE30}-\x{FE4F}]+|[\x{3105}-\x{312F}]+|[\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+",
                r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            ],
        )
    },
    pre(
        &["jais-2"],
        &[
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}",
        ],
    ),
    pre(&["poro-chat", "bloom", "gpt3-finnish"], &[POINTS]),
    pre(&["viking"], &[POINTS, r"\p{N}"]),
    PreTokenizer {
        ignore_merges: true,
        add_bos: true,
        ..pre(
            &["tekken"],
            &[
                r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            ],
        )
    },
    PreTokenizer {
        add_bos: true,
        ..pre(
            &["chameleon"],
            &[
                "<sentinel:[0-9]+>",
                "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
                "([\t\n]|    |  )",
                r"\p{N}",
                r"[\p{P}!-/:-@\[-`{-~]",
                GPT2,
            ],
        )
    },
    pre(
        &["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"],
        &[
            r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
    ),
    PreTokenizer {
        ignore_merges: true,
        ..pre(
            &["granite-embed-multi-97m"],
            &[
                r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            ],
        )
    },
    pre(
        &["bailingmoe", "bailingmoe2", "llada-moe"],
        &[
            r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
        ],
    ),
    pre(
        &["seed-coder"],
        &[
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
    ),
    pre(
        &["exaone-moe"],
        &[
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",
        ],
    ),
    PreTokenizer {
        ignore_merges: true,
        ..pre(
            &["minicpm5"],
            &[
                r"\p{N}{1,3}",
                r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            ],
        )
    },
];

/// The pre-tokenizer a `tokenizer.ggml.pre` name stands for. `gpt2` is not a llama.cpp name
/// (it says `gpt-2`); earlier adaptq versions accepted it, so it stays an alias.
pub(crate) fn pre_tokenizer(name: &str) -> Result<&'static PreTokenizer> {
    PRE_TOKENIZERS
        .iter()
        .find(|p| p.names.contains(&name))
        .ok_or_else(|| unsupported(format!("GGUF pre-tokenizer '{name}'")))
}

/// Text that tells llama.cpp's pre-tokenizers apart: contractions in both cases, digit runs of
/// every length, runs of spaces, tabs and newlines, punctuation runs, accented, CJK, kana,
/// Devanagari and emoji text, and code.
const PROBE: &str = "Hello world! I'm HERE, we'LL see; they've 'd... 'Tis don'tcha y'all'd've gap  42 tab\t7 \n\n  \t\tTabs\r\n  lines \
    3 33 333 3333 33333 3.14159 1,000,000 2024-12-01 x=42+7*3^2 $5 <a|b>~`q`\n\
    ¿Qué tal? Ça va très bien… naïve café 東京は日本の首都です。カタカナ ひらがな 你好，世界！\
    नमस्ते दुनिया। مرحبا بالعالم، 🦙🚀✨ 👨‍👩‍👧 ---=== !!!??? ((())) [[x]] {y}\n\
    def f(x):\n    return x + 1  # comment\n\n\n   \u{a0}nbsp\u{3000}ideo   trailing   ";

/// The pieces a pre-tokenizer definition (tokenizer.json's `pre_tokenizer`) cuts [`PROBE`] into,
/// or `None` when the `tokenizers` crate cannot run it.
fn probe_pieces(def: &Value) -> Option<Vec<String>> {
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer as _};
    let pre: tokenizers::PreTokenizerWrapper = serde_json::from_value(def.clone()).ok()?;
    let mut s = PreTokenizedString::from(PROBE);
    pre.pre_tokenize(&mut s).ok()?;
    let splits = s.get_splits(OffsetReferential::Original, OffsetType::Byte);
    Some(splits.into_iter().map(|(p, ..)| p.to_string()).collect())
}

/// The `tokenizer.ggml.pre` name for a Hugging Face byte-level BPE tokenizer: the first name
/// whose splits are the tokenizer.json pre-tokenizer's own on a probe text, preferring one that
/// also agrees on `ignore_merges`. llama.cpp's converter names it by hashing the token ids of
/// models it knows; comparing splits also names a model it has never seen, provided its regex
/// is one llama.cpp has. `None` when no name splits the probe the same way.
pub fn llama_cpp_pre_name(pre_tokenizer: &Value, ignore_merges: bool) -> Option<&'static str> {
    let want = probe_pieces(pre_tokenizer)?;
    let same: Vec<&PreTokenizer> = PRE_TOKENIZERS
        .iter()
        .filter(|p| probe_pieces(&pre_tokenizer_def(p)).as_ref() == Some(&want))
        .collect();
    let best = same.iter().find(|p| p.ignore_merges == ignore_merges);
    best.or(same.first()).map(|p| p.names[0])
}

/// The pre-tokenizer definition of a llama.cpp name: its regex splits, then byte encoding.
fn pre_tokenizer_def(pre: &PreTokenizer) -> Value {
    let splits = pre.splits.iter().map(|r| {
        let r = ["Lu", "Ll", "Lt", "Lm", "Lo"]
            .iter()
            .fold(r.to_string(), |r, c| {
                r.replace(&format!(r"\p{{{c}}}"), r"\p{L}")
            });
        json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false})
    });
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
    json!({"type": "Sequence", "pretokenizers": splits.chain([byte_level]).collect::<Vec<_>>()})
}

pub(super) fn parts(merges: &[String], ids: &HashMap<&str, u32>, pre: &PreTokenizer) -> Parts {
    Parts {
        model: json!({"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": pre.ignore_merges,
            "merges": merge_pairs(merges, ids)}),
        normalizer: Value::Null,
        pre_tokenizer: pre_tokenizer_def(pre),
        decoder: json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
            "use_regex": true}),
    }
}

/// `tokenizer.ggml.merges` as pairs, split where llama.cpp splits them (the first space after
/// the first byte). A repeated pair keeps its first rank, as in llama.cpp's `bpe_ranks`. A merge
/// with a part or a result outside the vocabulary is dropped: the `tokenizers` crate refuses
/// one, and in llama.cpp it could only produce a symbol that falls back to bytes.
fn merge_pairs(merges: &[String], ids: &HashMap<&str, u32>) -> Vec<[String; 2]> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(merges.len());
    for m in merges {
        let Some(at) = m.bytes().skip(1).position(|b| b == b' ') else {
            continue;
        };
        let (a, b) = (&m[..at + 1], &m[at + 2..]);
        let known = ids.contains_key(a) && ids.contains_key(b);
        if known && ids.contains_key(format!("{a}{b}").as_str()) && seen.insert((a, b)) {
            out.push([a.to_string(), b.to_string()]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_regex_compiles() {
        use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
        use tokenizers::SplitDelimiterBehavior::Isolated;
        for p in super::PRE_TOKENIZERS {
            for r in p.splits {
                if let Err(e) = Split::new(SplitPattern::Regex(r.to_string()), Isolated, false) {
                    panic!("{:?}: {r}: {e}", p.names);
                }
            }
        }
    }
    /// Every name's own splits lead back to a name with the same regexes, so the probe text
    /// tells apart regexes that split differently. The one pair of different regexes that
    /// splits alike: bailingmoe's `\s*[\r\n]` ends at the last newline of a whitespace run,
    /// as qwen2's `\s*[\r\n]+` does.
    #[test]
    fn each_name_is_found_from_its_own_splits() {
        let alike = [("bailingmoe", "qwen2")];
        let mut wrong = Vec::new();
        for p in super::PRE_TOKENIZERS {
            let def = super::pre_tokenizer_def(p);
            let name = super::llama_cpp_pre_name(&def, p.ignore_merges)
                .unwrap_or_else(|| panic!("{:?} not found", p.names));
            let found = super::pre_tokenizer(name).unwrap();
            let same = (found.splits, found.ignore_merges) == (p.splits, p.ignore_merges);
            if !same && !alike.contains(&(p.names[0], name)) {
                wrong.push(format!("{} named {name}", p.names[0]));
            }
        }
        assert!(wrong.is_empty(), "{wrong:?}");
    }

    /// The shapes Hugging Face tokenizer.json files have (SmolLM2's, GPT-2's, Llama 3's and
    /// Qwen2's regexes as published) get a name that splits as they do.
    #[test]
    fn hugging_face_pre_tokenizers_are_named() {
        use serde_json::json;
        let byte_level = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
        let split = |r: &str| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false});
        let seq = |v: Vec<serde_json::Value>| json!({"type": "Sequence", "pretokenizers": v});
        let llama3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
        let qwen2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
        let cases = [
            (byte_level(true), false, "gpt-2"),
            (
                seq(vec![
                    json!({"type": "Digits", "individual_digits": true}),
                    byte_level(true),
                ]),
                false,
                "smollm",
            ),
            (
                seq(vec![split(llama3), byte_level(false)]),
                true,
                "llama-bpe",
            ),
            (seq(vec![split(qwen2), byte_level(false)]), false, "qwen2"),
        ];
        for (def, ignore_merges, member) in cases {
            let name = super::llama_cpp_pre_name(&def, ignore_merges)
                .unwrap_or_else(|| panic!("{member}: no name"));
            let found = super::pre_tokenizer(name).unwrap();
            assert!(found.names.contains(&member), "{member}: named {name}");
        }
        let none = json!({"type": "Whitespace"});
        assert_eq!(super::llama_cpp_pre_name(&none, false), None);
    }
}
