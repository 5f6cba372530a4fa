//! A TCP tap: forwards every connection to a real service and records, per connection, whether
//! it opened with a TLS handshake or with plain text — how a test proves that a client never
//! retried over plain HTTP after a TLS failure (distribution does not log such requests).

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{IoContext, Result};

#[derive(Debug, Default)]
struct Counts {
    tls: AtomicU64,
    plain: AtomicU64,
    /// The first bytes of each plain-text connection (up to 64), for messages.
    plain_heads: Mutex<Vec<String>>,
}

/// A running tap on `127.0.0.1`; stops accepting on drop.
#[derive(Debug)]
pub struct Tap {
    addr: SocketAddr,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
}

impl Tap {
    /// Listens on a free loopback port and forwards each connection to `target`.
    pub fn start(target: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").ctx(|| "binding the tap's port".into())?;
        let addr = listener
            .local_addr()
            .ctx(|| "reading the tap's port".into())?;
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (Arc::clone(&counts), Arc::clone(&stop));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let c = Arc::clone(&c);
                std::thread::spawn(move || forward(client, target, &c));
            }
        });
        Ok(Self { addr, counts, stop })
    }

    /// `127.0.0.1:PORT`, as a registry host.
    #[must_use]
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Connections that opened with a TLS handshake record.
    #[must_use]
    pub fn tls_connections(&self) -> u64 {
        self.counts.tls.load(Ordering::SeqCst)
    }

    /// Connections that opened with anything else (plain HTTP), with their first bytes.
    #[must_use]
    pub fn plain_connections(&self) -> Vec<String> {
        self.counts
            .plain_heads
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn forward(client: TcpStream, target: SocketAddr, counts: &Counts) {
    let mut first = [0u8; 64];
    let Ok(n) = client.peek(&mut first) else {
        return;
    };
    if n == 0 {
        return;
    }
    // A TLS record starts with content type 22 (handshake) and major version 3.
    if first[0] == 0x16 && n > 1 && first[1] == 3 {
        counts.tls.fetch_add(1, Ordering::SeqCst);
    } else {
        counts.plain.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut v) = counts.plain_heads.lock() {
            v.push(String::from_utf8_lossy(&first[..n]).into_owned());
        }
    }
    let Ok(server) = TcpStream::connect(target) else {
        return;
    };
    let (Ok(mut c2), Ok(mut s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || pump(&mut c2, &mut s2));
    let (mut client, mut server) = (client, server);
    pump(&mut server, &mut client);
    let _ = up.join();
}

fn pump(from: &mut TcpStream, to: &mut TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
