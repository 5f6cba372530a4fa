//! Signed objects: what a node reads from a place others can write (a shared archive store, a
//! shared layer-index store) is accepted only with a signature by a key the node trusts.
//!
//! # Model
//!
//! A fleet has one or a few Ed25519 keys (`clip keygen`). Whoever writes shared objects (the
//! workers that index images, CI) holds a private key ([`SigningKey`]); every node lists the
//! public keys it accepts ([`Trust`]). A signed object is the payload behind a fixed header:
//!
//! ```text
//! "CLIPSIG\0" | version u32 LE (1) | public key (32) | signature (64) | payload …
//! ```
//!
//! The signature covers `"clip-signed-object-v1\0" | name | "\0" | SHA-256(payload)`, so a
//! signed object cannot be replayed under another name (a signed archive of one image copied
//! over another image's id fails), and large payloads are verified streaming. Objects without
//! the header are unsigned: refused unless the node explicitly allows unsigned objects (a fleet
//! from before signatures). A writer with write access to the bucket but no trusted key can
//! delete objects or write garbage — both make readers index the image themselves — but cannot
//! make any node serve its files.

use std::io::Read as _;
use std::path::Path;

use base64::Engine as _;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use sha2::{Digest as _, Sha256};

const MAGIC: &[u8; 8] = b"CLIPSIG\0";
const VERSION: u32 = 1;
/// Bytes in front of a signed object's payload.
pub const HEADER_LEN: usize = 8 + 4 + 32 + 64;
const DOMAIN: &[u8] = b"clip-signed-object-v1\0";
/// How a public key is written: `clip-ed25519 BASE64 [comment]`.
const PUBLIC_PREFIX: &str = "clip-ed25519";
/// How a private key file starts: `clip-ed25519-private BASE64(PKCS#8)`.
const PRIVATE_PREFIX: &str = "clip-ed25519-private";

/// Why a signed object, or a key, was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    /// The object carries no signature and unsigned objects are not allowed.
    #[error(
        "{name}: not signed (sign shared objects with signingKey, or set allowUnsigned for a fleet without keys)"
    )]
    Unsigned {
        /// The object's name.
        name: String,
    },
    /// Signed by a key this node does not trust.
    #[error("{name}: signed by key {key}, which is not in trustedKeys")]
    UnknownKey {
        /// The object's name.
        name: String,
        /// The signer's public key.
        key: String,
    },
    /// The signature does not match the object (altered, or signed for another name).
    #[error(
        "{name}: the signature does not match its bytes (altered, or copied from another name)"
    )]
    BadSignature {
        /// The object's name.
        name: String,
    },
    /// A signed object's header is cut short or of an unknown version.
    #[error("{name}: a damaged signature header")]
    Damaged {
        /// The object's name.
        name: String,
    },
    /// A key (file) cannot be read or parsed.
    #[error("{what}: {reason}")]
    Key {
        /// Which key.
        what: String,
        /// Why.
        reason: String,
    },
    /// Reading the object failed.
    #[error("{name}: {source}")]
    Io {
        /// The object's name.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// An Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{PUBLIC_PREFIX} {}",
            base64::engine::general_purpose::STANDARD.encode(self.0)
        )
    }
}

impl std::str::FromStr for PublicKey {
    type Err = SignError;
    /// `clip-ed25519 BASE64 [comment]`.
    fn from_str(s: &str) -> Result<Self, SignError> {
        let bad = |reason: &str| SignError::Key {
            what: format!("public key {:?}", s.chars().take(80).collect::<String>()),
            reason: reason.into(),
        };
        let mut words = s.split_whitespace();
        if words.next() != Some(PUBLIC_PREFIX) {
            return Err(bad(
                "not a clip-ed25519 public key (clip keygen writes them)",
            ));
        }
        let b64 = words.next().ok_or_else(|| bad("no key after the prefix"))?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| bad("the key is not base64"))?;
        let key: [u8; 32] = raw.try_into().map_err(|_| bad("not 32 bytes"))?;
        Ok(Self(key))
    }
}

/// A private key that signs what this node writes to shared stores.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    public: PublicKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new key: the private key file's text (keep it `0600`) and the key.
    pub fn generate() -> Result<(String, Self), SignError> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| SignError::Key {
            what: "a new key".into(),
            reason: "the system's random source failed".into(),
        })?;
        let text = format!(
            "{PRIVATE_PREFIX} {}\n",
            base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref())
        );
        let key = Self::parse(&text, "a new key")?;
        Ok((text, key))
    }

    /// Parses a private key file's text.
    pub fn parse(text: &str, what: &str) -> Result<Self, SignError> {
        let bad = |reason: &str| SignError::Key {
            what: what.into(),
            reason: reason.into(),
        };
        let mut words = text.split_whitespace();
        if words.next() != Some(PRIVATE_PREFIX) {
            return Err(bad(
                "not a clip-ed25519 private key (clip keygen writes them)",
            ));
        }
        let der = base64::engine::general_purpose::STANDARD
            .decode(words.next().ok_or_else(|| bad("no key after the prefix"))?)
            .map_err(|_| bad("the key is not base64"))?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map_err(|e| bad(&format!("not an Ed25519 PKCS#8 key: {e}")))?;
        let public = PublicKey(
            pair.public_key()
                .as_ref()
                .try_into()
                .map_err(|_| bad("a public key that is not 32 bytes"))?,
        );
        Ok(Self { pair, public })
    }

    /// Loads a private key file.
    pub fn load(path: &Path) -> Result<Self, SignError> {
        let what = format!("signing key {}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| SignError::Key {
            what: what.clone(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, &what)
    }

    /// Its public key.
    #[must_use]
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// The header that signs a payload with SHA-256 `digest` under `name`.
    #[must_use]
    pub fn header(&self, name: &str, digest: &[u8; 32]) -> [u8; HEADER_LEN] {
        let sig = self.pair.sign(&message(name, digest));
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..44].copy_from_slice(&self.public.0);
        h[44..].copy_from_slice(sig.as_ref());
        h
    }

    /// `payload` signed under `name`: header, then payload.
    #[must_use]
    pub fn seal(&self, name: &str, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(&self.header(name, &Sha256::digest(payload).into()));
        out.extend_from_slice(payload);
        out
    }
}

fn message(name: &str, digest: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + name.len() + 33);
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(name.as_bytes());
    m.push(0);
    m.extend_from_slice(digest);
    m
}

/// What a node accepts from shared places.
#[derive(Debug, Default)]
pub struct Trust {
    /// Signs what this node writes (its public key is trusted too).
    pub signer: Option<SigningKey>,
    /// Public keys whose signatures are accepted.
    pub trusted: Vec<PublicKey>,
    /// Accept objects without a signature (a fleet from before signatures; off by default).
    pub allow_unsigned: bool,
}

/// Whether bytes begin a signed object.
#[must_use]
pub fn is_signed(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

impl Trust {
    /// Whether `key`'s signatures are accepted.
    #[must_use]
    pub fn trusts(&self, key: &PublicKey) -> bool {
        self.trusted.contains(key) || self.signer.as_ref().is_some_and(|s| s.public == *key)
    }

    /// What to store under `name`: `payload` signed when this node has a key, else as it is.
    #[must_use]
    pub fn seal(&self, name: &str, payload: &[u8]) -> Vec<u8> {
        match &self.signer {
            Some(k) => k.seal(name, payload),
            None => payload.to_vec(),
        }
    }

    /// Checks `header` (the first [`HEADER_LEN`] bytes of a signed object) against a payload
    /// with SHA-256 `digest`.
    pub fn check_header(
        &self,
        name: &str,
        header: &[u8],
        digest: &[u8; 32],
    ) -> Result<(), SignError> {
        let damaged = || SignError::Damaged { name: name.into() };
        if header.len() < HEADER_LEN || !header.starts_with(MAGIC) {
            return Err(damaged());
        }
        let version = u32::from_le_bytes(header[8..12].try_into().map_err(|_| damaged())?);
        if version != VERSION {
            return Err(damaged());
        }
        let key = PublicKey(header[12..44].try_into().map_err(|_| damaged())?);
        if !self.trusts(&key) {
            return Err(SignError::UnknownKey {
                name: name.into(),
                key: key.to_string(),
            });
        }
        UnparsedPublicKey::new(&ED25519, key.0)
            .verify(&message(name, digest), &header[44..HEADER_LEN])
            .map_err(|_| SignError::BadSignature { name: name.into() })
    }

    /// The payload of object `bytes` stored under `name`, if its signature is trusted (or it is
    /// unsigned and unsigned objects are allowed).
    pub fn open<'a>(&self, name: &str, bytes: &'a [u8]) -> Result<&'a [u8], SignError> {
        if !is_signed(bytes) {
            return if self.allow_unsigned {
                Ok(bytes)
            } else {
                Err(SignError::Unsigned { name: name.into() })
            };
        }
        let (header, payload) = bytes.split_at(HEADER_LEN.min(bytes.len()));
        self.check_header(name, header, &Sha256::digest(payload).into())?;
        Ok(payload)
    }

    /// Checks the object in file `path` stored under `name` and returns where its payload
    /// starts (0 for an allowed unsigned object); the payload is hashed streaming.
    pub fn open_file(&self, name: &str, path: &Path) -> Result<u64, SignError> {
        let io = |source| SignError::Io {
            name: name.into(),
            source,
        };
        let mut f = std::fs::File::open(path).map_err(io)?;
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match f.read(&mut header[got..]).map_err(io)? {
                0 => break,
                n => got += n,
            }
        }
        if !is_signed(&header[..got]) {
            return if self.allow_unsigned {
                Ok(0)
            } else {
                Err(SignError::Unsigned { name: name.into() })
            };
        }
        let mut hasher = Sha256::new();
        std::io::copy(&mut f, &mut hasher).map_err(io)?;
        self.check_header(name, &header[..got], &hasher.finalize().into())?;
        Ok(HEADER_LEN as u64)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn signed_objects_open_only_for_trusted_keys_and_their_own_name() {
        let (text, fleet) = SigningKey::generate().unwrap();
        let fleet = SigningKey::parse(&text, "k").unwrap_or(fleet);
        let (_, other) = SigningKey::generate().unwrap();
        let reader = Trust {
            trusted: vec![fleet.public()],
            ..Trust::default()
        };
        let sealed = fleet.seal("a.clip", b"archive bytes");
        assert_eq!(reader.open("a.clip", &sealed).unwrap(), b"archive bytes");
        // Another name, altered bytes, an unknown key, no signature: refused.
        assert!(matches!(
            reader.open("b.clip", &sealed),
            Err(SignError::BadSignature { .. })
        ));
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert!(matches!(
            reader.open("a.clip", &altered),
            Err(SignError::BadSignature { .. })
        ));
        assert!(matches!(
            reader.open("a.clip", &other.seal("a.clip", b"archive bytes")),
            Err(SignError::UnknownKey { .. })
        ));
        assert!(matches!(
            reader.open("a.clip", b"archive bytes"),
            Err(SignError::Unsigned { .. })
        ));
        assert!(matches!(
            reader.open("a.clip", &sealed[..50]),
            Err(SignError::Damaged { .. })
        ));
        let lax = Trust {
            allow_unsigned: true,
            ..Trust::default()
        };
        assert_eq!(lax.open("a.clip", b"plain").unwrap(), b"plain");
        assert!(
            lax.open("a.clip", &sealed).is_err(),
            "signed, by nobody it trusts"
        );
        // A signer trusts itself.
        let writer = Trust {
            signer: Some(fleet),
            ..Trust::default()
        };
        assert_eq!(
            writer.open("a.clip", &writer.seal("a.clip", b"x")).unwrap(),
            b"x"
        );

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("obj");
        std::fs::write(&f, &sealed).unwrap();
        assert_eq!(reader.open_file("a.clip", &f).unwrap(), HEADER_LEN as u64);
        assert!(reader.open_file("b.clip", &f).is_err());
        std::fs::write(&f, b"short").unwrap();
        assert!(reader.open_file("a.clip", &f).is_err());
        assert_eq!(lax.open_file("a.clip", &f).unwrap(), 0);
    }

    #[test]
    fn keys_round_trip_through_their_text() {
        let (text, k) = SigningKey::generate().unwrap();
        assert!(text.starts_with("clip-ed25519-private "));
        let public: PublicKey = format!("{} ci@fleet", k.public()).parse().unwrap();
        assert_eq!(public, k.public());
        assert!("ssh-ed25519 AAAA".parse::<PublicKey>().is_err());
        assert!("clip-ed25519 AAAA".parse::<PublicKey>().is_err());
        assert!(SigningKey::parse("clip-ed25519-private AAAA", "k").is_err());
        assert!(
            !format!("{k:?}").contains(&text[21..40]),
            "a private key in Debug output"
        );
    }
}
