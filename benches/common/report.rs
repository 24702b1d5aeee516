//! How every bench reports: print the section, and append it to `docs/benchmarks.md`
//! unless `ERN_BENCH_WRITE=0`.

pub fn publish(section: &str) {
    print!("{section}");
    if std::env::var("ERN_BENCH_WRITE").as_deref() != Ok("0") {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/benchmarks.md");
        let mut doc = std::fs::read_to_string(path).expect("read docs/benchmarks.md");
        doc.push_str(section);
        std::fs::write(path, doc).expect("write docs/benchmarks.md");
    }
}
