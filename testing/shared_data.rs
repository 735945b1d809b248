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
