//! The tokenizer fields of a GGUF file, read from the file's own metadata or from a bundle's
//! `gguf-metadata.json` copy through one reader, and the settings llama.cpp derives from them
//! (`llama_vocab::impl::load` in src/llama-vocab.cpp).

use adaptq_source::gguf::Metadata;
use anyhow::{anyhow, bail, Result};

/// The tokenizer fields of a GGUF file.
pub struct GgufVocab {
    pub model: String,
    pub pre: String,
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    pub token_types: Vec<i64>,
    /// SentencePiece piece scores (`tokenizer.ggml.scores`); empty for byte-level BPE.
    pub scores: Vec<f32>,
    /// `general.name`: llama.cpp sets some token flags by model name (Phi-3's special tokens
    /// swallow the whitespace after them).
    pub name: String,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
    pub add_space_prefix: Option<bool>,
    pub bos_token_id: Option<u64>,
    pub eos_token_id: Option<u64>,
}

/// Typed lookups into GGUF metadata, whatever holds it.
trait Lookup {
    fn str(&self, key: &str) -> Option<String>;
    fn strs(&self, key: &str) -> Option<Vec<String>>;
    fn ints(&self, key: &str) -> Option<Vec<i64>>;
    fn floats(&self, key: &str) -> Option<Vec<f32>>;
    fn uint(&self, key: &str) -> Option<u64>;
    fn flag(&self, key: &str) -> Option<bool>;
}

impl Lookup for Metadata {
    fn str(&self, key: &str) -> Option<String> {
        self.get_str(key).map(str::to_string)
    }
    fn strs(&self, key: &str) -> Option<Vec<String>> {
        self.get_str_array(key)
            .map(|v| v.into_iter().map(str::to_string).collect())
    }
    fn ints(&self, key: &str) -> Option<Vec<i64>> {
        self.get_i64_array(key)
    }
    fn floats(&self, key: &str) -> Option<Vec<f32>> {
        self.get_f32_array(key)
    }
    fn uint(&self, key: &str) -> Option<u64> {
        self.get_u64(key)
    }
    fn flag(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(|v| v.as_bool())
    }
}

/// A bundle's `gguf-metadata.json`: a list of `{key, type, value}`.
struct JsonEntries<'a>(&'a [serde_json::Value]);

impl JsonEntries<'_> {
    fn value(&self, key: &str) -> Option<&serde_json::Value> {
        self.0.iter().find(|e| e["key"] == key).map(|e| &e["value"])
    }
    fn items<T>(&self, key: &str, f: impl Fn(&serde_json::Value) -> Option<T>) -> Option<Vec<T>> {
        self.value(key)?.as_array()?.iter().map(f).collect()
    }
}

impl Lookup for JsonEntries<'_> {
    fn str(&self, key: &str) -> Option<String> {
        self.value(key)?.as_str().map(str::to_string)
    }
    fn strs(&self, key: &str) -> Option<Vec<String>> {
        self.items(key, |s| s.as_str().map(str::to_string))
    }
    fn ints(&self, key: &str) -> Option<Vec<i64>> {
        self.items(key, serde_json::Value::as_i64)
    }
    fn floats(&self, key: &str) -> Option<Vec<f32>> {
        self.items(key, |x| x.as_f64().map(|f| f as f32))
    }
    fn uint(&self, key: &str) -> Option<u64> {
        self.value(key)?.as_u64()
    }
    fn flag(&self, key: &str) -> Option<bool> {
        self.value(key)?.as_bool()
    }
}

impl GgufVocab {
    pub fn from_metadata(md: &Metadata) -> Result<Self> {
        Self::read(md)
    }

    /// From a bundle's `gguf-metadata.json` (list of {key, type, value}).
    pub fn from_metadata_json(v: &serde_json::Value) -> Result<Self> {
        let entries = v
            .as_array()
            .ok_or_else(|| anyhow!("gguf-metadata.json is not a list"))?;
        Self::read(&JsonEntries(entries))
    }

    fn read(md: &dyn Lookup) -> Result<Self> {
        let k = |name: &str| format!("tokenizer.ggml.{name}");
        let v = GgufVocab {
            model: md.str(&k("model")).unwrap_or_default(),
            pre: md.str(&k("pre")).unwrap_or_else(|| "default".into()),
            tokens: md.strs(&k("tokens")).unwrap_or_default(),
            merges: md.strs(&k("merges")).unwrap_or_default(),
            token_types: md.ints(&k("token_type")).unwrap_or_default(),
            scores: md.floats(&k("scores")).unwrap_or_default(),
            name: md.str("general.name").unwrap_or_default(),
            add_bos_token: md.flag(&k("add_bos_token")),
            add_eos_token: md.flag(&k("add_eos_token")),
            add_space_prefix: md.flag(&k("add_space_prefix")),
            bos_token_id: md.uint(&k("bos_token_id")),
            eos_token_id: md.uint(&k("eos_token_id")),
        };
        // llama.cpp refuses shorter per-token arrays rather than reading past their end.
        for (what, n) in [
            ("scores", v.scores.len()),
            ("token_type", v.token_types.len()),
        ] {
            if n != 0 && n < v.tokens.len() {
                bail!(
                    "tokenizer.ggml.{what} has {n} entries for {} tokens",
                    v.tokens.len()
                );
            }
        }
        Ok(v)
    }

    /// Whether llama.cpp adds a BOS token to text it tokenizes for this model (`llama-tokenize`
    /// and `llama-perplexity` pass this as `add_special`): `tokenizer.ggml.add_bos_token`, else
    /// its default for the tokenizer kind (SentencePiece yes; byte-level BPE only for the
    /// llama3, tekken and chameleon pre-tokenizers).
    pub fn adds_bos(&self) -> Result<bool> {
        Ok(self.settings()?.add_bos)
    }

    /// Resolves what llama.cpp resolves at load time; an unsupported kind is an error.
    pub(crate) fn settings(&self) -> Result<Settings> {
        // llama.cpp's defaults per kind: (pre-tokenizer, BOS id, EOS id, add BOS, space prefix).
        let (pre, bos, eos, add_bos, space_prefix) = match self.model.as_str() {
            "llama" => (
                None,
                Some(1),
                Some(2),
                true,
                self.add_space_prefix.unwrap_or(true),
            ),
            "gpt2" => {
                let pre = super::bpe::pre_tokenizer(&self.pre)?;
                let bos = if pre.no_default_bos { None } else { Some(11) };
                (Some(pre), bos, Some(11), pre.add_bos, false)
            }
            other => {
                return Err(super::unsupported(format!(
                    "GGUF tokenizer model '{other}'"
                )))
            }
        };
        let n = self.tokens.len() as u64;
        // An id outside the vocabulary is ignored for the default, as llama.cpp does.
        let id = |key: Option<u64>, default: Option<u64>| {
            key.filter(|&i| i < n)
                .or(default.filter(|&i| i < n))
                .and_then(|i| u32::try_from(i).ok())
        };
        let s = Settings {
            pre,
            bos: id(self.bos_token_id, bos),
            eos: id(self.eos_token_id, eos),
            add_bos: self.add_bos_token.unwrap_or(add_bos),
            add_eos: self.add_eos_token.unwrap_or(false),
            space_prefix,
        };
        if (s.add_bos && s.bos.is_none()) || (s.add_eos && s.eos.is_none()) {
            bail!("the GGUF tokenizer asks for a BOS/EOS token that its vocabulary lacks");
        }
        Ok(s)
    }
}

/// The settings llama.cpp derives from a vocabulary's metadata.
pub(crate) struct Settings {
    /// The byte-level BPE pre-tokenizer (`None` for SentencePiece).
    pub pre: Option<&'static super::bpe::PreTokenizer>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    /// Prefix each text fragment with a space (SentencePiece's `▁` word marker).
    pub space_prefix: bool,
}
