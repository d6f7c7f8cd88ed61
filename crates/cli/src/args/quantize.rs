//! `adaptq quantize`'s flags, from one table. Each flag is a setting of
//! `adaptq_pipeline::QuantizeOptions` under the same name (`--group-size` is `group_size`), so
//! `--config FILE.yaml` takes the same keys; the defaults shown are the library's, read from
//! `QuantizeOptions::default()`. Written against clap's builder rather than its derive because
//! the flags are data (key, kind, help) that map onto the options by key: a derive would repeat
//! every setting as a field.

use adaptq_pipeline::QuantizeOptions;
use adaptq_pipeline::{Choice, EmbeddingMode, Lossless, Method, OutputFormat, Preset};
use clap::builder::{PossibleValue, PossibleValuesParser};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use serde_json::{Map, Value};
use std::path::PathBuf;

/// How a flag's value is read.
#[derive(Clone, Copy)]
enum Kind {
    /// Present or not.
    Switch,
    /// A whole number.
    Count,
    /// A decimal number.
    Number,
    /// Free text (a name, a width or range of widths).
    Text,
    /// A file or folder.
    Path,
    /// One of a library setting's named values, each explained in `--help`.
    Choice(fn() -> Vec<PossibleValue>),
}

use Kind::*;

fn names<T: Choice>() -> Vec<PossibleValue> {
    T::ALL
        .iter()
        .map(|v| PossibleValue::new(v.name()).help(v.help()))
        .collect()
}

/// A group of flags under one `--help` heading: (option key, kind, help).
type Section = (&'static str, &'static [(&'static str, Kind, &'static str)]);

const SECTIONS: &[Section] = &[
    (
        "Method",
        &[
            (
                "out",
                Path,
                "Output bundle folder (must not exist unless --force).",
            ),
            (
                "method",
                Choice(names::<Method>),
                "How the weights are quantized.",
            ),
            (
                "bits",
                Text,
                "Bits per code, 2 to 8; for --method apq a range of allowed widths, e.g. 3-4 \
                 or 2-8.",
            ),
            (
                "group_size",
                Count,
                "Columns per scale group (32, 64, 128, ...); 0 = one group per output channel.",
            ),
            (
                "sym",
                Switch,
                "Symmetric grid (no per-group offset); asymmetric (scale + min) otherwise.",
            ),
            (
                "embeddings",
                Choice(names::<EmbeddingMode>),
                "How to store embedding tables and a separate output head.",
            ),
            (
                "seed",
                Count,
                "Seed for every random choice; recorded in the manifest.",
            ),
            (
                "model_id",
                Text,
                "Model id recorded in the manifest (default: the source's own name).",
            ),
            (
                "force",
                Switch,
                "Replace --out if it exists and adaptq wrote it (a bundle, or a GGUF it \
                 exported); any other file or folder there is refused, never deleted.",
            ),
        ],
    ),
    (
        "Calibration",
        &[
            (
                "calib",
                Path,
                "Calibration text for calibrated methods (convention: emma.txt; never the eval \
                 text).",
            ),
            (
                "calib_samples",
                Count,
                "Calibration windows sampled from --calib.",
            ),
            ("seq_len", Count, "Tokens per calibration window."),
            (
                "damp",
                Number,
                "GPTQ Hessian dampening, as a fraction of the mean diagonal.",
            ),
            (
                "act_order",
                Switch,
                "GPTQ: quantize columns by decreasing activation energy (static groups).",
            ),
            (
                "awq",
                Switch,
                "Search and fold AWQ scales before GPTQ/APQ rounding (always on for --method \
                 awq).",
            ),
            (
                "refit",
                Switch,
                "Progressive pass for calibrated methods: after rounding, re-fit each group's \
                 scale (and min) to the layer's output error on the calibration inputs, codes \
                 fixed; kept only where it lowers the error. The reduction is recorded per \
                 layer.",
            ),
            (
                "rotate",
                Switch,
                "Rotate every linear layer's input by seeded Hadamard rotations (--seed) before \
                 quantizing (rtn, gptq, novaq): weights are stored as W·R and adaptq's forward \
                 pass rotates the inputs online, so the network computes the same function \
                 while outlier columns are spread over every row. Any width works (576 = 64·9, \
                 1536 = 512·3). Needs --calib (layers are calibrated in the rotated space). Such \
                 bundles cannot be exported to GGUF / GPTQ (those runtimes do not rotate \
                 online).",
            ),
        ],
    ),
    (
        "APQ (mixed widths)",
        &[
            (
                "target_bpw",
                Number,
                "Overall bits per weight to aim for, every tensor counted (default: the middle \
                 of the --bits range plus the scale overhead).",
            ),
            (
                "max_ppl_delta",
                Number,
                "Gate: held-out perplexity may rise at most this many percent.",
            ),
            (
                "promote_per_round",
                Count,
                "Layers promoted to the next width per round.",
            ),
            ("max_rounds", Count, "Most promotion rounds."),
            (
                "heldout_windows",
                Count,
                "Held-out windows (from the last tenth of --calib) for the perplexity gate.",
            ),
            (
                "gold_prompts",
                Path,
                "Gold-prompt gate: one prompt per line (default: the built-in prompts/gold.txt); \
                 the quantized model's greedy continuation must not loop or fall silent where \
                 the unquantized model does not.",
            ),
            (
                "gold_tokens",
                Count,
                "Gold-prompt gate: greedy tokens generated per prompt.",
            ),
        ],
    ),
    (
        "NOVAQ (codebooks)",
        &[
            (
                "preset",
                Choice(names::<Preset>),
                "A named setting (sets --target-bits unless that is given).",
            ),
            (
                "target_bits",
                Number,
                "Bits per weight of each linear layer, codebooks, scales and means included \
                 (default 2.5, or the preset's).",
            ),
            (
                "level1_centroids",
                Count,
                "Most centroids of the first codebook (a power of two).",
            ),
            (
                "level2_centroids",
                Count,
                "Most centroids of the residual codebook (a power of two; 0 = one stage).",
            ),
            (
                "min_subspace_dim",
                Count,
                "Smallest subspace (vector) dimension the planner may choose.",
            ),
            (
                "max_subspace_dim",
                Count,
                "Largest subspace (vector) dimension the planner may choose.",
            ),
            (
                "max_iterations",
                Count,
                "k-means iterations at most per codebook.",
            ),
            (
                "tolerance",
                Number,
                "Stop k-means when the objective improves by less than this fraction.",
            ),
            (
                "refine_iterations",
                Count,
                "Conjugate-gradient iterations of teacher-guided refinement (0 = off).",
            ),
        ],
    ),
    (
        "Output",
        &[
            (
                "format",
                Choice(names::<OutputFormat>),
                "Output format (with gguf, --out names the .gguf; the calibrated values are \
                 written onto the GGML type's exact grid).",
            ),
            (
                "ggml_type",
                Text,
                "Store linear layers as this llama.cpp type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, \
                 Q3_K, Q4_K, Q5_K, Q6_K) instead of adaptq's own groups; rows that do not fit a \
                 k-quant (576 is not a multiple of 256) fall back as llama.cpp does \
                 (Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0, Q2_K/Q3_K→Q4_0). Default with --format gguf: \
                 the type nearest --bits.",
            ),
            (
                "ggml_embedding_type",
                Text,
                "With GGML types: the embedding / output table's type, or f16 to keep it as \
                 float.",
            ),
            (
                "lossless",
                Choice(names::<Lossless>),
                "Lossless stage on the packed codes (decoded on load); the gain is reported per \
                 tensor and overall.",
            ),
            (
                "shard_size",
                Count,
                "Largest shard in bytes (at most 2 MiB).",
            ),
        ],
    ),
    (
        "Gates",
        &[
            (
                "min_cosine",
                Number,
                "Lowest acceptable weight cosine similarity of any quantized tensor.",
            ),
            (
                "max_bpw",
                Number,
                "Largest acceptable overall bits per weight.",
            ),
        ],
    ),
];

const SRC_HELP: &str = "Model: a local .gguf/.safetensors file or folder, \
hf://org/name[@revision][/file], an http(s):// link to a .gguf/.safetensors file, or \
ollama://name[:tag]. Remote weights are streamed with range requests, fetched ahead while \
quantizing. Environment: HF_TOKEN (or HUGGINGFACE_TOKEN, HUGGING_FACE_HUB_TOKEN), HF_ENDPOINT, \
ADAPTQ_CACHE_DIR (keep downloads, hub cache layout), ADAPTQ_OFFLINE=1 / HF_HUB_OFFLINE=1 (cache \
only), OLLAMA_MODELS (Ollama store, default ~/.ollama/models).";

/// What `adaptq quantize` was given.
pub struct QuantizeArgs {
    /// A YAML file of settings, laid under the flags.
    pub config: Option<PathBuf>,
    /// Print the effective settings and stop.
    pub print_config: bool,
    /// The settings given on the command line, by option key (defaults left out, so a config
    /// file's value stands unless a flag names it).
    pub given: Map<String, Value>,
}

fn flag(key: &'static str, kind: Kind, help: &'static str, default: &Value) -> Arg {
    let arg = Arg::new(key).long(key.replace('_', "-")).help(help);
    let arg = match kind {
        Switch => return arg.action(ArgAction::SetTrue),
        Count => arg.value_parser(clap::value_parser!(u64)).value_name("N"),
        Number => arg.value_parser(clap::value_parser!(f64)).value_name("X"),
        Text => arg.value_name(key.to_ascii_uppercase()),
        Path => arg.value_name("PATH"),
        Choice(values) => arg
            .value_name(key.to_ascii_uppercase())
            .value_parser(PossibleValuesParser::new(values())),
    };
    match default {
        Value::Null => arg,
        Value::String(s) => arg.default_value(s.clone()),
        v => arg.default_value(v.to_string()),
    }
}

impl clap::Args for QuantizeArgs {
    fn augment_args(cmd: Command) -> Command {
        let defaults = serde_json::to_value(QuantizeOptions::default()).expect("options serialize");
        let cmd = cmd
            .arg(Arg::new("src").value_name("SRC").help(SRC_HELP))
            .arg(
                Arg::new("config")
                    .long("config")
                    .value_name("FILE.yaml")
                    .value_parser(clap::value_parser!(PathBuf))
                    .help(
                        "Settings from a YAML file whose keys are these flags' long names with \
                         `_` for `-` (`group_size: 64`); flags given here override it. Unknown \
                         keys are refused.",
                    ),
            )
            .arg(
                Arg::new("print_config")
                    .long("print-config")
                    .action(ArgAction::SetTrue)
                    .help("Print the effective settings as YAML (a config file that repeats this run) and stop."),
            );
        SECTIONS.iter().fold(cmd, |cmd, &(heading, flags)| {
            cmd.next_help_heading(heading).args(
                flags
                    .iter()
                    .map(|&(key, kind, help)| flag(key, kind, help, &defaults[key])),
            )
        })
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for QuantizeArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut given = Map::new();
        if let Some(src) = m.get_one::<String>("src") {
            given.insert("src".into(), src.clone().into());
        }
        for &(key, kind, _) in SECTIONS.iter().flat_map(|(_, flags)| flags.iter()) {
            if m.value_source(key) != Some(ValueSource::CommandLine) {
                continue;
            }
            let v = match kind {
                Switch => Value::from(m.get_flag(key)),
                Count => Value::from(*m.get_one::<u64>(key).expect("a parsed count")),
                Number => Value::from(*m.get_one::<f64>(key).expect("a parsed number")),
                Text | Path | Choice(_) => m.get_one::<String>(key).cloned().into(),
            };
            given.insert(key.into(), v);
        }
        Ok(QuantizeArgs {
            config: m.get_one::<PathBuf>("config").cloned(),
            print_config: m.get_flag("print_config"),
            given,
        })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag names a setting, and every setting but the positional model has a flag.
    #[test]
    fn flags_and_settings_are_the_same_keys() {
        let defaults = serde_json::to_value(QuantizeOptions::default()).unwrap();
        let mut keys: Vec<&str> = SECTIONS
            .iter()
            .flat_map(|(_, f)| f.iter().map(|(k, _, _)| *k))
            .collect();
        keys.push("src");
        keys.sort_unstable();
        let mut settings: Vec<&str> = defaults
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        settings.sort_unstable();
        assert_eq!(keys, settings);
    }
}
