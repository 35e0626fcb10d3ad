//! Injectable wall clock: response `created` times and KV event timestamps
//! read time only through [`Clock`], so tests and simulations can fix it.

use std::fmt::Debug;

/// A source of wall-clock time.
pub trait Clock: Send + Sync + Debug + 'static {
    /// Seconds since the Unix epoch, with a fractional part.
    fn now_secs(&self) -> f64;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // the one sanctioned read of real time
    fn now_secs(&self) -> f64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    }
}

/// A clock that always reads the same time; for tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct FixedClock(pub f64);

impl Clock for FixedClock {
    fn now_secs(&self) -> f64 {
        self.0
    }
}
