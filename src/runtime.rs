//! Process-wide settings for heavy tensor work.
//!
//! Training allocates and frees the same large tensors every step (logits of
//! `batch × seq × vocab`, embedding gradients, attention scores: tens to hundreds of MB
//! each). glibc serves allocations above its mmap threshold (at most 32 MB when adapted
//! dynamically) with fresh `mmap`s and returns them with `munmap` on free, so every step
//! pays for zero-filling new pages in the kernel: profiled on SmolLM2-135M, page faults
//! and page clearing took about a third of the time of a training step. Keeping large
//! blocks in the heap and not trimming it lets the next step reuse them (measured: 107 →
//! 150 tokens/s, README "Training throughput"). jemalloc (LD_PRELOAD) was 3× slower
//! here: its decay returns the pages just as eagerly.

/// Keeps freed large blocks for reuse instead of returning them to the kernel. Call once,
/// at start-up, before the heavy work. A no-op outside glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // 1 GiB: above any single tensor of the models this crate trains on a CPU.
        const MMAP_ABOVE: libc::c_int = 1 << 30;
        // -1 turns trimming off: a step frees gigabytes at once and the next one needs
        // them again. The process keeps its peak heap until it exits.
        const NEVER: libc::c_int = -1;
        // SAFETY: mallopt only changes allocator parameters; it is called before any
        // thread of ours allocates concurrently, and failure (0) leaves the defaults.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_ABOVE);
            libc::mallopt(libc::M_TRIM_THRESHOLD, NEVER);
        }
    }
}
