//! The `walhook` binary: everything lives in the library; this is only the edge.

fn main() {
    std::process::exit(walhook::cli::main());
}
