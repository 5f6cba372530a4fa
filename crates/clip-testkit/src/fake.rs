//! A scriptable HTTP server for misbehaviour a real registry will not produce (wrong digests,
//! 200 instead of 206, bogus `Content-Range`, truncated bodies, redirects, 5xx storms). Every
//! request is recorded so tests can check what a client sent (e.g. no `Authorization` after a
//! cross-host redirect).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{IoContext, Result};

/// A request as the fake server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeRequest {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body (up to [`MAX_BODY`] bytes).
    pub body: Vec<u8>,
}

/// The largest request body the fake server reads.
pub const MAX_BODY: usize = 64 << 20;

impl FakeRequest {
    /// A header's value.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What to answer.
#[derive(Debug, Clone, Default)]
pub struct FakeResponse {
    /// Status code.
    pub status: u16,
    /// Headers (Content-Length is added unless given).
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// Send only this many body bytes, then close the connection.
    pub truncate_to: Option<usize>,
}

impl FakeResponse {
    /// A response with a status and a body.
    #[must_use]
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            body: body.into(),
            ..Self::default()
        }
    }
    /// Adds a header.
    #[must_use]
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
}

type Handler = dyn Fn(&FakeRequest) -> FakeResponse + Send + Sync;

/// A running fake server on 127.0.0.1; stops on drop.
pub struct FakeRegistry {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    requests: Arc<Mutex<Vec<FakeRequest>>>,
}

impl std::fmt::Debug for FakeRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeRegistry")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeRegistry {
    /// Starts a server answering every request with `handler`.
    pub fn start(
        handler: impl Fn(&FakeRequest) -> FakeResponse + Send + Sync + 'static,
    ) -> Result<Self> {
        let listener =
            TcpListener::bind("127.0.0.1:0").ctx(|| "binding the fake registry".into())?;
        let addr = listener
            .local_addr()
            .ctx(|| "fake registry address".into())?;
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let (stop2, reqs2) = (Arc::clone(&stop), Arc::clone(&requests));
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (h, r) = (Arc::clone(&handler), Arc::clone(&reqs2));
                std::thread::spawn(move || {
                    let _ = serve(&conn, &*h, &r);
                });
            }
        });
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
            requests,
        })
    }

    /// `127.0.0.1:PORT`.
    #[must_use]
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Every request so far.
    #[must_use]
    pub fn requests(&self) -> Vec<FakeRequest> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    conn: &TcpStream,
    handler: &Handler,
    log: &Mutex<Vec<FakeRequest>>,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    // Like any HTTP server, answer bytes that are not HTTP (a TLS ClientHello) with a 400.
    if reader
        .fill_buf()?
        .first()
        .is_some_and(|b| !b.is_ascii_uppercase())
    {
        let mut out = conn;
        out.write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")?;
        return Ok(());
    }
    // One request per connection (every answer says `Connection: close`).
    {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let path = parts.next().unwrap_or_default().to_owned();
        let mut headers = Vec::new();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_owned());
                if k == "content-length" {
                    len = v.parse().unwrap_or(0).min(MAX_BODY);
                }
                headers.push((k, v));
            }
        }
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body)?;
        let req = FakeRequest {
            method,
            path,
            headers,
            body,
        };
        if let Ok(mut l) = log.lock() {
            l.push(req.clone());
        }
        let resp = handler(&req);
        let mut out = conn;
        write!(out, "HTTP/1.1 {} X\r\n", resp.status)?;
        let has_len = resp
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
        for (k, v) in &resp.headers {
            write!(out, "{k}: {v}\r\n")?;
        }
        if !has_len {
            write!(out, "Content-Length: {}\r\n", resp.body.len())?;
        }
        write!(out, "Connection: close\r\n\r\n")?;
        if req.method != "HEAD" {
            let n = resp
                .truncate_to
                .unwrap_or(resp.body.len())
                .min(resp.body.len());
            out.write_all(&resp.body[..n])?;
        }
        out.flush()?;
    }
    Ok(())
}
