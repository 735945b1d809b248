use std::path::PathBuf;

/// The real sample data folder from `MOBILEONE_DATA`; tests that need it fail loudly without it.
#[allow(dead_code)]
pub fn data_dir() -> PathBuf {
    let dir = std::env::var_os("MOBILEONE_DATA").unwrap_or_else(|| {
        panic!("MOBILEONE_DATA is not set: point it at the shared sample data (../shared/data from the repository root)")
    });
    let dir = PathBuf::from(dir);
    assert!(
        dir.is_dir(),
        "MOBILEONE_DATA={} is not a folder",
        dir.display()
    );
    dir
}

#[allow(dead_code)]
pub fn fixture(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}
