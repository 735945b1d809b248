//! Shared helpers of the command-line tools; the work itself lives in the library crates.
pub mod bench;
pub mod bundled;
pub mod classify;
pub mod detections;
pub mod draw;
pub mod hub;
pub mod imageio;
pub mod npy;
pub mod output;
pub mod segment_render;

/// Every tool starts large blocks on a cache line, so the kernels' vectors never straddle two
/// ([`mobileone::alloc`]).
#[global_allocator]
static GLOBAL: mobileone::alloc::CacheLineAligned = mobileone::alloc::CacheLineAligned;

/// The `main` of the report-printing tools: parse the flags, run, and on failure print the error
/// chain and exit with status 1. A closed stdout (`detect ... | head`) ends the process quietly, as
/// it does Unix filters, instead of panicking in `println!`; freed tensors' memory stays in the
/// process ([`mobileone::ops::retain_freed_memory`]).
pub fn cli_main<C: clap::Parser>(run: fn(C) -> anyhow::Result<()>) {
    #[cfg(unix)]
    // SAFETY: runs first in `main`, before any other thread exists; it restores the default action.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    mobileone::ops::retain_freed_memory();
    if let Err(error) = run(C::parse()) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}
