//! The memory-bandwidth limit: a plain `memcpy` of one block size, on one
//! thread or several at once, each thread copying between its own two
//! buffers. Both buffers are written before timing starts so no page fault
//! is measured. Any data path that moves a block through memory (a host-tier
//! put, a gRPC transfer over loopback) copies it at least once, so this is
//! the ceiling it is compared with.
//!
//! Buffers are placed at a chosen offset from a 4 KiB page boundary
//! ([`PageBuf`]): where they fall relative to each other can change memcpy's
//! speed many times over (glibc's `rep movsb` path on some AMD CPUs is ~17x
//! slower when the destination sits 16 bytes past the source modulo 4 KiB),
//! so the limit is measured with both page-aligned and the criterion bench
//! also measures the skewed case.

use crate::latency;
use hdrhistogram::Histogram;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Page size the buffers are placed against.
pub const PAGE: usize = 4096;

/// A buffer of `len` bytes starting `skew` bytes after a 4 KiB page
/// boundary, filled with a deterministic pattern.
#[derive(Debug, Clone)]
pub struct PageBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl PageBuf {
    /// `len` bytes at `skew` (taken modulo 4 KiB) past a page boundary,
    /// filled from `seed` (every page written, so none faults later).
    pub fn new(len: usize, skew: usize, seed: u64) -> PageBuf {
        let raw = vec![0u8; len + 2 * PAGE];
        let misalign = raw.as_ptr() as usize % PAGE;
        let start = (PAGE - misalign) % PAGE + skew % PAGE;
        let mut b = PageBuf { raw, start, len };
        crate::payload::fill(seed, b.as_mut_slice());
        b
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// What a memcpy run measured.
#[derive(Debug, Clone)]
pub struct CopyRun {
    /// Bytes copied, all threads together.
    pub bytes: u64,
    /// Copies made, all threads together.
    pub copies: u64,
    /// Wall time from the common start to the last thread's end.
    pub elapsed: Duration,
    /// Latency of each copy, in nanoseconds.
    pub latency: Histogram<u64>,
}

impl CopyRun {
    /// Bytes per second, all threads together.
    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Copies `size` bytes between page-aligned buffers again and again on
/// `threads` threads for about `duration` (each thread makes at least one
/// copy).
pub fn measure(size: usize, threads: usize, duration: Duration) -> CopyRun {
    measure_skewed(size, threads, duration, 0)
}

/// Like [`measure`], but each thread copies into successive `size`-byte
/// slots of its own share of a `working_set`-byte destination (cycling),
/// so copies land in DRAM rather than in a cache-resident buffer: what a
/// put into a large arena, or a get out of one, has to do. The destination
/// is written before timing starts, so no page fault is measured.
pub fn measure_working_set(size: usize, threads: usize, duration: Duration, working_set: usize) -> CopyRun {
    let slots = (working_set / threads.max(1) / size.max(1)).max(1);
    copy_loop(size, threads, duration, 0, slots)
}

/// Like [`measure`] with the destination `dst_skew` bytes past a page
/// boundary (the source stays page-aligned).
pub fn measure_skewed(size: usize, threads: usize, duration: Duration, dst_skew: usize) -> CopyRun {
    copy_loop(size, threads, duration, dst_skew, 1)
}

/// `threads` threads each copy a `size`-byte source into `slots`
/// consecutive destination slots in turn (starting `dst_skew` past a page
/// boundary) until `duration` has passed.
fn copy_loop(size: usize, threads: usize, duration: Duration, dst_skew: usize, slots: usize) -> CopyRun {
    let threads = threads.max(1);
    let barrier = std::sync::Barrier::new(threads + 1);
    let (per_thread, elapsed) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    let src = PageBuf::new(size, 0, t as u64);
                    let mut dst = PageBuf::new(size * slots, dst_skew, !(t as u64));
                    let (src, dst) = (src.as_slice(), dst.as_mut_slice());
                    let mut h = latency::histogram();
                    let mut copies = 0u64;
                    barrier.wait();
                    let start = Instant::now();
                    loop {
                        let at = (copies as usize % slots) * size;
                        let t0 = Instant::now();
                        dst[at..at + size].copy_from_slice(black_box(src));
                        black_box(&mut *dst);
                        latency::record(&mut h, t0.elapsed());
                        copies += 1;
                        if start.elapsed() >= duration {
                            break;
                        }
                    }
                    (copies, h)
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let per_thread: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("memcpy thread panicked"))
            .collect();
        (per_thread, start.elapsed())
    });
    let mut latency = latency::histogram();
    let mut copies = 0;
    for (c, h) in per_thread {
        copies += c;
        latency.add(&h).expect("same histogram layout");
    }
    CopyRun {
        bytes: copies * size as u64,
        copies,
        elapsed,
        latency,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn page_buf_lands_at_its_skew() {
        for skew in [0, 16, 4095] {
            let b = super::PageBuf::new(10_000, skew, 1);
            assert_eq!(b.as_slice().as_ptr() as usize % super::PAGE, skew);
            assert_eq!(b.as_slice().len(), 10_000);
        }
    }

    #[test]
    fn working_set_copies_cycle_through_their_slots() {
        let r = super::measure_working_set(4096, 2, std::time::Duration::from_millis(5), 64 << 10);
        assert!(r.copies >= 2);
        assert_eq!(r.bytes, r.copies * 4096);
    }

    #[test]
    fn copies_at_least_once_per_thread() {
        let r = super::measure(4096, 2, std::time::Duration::ZERO);
        assert!(r.copies >= 2);
        assert_eq!(r.bytes, r.copies * 4096);
        assert_eq!(r.latency.len(), r.copies);
        assert!(r.bytes_per_sec() > 0.0);
    }
}
