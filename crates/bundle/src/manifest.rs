//! `manifest.json`: the bundle's index. The schema is the format crate's
//! ([`adaptq_loader::manifest`]), so the writer here, the host reader and the wasm loader read
//! and write one definition; this module re-exports it.

pub use adaptq_loader::manifest::*;

/// A shape as the loader's layout check reads it (`u64` dimensions on every platform).
pub fn shape_u64(shape: &[usize]) -> Vec<u64> {
    shape.iter().map(|&d| d as u64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ggml_encodings_serialize_under_their_table_names() {
        for t in adaptq_quant::ggml::ALL {
            let name = serde_json::to_value(t).unwrap();
            assert_eq!(name, t.name(), "serialized name of {t:?}");
            let enc = Encoding::Ggml { ggml_type: t };
            let shape = [2, t.block_len() as u64 * 3];
            assert_eq!(
                adaptq_loader::expected_parts(&enc, &shape),
                Some(vec![("blocks", t.bytes_for(6 * t.block_len()) as u64)])
            );
        }
        assert!(
            serde_json::from_str::<Encoding>(r#"{"scheme":"ggml","ggml_type":"Q4_K_M"}"#).is_err()
        );
    }

    /// The bytes of `manifest.json` are part of the format (the manifest digest covers them):
    /// parsing and re-serializing a manifest gives back the same text.
    #[test]
    fn manifest_text_round_trips_byte_for_byte() {
        let text = include_str!("testdata/manifest.json");
        let m: Manifest = serde_json::from_str(text).unwrap();
        let again = serde_json::to_string_pretty(&m).unwrap() + "\n";
        assert_eq!(again, text);
    }
}
