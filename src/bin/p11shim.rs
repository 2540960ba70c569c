//! `p11shim`: the operator's command. Thin: the commands live in the library (p11shim::cli), which calls the
//! same code paths as the module.

fn main() -> std::process::ExitCode {
    p11shim::cli::main()
}
