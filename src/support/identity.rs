//! Who cloudimg acts as.

/// The user whose files cloudimg trusts and creates (root when run through sudo).
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}
