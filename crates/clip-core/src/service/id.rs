//! Image ids: names of archives in a store, never paths.

use std::fmt;

/// An image id: `[A-Za-z0-9_-]`, 1 to 128 characters — a name, never a path. Flows make ids
/// from what an image is (a hash); requests give them as text and are parsed; a store joins
/// nothing else into a path or an object key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct ImageId(String);

impl ImageId {
    /// The longest id.
    pub const MAX_LEN: usize = 128;

    /// `s` as an id, if it is one.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        ok.then(|| Self(s.to_owned()))
    }

    /// The id of what `parts` name: the first 8 bytes of a sha256 over the length-prefixed
    /// parts, in hex.
    #[must_use]
    pub fn hashed(parts: &[&[u8]]) -> Self {
        Self(super::short_hash(parts))
    }

    /// The id of what a SHA-256 `digest` names: its first 8 bytes in hex.
    #[must_use]
    pub(crate) fn from_digest(digest: &[u8; 32]) -> Self {
        Self(hex::encode(&digest[..8]))
    }

    /// The id as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ImageId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for ImageId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

#[cfg(test)]
mod tests {
    use super::ImageId;

    #[test]
    fn ids_are_names_never_paths() {
        for bad in ["", "..", "a/b", "../x", "a b", "a.clip", &"x".repeat(129)] {
            assert!(ImageId::parse(bad).is_none(), "{bad:?}");
        }
        for good in ["0123abcd", "my-image_2", &"x".repeat(128)] {
            assert_eq!(
                ImageId::parse(good).map(|i| i.to_string()).as_deref(),
                Some(good)
            );
        }
        assert_eq!(ImageId::hashed(&[b"a"]).as_str().len(), 16);
        let id = ImageId::from_digest(&[0xab; 32]);
        assert_eq!(ImageId::parse(id.as_str()), Some(id));
    }
}
