//! Cell suppression against an attacker who sees only what is published.
//!
//! The attacker is written independently of `aggregate::suppress`: its own numbering of
//! the cells, its own equations, exact `BigRational` arithmetic, its own (dense, row
//! echelon) elimination, and the non-negativity of counts. A protected table must give it
//! nothing; a table with only primary suppression must not (which shows it can win).

use ern_registry::aggregate::suppress::{Protected, Table, protect};
use num_bigint::BigInt;
use num_rational::BigRational;
use num_traits::{One, Zero};
use proptest::prelude::*;

/// A cell as the attacker names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cell {
    Grand,
    Row(usize),
    Col(usize),
    Inner(usize, usize),
}

/// `sum(parts) == total`, in the attacker's numbering.
struct Relation {
    parts: Vec<usize>,
    total: usize,
}

/// What the attacker knows: every cell (published value or `None`) and every relation.
struct View {
    cells: Vec<Cell>,
    published: Vec<Option<u64>>,
    relations: Vec<Relation>,
}

impl View {
    /// Built from the shape and the published values only.
    fn of(p: &Protected, rows: usize, cols: usize, two_way: bool) -> View {
        let mut cells = vec![Cell::Grand];
        let mut published = vec![p.grand_total];
        let index = |cells: &mut Vec<Cell>, published: &mut Vec<Option<u64>>, c, v| {
            cells.push(c);
            published.push(v);
            cells.len() - 1
        };
        let mut relations = Vec::new();
        if two_way {
            let rs: Vec<usize> = (0..rows)
                .map(|i| index(&mut cells, &mut published, Cell::Row(i), p.row_totals[i]))
                .collect();
            let cs: Vec<usize> = (0..cols)
                .map(|j| index(&mut cells, &mut published, Cell::Col(j), p.col_totals[j]))
                .collect();
            let mut inner = vec![vec![0; cols]; rows];
            for (i, row) in inner.iter_mut().enumerate() {
                for (j, slot) in row.iter_mut().enumerate() {
                    *slot = index(
                        &mut cells,
                        &mut published,
                        Cell::Inner(i, j),
                        p.cells[i * cols + j],
                    );
                }
            }
            for (i, row) in inner.iter().enumerate() {
                relations.push(Relation {
                    parts: row.clone(),
                    total: rs[i],
                });
            }
            for (j, &total) in cs.iter().enumerate() {
                let parts = inner.iter().map(|row| row[j]).collect();
                relations.push(Relation { parts, total });
            }
            relations.push(Relation {
                parts: rs,
                total: 0,
            });
            relations.push(Relation {
                parts: cs,
                total: 0,
            });
        } else {
            let parts = (0..rows)
                .map(|i| index(&mut cells, &mut published, Cell::Inner(i, 0), p.cells[i]))
                .collect();
            relations.push(Relation { parts, total: 0 });
        }
        View {
            cells,
            published,
            relations,
        }
    }
}

fn q(v: u64) -> BigRational {
    BigRational::from_integer(BigInt::from(v))
}

/// A row echelon form of `A x = b`, each row carrying its right-hand side.
struct Echelon {
    rows: Vec<(Vec<BigRational>, BigRational, usize)>,
}

impl Echelon {
    fn new(mut a: Vec<Vec<BigRational>>, mut b: Vec<BigRational>, n: usize) -> Echelon {
        let mut rank = 0;
        let mut pivots = Vec::new();
        for col in 0..n {
            let Some(found) = (rank..a.len()).find(|&i| !a[i][col].is_zero()) else {
                continue;
            };
            a.swap(rank, found);
            b.swap(rank, found);
            for i in rank + 1..a.len() {
                if a[i][col].is_zero() {
                    continue;
                }
                let (above, below) = a.split_at_mut(i);
                let (pivot_row, row) = (&above[rank], &mut below[0]);
                let f = &row[col] / &pivot_row[col];
                for (x, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                    *x -= &f * p;
                }
                let d = &f * &b[rank];
                b[i] -= d;
            }
            pivots.push(col);
            rank += 1;
        }
        // The true values satisfy the system, so the dependent equations must read 0 = 0.
        assert!(
            b[rank..].iter().all(Zero::is_zero),
            "attacker's system is inconsistent"
        );
        let rows = a
            .into_iter()
            .zip(b)
            .zip(pivots)
            .map(|((row, rhs), p)| (row, rhs, p))
            .collect();
        Echelon { rows }
    }

    /// Whether `e_j` lies in the row space (rank([A; e_j]) == rank(A): it reduces to zero
    /// against the echelon rows), and if so `x_j`, the same combination of the rhs.
    fn unit(&self, j: usize, n: usize) -> Option<BigRational> {
        let mut v = vec![BigRational::zero(); n];
        v[j] = BigRational::one();
        let mut value = BigRational::zero();
        for (row, rhs, p) in &self.rows {
            if v[*p].is_zero() {
                continue;
            }
            let f = &v[*p] / &row[*p];
            for (x, r) in v[*p..].iter_mut().zip(&row[*p..]) {
                *x -= &f * r;
            }
            value += &f * rhs;
        }
        v.iter().all(Zero::is_zero).then_some(value)
    }
}

/// Every hidden cell the attacker can pin down, with the value it finds.
fn attack(view: &View) -> Vec<(Cell, BigRational)> {
    let mut known: Vec<Option<BigRational>> = view.published.iter().map(|v| v.map(q)).collect();
    let mut recovered = Vec::new();
    loop {
        let unknown: Vec<usize> = (0..known.len()).filter(|&c| known[c].is_none()).collect();
        if unknown.is_empty() {
            break;
        }
        let column = |cell: usize| unknown.iter().position(|&u| u == cell);
        let mut a = Vec::new();
        let mut b = Vec::new();
        for rel in &view.relations {
            // sum(parts) - total = 0, known values moved to the right.
            let mut row = vec![BigRational::zero(); unknown.len()];
            let mut rhs = BigRational::zero();
            let terms = rel.parts.iter().map(|&c| (c, 1)).chain([(rel.total, -1)]);
            for (cell, sign) in terms {
                let s = BigRational::from_integer(BigInt::from(sign));
                match (&known[cell], column(cell)) {
                    (Some(v), _) => rhs -= s * v,
                    (None, Some(col)) => row[col] += s,
                    (None, None) => unreachable!(),
                }
            }
            a.push(row);
            b.push(rhs);
        }
        let echelon = Echelon::new(a, b, unknown.len());
        let mut found: Vec<(usize, BigRational)> = unknown
            .iter()
            .enumerate()
            .filter_map(|(col, &cell)| echelon.unit(col, unknown.len()).map(|v| (cell, v)))
            .collect();
        // Counts are non-negative: hidden parts that must add up to 0 are all 0.
        for rel in &view.relations {
            let Some(total) = &known[rel.total] else {
                continue;
            };
            let mut rest = total.clone();
            let mut hidden = Vec::new();
            for &c in &rel.parts {
                match &known[c] {
                    Some(v) => rest -= v,
                    None => hidden.push(c),
                }
            }
            if rest.is_zero() {
                found.extend(hidden.into_iter().map(|c| (c, BigRational::zero())));
            } else if rest == q(hidden.len() as u64) {
                // The service never hides a zero, so every hidden cell is at least 1:
                // hidden parts that must add up to their number are all 1.
                found.extend(hidden.into_iter().map(|c| (c, q(1))));
            }
        }
        if found.is_empty() {
            found = bounded(view, &known);
        }
        if found.is_empty() {
            break;
        }
        for (cell, value) in found {
            if known[cell].is_none() {
                known[cell] = Some(value.clone());
                recovered.push((view.cells[cell], value));
            }
        }
    }
    recovered
}

/// Interval reasoning: a hidden cell lies in [1, unbounded) (the service never hides a
/// zero); every relation `sum(parts) = total` narrows the total to the sum of its parts'
/// intervals and each part to the total's interval minus the others'. Repeated to a fixed
/// point; a hidden cell whose interval is a single value is recovered.
fn bounded(view: &View, known: &[Option<BigRational>]) -> Vec<(usize, BigRational)> {
    let n = known.len();
    let mut lo: Vec<BigRational> = known
        .iter()
        .map(|k| k.clone().unwrap_or_else(|| q(1)))
        .collect();
    let mut hi: Vec<Option<BigRational>> = known.to_vec();
    fn sum_hi(
        hi: &[Option<BigRational>],
        cells: impl Iterator<Item = usize>,
    ) -> Option<BigRational> {
        let mut acc = BigRational::zero();
        for c in cells {
            acc += hi[c].as_ref()?;
        }
        Some(acc)
    }
    let mut changed = true;
    while changed {
        changed = false;
        for rel in &view.relations {
            // The total, from its parts.
            let parts_lo = rel
                .parts
                .iter()
                .fold(BigRational::zero(), |acc, &c| acc + &lo[c]);
            if parts_lo > lo[rel.total] {
                lo[rel.total] = parts_lo;
                changed = true;
            }
            if let Some(h) = sum_hi(&hi, rel.parts.iter().copied())
                && hi[rel.total].as_ref().is_none_or(|t| h < *t)
            {
                hi[rel.total] = Some(h);
                changed = true;
            }
            // Each part, from the total and the other parts.
            for (i, &part) in rel.parts.iter().enumerate() {
                let others = rel
                    .parts
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, &c)| c);
                let others_lo = rel
                    .parts
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .fold(BigRational::zero(), |acc, (_, &c)| acc + &lo[c]);
                if let Some(t) = &hi[rel.total] {
                    let h = t - &others_lo;
                    if hi[part].as_ref().is_none_or(|p| h < *p) {
                        hi[part] = Some(h);
                        changed = true;
                    }
                }
                if let Some(others_hi) = sum_hi(&hi, others) {
                    let l = &lo[rel.total] - others_hi;
                    if l > lo[part] {
                        lo[part] = l;
                        changed = true;
                    }
                }
            }
        }
    }
    (0..n)
        .filter(|&c| known[c].is_none() && hi[c].as_ref() == Some(&lo[c]))
        .map(|c| (c, lo[c].clone()))
        .collect()
}

/// The true value of every cell, by the attacker's names.
fn truth(table: &Table, cell: Cell) -> u64 {
    let (rows, cols) = (table.rows, table.cols);
    match cell {
        Cell::Grand => table.cells.iter().sum(),
        Cell::Row(i) => (0..cols).map(|j| table.cells[i * cols + j]).sum(),
        Cell::Col(j) => (0..rows).map(|i| table.cells[i * cols + j]).sum(),
        Cell::Inner(i, j) => table.cells[i * cols + j],
    }
}

/// What a naive publisher does: hide the small cells and nothing else.
fn primary_only(table: &Table, k: u64) -> Protected {
    let hide = |v: u64| (!(1..k).contains(&v)).then_some(v);
    let (rows, cols) = (table.rows, table.cols);
    let margins = |f: &dyn Fn(usize) -> Cell, n: usize| -> Vec<Option<u64>> {
        if table.two_way {
            (0..n).map(|x| hide(truth(table, f(x)))).collect()
        } else {
            Vec::new()
        }
    };
    Protected {
        cells: table.cells.iter().map(|&v| hide(v)).collect(),
        row_totals: margins(&Cell::Row, rows),
        col_totals: margins(&Cell::Col, cols),
        grand_total: hide(truth(table, Cell::Grand)),
        primary: 0,
        secondary: 0,
    }
}

fn recovered_by_attacker(table: &Table, p: &Protected) -> Vec<(Cell, BigRational)> {
    attack(&View::of(p, table.rows, table.cols, table.two_way))
}

#[test]
fn attacker_recovers_a_small_cell_hidden_alone() {
    let t = Table::two_way(3, 3, vec![2, 10, 10, 10, 10, 10, 10, 10, 10]).unwrap();
    let found = recovered_by_attacker(&t, &primary_only(&t, 5));
    assert_eq!(found, vec![(Cell::Inner(0, 0), q(2))]);
}

#[test]
fn attacker_recovers_small_cells_and_margins_hidden_by_primary_suppression_alone() {
    // x00 = 1 and x01 = 1 are hidden, and so is their row total 2; the columns give
    // both cells away, and then the row total.
    let t = Table::two_way(2, 3, vec![1, 1, 0, 10, 10, 10]).unwrap();
    let mut found = recovered_by_attacker(&t, &primary_only(&t, 3));
    found.sort_by_key(|(c, _)| format!("{c:?}"));
    assert_eq!(
        found,
        vec![
            (Cell::Inner(0, 0), q(1)),
            (Cell::Inner(0, 1), q(1)),
            (Cell::Row(0), q(2)),
        ]
    );
    let t = Table::one_way(vec![3, 10, 20]);
    let found = recovered_by_attacker(&t, &primary_only(&t, 5));
    assert_eq!(found, vec![(Cell::Inner(0, 0), q(3))]);
}

#[test]
fn attacker_knows_hidden_cells_are_never_zero() {
    // Two ones beside a large count: linear algebra only learns x0 + x1 = 2, but a hidden
    // cell is never zero, so both are 1. Protection must hide a third cell.
    let t = Table::one_way(vec![1, 1, 20]);
    let mut found = recovered_by_attacker(&t, &primary_only(&t, 5));
    found.sort_by_key(|(c, _)| format!("{c:?}"));
    assert_eq!(
        found,
        vec![(Cell::Inner(0, 0), q(1)), (Cell::Inner(1, 0), q(1))]
    );
    let p = protect(&t, 5).unwrap();
    assert_eq!(p.cells, vec![None, None, None]);
    assert!(recovered_by_attacker(&t, &p).is_empty());
}

#[test]
fn attacker_uses_non_negativity() {
    // All four cells hidden form a cycle, so linear algebra alone learns nothing; but the
    // published R0 = 0 forces x00 = x01 = 0, and then the columns give the rest.
    let t = Table::two_way(2, 2, vec![0, 0, 5, 5]).unwrap();
    let mut p = primary_only(&t, 2);
    p.cells = vec![None; 4];
    let mut found = recovered_by_attacker(&t, &p);
    found.sort_by_key(|(c, _)| format!("{c:?}"));
    assert_eq!(
        found,
        vec![
            (Cell::Inner(0, 0), q(0)),
            (Cell::Inner(0, 1), q(0)),
            (Cell::Inner(1, 0), q(5)),
            (Cell::Inner(1, 1), q(5)),
        ]
    );
}

#[test]
fn attacker_gets_nothing_from_the_hand_checked_examples() {
    let two_way = |r, c, cells| Table::two_way(r, c, cells).unwrap();
    let cases = [
        (two_way(2, 2, vec![3, 10, 10, 10]), 5),
        (two_way(2, 2, vec![3, 0, 0, 10]), 5),
        (two_way(2, 2, vec![0, 3, 10, 10]), 5),
        (two_way(1, 4, vec![2, 7, 9, 30]), 5),
        (two_way(4, 1, vec![2, 7, 9, 30]), 5),
        (Table::one_way(vec![3, 20, 10]), 5),
        (Table::one_way(vec![4]), 5),
        // Found by the property test: complements use up every non-zero cell mid-round.
        (two_way(2, 3, vec![0, 0, 1, 2, 1, 0]), 2),
        (two_way(2, 3, vec![0, 1, 2, 1, 0, 0]), 2),
    ];
    for (t, k) in &cases {
        let p = protect(t, *k).unwrap();
        assert_eq!(recovered_by_attacker(t, &p), vec![], "{t:?} gave {p:?}");
    }
}

/// Many zeros, many small counts, some large ones: the shape of rare-disease tables.
fn count() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => Just(0u64),
        4 => 1u64..=5,
        2 => 6u64..=40,
        1 => 41u64..=5_000,
    ]
}

fn table() -> impl Strategy<Value = Table> {
    (any::<bool>(), 1usize..=8, 1usize..=8).prop_flat_map(|(two_way, rows, cols)| {
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
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn attacker_recovers_no_hidden_cell(t in table(), k in 2u64..=6) {
        let p = protect(&t, k).unwrap();
        let view = View::of(&p, t.rows, t.cols, t.two_way);

        // Shape, and published values are the true ones; small counts hidden, zeros shown.
        prop_assert_eq!(p.cells.len(), t.rows * t.cols);
        let margins = if t.two_way { (t.rows, t.cols) } else { (0, 0) };
        prop_assert_eq!((p.row_totals.len(), p.col_totals.len()), margins);
        let mut hidden = 0;
        let mut small = 0;
        for (cell, published) in view.cells.iter().zip(&view.published) {
            let value = truth(&t, *cell);
            match published {
                Some(v) => prop_assert_eq!(*v, value, "{:?} published wrong", cell),
                None => hidden += 1,
            }
            if (1..k).contains(&value) {
                small += 1;
                prop_assert!(published.is_none(), "{:?} = {} published with k = {}", cell, value, k);
            }
            if value == 0 {
                prop_assert_eq!(*published, Some(0), "zero {:?} hidden", cell);
            }
        }
        prop_assert_eq!(p.primary, small);
        prop_assert_eq!(p.primary + p.secondary, hidden);

        // Published totals agree with the published and true parts.
        for rel in &view.relations {
            if let Some(total) = view.published[rel.total] {
                let parts: u64 = rel.parts.iter().map(|&c| truth(&t, view.cells[c])).sum();
                prop_assert_eq!(total, parts);
                if rel.parts.iter().all(|&c| view.published[c].is_some()) {
                    let shown: u64 = rel.parts.iter().filter_map(|&c| view.published[c]).sum();
                    prop_assert_eq!(total, shown);
                }
            }
        }

        let found = attack(&view);
        prop_assert!(found.is_empty(), "attacker recovered {:?} from {:?} (k = {})", found, p, k);

        // Same input, same output.
        prop_assert_eq!(protect(&t, k).unwrap(), p);
    }
}

/// Pseudo-random counts: weights (out of 100) of 0, 1..=4, 5..=40 and 41..=2000.
fn generated_cells(n: usize, [w0, w1, w2, _]: [u64; 4], seed: u64) -> Vec<u64> {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..n)
        .map(|_| {
            let r = next() % 100;
            let x = next();
            if r < w0 {
                0
            } else if r < w0 + w1 {
                1 + x % 4
            } else if r < w0 + w1 + w2 {
                5 + x % 36
            } else {
                41 + x % 1960
            }
        })
        .collect()
}

#[test]
fn attacker_gets_nothing_from_larger_tables_that_need_many_complements() {
    for (seed, weights) in [
        (1, [0, 5, 5, 90]),
        (2, [60, 4, 1, 35]),
        (3, [20, 20, 20, 40]),
    ] {
        let t = Table::two_way(14, 11, generated_cells(14 * 11, weights, seed)).unwrap();
        let p = protect(&t, 5).unwrap();
        assert_eq!(recovered_by_attacker(&t, &p), vec![], "seed {seed}");
    }
}

/// Timing of a 200 x 60 table (run in release):
/// `cargo test --release --test suppression -- --ignored --nocapture`
#[test]
#[ignore = "timing, run by hand in release mode"]
fn timing_200_by_60() {
    let mixes: [(&str, [u64; 4]); 6] = [
        ("mostly zeros", [70, 15, 10, 5]),
        ("skewed", [40, 30, 20, 10]),
        ("mostly small", [10, 60, 25, 5]),
        ("few small among large", [0, 3, 7, 90]),
        ("one percent small", [0, 1, 0, 99]),
        ("zeros and lone small cells", [80, 3, 0, 17]),
    ];
    for (seed, (name, weights)) in mixes.into_iter().enumerate() {
        let t = Table::two_way(200, 60, generated_cells(200 * 60, weights, seed as u64)).unwrap();
        let start = std::time::Instant::now();
        let p = protect(&t, 5).unwrap();
        let elapsed = start.elapsed();
        println!(
            "200x60 {name}: {elapsed:?}, primary {}, secondary {}",
            p.primary, p.secondary
        );
    }
}
