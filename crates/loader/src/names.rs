//! File names that come from strangers: bundle manifests, safetensors indexes and hub listings.
//!
//! Such a name is only ever joined to the folder it belongs to, so it must stay inside it on
//! every platform: relative, `/`-separated, no `.`/`..` or empty components, no backslashes,
//! drive letters, control characters or NUL. Anything else is refused rather than cleaned up,
//! so a listing that tries to escape is reported, not silently renamed.

/// Whether `name` is a plain relative path that stays inside the folder it is joined to.
/// With `nested == false` only a single file name (no `/`) is accepted.
pub fn is_plain_relative(name: &str, nested: bool) -> bool {
    if name.is_empty() || name.len() > 1024 {
        return false;
    }
    if !nested && name.contains('/') {
        return false;
    }
    name.split('/').all(|c| {
        !c.is_empty()
            && c != "."
            && c != ".."
            && !c.contains(':')
            && !c.chars().any(|ch| ch == '\\' || ch.is_control())
    })
}

#[cfg(test)]
mod tests {
    use super::is_plain_relative;

    #[test]
    fn refuses_names_that_escape_their_folder() {
        for ok in ["model.gguf", "shard-00000.bin", "a.b-c_d"] {
            assert!(is_plain_relative(ok, false), "{ok}");
            assert!(is_plain_relative(ok, true), "{ok}");
        }
        assert!(is_plain_relative("sub/dir/model.gguf", true));
        assert!(!is_plain_relative("sub/model.gguf", false));
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "../../../../tmp/x/evil.gguf",
            "/etc/hostname",
            "a//b",
            "a/./b",
            "a/../b",
            "a/",
            "..\\x",
            "C:x",
            "c:\\windows",
            "a\0b",
            "a\nb",
            "\u{1b}[31mred",
        ] {
            assert!(!is_plain_relative(bad, true), "{bad:?} accepted");
            assert!(!is_plain_relative(bad, false), "{bad:?} accepted");
        }
        assert!(!is_plain_relative(&"a".repeat(2000), true));
    }
}
