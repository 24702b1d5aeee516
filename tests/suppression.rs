//! Cell suppression against an attacker with an LP solver who sees only what is published.
//!
//! The attacker (`common/lp_attacker.rs`) shares no code with `aggregate::suppress`: its
//! own numbering and relations, a general floating-point simplex (good_lp + microlp)
//! instead of integer network flows. For every hidden cell it computes the least and the
//! greatest value consistent with the published table and with "a hidden count is at
//! least 1". A protected table must leave every hidden cell an interval at least the
//! protection level wide, and never prove a count below k to be below k. The negative
//! controls show the attacker wins against primary suppression alone and against
//! exact-recovery-only checking, so these tests can fail.

#[path = "common/lp_attacker.rs"]
mod lp_attacker;
#[path = "common/tables.rs"]
mod tables;

use std::time::{Duration, Instant};

use ern_registry::aggregate::suppress::{Protected, Rules, Table, attacker_intervals, protect};
use lp_attacker::{Cell, Published, confirm, violations};
use proptest::prelude::*;
use tables::generated_cells;

fn published(t: &Table, p: &Protected) -> Published {
    Published {
        rows: t.rows,
        cols: t.cols,
        two_way: t.two_way,
        cells: p.cells.clone(),
        row_totals: p.row_totals.clone(),
        col_totals: p.col_totals.clone(),
        grand: p.grand_total,
    }
}

fn run(t: &Table, k: u64, level: u64) -> Protected {
    let deadline = Instant::now() + Duration::from_secs(60);
    protect(t, Rules::new(k, level).unwrap(), deadline).unwrap()
}

/// What the attacker can do against `p`: its rule violations.
fn attack(t: &Table, p: &Protected, k: u64, level: u64) -> Vec<String> {
    let view = published(t, p);
    let intervals = view.attack();
    confirm(&t.cells, t.cols, &intervals);
    violations(&t.cells, t.cols, &intervals, k, level)
}

/// Primary suppression alone: the audit switched off.
fn primary_only(t: &Table, k: u64) -> Protected {
    let hide = |v: u64| (v > 0 && v < k).then_some(()).map_or(Some(v), |_| None);
    let rows: Vec<u64> = (0..t.rows)
        .map(|i| t.cells[i * t.cols..(i + 1) * t.cols].iter().sum())
        .collect();
    let cols: Vec<u64> = (0..t.cols)
        .map(|j| (0..t.rows).map(|i| t.cells[i * t.cols + j]).sum())
        .collect();
    Protected {
        cells: t.cells.iter().map(|&v| hide(v)).collect(),
        row_totals: if t.two_way {
            rows.iter().map(|&v| hide(v)).collect()
        } else {
            vec![]
        },
        col_totals: if t.two_way {
            cols.iter().map(|&v| hide(v)).collect()
        } else {
            vec![]
        },
        grand_total: hide(t.cells.iter().sum()),
        primary: 0,
        secondary: 0,
    }
}

#[test]
fn attacker_beats_primary_suppression_alone() {
    // A lone small cell: its row total minus the others gives it back.
    let t = Table::two_way(2, 2, vec![3, 10, 10, 10]).unwrap();
    assert!(!attack(&t, &primary_only(&t, 5), 5, 1).is_empty());
    // Three hidden ones in a one-way table with 20 and the total published: each is 1.
    let t = Table::one_way(vec![1, 1, 1, 20]);
    assert!(!attack(&t, &primary_only(&t, 5), 5, 1).is_empty());
}

#[test]
fn attacker_beats_a_table_that_only_stops_exact_recovery() {
    // Hidden x00 = 1, x01 = 1, x10 = 9, x11 = 9 with every margin published: no hidden cell
    // is determined by linear algebra (one degree of freedom), but with hidden >= 1 the
    // row total 2 pins x00 = x01 = 1. An exact-recovery audit publishes this; ours not.
    let t = Table::two_way(2, 2, vec![1, 1, 9, 9]).unwrap();
    let naive = Protected {
        cells: vec![None; 4],
        row_totals: vec![None, Some(18)],
        col_totals: vec![Some(10), Some(10)],
        grand_total: Some(20),
        primary: 3,
        secondary: 1,
    };
    let found = attack(&t, &naive, 2, 1);
    assert!(!found.is_empty());
    assert!(attack(&t, &run(&t, 2, 1), 2, 1).is_empty());
}

#[test]
fn attacker_combines_rows_and_columns_that_no_single_equation_pins() {
    // Small cells scattered so that every row and column has two or more of them: the
    // attacker uses every equation at once, with hidden >= 1.
    #[rustfmt::skip]
    let t = Table::two_way(3, 3, vec![
        1, 1, 30,
        1, 40, 1,
        30, 1, 50,
    ]).unwrap();
    for (k, level) in [(2, 1), (5, 1), (5, 3), (10, 5)] {
        let p = run(&t, k, level);
        assert_eq!(
            attack(&t, &p, k, level),
            Vec::<String>::new(),
            "k={k} p={level}"
        );
    }
}

#[test]
fn service_intervals_equal_the_lp_attackers() {
    // The service's exact network bounds and the attacker's LP bounds agree cell by cell.
    for seed in 0..40u64 {
        let cells = generated_cells(5 * 4, [30, 40, 20, 10], seed);
        let t = Table::two_way(5, 4, cells).unwrap();
        let p = run(&t, 3 + seed % 5, 1 + seed % 3);
        let ours = attacker_intervals(&t, &p).unwrap();
        let theirs = published(&t, &p).attack();
        assert_eq!(ours.len(), theirs.len());
        for ((_, lo, hi), iv) in ours.iter().zip(&theirs) {
            assert_eq!((*lo, *hi), (iv.lo, iv.hi), "seed {seed}: {:?}", iv.cell);
        }
    }
}

/// Many zeros, many small counts, some large ones: the shape of rare-disease tables.
fn count() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => Just(0u64),
        5 => 1u64..=5,
        2 => 6u64..=40,
        1 => 41u64..=5_000,
    ]
}

fn table() -> impl Strategy<Value = Table> {
    (any::<bool>(), 1usize..=7, 1usize..=6).prop_flat_map(|(two_way, rows, cols)| {
        let cols = if two_way { cols } else { 1 };
        proptest::collection::vec(count(), rows * cols).prop_map(move |cells| {
            if two_way {
                Table::two_way(rows, cols, cells).unwrap()
            } else {
                Table::one_way(cells)
            }
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn lp_attacker_narrows_no_hidden_cell(t in table(), k in 2u64..=20, level in 1u64..=5) {
        let p = run(&t, k, level);
        let view = published(&t, &p);

        // Published values are the true ones; small counts hidden; zeros shown.
        for cell in all_cells(&t) {
            let value = lp_attacker::truth(&t.cells, t.cols, cell);
            let shown = value_of(&view, cell);
            if let Some(v) = shown {
                prop_assert_eq!(v, value, "{:?} published wrong", cell);
            }
            if (1..k).contains(&value) {
                prop_assert!(shown.is_none(), "{:?} = {} published with k = {}", cell, value, k);
            }
            if value == 0 {
                prop_assert_eq!(shown, Some(0), "zero {:?} hidden", cell);
            }
        }
        prop_assert_eq!(p.primary + p.secondary, view.hidden().len());

        let found = attack(&t, &p, k, level);
        prop_assert!(found.is_empty(), "k={} p={}: {:?} from {:?}", k, level, found, p);

        // Same input, same output.
        prop_assert_eq!(run(&t, k, level), p);
    }
}

/// A small registry's two-way table (e.g. onset age band x sex): every cell a handful.
fn small_registry_table() -> impl Strategy<Value = Table> {
    (2usize..=8, 2usize..=4).prop_flat_map(|(rows, cols)| {
        proptest::collection::vec(0u64..=7, rows * cols)
            .prop_map(move |cells| Table::two_way(rows, cols, cells).unwrap())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn lp_attacker_pins_nothing_in_small_registries(t in small_registry_table(), k in 2u64..=6) {
        let p = run(&t, k, 1);
        let found = attack(&t, &p, k, 1);
        prop_assert!(found.is_empty(), "k={}: {:?} from {:?} of {:?}", k, found, p, t);
    }
}

fn all_cells(t: &Table) -> Vec<Cell> {
    let mut out: Vec<Cell> = (0..t.rows)
        .flat_map(|i| (0..t.cols).map(move |j| Cell::Inner(i, j)))
        .collect();
    if t.two_way {
        out.extend((0..t.rows).map(Cell::Row));
        out.extend((0..t.cols).map(Cell::Col));
    }
    out.push(Cell::Grand);
    out
}

fn value_of(p: &Published, cell: Cell) -> Option<u64> {
    match cell {
        Cell::Inner(i, j) => p.cells[i * p.cols + j],
        Cell::Row(i) => p.row_totals[i],
        Cell::Col(j) => p.col_totals[j],
        Cell::Grand => p.grand,
    }
}

#[test]
fn lp_attacker_gets_nothing_from_larger_tables_that_need_many_complements() {
    for (seed, weights) in [
        (1, [0, 5, 5, 90]),
        (2, [60, 4, 1, 35]),
        (3, [20, 20, 20, 40]),
    ] {
        let t = Table::two_way(12, 9, generated_cells(12 * 9, weights, seed)).unwrap();
        for (k, level) in [(5, 1), (10, 3)] {
            let p = run(&t, k, level);
            assert_eq!(
                attack(&t, &p, k, level),
                Vec::<String>::new(),
                "seed {seed}"
            );
        }
    }
}
