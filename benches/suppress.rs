//! Time to protect large research tables: cell suppression with the attacker's-LP audit
//! (network flows) on 200 x 60 tables of several mixes of zeros, small and large counts,
//! and on tables where nearly every row is below k (1000 x 10, 100 x 100).
//!
//! `cargo bench --bench suppress` appends a section to `docs/benchmarks.md`
//! (`ERN_BENCH_WRITE=0` to only print). In-process: the pure function, no gRPC.

#[path = "common/report.rs"]
mod report;

use std::time::{Duration, Instant};

use ern_registry::aggregate::suppress::{Rules, Table, protect};

#[path = "../tests/common/tables.rs"]
mod tables;
use tables::generated_cells;

fn main() {
    let mixes: [(&str, [u64; 4]); 7] = [
        ("mostly zeros", [70, 15, 10, 5]),
        ("skewed", [40, 30, 20, 10]),
        ("mostly small", [10, 60, 25, 5]),
        ("few small among large", [0, 3, 7, 90]),
        ("one percent small", [0, 1, 0, 99]),
        ("zeros and lone small cells", [80, 3, 0, 17]),
        // Many rows of a few patients each: their zeros are hidden with their totals.
        ("sparse rows of few patients", [95, 4, 1, 0]),
    ];
    let mut out = format!(
        "\n## Protecting large tables, {}\n\n`cargo bench --bench suppress` (in-process, \
         release, one thread; the service runs it on a blocking worker with a 5 s budget).\n\n\
         | mix | k | p | ms (median of 3) | primary | complements |\n|---|---:|---:|---:|---:|---:|\n",
        chrono::Utc::now().format("%Y-%m-%d")
    );
    // Every mix at 200 x 60, then the shapes where nearly every row is below k (its zeros
    // hidden and protected): long and narrow, and square and sparse, up to k = 20.
    /// (name, rows, columns, mix weights, seed, (k, p) pairs)
    type Case = (String, usize, usize, [u64; 4], u64, Vec<(u64, u64)>);
    let mut cases: Vec<Case> = mixes
        .into_iter()
        .enumerate()
        .map(|(seed, (name, weights))| {
            (
                name.to_string(),
                200,
                60,
                weights,
                seed as u64,
                vec![(5, 1), (10, 3)],
            )
        })
        .collect();
    cases.push((
        "rows of few patients, 1000 x 10".into(),
        1000,
        10,
        [70, 28, 2, 0],
        11,
        vec![(5, 1), (10, 3), (20, 1)],
    ));
    cases.push((
        "sparse, 100 x 100".into(),
        100,
        100,
        [90, 9, 1, 0],
        12,
        vec![(5, 1), (20, 1)],
    ));
    for (name, rows, cols, weights, seed, levels) in cases {
        let t = Table::two_way(rows, cols, generated_cells(rows * cols, weights, seed)).unwrap();
        for (k, p) in levels {
            let rules = Rules::new(k, p).unwrap();
            let mut times = Vec::new();
            let mut last = None;
            for _ in 0..3 {
                let start = Instant::now();
                let deadline = start + Duration::from_secs(600);
                last = Some(protect(&t, rules, deadline).expect("protected"));
                times.push(start.elapsed());
            }
            times.sort();
            let p_ = last.unwrap();
            let line = format!(
                "| {name} | {k} | {p} | {:.1} | {} | {} |\n",
                times[1].as_secs_f64() * 1e3,
                p_.primary,
                p_.secondary
            );
            out.push_str(&line);
        }
    }
    report::publish(&out);
}
