//! A throwaway certificate authority for TLS registries and token signing.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::error::{Error, IoContext, Result};

fn crypto(e: impl std::fmt::Display) -> Error {
    Error::Crypto(e.to_string())
}

/// A self-signed CA that issues leaf certificates, with its PEM written to `dir/ca.crt`.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_path: PathBuf,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

/// A certificate and its private key, as PEM files and DER bytes.
#[derive(Debug, Clone)]
pub struct LeafCert {
    /// The certificate PEM file.
    pub cert_path: PathBuf,
    /// The private key PEM file (PKCS#8).
    pub key_path: PathBuf,
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 DER.
    pub key_pkcs8_der: Vec<u8>,
}

impl TestCa {
    /// Creates a CA and writes its certificate to `dir/ca.crt` (the name skopeo's `--cert-dir` and
    /// docker's `certs.d` expect).
    pub fn new(dir: &Path, name: &str) -> Result<Self> {
        let key = KeyPair::generate().map_err(crypto)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(crypto)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(crypto)?;
        let cert_pem = cert.pem();
        let cert_path = dir.join("ca.crt");
        std::fs::write(&cert_path, &cert_pem).ctx(|| format!("writing {}", cert_path.display()))?;
        let issuer = Issuer::new(params, key);
        Ok(Self {
            issuer,
            cert_pem,
            cert_path,
        })
    }

    /// The CA certificate as PEM.
    #[must_use]
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate file.
    #[must_use]
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// Issues a certificate for `localhost` and `127.0.0.1` (TLS servers) or, with `san` empty, a
    /// plain signing certificate; writes `dir/NAME.crt` and `dir/NAME.key`.
    pub fn issue(&self, dir: &Path, name: &str, server: bool) -> Result<LeafCert> {
        let key = KeyPair::generate().map_err(crypto)?;
        let sans = if server {
            vec!["localhost".to_owned()]
        } else {
            Vec::new()
        };
        let mut params = CertificateParams::new(sans).map_err(crypto)?;
        if server {
            params
                .subject_alt_names
                .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        }
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.issuer).map_err(crypto)?;
        let cert_path = dir.join(format!("{name}.crt"));
        let key_path = dir.join(format!("{name}.key"));
        std::fs::write(&cert_path, cert.pem())
            .ctx(|| format!("writing {}", cert_path.display()))?;
        std::fs::write(&key_path, key.serialize_pem())
            .ctx(|| format!("writing {}", key_path.display()))?;
        Ok(LeafCert {
            cert_path,
            key_path,
            cert_der: cert.der().to_vec(),
            key_pkcs8_der: key.serialize_der(),
        })
    }
}
