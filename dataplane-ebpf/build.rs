// Rebuild when bpf-linker changes: it is the linker of this crate but cargo
// does not track it on its own.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
