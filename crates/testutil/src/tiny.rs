//! A tiny Llama held in memory (2 blocks, hidden 64, byte-level tokenizer), so pipeline tests
//! run every quantize method end to end in seconds without a fixture file. Weights are seeded
//! Gaussians; the tokenizer has one token per byte, so any text calibrates it.

use adaptq_quant::rng::Rng;
use adaptq_source::model::{Family, ModelDesc, RopeStyle};
use adaptq_source::{SrcDType, TensorInfo, TensorSource};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

/// The tiny model: tensors by Hugging Face name, a folder holding its tokenizer.json.
pub struct TinyLlama {
    desc: ModelDesc,
    infos: Vec<TensorInfo>,
    values: BTreeMap<String, Vec<f32>>,
    dir: tempfile::TempDir,
}

const HIDDEN: usize = 64;
const FFN: usize = 128;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const LAYERS: usize = 2;
const VOCAB: usize = 256;

impl TinyLlama {
    /// The model whose weights come from `seed`.
    pub fn new(seed: u64) -> TinyLlama {
        let hd = HIDDEN / HEADS;
        let mut shapes: Vec<(String, Vec<usize>)> =
            vec![("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN])];
        for i in 0..LAYERS {
            let p = |s: &str| format!("model.layers.{i}.{s}.weight");
            shapes.extend([
                (p("input_layernorm"), vec![HIDDEN]),
                (p("self_attn.q_proj"), vec![HEADS * hd, HIDDEN]),
                (p("self_attn.k_proj"), vec![KV_HEADS * hd, HIDDEN]),
                (p("self_attn.v_proj"), vec![KV_HEADS * hd, HIDDEN]),
                (p("self_attn.o_proj"), vec![HIDDEN, HEADS * hd]),
                (p("post_attention_layernorm"), vec![HIDDEN]),
                (p("mlp.gate_proj"), vec![FFN, HIDDEN]),
                (p("mlp.up_proj"), vec![FFN, HIDDEN]),
                (p("mlp.down_proj"), vec![HIDDEN, FFN]),
            ]);
        }
        shapes.push(("model.norm.weight".into(), vec![HIDDEN]));
        shapes.push(("lm_head.weight".into(), vec![VOCAB, HIDDEN]));
        let mut rng = Rng(seed);
        let mut values = BTreeMap::new();
        let infos = shapes
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let v: Vec<f32> = if shape.len() == 1 {
                    (0..n).map(|_| 1.0 + 0.1 * rng.gauss() as f32).collect()
                } else {
                    let s = 1.0 / (shape[1] as f64).sqrt();
                    (0..n).map(|_| (s * rng.gauss()) as f32).collect()
                };
                values.insert(name.clone(), v);
                TensorInfo {
                    name,
                    shape,
                    dtype: SrcDType::F32,
                    byte_len: n * 4,
                }
            })
            .collect();
        let dir = tempfile::tempdir().expect("a temp folder");
        write_byte_tokenizer(&dir.path().join("tokenizer.json"));
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": HIDDEN, "intermediate_size": FFN, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "num_hidden_layers": LAYERS, "vocab_size": VOCAB,
            "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": false
        });
        std::fs::write(dir.path().join("config.json"), config.to_string())
            .expect("config.json written");
        TinyLlama {
            desc: ModelDesc {
                family: Family::Llama,
                architecture: "llama".into(),
                name: Some("tiny-llama".into()),
                license: None,
                n_layers: LAYERS,
                hidden: HIDDEN,
                n_heads: HEADS,
                n_kv_heads: KV_HEADS,
                ffn_dim: FFN,
                vocab_size: VOCAB,
                context_length: 256,
                rope_theta: 10000.0,
                norm_eps: 1e-5,
                rope_style: RopeStyle::Halves,
                tied_embeddings: false,
                tokenizer_id: "tokenizer.json".into(),
                decoder: Default::default(),
            },
            infos,
            values,
            dir,
        }
    }
}

/// A byte-level BPE tokenizer with no merges: token `b` is byte `b`, written as GPT-2's
/// printable stand-in character (bytes outside the printable ranges move to U+0100 onwards).
fn write_byte_tokenizer(path: &Path) {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut moved = 0;
    let vocab: serde_json::Map<String, serde_json::Value> = (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                moved += 1;
                255 + moved
            };
            (char::from_u32(c).expect("a char").to_string(), b.into())
        })
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    let t = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(path, serde_json::to_vec(&t).expect("JSON")).expect("tokenizer.json written");
}

impl TensorSource for TinyLlama {
    fn tensors(&self) -> &[TensorInfo] {
        &self.infos
    }
    fn read_f32(&self, name: &str) -> adaptq_source::Result<Vec<f32>> {
        self.values
            .get(name)
            .cloned()
            .ok_or_else(|| adaptq_source::SourceError::NoSuchTensor {
                path: "tiny-llama".into(),
                tensor: name.into(),
            })
    }
    fn raw_bytes(&self, name: &str) -> adaptq_source::Result<Cow<'_, [u8]>> {
        let v = self.read_f32(name)?;
        Ok(Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect()))
    }
    fn desc(&self) -> &ModelDesc {
        &self.desc
    }
    fn format(&self) -> &'static str {
        "safetensors"
    }
    fn companion_dir(&self) -> Option<&Path> {
        Some(self.dir.path())
    }
}

/// Calibration text for the tiny model: seeded words, `bytes` long, one token per byte.
pub fn text(seed: u64, bytes: usize) -> String {
    const WORDS: [&str; 12] = [
        "the", "quiet", "house", "stood", "near", "a", "river", "where", "she", "walked", "every",
        "morning",
    ];
    let mut rng = Rng(seed);
    let mut s = String::with_capacity(bytes + 16);
    while s.len() < bytes {
        let w: &&str = rng.pick(&WORDS);
        s.push_str(w);
        s.push(if rng.below(9) == 0 { '.' } else { ' ' });
    }
    s.truncate(bytes);
    s
}

/// A folder for a test's outputs, holding `calib.txt` (12,000 bytes of [`text`], seed 1).
pub struct Work {
    pub dir: tempfile::TempDir,
}

impl Work {
    pub fn new() -> Work {
        let dir = tempfile::tempdir().expect("a temporary folder");
        std::fs::write(dir.path().join("calib.txt"), text(1, 12_000)).expect("calib.txt");
        Work { dir }
    }
    pub fn calib(&self) -> std::path::PathBuf {
        self.dir.path().join("calib.txt")
    }
    pub fn out(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

impl Default for Work {
    fn default() -> Self {
        Work::new()
    }
}
