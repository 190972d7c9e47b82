//! The guest's `/etc/os-release`, read as os-release(5) says (pure).

/// A field of an os-release file, unquoted.
pub fn field(text: &str, field: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(field)?.strip_prefix('=')?;
        Some(value.trim().trim_matches('"').trim_matches('\'').to_string())
    })
}
