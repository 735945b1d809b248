//! The real sample data the integration tests read, from `MOBILEONE_DATA`. cargo runs each crate's
//! tests in that crate's folder, so a relative value (the README's `../shared/data`) is taken from the
//! repository root, as the user typed it. Included with `#[path]` by the tests of the crates one
//! folder below the root (datasets/, eval/, bin/).
use std::path::{Path, PathBuf};

/// The sample data folder; a test that needs it fails loudly without it.
pub fn shared_data() -> PathBuf {
    let value = std::env::var_os("MOBILEONE_DATA").unwrap_or_else(|| {
        panic!("MOBILEONE_DATA is not set: point it at the shared sample data (../shared/data from the repository root)")
    });
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lies below the repository root");
    let dir = root.join(&value);
    assert!(
        dir.is_dir(),
        "MOBILEONE_DATA={} is not a folder (read as {})",
        Path::new(&value).display(),
        dir.display()
    );
    dir
}

/// `../shared/cases/`: inputs that failed before, beside the sample data (`MOBILEONE_DATA/../cases`).
#[allow(dead_code)] // not every crate's tests read the cases
pub fn shared_cases() -> PathBuf {
    let dir = shared_data()
        .parent()
        .expect("MOBILEONE_DATA has a parent folder")
        .join("cases");
    assert!(
        dir.is_dir(),
        "no cases folder beside MOBILEONE_DATA: {}",
        dir.display()
    );
    dir
}
