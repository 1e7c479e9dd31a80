//! Property ("fuzz") tests for everything that parses outside input: catalog files,
//! interaction files, `.npy` and `.safetensors` embeddings, the codebooks metadata,
//! attribute filters, request bodies, SID strings and item text templates.
//!
//! Every property feeds arbitrary bytes or valid inputs that were then mutated
//! (truncated, bytes flipped, quotes/tabs/newlines/NUL/BOM/huge numbers/non-UTF-8
//! injected) and checks that the parser never panics, never asks for an absurd
//! allocation, and that its errors name the file (and a line that exists). Valid
//! generated inputs must round-trip.
//!
//! The suite runs in plain `cargo test`, so it is bounded and deterministic: a fixed
//! case count per property, a fixed RNG seed (the same inputs on every run and every
//! machine) and no failure-persistence files. `PROPTEST_CASES` and `PROPTEST_RNG_SEED`
//! override them for a longer search (see [`config`]); a shrunk failure belongs in a
//! plain `#[test]` next to its property.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{RngAlgorithm, RngSeed};

mod arrays;
mod catalog;
mod codebooks;
mod interactions;
mod text;

/// The seed of every property in CI.
const SEED: u64 = 0x5EED_F022;

/// The configuration of every property: `cases` cases from a fixed seed, no files
/// written on failure, shrinking bounded so a failure reports quickly. Setting
/// `PROPTEST_CASES` or `PROPTEST_RNG_SEED` overrides the count or the seed, to search
/// longer or elsewhere locally.
pub fn config(cases: u32) -> ProptestConfig {
    let base = ProptestConfig::default();
    let set = |var: &str| std::env::var_os(var).is_some();
    ProptestConfig {
        cases: if set("PROPTEST_CASES") {
            base.cases
        } else {
            cases
        },
        rng_seed: if set("PROPTEST_RNG_SEED") {
            base.rng_seed
        } else {
            RngSeed::Fixed(SEED)
        },
        failure_persistence: None,
        rng_algorithm: RngAlgorithm::ChaCha,
        max_shrink_iters: 4096,
        ..base
    }
}

// ---------------------------------------------------------------------------------------
// Allocation watch

/// The system allocator, recording the largest single request made on each thread, so a
/// property can check that a parser sized its buffers by the input it was given and not
/// by a number the input claims (a header saying 10^12 rows in a 100-byte file). A
/// request far beyond memory would abort the whole test binary instead of failing one
/// property, so the check also catches the merely large (a few GiB) that overcommit lets
/// through.
struct PeakAlloc;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the slot may be gone while the thread shuts down.
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size)
        }
    });
}

unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

/// Runs `f` and returns its result with the largest single allocation it made.
pub fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    let r = f();
    (r, LARGEST.with(Cell::get))
}

/// The most a parser may allocate at once for a file of `len` bytes: a small multiple
/// of the file (a float16 `.npy` becomes f32, twice its size; candle may copy a tensor
/// once more) plus slack for fixed-size buffers.
pub fn allocation_budget(len: usize) -> usize {
    16 * len + (1 << 20)
}

// ---------------------------------------------------------------------------------------
// Scratch files

thread_local! {
    static SCRATCH: tempfile::TempDir = tempfile::tempdir().expect("a temporary directory");
}

/// A directory for the files of the test running on this thread, made on first use
/// and removed when the thread ends. The parsers read paths, so every case writes a
/// file; making and removing a directory per case would cost more than the case.
/// Cases overwrite the files they read.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

pub fn scratch() -> Scratch {
    Scratch(SCRATCH.with(|d| d.path().to_path_buf()))
}

// ---------------------------------------------------------------------------------------
// Mutations

/// Byte strings that tend to break parsers: quotes, separators, line ends, NUL, a BOM,
/// numbers out of every range, broken UTF-8 and deep nesting.
pub const INJECTIONS: &[&[u8]] = &[
    b"\"",
    b"\"\"",
    b"'",
    b"\t",
    b"\n",
    b"\r\n",
    b"\r",
    b"\0",
    b"\xEF\xBB\xBF",
    b"\xff",
    b"\xc3",
    b"\xe9",
    b"\xe2\x82",
    b"\xe2\x80\xa8",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"|",
    b"\\",
    b"\\u",
    b"\\ud800",
    b"1e999",
    b"-1e999",
    b"99999999999999999999999999999",
    b"-9223372036854775809",
    b"18446744073709551616",
    b"-0",
    b"NaN",
    b"inf",
    b"null",
    b"true",
    b" and ",
    b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    b"{\"a\":",
    b":token",
    b":float_seq",
    b"item_id:token",
    b"user_id:token",
    b"id",
    b"title",
    b"<",
    b">",
];

/// One edit of a byte string. Positions are [`Index`]es, scaled to the length the string
/// has when the edit is applied.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Cut the input short.
    Truncate(Index),
    /// XOR one byte with a non-zero mask.
    Flip(Index, u8),
    /// Insert one of [`INJECTIONS`].
    Inject(Index, Index),
    /// Insert random bytes.
    Insert(Index, Vec<u8>),
    /// Remove up to `n` bytes.
    Delete(Index, usize),
    /// Repeat a stretch of the input right after itself (duplicate keys, lines, rows).
    Repeat(Index, usize),
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => any::<Index>().prop_map(Mutation::Truncate),
        // Mostly masks below 0x80, which keep ASCII text ASCII (and so get past UTF-8
        // checks into the parser proper).
        3 => (any::<Index>(), prop_oneof![3 => 1u8..0x80, 1 => 1u8..=255])
            .prop_map(|(i, m)| Mutation::Flip(i, m)),
        4 => (any::<Index>(), any::<Index>()).prop_map(|(i, w)| Mutation::Inject(i, w)),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => (any::<Index>(), 1usize..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => (any::<Index>(), 1usize..64).prop_map(|(i, n)| Mutation::Repeat(i, n)),
    ]
}

/// One to four mutations, one half the time: a single edit is what most often gets
/// deep into a parser without being rejected at the first check.
pub fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop_oneof![
        prop::collection::vec(mutation(), 1..2),
        prop::collection::vec(mutation(), 2..5),
    ]
}

/// Applies `muts` in order.
pub fn mutate(mut b: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        let at = |i: &Index, len: usize| i.index(len + 1);
        match m {
            Mutation::Truncate(i) => {
                let n = at(i, b.len());
                b.truncate(n);
            }
            Mutation::Flip(i, mask) => {
                if !b.is_empty() {
                    let n = i.index(b.len());
                    b[n] ^= mask;
                }
            }
            Mutation::Inject(i, which) => {
                let n = at(i, b.len());
                let s = INJECTIONS[which.index(INJECTIONS.len())];
                b.splice(n..n, s.iter().copied());
            }
            Mutation::Insert(i, bytes) => {
                let n = at(i, b.len());
                b.splice(n..n, bytes.iter().copied());
            }
            Mutation::Delete(i, len) => {
                let n = at(i, b.len());
                let end = (n + len).min(b.len());
                b.drain(n..end);
            }
            Mutation::Repeat(i, len) => {
                let n = at(i, b.len());
                let end = (n + len).min(b.len());
                let stretch = b[n..end].to_vec();
                b.splice(end..end, stretch);
            }
        }
    }
    b
}

/// Arbitrary bytes, biased towards printable ASCII and line structure half the time so
/// that more inputs get past the first check of a parser.
pub fn junk(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..max),
        prop::collection::vec(
            prop_oneof![
                8 => 0x20u8..0x7f,
                2 => Just(b'\n'),
                2 => Just(b'\t'),
                1 => Just(b','),
                1 => Just(b'"'),
                1 => any::<u8>(),
            ],
            0..max
        ),
    ]
}

/// The number of lines a file of these bytes has (a final newline does not start one).
pub fn line_count(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b == b'\n').count() + 1
}

/// A JSON value of bounded size: every kind of scalar (numbers beyond i64 and floats
/// with exponents included) in nested arrays and objects.
pub fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter_map("finite", serde_json::Number::from_f64)
            .prop_map(Value::Number),
        ".{0,12}".prop_map(Value::String),
        "[a-z0-9 ,<>=~!_]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::vec(("[a-z_]{0,8}", inner), 0..6)
                .prop_map(|kv| { serde_json::Value::Object(kv.into_iter().collect()) }),
        ]
    })
}
