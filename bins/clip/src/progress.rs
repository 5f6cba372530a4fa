//! A progress line on stderr — bytes, rate, ETA — when stderr is a terminal, and nothing when it
//! is not (logs and pipes stay clean), the way cargo and uv do it.

use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A progress line drawn by a background thread from a byte counter the work increments.
pub(crate) struct ProgressLine {
    done: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProgressLine {
    /// Starts drawing `label` (if stderr is a terminal and `enabled`); `total` may be set later.
    pub(crate) fn start(label: &'static str, enabled: bool) -> Self {
        let done = Arc::new(AtomicU64::new(0));
        let total = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = (enabled && std::io::stderr().is_terminal()).then(|| {
            let (done, total, stop) = (Arc::clone(&done), Arc::clone(&total), Arc::clone(&stop));
            std::thread::spawn(move || draw(label, &done, &total, &stop))
        });
        Self {
            done,
            total,
            stop,
            thread,
        }
    }

    /// The counter the work adds its bytes to.
    pub(crate) fn counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.done)
    }

    /// Sets the number of bytes the work will take.
    pub(crate) fn set_total(&self, bytes: u64) {
        self.total.store(bytes, Ordering::Relaxed);
    }
}

impl Drop for ProgressLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[allow(clippy::print_stderr)]
fn draw(label: &str, done: &AtomicU64, total: &AtomicU64, stop: &AtomicBool) {
    let start = Instant::now();
    let mut drawn = false;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        let (d, t) = (done.load(Ordering::Relaxed), total.load(Ordering::Relaxed));
        let secs = start.elapsed().as_secs_f64().max(0.001);
        let rate = d as f64 / secs;
        let mut line = format!("\r{label} {}", human(d));
        if t > 0 {
            let _ = write!(
                line,
                " / {} ({:.0}%)",
                human(t),
                d as f64 * 100.0 / t as f64
            );
        }
        let per_sec = u128::from(d) * 1000 / start.elapsed().as_millis().max(1);
        let _ = write!(
            line,
            ", {}/s",
            human(u64::try_from(per_sec).unwrap_or(u64::MAX))
        );
        if t > d && rate > 0.0 {
            let _ = write!(line, ", ETA {:.0} s", (t - d) as f64 / rate);
        }
        eprint!("{line}\x1b[K");
        let _ = std::io::stderr().flush();
        drawn = true;
    }
    if drawn {
        eprint!("\r\x1b[K");
    }
}

/// `12.3 MiB`.
fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_like_a_person_writes_them() {
        assert_eq!(super::human(512), "512 B");
        assert_eq!(super::human(3 << 20), "3.0 MiB");
        assert_eq!(super::human(1536), "1.5 KiB");
    }
}
