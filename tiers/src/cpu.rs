//! Keeping long CPU work (hashing or copying megabytes) from stalling the
//! async workers that also serve small control calls: [`offload`] runs it
//! through `tokio::task::block_in_place` on a multi-threaded runtime, which
//! hands this worker's other tasks to another thread for the duration.

/// Below this many bytes the work is shorter than the hand-off.
pub const OFFLOAD_BYTES: usize = 256 << 10;

/// Runs `f`, which touches about `bytes` bytes, moving it off the async
/// worker when it is large and the runtime allows it (multi-threaded);
/// inline otherwise (small work, current-thread runtimes, no runtime).
pub fn offload<R>(bytes: usize, f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let multi = Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
    if bytes >= OFFLOAD_BYTES && multi {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_inline_without_a_runtime() {
        assert_eq!(offload(1 << 30, || 7), 7);
    }

    #[tokio::test]
    async fn runs_inline_on_a_current_thread_runtime() {
        assert_eq!(offload(1 << 30, || 8), 8);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_on_a_multi_thread_runtime() {
        assert_eq!(offload(1 << 30, || 9), 9);
        assert_eq!(offload(10, || 10), 10);
    }
}
