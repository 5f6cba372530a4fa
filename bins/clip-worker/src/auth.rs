//! Who may call the API.
//!
//! The unix socket's permissions are the first gate (like dockerd's and containerd's sockets).
//! Over TCP a credential is required: bearer tokens from a file (several lines for rotation,
//! compared in constant time) and/or a client certificate signed by the configured CA (checked in
//! the TLS handshake, before any request). Read-only endpoints can be opened separately.

use std::path::Path;

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

/// The credential check every request passes.
#[derive(Default)]
pub(crate) struct Credentials {
    /// SHA-256 of each accepted token (the tokens themselves are not kept).
    tokens: Vec<[u8; 32]>,
    /// GET/HEAD requests need no token.
    public_read: bool,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("tokens", &self.tokens.len())
            .field("public_read", &self.public_read)
            .finish()
    }
}

impl Credentials {
    /// Tokens from `file` (one per line; blank lines and `#` comments ignored), if given.
    pub(crate) fn load(file: Option<&Path>, public_read: bool) -> anyhow::Result<Self> {
        let mut tokens = Vec::new();
        if let Some(f) = file {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading the token file {}", f.display()))?;
            for line in text.lines().map(str::trim) {
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                anyhow::ensure!(
                    line.len() >= 16,
                    "{}: tokens must be at least 16 characters (generate one with `openssl rand -hex 32`)",
                    f.display()
                );
                tokens.push(Sha256::digest(line.as_bytes()).into());
            }
            anyhow::ensure!(!tokens.is_empty(), "{}: no tokens in the file", f.display());
        }
        Ok(Self {
            tokens,
            public_read,
        })
    }

    /// Whether tokens are required.
    pub(crate) fn has_tokens(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Checks a request's `Authorization` header.
    pub(crate) fn check(&self, header: Option<&str>, read_only: bool) -> Result<(), String> {
        if self.tokens.is_empty() || (read_only && self.public_read) {
            return Ok(());
        }
        let Some(token) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            return Err("a credential is required: send `Authorization: Bearer <token>` with a token of the worker's --token-file".into());
        };
        let candidate: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        // Equal-length digests compared without an early exit: no timing signal.
        let mut found = false;
        for t in &self.tokens {
            let diff = t
                .iter()
                .zip(&candidate)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            found |= diff == 0;
        }
        if found {
            Ok(())
        } else {
            Err("the token is not one the worker accepts".into())
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tokens_rotate_and_read_only_may_be_public() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens");
        std::fs::write(
            &f,
            "# current and next\n0123456789abcdef0123\n\nfedcba9876543210fedc\n",
        )
        .unwrap();
        let c = Credentials::load(Some(&f), false).unwrap();
        assert!(c.check(Some("Bearer 0123456789abcdef0123"), false).is_ok());
        assert!(c.check(Some("Bearer fedcba9876543210fedc"), false).is_ok());
        assert!(c.check(Some("Bearer 0123456789abcdef0124"), false).is_err());
        assert!(c.check(None, true).is_err());
        let public = Credentials::load(Some(&f), true).unwrap();
        assert!(public.check(None, true).is_ok());
        assert!(public.check(None, false).is_err());
        std::fs::write(&f, "short\n").unwrap();
        assert!(Credentials::load(Some(&f), false).is_err());
        assert!(!format!("{c:?}").contains("0123456789"));
    }
}
