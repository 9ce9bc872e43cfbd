// A fully linked ELF (not an archive) so that every symbol the core reaches must resolve, and so that
// any nm can read it (the sysroot's objects in an archive hold LLVM bitcode that an older llvm-nm rejects).
// No linker script: addresses do not matter, nothing runs it. `probe` is the root that --gc-sections keeps.
fn main() {
    println!("cargo:rustc-link-arg-bins=--entry=probe");
    println!("cargo:rerun-if-changed=build.rs");
}
