//! How the C heap treats large buffers, for commands that loop over the same work.
//!
//! glibc serves every allocation above its mmap threshold (32 MiB at most) with a mapping of its
//! own and unmaps it when it is freed. A training step allocates and frees tensors of 60–140 MB
//! (logits over the extended vocabulary, their gradients, the chain teacher's distributions over
//! the old tokenization), so every step the kernel faulted in and zeroed those pages again: four
//! million page faults in ten quickstart steps, ~10 % of a step's time (BENCHMARKS.md, "A heap
//! that keeps its pages").

/// Serves large allocations from the heap and keeps freed memory there, so that the next step
/// reuses pages that are already mapped. (A thread other than the main one still maps a buffer
/// larger than its arena's 64 MiB heap; the training loop's large tensors are the main
/// thread's.) Returns whether the setting took (glibc on Linux only; elsewhere it is a no-op
/// that returns false).
///
/// The price: the process's memory does not shrink after a peak until it exits. So only
/// commands that end with their loop call this (`train`, `eval`), not `serve`, whose memory must
/// return to its idle level after a burst of requests.
pub fn reuse_large_buffers() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes glibc's allocation policy; it is thread-safe (it takes
        // the arenas' locks) and memory already handed out stays valid.
        unsafe { libc::mallopt(libc::M_MMAP_MAX, 0) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    /// Minor page faults of the calling thread so far.
    fn thread_faults() -> i64 {
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `ru` is a valid out-pointer for the call's duration.
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) }, 0);
        ru.ru_minflt
    }

    /// 40 MiB: above glibc's largest mmap threshold (32 MiB), so without the setting every
    /// such buffer is a fresh mapping; below the 64 MiB heaps of the arenas that threads other
    /// than the main one (the test harness's) allocate from.
    const BYTES: usize = 40 << 20;

    /// Writes every page of a fresh buffer; the page faults that took.
    fn touch_fresh_buffer() -> i64 {
        let before = thread_faults();
        // calloc: a fresh mapping comes zeroed by the kernel (faults on first touch), a reused
        // heap chunk is cleared with memset (its pages are mapped already).
        let mut v = vec![0u8; BYTES];
        for page in v.chunks_mut(4096) {
            page[0] = 1;
        }
        std::hint::black_box(&v);
        thread_faults() - before
    }

    #[test]
    fn a_freed_large_buffer_is_reused_without_page_faults() {
        assert!(super::reuse_large_buffers());
        // The first buffer may grow the heap (faults); the second gets the same pages back.
        touch_fresh_buffer();
        let faults = touch_fresh_buffer();
        // A fresh mapping faults once per 4 KiB page: 10,240 here.
        assert!(faults < 1_000, "{faults} page faults for a buffer the heap had just freed");
    }
}
