//! Run-time dispatch of hot loops to the widest vector extension the CPU has.
//!
//! Builds target baseline x86-64 (no `target-cpu=native`, so binaries run anywhere); the
//! few loops that dominate a profile are written as plain `#[inline(always)]` Rust over
//! fixed-width lane arrays, and [`multiversion!`] compiles each for AVX-512 and AVX2 and
//! picks one at run time.

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
                if is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports the extension.
                    return unsafe { avx512($($arg),*) };
                }
                if is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports the extension.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $kernel($($arg),*)
        }
    };
}
pub(crate) use multiversion_impl as multiversion;
