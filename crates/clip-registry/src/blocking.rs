//! One client and one runtime for blocking callers.

use std::future::Future;
use std::sync::Arc;

use crate::{Client, ClientConfig, Error};

/// A [`Client`] together with the runtime that drives it, for callers on ordinary threads:
/// indexing, archiving, extracting, the image service, the CLI. Make one per service or per
/// command and hand out clones: every flow then shares the token cache, the connection pool, the
/// redirect cache and the runtime's threads. Cheap to clone.
#[derive(Clone)]
pub struct BlockingClient {
    client: Client,
    handle: tokio::runtime::Handle,
    _runtime: Arc<Runtime>,
}

/// Owns the runtime; shut down without blocking when the last clone goes (possibly from
/// inside another runtime, where blocking is not allowed).
struct Runtime(Option<tokio::runtime::Runtime>);

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for BlockingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingClient")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl BlockingClient {
    /// A client for `cfg` and a small runtime (two worker threads, I/O and timers) to drive it.
    pub fn new(cfg: ClientConfig) -> Result<Self, Error> {
        let client = Client::new(cfg)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("clip-net")
            .enable_all()
            .build()
            .map_err(|e| Error::Config(format!("starting the network runtime: {e}")))?;
        Ok(Self {
            client,
            handle: runtime.handle().clone(),
            _runtime: Arc::new(Runtime(Some(runtime))),
        })
    }

    /// The async client (clones share everything with this one).
    #[must_use]
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The runtime (alive as long as any clone), for spawning tasks and for the caller's other
    /// async services.
    #[must_use]
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Runs `f` to completion on the runtime. Call it from an ordinary thread (or a
    /// `spawn_blocking` thread), never from inside an async task.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.handle().block_on(f)
    }
}
