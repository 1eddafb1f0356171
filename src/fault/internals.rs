//! Internals the crate's own benchmarks measure directly, reachable only with the `fault`
//! feature. Not a stable API: they are private to the library, and a program that links
//! timezero has no use for them (the engine is the way to change a table or a bitmap).

/// The lock-free copied bitmap (one bit per grain) the write path tests on every write.
pub use crate::bitmap::AtomicBitmap;
