//! Shared helpers of the command-line tools; the work itself lives in the library crates.
pub mod bench;
pub mod bundled;
pub mod detections;
pub mod draw;
pub mod imageio;
pub mod npy;
pub mod segment_render;
