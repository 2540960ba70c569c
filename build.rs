//! Link options of the module (libp11shim.so).

fn main() {
    // dlclose never unmaps the module (ld's `-z nodelete`), as other PKCS#11 modules with threads do: the
    // shim joins its threads in C_Finalize, but an application may dlclose without C_Finalize, and a thread or
    // a pthread_atfork handler must never find its code gone.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
    println!("cargo:rerun-if-changed=build.rs");
}
