//! Process-wide settings for heavy tensor work.
//!
//! Training allocates and frees the same large tensors every step (logits of
//! `batch × seq × vocab`, embedding gradients, attention scores: tens to hundreds of MB
//! each). glibc serves allocations above its mmap threshold (at most 32 MB when adapted
//! dynamically) with fresh `mmap`s and returns them with `munmap` on free, so every step
//! pays for zero-filling new pages in the kernel: profiled on SmolLM2-135M, page faults
//! and page clearing took about a third of the time of a training step. Keeping large
//! blocks in the heap and not trimming it lets the next step reuse them (measured: 107 →
//! 150 tokens/s, docs/benchmarks.md, "Training throughput"). jemalloc (LD_PRELOAD) was 3× slower
//! here: its decay returns the pages just as eagerly.

/// For serving and one-off requests: blocks of 256 KiB and more get their own mappings
/// and go back to the kernel when freed. glibc's default raises that threshold each time
/// such a block is freed, after which decoding's many mid-sized buffers (KV caches, logits)
/// come from per-thread arenas that keep them: measured with `sidrec serve` on a SmolLM2
/// model in int8, 16 concurrent clients took the peak RSS from 0.71 GB after loading to
/// 1.98 GB; with the threshold fixed, 0.83 GB. Arenas are also limited to one per core
/// (glibc makes up to eight per core, one per thread that allocates at once, each keeping
/// its own free blocks): 0.70 → 0.61 GB on the same load. A no-op outside glibc and
/// under `SIDREC_ALLOCATOR=system`.
pub fn tune_allocator_for_serving() {
    if std::env::var("SIDREC_ALLOCATOR").is_ok_and(|v| v == "system") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: as in `tune_allocator`.
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
            libc::mallopt(libc::M_ARENA_MAX, cores as libc::c_int);
        }
    }
}

/// Keeps freed large blocks for reuse instead of returning them to the kernel. Call once,
/// at start-up, before the heavy work. A no-op outside glibc, and when the environment
/// variable `SIDREC_ALLOCATOR=system` asks for glibc's defaults.
pub fn tune_allocator() {
    if std::env::var("SIDREC_ALLOCATOR").is_ok_and(|v| v == "system") {
        return;
    }
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

/// Sets the worker thread count for everything (rayon's global pool, which sidrec's own
/// kernels and candle's GEMM use) to `threads`, or to `RAYON_NUM_THREADS`, or to the
/// cores available. Call once, at start-up, before any parallel work.
///
/// It also exports the count as `RAYON_NUM_THREADS` when unset: candle asks for its thread
/// count on every matrix product and, without that variable, answers by reading
/// `/proc/cpuinfo` each time (profiled: it doubled the latency of a tiny model's decoding
/// query).
pub fn set_threads(threads: Option<usize>) -> Result<usize, String> {
    let from_env = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0);
    let n = match threads {
        Some(0) => return Err("--threads must be at least 1".into()),
        Some(n) => n,
        None => from_env.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }),
    };
    if threads.is_some() || from_env.is_none() {
        // SAFETY (edition 2021: a safe call): done at start-up, before threads exist.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    // A second call (tests, benches) finds the pool built: keep it.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    Ok(n)
}
