//! The CPU reference backend.
pub mod flops;
pub mod layout_copy;
pub mod linear_ce;
pub mod ops;
pub mod skinny;

/// Runs `work` on a thread of the CPU pool (rayon's global pool) and waits for it.
///
/// A forward is a few hundred small parallel steps (products, norms, adds). Called from a thread
/// outside the pool, each step hands its tasks to the pool and puts the caller to sleep until
/// they are done, a wake-up per step; run from inside the pool, the thread that runs the forward
/// does its share of each step and the other threads take theirs (on 2 cores the 32-token gpt2
/// forward 5-6% faster, a SmolLM2 edit 13%; BENCHMARKS.md, issue 19). `work` must not wait on
/// anything but its own parallel steps (no locks, no channels): while it waits for them, its
/// thread may run other work queued in the pool.
pub fn in_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| work())
}
