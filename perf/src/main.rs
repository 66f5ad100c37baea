//! `esh3ar-perf`: see `esh3ar-perf --help` and docs/PERFORMANCE.md.

fn main() {
    std::process::exit(esh3ar_perf::cli::main());
}
