//! Gives libqcow2.so its versioned SONAME (`libqcow2.so.<major>`), so that
//! programs linked against it record the ABI major version they need.

fn main() {
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").expect("cargo sets the version");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libqcow2.so.{major}");
    println!("cargo:rerun-if-changed=build.rs");
}
