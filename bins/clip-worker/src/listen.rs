//! Where the API listens, and the rules that keep it closed.
//!
//! `unix:PATH` (the default, `/run/clip/worker.sock`): a socket created with the configured mode
//! (default `0660`) and group; a stale socket left by a killed worker is replaced, a live one
//! (another worker answers) or anything that is not a socket is refused. `tcp:ADDR`: only with a
//! credential — a token file and/or a client CA (mutual TLS) — and, unless the address is a
//! loopback one, only with TLS. A loopback TCP listener without any credential needs
//! `--insecure-no-auth`, which is named so nobody sets it by accident.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Listen {
    /// A unix socket.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(p) = s.strip_prefix("unix:") {
            if !p.starts_with('/') {
                return Err(format!("{s:?}: the socket path must be absolute"));
            }
            return Ok(Self::Unix(PathBuf::from(p)));
        }
        let addr = s.strip_prefix("tcp:").unwrap_or(s);
        addr.parse()
            .map(Self::Tcp)
            .map_err(|e| format!("{s:?} is neither unix:PATH nor tcp:ADDR:PORT ({e})"))
    }
}

/// TLS settings of a TCP listener.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tls {
    /// Server certificate chain (PEM).
    pub(crate) cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub(crate) key: Option<PathBuf>,
    /// Clients must present a certificate signed by this CA (PEM).
    pub(crate) client_ca: Option<PathBuf>,
}

/// The unix socket's permissions.
#[derive(Debug, Clone)]
pub(crate) struct SocketPerms {
    /// Mode bits.
    pub(crate) mode: u32,
    /// Owning group (name or number); `None` keeps the process's.
    pub(crate) group: Option<String>,
}

/// A bound listener, ready to serve.
pub(crate) enum Bound {
    Unix(tokio::net::UnixListener, PathBuf),
    Tcp(tokio::net::TcpListener),
    Tls(TlsListener),
}

/// Checks the combination of listener, TLS and credentials before anything is bound.
pub(crate) fn check_policy(
    listen: &Listen,
    tls: &Tls,
    has_tokens: bool,
    insecure_no_auth: bool,
) -> anyhow::Result<()> {
    let Listen::Tcp(addr) = listen else {
        if tls.cert.is_some() || tls.client_ca.is_some() {
            bail!("TLS settings apply to tcp: listeners only");
        }
        return Ok(());
    };
    let tls_on = tls.cert.is_some() || tls.key.is_some();
    if tls_on && (tls.cert.is_none() || tls.key.is_none()) {
        bail!("--tls-cert and --tls-key go together");
    }
    if tls.client_ca.is_some() && !tls_on {
        bail!("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS)");
    }
    if !addr.ip().is_loopback() && !tls_on {
        bail!(
            "refusing to listen on {addr} without TLS: the API starts containers as root; pass --tls-cert/--tls-key (and --tls-client-ca or --token-file), or listen on a unix socket"
        );
    }
    let authenticated = has_tokens || tls.client_ca.is_some();
    if !authenticated && !insecure_no_auth {
        bail!(
            "refusing to listen on {addr} without authentication: any local user could start containers as root; pass --token-file (or --tls-client-ca), listen on a unix socket, or — for throwaway test machines only — --insecure-no-auth"
        );
    }
    if !authenticated {
        tracing::warn!(%addr, "listening WITHOUT authentication (--insecure-no-auth): every local process can use this worker");
    }
    Ok(())
}

/// Binds the listener.
pub(crate) async fn bind(listen: &Listen, tls: &Tls, perms: &SocketPerms) -> anyhow::Result<Bound> {
    match listen {
        Listen::Unix(path) => bind_unix(path, perms).map(|l| Bound::Unix(l, path.clone())),
        Listen::Tcp(addr) => {
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr}"))?;
            match (&tls.cert, &tls.key) {
                (Some(cert), Some(key)) => Ok(Bound::Tls(TlsListener::new(
                    tcp,
                    acceptor(cert, key, tls.client_ca.as_deref())?,
                )?)),
                _ => Ok(Bound::Tcp(tcp)),
            }
        }
    }
}

fn bind_unix(path: &Path, perms: &SocketPerms) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "{} is in use: another worker answers on it (stop it, or pass another --listen)",
                    path.display()
                );
            }
            tracing::info!(path = %path.display(), "replacing a stale socket left by a stopped worker");
            std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    }
    // Bound under a private name, secured, then renamed into place: the socket is never
    // reachable with looser permissions than configured.
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let std_listener = std::os::unix::net::UnixListener::bind(&tmp)
        .with_context(|| format!("binding {}", tmp.display()))?;
    let secure = || -> anyhow::Result<()> {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(perms.mode))?;
        if let Some(g) = &perms.group {
            let gid = group_id(g)?;
            rustix::fs::chown(&tmp, None, Some(rustix::fs::Gid::from_raw(gid)))
                .with_context(|| format!("giving {} to group {g}", path.display()))?;
        }
        std::fs::rename(&tmp, path)
            .with_context(|| format!("moving the socket to {}", path.display()))?;
        Ok(())
    };
    if let Err(e) = secure() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std_listener.set_nonblocking(true)?;
    Ok(tokio::net::UnixListener::from_std(std_listener)?)
}

/// A group name or number as a gid (names from /etc/group).
fn group_id(g: &str) -> anyhow::Result<u32> {
    if let Ok(n) = g.parse() {
        return Ok(n);
    }
    let text = std::fs::read_to_string("/etc/group").context("reading /etc/group")?;
    text.lines()
        .find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let gid = f.nth(1)?.parse().ok()?;
            (name == g).then_some(gid)
        })
        .with_context(|| format!("no group {g:?} in /etc/group"))
}

fn acceptor(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not PEM certificates", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the key {}", key.display()))?;
    let builder = rustls::ServerConfig::builder();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("reading {}", ca.display()))?
            {
                roots
                    .add(c.with_context(|| format!("{}: not a PEM certificate", ca.display()))?)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .context("the client CA")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(certs, key)
        .context("the server certificate and key")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// How long a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How many handshakes may be in progress at once; more connections wait to be accepted.
const MAX_HANDSHAKES: usize = 256;

/// A TCP listener that completes a TLS handshake (client certificate checked, if required)
/// before a connection reaches the API; failed handshakes are dropped. Each handshake runs as a
/// task of its own with a time limit, so a client that connects and says nothing holds up
/// nobody but itself.
pub(crate) struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        SocketAddr,
    )>,
    local: SocketAddr,
    acceptor_task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub(crate) fn new(
        tcp: tokio::net::TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
    ) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let acceptor_task = tokio::spawn(async move {
            loop {
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                let Ok((tcp, addr)) = tcp.accept().await else {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, addr)).await;
                        }
                        Ok(Err(e)) => tracing::info!(%addr, error = %e, "TLS handshake refused"),
                        Err(_) => tracing::info!(%addr, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self {
            ready,
            local,
            acceptor_task,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor_task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accepting task is gone (only at shutdown): never hand out a connection again.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn listeners_parse_and_open_ones_are_refused() {
        assert_eq!(
            "unix:/run/clip/w.sock".parse(),
            Ok(Listen::Unix("/run/clip/w.sock".into()))
        );
        assert!("unix:relative".parse::<Listen>().is_err());
        let lo: Listen = "tcp:127.0.0.1:7878".parse().unwrap();
        assert_eq!("127.0.0.1:7878".parse(), Ok(lo.clone()));
        let any: Listen = "tcp:0.0.0.0:7878".parse().unwrap();
        let none = Tls::default();
        let tls = Tls {
            cert: Some("c".into()),
            key: Some("k".into()),
            client_ca: None,
        };
        assert!(check_policy(&lo, &none, false, false).is_err());
        assert!(check_policy(&lo, &none, false, true).is_ok());
        assert!(check_policy(&lo, &none, true, false).is_ok());
        assert!(
            check_policy(&any, &none, true, false).is_err(),
            "tokens in the clear on a network"
        );
        assert!(check_policy(&any, &tls, true, false).is_ok());
        assert!(
            check_policy(&any, &tls, false, false).is_err(),
            "TLS alone authenticates nobody"
        );
        assert!(check_policy(&Listen::Unix("/x".into()), &none, false, false).is_ok());
    }
}
