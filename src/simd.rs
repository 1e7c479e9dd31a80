//! Run-time dispatch of hot loops to the widest vector extension the CPU has.
//!
//! Builds target baseline x86-64 (no `target-cpu=native`, so binaries run anywhere); the
//! few loops that dominate a profile are written as plain `#[inline(always)]` Rust over
//! fixed-width lane arrays, and [`multiversion!`] compiles each for AVX-512 and AVX2 and
//! picks one at run time. [`level`] says which one runs; `SIDREC_SIMD=avx2` (or
//! `portable`) holds a machine below its best, to measure the narrower paths on it.

use std::sync::OnceLock;

/// The vector extension sidrec's own kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Plain Rust, whatever the compiler makes of it for baseline x86-64 (SSE2).
    Portable,
    /// AVX2 with fused multiply-add.
    Avx2,
    /// AVX-512F.
    Avx512,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    /// The widest level this CPU supports.
    fn detect() -> Level {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Level::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Level::Avx2;
            }
        }
        Level::Portable
    }
}

/// The level the kernels run at: the CPU's widest, or lower where `SIDREC_SIMD` asks
/// (`avx512`, `avx2`, `portable`; a level the CPU lacks, or an unknown name, is
/// ignored: the variable can only narrow). Read once per process. Matrix products of
/// many rows go to gemm, which picks its own kernels (the CPU's widest).
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = Level::detect();
        let asked = match std::env::var("SIDREC_SIMD").ok().as_deref() {
            Some("avx512") => Level::Avx512,
            Some("avx2") => Level::Avx2,
            Some("portable") => Level::Portable,
            _ => best,
        };
        asked.min(best)
    })
}

/// Defines `$name` running the `#[inline(always)]` function `$kernel`, compiled for the
/// widest vector extension the CPU has. Rust never contracts a multiply and an add into
/// one instruction, so the result does not depend on which version runs.
macro_rules! multiversion_impl {
    ($vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? = $kernel:ident) => {
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $kernel($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $kernel($($arg),*)
                }
                match $crate::simd::level() {
                    // SAFETY: `level` never names an extension the CPU lacks.
                    $crate::simd::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::simd::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::simd::Level::Portable => {}
                }
            }
            $kernel($($arg),*)
        }
    };
}
pub(crate) use multiversion_impl as multiversion;
