//! Links the guest with the shared linker script (../link.ld) at its guest-physical
//! address; only for the bare-metal target, so host builds are unaffected.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    if std::env::var("TARGET").as_deref() == Ok("x86_64-unknown-none") {
        println!("cargo:rustc-link-arg-bins=-T{dir}/../link.ld");
        println!("cargo:rustc-link-arg-bins=-zmax-page-size=0x1000");
        // No dynamic loader applies RELRO here; keep the program headers to PT_LOAD.
        println!("cargo:rustc-link-arg-bins=-znorelro");
    }
    println!("cargo:rerun-if-changed={dir}/../link.ld");
    println!("cargo:rerun-if-changed={dir}/../build.rs");
}
