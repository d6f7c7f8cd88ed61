//! `adaptq quantize`'s flags, from one table. Each flag is a setting of
//! `adaptq_pipeline::QuantizeOptions` under the same name (`--group-size` is `group_size`), so
//! `--config FILE.yaml` takes the same keys; the defaults shown are the library's, read from
//! `QuantizeOptions::default()`. Written against clap's builder rather than its derive because
//! the flags are data (key, kind, help) that map onto the options by key: a derive would repeat
//! every setting as a field.

use super::quantize_flags::{Kind, Kind::*, SECTIONS, SRC_HELP};
use adaptq_pipeline::QuantizeOptions;
use clap::builder::PossibleValuesParser;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use serde_json::{Map, Value};
use std::path::PathBuf;

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
