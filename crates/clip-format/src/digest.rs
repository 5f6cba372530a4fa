//! Content digests: the one type for `sha256:…` names of blobs, layers, manifests and files.

use std::fmt;
use std::path::PathBuf;

use sha2::{Digest as _, Sha256};

/// A content digest as OCI writes it: `ALGORITHM:HEX`, validated on construction. `sha256` (64
/// lowercase hex digits) is what every image in practice uses and what clip computes;
/// `sha512` (128) is accepted where an image names one. Serialises as its string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

/// A string that is not a digest clip understands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a digest (expected sha256:<64 hex digits> or sha512:<128 hex digits>)")]
pub struct DigestParseError {
    /// What was given (at most 100 characters of it).
    pub value: String,
}

/// Bytes whose digest is not the one that names them — the one error for every such check
/// (blobs, manifests, configs, uncompressed layers, files, spans).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} does not match its digest: expected {expected}, found {found}")]
pub struct DigestMismatch {
    /// Which bytes (e.g. "blob sha256:… in library/app on registry.example.com").
    pub what: String,
    /// The digest that names them.
    pub expected: Digest,
    /// The digest they have.
    pub found: Digest,
}

impl Digest {
    /// Parses `sha256:<64 hex>` or `sha512:<128 hex>` (lowercase, as the OCI spec requires).
    pub fn parse(s: &str) -> Result<Self, DigestParseError> {
        let ok = s.split_once(':').is_some_and(|(alg, hex)| {
            let len = match alg {
                "sha256" => 64,
                "sha512" => 128,
                _ => return false,
            };
            hex.len() == len && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(DigestParseError {
                value: s.chars().take(100).collect(),
            })
        }
    }

    /// The sha256 digest of `bytes`.
    #[must_use]
    pub fn sha256(bytes: &[u8]) -> Self {
        Self::from_sha256(Sha256::digest(bytes).into())
    }

    /// The digest named by a finished sha256 hash.
    #[must_use]
    pub fn from_sha256(hash: [u8; 32]) -> Self {
        Self(format!("sha256:{}", hex::encode(hash)))
    }

    /// The digest of what `hasher` has seen.
    #[must_use]
    pub fn of_hasher(hasher: Sha256) -> Self {
        Self::from_sha256(hasher.finalize().into())
    }

    /// `sha256` or `sha512`.
    #[must_use]
    pub fn algorithm(&self) -> &str {
        self.0.split_once(':').map_or("", |(a, _)| a)
    }

    /// The hex part.
    #[must_use]
    pub fn hex(&self) -> &str {
        self.0.split_once(':').map_or("", |(_, h)| h)
    }

    /// The whole `ALGORITHM:HEX` string.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 32 bytes of a sha256 digest (`None` for other algorithms).
    #[must_use]
    pub fn sha256_bytes(&self) -> Option<[u8; 32]> {
        if self.algorithm() != "sha256" {
            return None;
        }
        hex::decode(self.hex()).ok()?.try_into().ok()
    }

    /// Where an OCI image layout keeps this blob, relative to the layout: `blobs/ALG/HEX`.
    #[must_use]
    pub fn blob_path(&self) -> PathBuf {
        PathBuf::from("blobs")
            .join(self.algorithm())
            .join(self.hex())
    }

    /// Checks `bytes` against this digest (`what` names them in the error).
    pub fn verify(&self, what: impl Into<String>, bytes: &[u8]) -> Result<(), DigestMismatch> {
        let found = if self.algorithm() == "sha256" {
            Self::sha256(bytes)
        } else {
            Self(format!(
                "sha512:{}",
                hex::encode(sha2::Sha512::digest(bytes))
            ))
        };
        self.check(what, found)
    }

    /// Compares with a computed digest.
    pub fn check(&self, what: impl Into<String>, found: Self) -> Result<(), DigestMismatch> {
        if *self == found {
            Ok(())
        } else {
            Err(DigestMismatch {
                what: what.into(),
                expected: self.clone(),
                found,
            })
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.0)
    }
}

impl std::str::FromStr for Digest {
    type Err = DigestParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl AsRef<str> for Digest {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Digest {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Digest {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn digests_parse_hash_and_name_their_blob() {
        let d = Digest::sha256(b"hello");
        assert_eq!(
            d.as_str(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(Digest::parse(d.as_str()).unwrap(), d);
        assert_eq!(d.algorithm(), "sha256");
        assert_eq!(d.blob_path(), PathBuf::from("blobs/sha256").join(d.hex()));
        assert_eq!(d.sha256_bytes().unwrap()[0], 0x2c);
        d.verify("greeting", b"hello").unwrap();
        let e = d.verify("greeting", b"hellO").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("greeting does not match its digest"),
            "{e}"
        );
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        for bad in [
            "",
            "sha256:",
            "sha256:2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824",
            "md5:00",
            "sha256:+f",
            "sha256:../../etc/passwd",
            "sha512:00",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad:?}");
            assert!(serde_json::from_str::<Digest>(&format!("{bad:?}")).is_err());
        }
        let long = format!("sha512:{}", "a".repeat(128));
        assert_eq!(Digest::parse(&long).unwrap().sha256_bytes(), None);
    }
}
