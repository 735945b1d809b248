use std::path::PathBuf;

#[path = "../../../testing/shared_data.rs"]
#[allow(dead_code)]
mod shared_data;
#[allow(unused_imports)]
pub use shared_data::{shared_cases, shared_data};

#[allow(dead_code)]
pub fn fixture(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}
