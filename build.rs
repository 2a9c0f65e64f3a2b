//! Build script: gives the shared library its SONAME (`libmlart.so.<ABI>`,
//! the ABI version being the crate's major version) so hosts linked against
//! one ABI never load another. CUDA kernels will be built from here too.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let abi = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap_or_else(|_| "0".into());
    if target_os == "linux" {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libmlart.so.{abi}");
    }
}
