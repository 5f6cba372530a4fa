//! A token server for the registry's `auth.token` mode.
//!
//! It implements the two halves of the Docker token protocol that clients use: `GET /token` with
//! optional Basic credentials, and the OAuth2 `POST /token` (grant types `password` and
//! `refresh_token`). Tokens are ES256 JWTs whose `x5c` header carries a certificate issued by the
//! testkit CA, which the registry trusts through its `rootcertbundle`.
//!
//! The distribution registry accepts a token for 60 s past its `exp` (clock-skew leeway). To make
//! short lifetimes real, the server writes `exp = now + lifetime - 60 s`, so the registry starts
//! rejecting the token exactly `lifetime` after issue, while `expires_in` tells the client the
//! advertised lifetime. Counters let tests see how often clients asked.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

use crate::error::{Error, IoContext, Result};
use crate::pki::LeafCert;

/// The registry's leeway on `exp`, which the server subtracts.
const REGISTRY_LEEWAY_SECS: u64 = 60;

/// Settings of a [`TokenServer`].
#[derive(Debug, Clone)]
pub struct TokenSettings {
    /// The `service` name the registry expects as audience.
    pub service: String,
    /// The issuer the registry trusts.
    pub issuer: String,
    /// How long a token lives.
    pub lifetime: Duration,
    /// Users and passwords; each gets pull and push on every repository.
    pub users: Vec<(String, String)>,
    /// Whether anonymous clients get pull access.
    pub anonymous_pull: bool,
}

/// What the server has handed out so far.
#[derive(Debug, Default)]
pub struct TokenStats {
    /// Tokens issued through `GET`.
    pub get_tokens: AtomicU64,
    /// Tokens issued through OAuth2 `POST`.
    pub post_tokens: AtomicU64,
    /// Requests refused (bad credentials, unknown refresh token).
    pub refused: AtomicU64,
}

struct Shared {
    settings: TokenSettings,
    key: EcdsaKeyPair,
    x5c: String,
    rng: SystemRandom,
    stats: Arc<TokenStats>,
    refresh_tokens: Mutex<HashMap<String, String>>,
    next_id: AtomicU64,
}

/// A running token server on 127.0.0.1; stops on drop.
pub struct TokenServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<TokenStats>,
}

impl std::fmt::Debug for TokenServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl TokenServer {
    /// Starts the server, signing with `signer` (a certificate issued by the registry's trusted CA).
    pub fn start(settings: TokenSettings, signer: &LeafCert) -> Result<Self> {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &signer.key_pkcs8_der,
            &rng,
        )
        .map_err(|e| Error::Crypto(format!("loading token signing key: {e}")))?;
        let listener =
            TcpListener::bind("127.0.0.1:0").ctx(|| "binding the token server".to_owned())?;
        let addr = listener
            .local_addr()
            .ctx(|| "token server address".to_owned())?;
        let stats = Arc::new(TokenStats::default());
        let shared = Arc::new(Shared {
            settings,
            key,
            x5c: STANDARD.encode(&signer.cert_der),
            rng,
            stats: Arc::clone(&stats),
            refresh_tokens: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let shared = Arc::clone(&shared);
                    std::thread::spawn(move || {
                        let _ = serve(&shared, &conn);
                    });
                }
            }
        });
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
            stats,
        })
    }

    /// The realm URL to put in the registry config.
    #[must_use]
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// Counters of what was issued.
    #[must_use]
    pub fn stats(&self) -> &TokenStats {
        &self.stats
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Request {
    method: String,
    query: String,
    authorization: Option<String>,
    body: String,
}

fn read_request(conn: &TcpStream) -> std::io::Result<Request> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default();
    let query = target
        .split_once('?')
        .map(|(_, q)| q.to_owned())
        .unwrap_or_default();
    let mut authorization = None;
    let mut content_length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            let value = value.trim().to_owned();
            match name.to_ascii_lowercase().as_str() {
                "authorization" => authorization = Some(value),
                "content-length" => content_length = value.parse().unwrap_or(0).min(1 << 20),
                _ => {}
            }
        }
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body)?;
    Ok(Request {
        method,
        query,
        authorization,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn respond(mut conn: &TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Decodes `application/x-www-form-urlencoded` / query strings into pairs (repeated keys kept).
fn parse_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn basic_credentials(header: Option<&str>) -> Option<(String, String)> {
    let encoded = header?.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (u, p) = decoded.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

// Over 100 lines on purpose: test support: the token server's request handling (Basic check,
// scope grant, expiry on demand) as one readable handler.
fn serve(shared: &Shared, conn: &TcpStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let req = read_request(conn)?;
    let mut params = parse_form(&req.query);
    if req.method == "POST" {
        params.extend(parse_form(&req.body));
    }
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let users = &shared.settings.users;
    let check = |u: &str, p: &str| users.iter().any(|(uu, pp)| uu == u && pp == p);

    // Who is asking?
    let subject: Option<String> = if req.method == "POST" {
        match get("grant_type").as_deref() {
            Some("password") => {
                let (u, p) = (
                    get("username").unwrap_or_default(),
                    get("password").unwrap_or_default(),
                );
                if check(&u, &p) { Some(u) } else { None }
            }
            Some("refresh_token") => {
                let rt = get("refresh_token").unwrap_or_default();
                shared
                    .refresh_tokens
                    .lock()
                    .ok()
                    .and_then(|m| m.get(&rt).cloned())
            }
            _ => None,
        }
    } else {
        match basic_credentials(req.authorization.as_deref()) {
            Some((u, p)) if check(&u, &p) => Some(u),
            Some(_) => None,
            None if shared.settings.anonymous_pull => Some(String::new()),
            None => Some(String::new()), // anonymous gets a token with no access, like real servers
        }
    };
    let Some(subject) = subject else {
        shared.stats.refused.fetch_add(1, Ordering::SeqCst);
        return respond(
            conn,
            "401 Unauthorized",
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#,
        );
    };

    // What may they do? Users: what they asked; anonymous: pull, if allowed.
    let mut access = Vec::new();
    for (k, scope) in &params {
        if k != "scope" {
            continue;
        }
        for one in scope.split(' ') {
            let Some((kind, rest)) = one.split_once(':') else {
                continue;
            };
            let Some((name, actions)) = rest.rsplit_once(':') else {
                continue;
            };
            let granted: Vec<&str> = actions
                .split(',')
                .filter(|a| {
                    if subject.is_empty() {
                        shared.settings.anonymous_pull && *a == "pull"
                    } else {
                        true
                    }
                })
                .collect();
            access.push(serde_json::json!({"type": kind, "name": name, "actions": granted}));
        }
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let lifetime = shared.settings.lifetime.as_secs().max(1);
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let claims = serde_json::json!({
        "iss": shared.settings.issuer,
        "sub": subject,
        "aud": shared.settings.service,
        "exp": (now + lifetime).saturating_sub(REGISTRY_LEEWAY_SECS),
        "nbf": now.saturating_sub(1),
        "iat": now,
        "jti": format!("clip-testkit-{id}"),
        "access": access,
    });
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [shared.x5c]});
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let Ok(sig) = shared.key.sign(&shared.rng, signing_input.as_bytes()) else {
        return respond(conn, "500 Internal Server Error", "{}");
    };
    let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
    let mut body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": lifetime,
        "issued_at": format_rfc3339(now),
    });
    if req.method == "POST" {
        shared.stats.post_tokens.fetch_add(1, Ordering::SeqCst);
        if !subject.is_empty() {
            let rt = format!("rt-{id}");
            if let Ok(mut m) = shared.refresh_tokens.lock() {
                m.insert(rt.clone(), subject.clone());
            }
            body["refresh_token"] = rt.into();
        }
    } else {
        shared.stats.get_tokens.fetch_add(1, Ordering::SeqCst);
    }
    respond(conn, "200 OK", &body.to_string())
}

/// Formats seconds since the epoch as RFC 3339 UTC (civil-from-days, no date crate needed).
pub(crate) fn format_rfc3339(secs: u64) -> String {
    let days = (secs / 86_400).cast_signed();
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn form_decoding_handles_scopes() {
        let p = parse_form("service=reg&scope=repository%3Afoo%2Fbar%3Apull%2Cpush&scope=x");
        assert_eq!(p[1].1, "repository:foo/bar:pull,push");
        assert_eq!(p.len(), 3);
        assert_eq!(percent_decode("a%2"), "a%2");
    }
}
