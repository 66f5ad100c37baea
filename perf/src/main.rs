fn main() {
    eprintln!("esh3ar-perf: under construction");
    std::process::exit(2);
}
