//! Key names: the NixOS driver's `send_key` / `send_chars` semantics on top of QMP `send-key`.
//!
//! Upstream maps one character through `CHAR_TO_KEY` (upper case letters and shifted symbols
//! to `shift-<key>`, punctuation to raw scancodes such as `0x0C`) and hands everything else
//! to HMP `sendkey`, which splits a combination such as `ctrl-alt-delete` on `-`. The same
//! keys go out here as one QMP `send-key` with a list of QEMU key codes (`0x..` as raw
//! scancode numbers).

/// Upstream's `CHAR_TO_KEY` (nixos/lib/test-driver, machine/__init__.py), plus `\t` -> `tab`.
pub const CHAR_TO_KEY: &[(char, &str)] = &[
    ('A', "shift-a"),
    ('N', "shift-n"),
    ('-', "0x0C"),
    ('_', "shift-0x0C"),
    ('B', "shift-b"),
    ('O', "shift-o"),
    ('=', "0x0D"),
    ('+', "shift-0x0D"),
    ('C', "shift-c"),
    ('P', "shift-p"),
    ('[', "0x1A"),
    ('{', "shift-0x1A"),
    ('D', "shift-d"),
    ('Q', "shift-q"),
    (']', "0x1B"),
    ('}', "shift-0x1B"),
    ('E', "shift-e"),
    ('R', "shift-r"),
    (';', "0x27"),
    (':', "shift-0x27"),
    ('F', "shift-f"),
    ('S', "shift-s"),
    ('\'', "0x28"),
    ('"', "shift-0x28"),
    ('G', "shift-g"),
    ('T', "shift-t"),
    ('`', "0x29"),
    ('~', "shift-0x29"),
    ('H', "shift-h"),
    ('U', "shift-u"),
    ('\\', "0x2B"),
    ('|', "shift-0x2B"),
    ('I', "shift-i"),
    ('V', "shift-v"),
    (',', "0x33"),
    ('<', "shift-0x33"),
    ('J', "shift-j"),
    ('W', "shift-w"),
    ('.', "0x34"),
    ('>', "shift-0x34"),
    ('K', "shift-k"),
    ('X', "shift-x"),
    ('/', "0x35"),
    ('?', "shift-0x35"),
    ('L', "shift-l"),
    ('Y', "shift-y"),
    (' ', "spc"),
    ('M', "shift-m"),
    ('Z', "shift-z"),
    ('\n', "ret"),
    ('!', "shift-0x02"),
    ('@', "shift-0x03"),
    ('#', "shift-0x04"),
    ('$', "shift-0x05"),
    ('%', "shift-0x06"),
    ('^', "shift-0x07"),
    ('&', "shift-0x08"),
    ('*', "shift-0x09"),
    ('(', "shift-0x0A"),
    (')', "shift-0x0B"),
    ('\t', "tab"),
];

/// Upstream's key spelling for `key`: `CHAR_TO_KEY[key]` when `key` is one mapped
/// character, else `key` itself.
pub fn key_name(key: &str) -> &str {
    let mut chars = key.chars();
    if let (Some(c), None) = (chars.next(), chars.next()) {
        if let Some((_, name)) = CHAR_TO_KEY.iter().find(|(k, _)| *k == c) {
            return name;
        }
    }
    key
}

/// The QEMU key codes pressed together for `key` (`"ctrl-alt-delete"` ->
/// `["ctrl", "alt", "delete"]`, `"A"` -> `["shift", "a"]`, `"-"` -> `["0x0c"]`).
/// QEMU's key codes are all lower case, so names are lowered (`"ctrl-alt-F1"` works).
pub fn qemu_keys(key: &str) -> Result<Vec<String>, String> {
    let name = key_name(key);
    if name.is_empty() {
        return Err("send_key: empty key name".into());
    }
    let keys: Vec<String> = name.split('-').map(str::to_lowercase).collect();
    if keys.iter().any(String::is_empty) {
        return Err(format!(
            "send_key: bad key combination {key:?} (keys are joined with `-`; send a dash as \"-\" or \"minus\")"
        ));
    }
    for k in &keys {
        if let Some(hex) = k.strip_prefix("0x") {
            if u8::from_str_radix(hex, 16).is_err() {
                return Err(format!("send_key: bad scancode {k:?} in {key:?}"));
            }
        } else if !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "send_key: {key:?} is not a QEMU key name (see `sendkey` in QEMU's monitor documentation)"
            ));
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_key_table() {
        let golden: &[(&str, &[&str])] = &[
            ("ctrl-alt-delete", &["ctrl", "alt", "delete"]),
            ("alt-f2", &["alt", "f2"]),
            ("ctrl-alt-F1", &["ctrl", "alt", "f1"]),
            ("ret", &["ret"]),
            ("a", &["a"]),
            ("A", &["shift", "a"]),
            ("Z", &["shift", "z"]),
            ("1", &["1"]),
            ("!", &["shift", "0x02"]),
            (")", &["shift", "0x0b"]),
            ("-", &["0x0c"]),
            ("_", &["shift", "0x0c"]),
            ("=", &["0x0d"]),
            ("+", &["shift", "0x0d"]),
            (":", &["shift", "0x27"]),
            ("\"", &["shift", "0x28"]),
            ("|", &["shift", "0x2b"]),
            ("?", &["shift", "0x35"]),
            (" ", &["spc"]),
            ("\n", &["ret"]),
            ("\t", &["tab"]),
            ("shift-0x0C", &["shift", "0x0c"]),
            ("kp_enter", &["kp_enter"]),
        ];
        for (key, want) in golden {
            assert_eq!(qemu_keys(key).unwrap(), *want, "key {key:?}");
        }
    }

    #[test]
    fn every_printable_ascii_character_maps_to_keys() {
        for c in (0x20u8..0x7f).map(char::from) {
            let keys = qemu_keys(&c.to_string()).unwrap_or_else(|e| panic!("{c:?}: {e}"));
            assert!(!keys.is_empty() && keys.len() <= 2, "{c:?}: {keys:?}");
        }
    }

    #[test]
    fn bad_names_are_refused_with_a_hint() {
        assert!(qemu_keys("").is_err());
        assert!(qemu_keys("ctrl--").unwrap_err().contains("minus"));
        assert!(qemu_keys("0xZZ").unwrap_err().contains("scancode"));
        assert!(qemu_keys("é").unwrap_err().contains("not a QEMU key name"));
    }
}
