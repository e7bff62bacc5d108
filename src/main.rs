//! The `walhook` binary: everything lives in the library; this is only the edge.

// Capture and delivery allocate many short-lived values per event (decoded rows, JSON,
// headers). glibc's malloc took ~24% of walhook's CPU under load (perf, NATS benchmark);
// mimalloc's thread-local free lists make those allocations cheap.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(walhook::cli::main());
}
