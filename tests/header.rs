//! The committed C header must be exactly what cbindgen generates from the
//! sources. `MLART_BLESS=1 cargo test --test header` rewrites it.

use std::path::Path;

#[test]
fn committed_header_is_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/ffi/mod.rs"))
        .generate()
        .expect("cbindgen failed")
        .write(&mut generated);
    let generated = String::from_utf8(generated).expect("utf-8 header");
    let path = root.join("include/mlart.h");
    if std::env::var_os("MLART_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write include/mlart.h");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != generated {
        let first = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(committed.lines().count().min(generated.lines().count()));
        let show = |s: &str| s.lines().skip(first).take(6).collect::<Vec<_>>().join("\n");
        panic!(
            "include/mlart.h is stale (first difference at line {}):\n--- committed\n{}\n+++ generated\n{}\nRegenerate with: MLART_BLESS=1 cargo test --test header",
            first + 1,
            show(&committed),
            show(&generated)
        );
    }
}
