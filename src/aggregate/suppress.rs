//! Statistical disclosure control for frequency tables: primary and complementary cell
//! suppression, audited by the attacker's own linear program.
//!
//! A researcher receives counts of patients, with row totals, column totals and a grand
//! total. Every count in `1..k` is hidden (*primary* suppression), margins included. A zero
//! that can be 0 is hidden when a total of a line it is part of is hidden, unless it is
//! 0 by a public fact or another of its totals is a published 0 (the *zero rule*, see
//! `Network`): beside a small group's hidden total, a published zero would say what all
//! its patients have ("alive 0, deceased hidden, lost 0": all deceased). Grouped by gene,
//! a total that counts (patient, gene) pairs is hidden when its line publishes no count
//! other than 0 (the *pair rule*, [`Table::counting_pairs`]): a few patients with several
//! genes each can make a pair total of k or more. Hiding small
//! cells is not enough: an attacker who takes everything the table publishes — every
//! additivity relation, every published value, and the fact that a hidden count is a
//! whole number, at least 0 where the zero rule may have hidden a zero and at least 1
//! elsewhere — can bound each hidden cell by linear programming, and combining equations
//! often pins cells that no single equation pins. So further cells are hidden
//! (*complementary* suppression) until, for every hidden cell, the interval the attacker
//! can prove is wide enough:
//!
//! - **sliding protection**: its upper bound minus its lower bound is at least the
//!   registry's protection level `p` (`p >= 1`: no hidden value is ever pinned);
//! - **upper protection** of every primary cell and every hidden zero: the attacker's
//!   upper bound is at least `k`, so no answer proves that a hidden count is below the
//!   threshold, nor that a small group has none of a category.
//!
//! These are the protection levels of tau-Argus and sdcTable (HITAS/OPT: an upper,
//! lower and sliding protection level per sensitive cell, checked against the attacker's
//! LP bounds); the choice of levels is explained in `docs/privacy.md`.
//!
//! **The attacker's LP is solved exactly, as a network flow.** Every table the service
//! publishes is a one-way table (cells and a grand total) or a two-way table with row,
//! column and grand totals. In the table extended by its totals, every value appears in
//! exactly two equations (its row's and its column's), so after flipping the sign of the
//! totals row and column (`z = s_i t_j x`) the equations say that every extended row and
//! column of `z` sums to zero: the constraint matrix is that of a bipartite network and
//! totally unimodular. A change of the hidden values that keeps every equation is a
//! *circulation* on that network (published values are fixed, so only hidden cells are
//! edges; a hidden cell can grow without limit and shrink to its least value, 0 or 1). The largest increase of a
//! hidden cell that the attacker cannot rule out is therefore the maximum flow around a
//! cycle through it, and likewise the largest decrease: that is the attacker's LP optimum,
//! computed in integers by augmenting paths, with no floating point to mislead (the LP's
//! vertices are integral, so its bounds are the integer bounds too). A one-way table is
//! the same network with a single equation node and a node without an equation. This is
//! the network formulation that tau-Argus offers for two-dimensional tables (Castro's
//! network flows); the test suite checks it against a general LP solver.
//!
//! Complements: cells are checked in order (primary cells first, complements as they are
//! added). When a cell's interval is too narrow, the cheapest path that would carry more
//! flow around it is found (Dijkstra over the residual network; a hidden cell costs
//! nothing, a published one its value, so small interior cells go before totals), and the
//! published cells on it are hidden. Hiding a cell only frees the attacker's system, so a
//! cell found safe stays safe and one pass proves the whole pattern. A final pass tries to
//! publish complements again (largest first), keeping each published only when the pair
//! rule still holds and a full audit of the new pattern passes; its number of tries, and
//! the edges its searches may look at (`PRUNE_VISITS`), depend on the table, k and p
//! alone, so the same table always gives the same answer under the same rules. The
//! pattern returned is thus always one proven in full; past the deadline the answer is refused
//! ([`SuppressError::OutOfTime`]), never cut short or unproven. Ties are broken by a
//! cell's position, so the service protects every table through [`protect_arranged`]: in
//! one arrangement fixed by its dimensions, so the same counts asked for in another layout
//! (transposed, rows or columns reordered) hide exactly the same cells.
//!
//! Limits, on purpose: this protects *one* table against an attacker who knows the
//! method's inputs but not the data. It does not protect against differencing between
//! several queries (linked tables, a filter that removes one patient), nor against an
//! attacker who reasons about which complement the greedy choice would have taken:
//! `docs/privacy.md` states the guarantees and the limits.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// Most interior cells of a table this module protects.
pub const MAX_CELLS: usize = 20_000;
/// Largest protection level (and k) a table can be asked for.
pub const MAX_LEVEL: u64 = 1_000;

/// Most complements tried for publication again after the greedy pass, and most cell
/// audits all those tries may take together (each try audits every hidden cell).
const PRUNE_ATTEMPTS: usize = 256;
const PRUNE_WORK: usize = 200_000;
/// Most edges the prune's flow searches may look at, all tries together: a count of work,
/// not of time, so the same table gets the same answer. Many hidden zeros needing room
/// for k each make a cell audit costly; past this the remaining complements stay hidden.
const PRUNE_VISITS: u64 = 400_000_000;

/// A frequency table of non-negative counts. `cols == 1` with `two_way == false` is a
/// one-way table: its cells and a grand total (no row/column totals are published).
///
/// What anyone knows about its zeros is part of the table, since the attacker knows it
/// too: an interior cell of a two-way table may be 0; a row total (or the cell of a
/// one-way table) may be 0 only when rows are listed whether or not they hold a count
/// (`empty_rows`, e.g. the five delay bands), likewise a column total (`empty_cols`);
/// otherwise a listed row holds at least 1. `structural` marks interior cells that are 0
/// by a public fact (a centre lies in one country): they are published as 0, never
/// hidden.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub rows: usize,
    pub cols: usize,
    /// Whether row and column totals are published (a two-way table).
    pub two_way: bool,
    /// Row-major, `rows * cols` counts.
    pub cells: Vec<u64>,
    /// Rows are listed even when they hold no count.
    pub empty_rows: bool,
    /// Columns are listed even when they hold no count.
    pub empty_cols: bool,
    /// Per interior cell, whether it is 0 by a public fact; empty: none is.
    pub structural: Vec<bool>,
    /// Row totals count (patient, gene) pairs, not patients (a one-way table: its grand
    /// total does). See [`Table::counting_pairs`].
    pub pair_rows: bool,
    /// Column totals count (patient, gene) pairs.
    pub pair_cols: bool,
}

impl Table {
    /// A one-way table: one cell per category, and a grand total.
    pub fn one_way(cells: Vec<u64>) -> Table {
        Table {
            rows: cells.len(),
            cols: 1,
            two_way: false,
            cells,
            empty_rows: false,
            empty_cols: false,
            structural: Vec::new(),
            pair_rows: false,
            pair_cols: false,
        }
    }

    /// The same table, its row totals (`rows`; a one-way table's grand total) or column
    /// totals (`cols`) counting (patient, gene) pairs: grouped by gene, a patient with two
    /// genes is in two cells of a row that is not by gene. Such a total can reach k for
    /// fewer than k patients, so the *pair rule* hides it whenever its line publishes no
    /// count but zeros (every cell of a line of fewer than k patients is below k), and the
    /// zero rule then hides the line's zeros: three patients with genes A and B do not
    /// publish that they have no other gene. The grand total of a table by gene counts
    /// pairs too, and is hidden when no row or column total other than 0 is published.
    pub fn counting_pairs(mut self, rows: bool, cols: bool) -> Table {
        self.pair_rows = rows;
        self.pair_cols = cols && self.two_way;
        self
    }

    /// The same table, its rows (`rows`) and columns (`cols`) listed even when they hold
    /// no count.
    pub fn listing_empty(mut self, rows: bool, cols: bool) -> Table {
        self.empty_rows = rows;
        self.empty_cols = cols;
        self
    }

    /// The same table with the interior cells that are 0 by a public fact marked; every
    /// marked cell must be 0.
    pub fn with_structural_zeros(mut self, structural: Vec<bool>) -> Result<Table, SuppressError> {
        self.structural = structural;
        self.check()?;
        Ok(self)
    }

    /// Whether interior cell `c` is 0 by a public fact.
    fn is_structural(&self, c: usize) -> bool {
        self.structural.get(c).copied().unwrap_or(false)
    }

    /// A two-way table with row totals, column totals and a grand total; `cells` is
    /// row-major. A single row or column is legal: its total then equals the grand total.
    pub fn two_way(rows: usize, cols: usize, cells: Vec<u64>) -> Result<Table, SuppressError> {
        let table = Table {
            rows,
            cols,
            two_way: true,
            cells,
            empty_rows: false,
            empty_cols: false,
            structural: Vec::new(),
            pair_rows: false,
            pair_cols: false,
        };
        table.check()?;
        Ok(table)
    }

    /// The fields are public, so `protect` checks the shape again.
    fn check(&self) -> Result<(), SuppressError> {
        let fits = self.rows.checked_mul(self.cols) == Some(self.cells.len());
        if !fits || (!self.two_way && self.cols != 1) {
            return Err(SuppressError::ShapeMismatch {
                rows: self.rows,
                cols: self.cols,
                len: self.cells.len(),
            });
        }
        if self.cells.len() > MAX_CELLS {
            return Err(SuppressError::TooLarge {
                cells: self.cells.len(),
            });
        }
        let structural_fits = self.structural.is_empty()
            || (self.structural.len() == self.cells.len()
                && self
                    .structural
                    .iter()
                    .zip(&self.cells)
                    .all(|(&s, &v)| !s || v == 0));
        if !structural_fits {
            return Err(SuppressError::Internal(
                "structural zeros that do not fit the table's cells",
            ));
        }
        Ok(())
    }
}

/// What a published table must guarantee: the threshold `k` and the protection level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    k: u64,
    protection: u64,
}

impl Rules {
    /// `k` in `2..=MAX_LEVEL`: counts `1..k` are hidden and no hidden count can be proven
    /// below `k`. `protection` in `1..=MAX_LEVEL`: the least width of the interval an
    /// attacker can prove for any hidden value.
    pub fn new(k: u64, protection: u64) -> Result<Rules, SuppressError> {
        if !(2..=MAX_LEVEL).contains(&k) {
            return Err(SuppressError::BadThreshold { k });
        }
        if !(1..=MAX_LEVEL).contains(&protection) {
            return Err(SuppressError::BadProtectionLevel { protection });
        }
        Ok(Rules { k, protection })
    }

    pub fn k(&self) -> u64 {
        self.k
    }

    pub fn protection(&self) -> u64 {
        self.protection
    }
}

/// What may be published: `None` = suppressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protected {
    /// Row-major, same layout as [`Table::cells`].
    pub cells: Vec<Option<u64>>,
    /// One per row; empty for a one-way table.
    pub row_totals: Vec<Option<u64>>,
    /// One per column; empty for a one-way table.
    pub col_totals: Vec<Option<u64>>,
    pub grand_total: Option<u64>,
    /// Number of primary-suppressed cells (values in `1..k`), margins included.
    pub primary: usize,
    /// Number of complementary suppressions.
    pub secondary: usize,
}

impl Protected {
    /// A table that publishes nothing but its hidden grand total: no cell, no line.
    pub fn hidden_total() -> Protected {
        Protected {
            cells: Vec::new(),
            row_totals: Vec::new(),
            col_totals: Vec::new(),
            grand_total: None,
            primary: 0,
            secondary: 1,
        }
    }

    /// Whether the table publishes no count but zeros: every count of patients it holds
    /// is hidden. Then its rows and columns would only say which categories its patients
    /// fall in (all of them, with "deceased" the only status listed: all deceased).
    pub fn publishes_no_count(&self) -> bool {
        self.cells
            .iter()
            .chain(&self.row_totals)
            .chain(&self.col_totals)
            .chain(std::iter::once(&self.grand_total))
            .all(|v| v.is_none_or(|v| v == 0))
            && self.grand_total.is_none()
    }
}

/// Why a table cannot be published. The first four are the caller's to fix;
/// `OutOfTime` asks for a coarser question; `Internal` is a bug, reported rather than
/// publishing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuppressError {
    #[error(
        "{len} cells do not fit a {rows}x{cols} table (a one-way table has exactly one column)"
    )]
    ShapeMismatch {
        rows: usize,
        cols: usize,
        len: usize,
    },
    #[error("the table has {cells} cells; at most {MAX_CELLS} can be protected")]
    TooLarge { cells: usize },
    #[error("the suppression threshold k must be 2 to {MAX_LEVEL}, got {k}")]
    BadThreshold { k: u64 },
    #[error("the protection level must be 1 to {MAX_LEVEL}, got {protection}")]
    BadProtectionLevel { protection: u64 },
    #[error("a total of the table does not fit in 64 bits")]
    TotalOverflow,
    #[error("the table could not be proven safe within {} ms", budget.as_millis())]
    OutOfTime { budget: Duration },
    #[error("internal error in cell suppression: {0}")]
    Internal(&'static str),
}

/// Protects `table` under `rules`, giving up (and publishing nothing) at `deadline`.
/// Deterministic: the same table and rules always give the same result.
pub fn protect(table: &Table, rules: Rules, deadline: Instant) -> Result<Protected, SuppressError> {
    let started = Instant::now();
    let out_of_time = || SuppressError::OutOfTime {
        budget: deadline.saturating_duration_since(started),
    };
    table.check()?;
    let layout = Layout::of(table);
    let values = layout.values(&table.cells)?;
    let network = Network::new(&layout, &values);
    let mut audit = Audit::new(&network, rules);
    let preference = |cell: usize| (values[cell], layout.class(cell), cell);

    let primary_cells: Vec<usize> = (0..values.len())
        .filter(|&c| values[c] > 0 && values[c] < rules.k)
        .collect();
    let primary = primary_cells.len();
    let mut hidden = Hidden::new(&network, vec![false; values.len()]);
    for &c in &primary_cells {
        hidden.hide(&network, c);
    }

    // One pass: a cell found safe stays safe as more cells are hidden, since every hidden
    // cell only adds an edge to the attacker's network, and a hidden total only lowers
    // the floor of the cells of its lines. So when the pass ends, every hidden cell is
    // proven safe in the final pattern.
    let mut queue: Vec<usize> = hidden.cells().collect();
    let mut next = 0;
    loop {
        while next < queue.len() {
            if Instant::now() >= deadline {
                return Err(out_of_time());
            }
            let cell = queue[next];
            next += 1;
            let newly = audit.make_safe(cell, &mut hidden)?;
            queue.extend(newly);
        }
        // Totals of pairs over lines that now show no count go too (only hiding more, so
        // what was proven stays proven); their cells and zeros are then checked.
        let forced = layout.pair_rule(&values, &hidden);
        if forced.is_empty() {
            break;
        }
        for total in forced {
            queue.extend(hidden.hide(&network, total));
        }
    }

    // Greedy choices can hide more than needed: publish complements again, largest first,
    // keeping each published only when a full audit of the new pattern passes (so the
    // pattern returned is always one audited in full). The number of tries, and the work
    // of their searches, are functions of the table and the rules alone, so the same table
    // always gives the same answer under the same rules; past the deadline the answer is
    // refused, never cut short.
    let mut complements: Vec<usize> = hidden.cells().filter(|&c| values[c] >= rules.k).collect();
    complements.sort_unstable_by_key(|&c| Reverse(preference(c)));
    let hidden_now = hidden.cells().count().max(1);
    let tries = PRUNE_ATTEMPTS.min(PRUNE_WORK / hidden_now);
    let counts_pairs = layout.pair_rows || layout.pair_cols;
    let mut tried = 0;
    let visits_before = audit.flows.visits;
    for cell in complements {
        if tried == tries || audit.flows.visits - visits_before > PRUNE_VISITS {
            break;
        }
        let published = hidden.publish(&network, cell);
        // Publishing a cell can break the pair rule only for that cell's own line, when
        // it is a total (it shows a count otherwise, and the zeros it publishes show none).
        if counts_pairs && layout.pair_forces(cell, &values, &hidden) {
            // A total the pair rule keeps hidden: not a try (no audit ran).
            hidden.hide(&network, cell);
            continue;
        }
        tried += 1;
        let mut nodes: Vec<usize> = published
            .iter()
            .flat_map(|&c| [network.from[c], network.to[c]])
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        let neighbours: Vec<usize> = nodes
            .into_iter()
            .flat_map(|n| hidden.adjacent[n].iter().copied())
            .collect();
        let safe = audit
            .all_safe(&hidden, &neighbours, deadline)
            .map_err(|_| out_of_time())?;
        if !safe {
            hidden.hide(&network, cell);
        }
    }

    let hidden_count = hidden.cells().count();
    let publish = |range: std::ops::Range<usize>| -> Vec<Option<u64>> {
        range
            .map(|c| (!hidden.contains(c)).then_some(values[c]))
            .collect()
    };
    let interior = table.cells.len();
    let (row_totals, col_totals) = if layout.two_way {
        let rows_end = interior + layout.rows;
        (
            publish(interior..rows_end),
            publish(rows_end..rows_end + layout.cols),
        )
    } else {
        (Vec::new(), Vec::new())
    };
    let grand = layout.grand();
    Ok(Protected {
        cells: publish(0..interior),
        row_totals,
        col_totals,
        grand_total: (!hidden.contains(grand)).then_some(values[grand]),
        primary,
        secondary: hidden_count - primary,
    })
}

/// Where a table's rows and columns go in its canonical arrangement: the layout every
/// question asking for the same table is protected in, however it orders its dimensions.
///
/// [`protect`] breaks ties by cell position, so the same counts laid out in another order
/// (a transposed table, columns reordered) can get another pattern, and two answers that
/// hide different cells of one table together reveal what each hides alone (a cell
/// published by one answer closes the other's equations). Protected in one arrangement
/// and mapped back, every such answer hides exactly the same cells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrangement {
    /// The table's rows in canonical order: canonical row `i` is the table's row `rows[i]`
    /// (its column `i` when transposed).
    pub rows: Vec<usize>,
    /// The table's columns in canonical order, likewise; `[0]` for a one-way table.
    pub cols: Vec<usize>,
    /// Whether the canonical table is the transpose: its rows are the table's columns.
    pub transpose: bool,
}

impl Arrangement {
    /// The table as it is.
    pub fn identity(table: &Table) -> Arrangement {
        Arrangement {
            rows: (0..table.rows).collect(),
            cols: (0..table.cols).collect(),
            transpose: false,
        }
    }

    fn check(&self, table: &Table) -> Result<(), SuppressError> {
        let permutes = |order: &[usize], n: usize| {
            let mut seen = vec![false; n];
            order.len() == n
                && order
                    .iter()
                    .all(|&i| i < n && !std::mem::replace(&mut seen[i], true))
        };
        let fits = permutes(&self.rows, table.rows)
            && permutes(&self.cols, table.cols)
            && (table.two_way || !self.transpose);
        if fits {
            Ok(())
        } else {
            Err(SuppressError::Internal(
                "an arrangement that does not permute the table's rows and columns",
            ))
        }
    }
}

/// Protects `table` in its canonical `arrangement` (see [`Arrangement`]) and maps the
/// pattern back to the table's own layout. A two-way table of one row or one column is
/// protected as the one-way table of its cells: its row (or column) totals repeat its
/// cells and its one column (or row) total the grand total, so it publishes the same
/// relations, and it then gets the same pattern as the one-way question.
pub fn protect_arranged(
    table: &Table,
    arrangement: &Arrangement,
    rules: Rules,
    deadline: Instant,
) -> Result<Protected, SuppressError> {
    table.check()?;
    arrangement.check(table)?;
    let (rows, cols) = if arrangement.transpose {
        (table.cols, table.rows)
    } else {
        (table.rows, table.cols)
    };
    // Canonical position (i, j) holds the table's cell `at(i, j)`.
    let at = |i: usize, j: usize| -> usize {
        if arrangement.transpose {
            arrangement.rows[j] * table.cols + arrangement.cols[i]
        } else {
            arrangement.rows[i] * table.cols + arrangement.cols[j]
        }
    };
    let mut cells = Vec::with_capacity(table.cells.len());
    let mut structural = Vec::new();
    for i in 0..rows {
        for j in 0..cols {
            cells.push(table.cells[at(i, j)]);
            if !table.structural.is_empty() {
                structural.push(table.is_structural(at(i, j)));
            }
        }
    }
    // Which canonical lines are listed even when they hold no count.
    let (empty_rows, empty_cols) = if arrangement.transpose {
        (table.empty_cols, table.empty_rows)
    } else {
        (table.empty_rows, table.empty_cols)
    };
    let (pair_rows, pair_cols) = if arrangement.transpose {
        (table.pair_cols, table.pair_rows)
    } else {
        (table.pair_rows, table.pair_cols)
    };
    let degenerate = !table.two_way || rows == 1 || cols == 1;
    let canonical = if !table.two_way {
        Table::one_way(cells)
            .listing_empty(empty_rows, false)
            .counting_pairs(table.pair_rows, false)
    } else if rows == 1 {
        // Its cells are its column totals, its total the row's.
        Table::one_way(cells)
            .listing_empty(empty_cols, false)
            .counting_pairs(pair_rows, false)
    } else if cols == 1 {
        Table::one_way(cells)
            .listing_empty(empty_rows, false)
            .counting_pairs(pair_cols, false)
    } else {
        Table::two_way(rows, cols, cells)?
            .listing_empty(empty_rows, empty_cols)
            .counting_pairs(pair_rows, pair_cols)
            .with_structural_zeros(structural)?
    };
    let p = protect(&canonical, rules, deadline)?;

    // Back to the table's layout. `shown[c]`: canonical cell `c` published.
    let mut out_cells = vec![None; table.cells.len()];
    for (c, shown) in p.cells.iter().enumerate() {
        let (i, j) = if degenerate && rows == 1 {
            (0, c)
        } else {
            (c / cols, c % cols)
        };
        out_cells[at(i, j)] = *shown;
    }
    // Canonical row totals and column totals, in canonical order.
    let (canon_rows, canon_cols): (Vec<Option<u64>>, Vec<Option<u64>>) = if !degenerate {
        (p.row_totals.clone(), p.col_totals.clone())
    } else if !table.two_way {
        (Vec::new(), Vec::new())
    } else if rows == 1 {
        (vec![p.grand_total], p.cells.clone())
    } else {
        (p.cells.clone(), vec![p.grand_total])
    };
    let (mut row_totals, mut col_totals) = if table.two_way {
        (vec![None; table.rows], vec![None; table.cols])
    } else {
        (Vec::new(), Vec::new())
    };
    if table.two_way {
        // Canonical row `i` is the table's row `rows[i]`, or its column `cols[i]` when
        // transposed; likewise for columns.
        for (i, shown) in canon_rows.into_iter().enumerate() {
            if arrangement.transpose {
                col_totals[arrangement.cols[i]] = shown;
            } else {
                row_totals[arrangement.rows[i]] = shown;
            }
        }
        for (j, shown) in canon_cols.into_iter().enumerate() {
            if arrangement.transpose {
                row_totals[arrangement.rows[j]] = shown;
            } else {
                col_totals[arrangement.cols[j]] = shown;
            }
        }
    }
    let layout = Layout::of(table);
    let values = layout.values(&table.cells)?;
    let shown: Vec<bool> = out_cells
        .iter()
        .chain(&row_totals)
        .chain(&col_totals)
        .chain(std::iter::once(&p.grand_total))
        .map(Option::is_some)
        .collect();
    let hidden: Vec<u64> = values
        .iter()
        .zip(&shown)
        .filter(|(_, shown)| !**shown)
        .map(|(v, _)| *v)
        .collect();
    let primary = hidden.iter().filter(|&&v| v > 0 && v < rules.k).count();
    Ok(Protected {
        cells: out_cells,
        row_totals,
        col_totals,
        grand_total: p.grand_total,
        primary,
        secondary: hidden.len() - primary,
    })
}

/// The interval an attacker can prove for every hidden cell of a published table:
/// `(cell index as in [`Protected`] order, lower bound, upper bound)`, `None` for an
/// unbounded upper end. For docs and tests: the exact LP bounds of the attacker model.
pub fn attacker_intervals(
    table: &Table,
    protected: &Protected,
) -> Result<Vec<(usize, u64, Option<u64>)>, SuppressError> {
    table.check()?;
    let layout = Layout::of(table);
    let values = layout.values(&table.cells)?;
    let network = Network::new(&layout, &values);
    let mut hidden: Vec<bool> = protected.cells.iter().map(Option::is_none).collect();
    hidden.extend(protected.row_totals.iter().map(Option::is_none));
    hidden.extend(protected.col_totals.iter().map(Option::is_none));
    hidden.push(protected.grand_total.is_none());
    let hidden = Hidden::new(&network, hidden);
    let mut flows = Flows::new(&network);
    let mut out = Vec::new();
    for c in hidden.cells() {
        let up = flows.up(c, &hidden, UNBOUNDED);
        let down = flows.down(c, &hidden, UNBOUNDED);
        let lo = values[c] - down as u64;
        let hi = (up < UNBOUNDED).then(|| values[c] + up as u64);
        out.push((c, lo, hi));
    }
    Ok(out)
}

fn sum(values: impl Iterator<Item = u64>) -> Result<u64, SuppressError> {
    let mut total = 0u64;
    for v in values {
        total = total.checked_add(v).ok_or(SuppressError::TotalOverflow)?;
    }
    Ok(total)
}

/// Numbering of every cell of a table: the interior row-major, then (two-way only) the row
/// totals, the column totals, and last the grand total.
struct Layout {
    rows: usize,
    cols: usize,
    two_way: bool,
    empty_rows: bool,
    empty_cols: bool,
    structural: Vec<bool>,
    pair_rows: bool,
    pair_cols: bool,
}

/// No cell: the missing second parent of a cell in one line only.
const NONE: usize = usize::MAX;

impl Layout {
    fn of(table: &Table) -> Layout {
        Layout {
            rows: table.rows,
            cols: table.cols,
            two_way: table.two_way,
            empty_rows: table.empty_rows,
            empty_cols: table.empty_cols,
            structural: Layout::structural_of(table),
            pair_rows: table.pair_rows,
            pair_cols: table.pair_cols,
        }
    }

    /// Per cell, interior then totals: whether it is 0 by a public fact. A total whose
    /// every cell is so is too (a delay band no group of the table can have): published
    /// as 0, never hidden by the zero rule, which could never protect it (every cell of
    /// its line is a published 0), and a table with a small hidden total was refused as
    /// an internal error (a claims audit: the error itself told that every patient of the
    /// small selection was, say, diagnosed before 18).
    fn structural_of(table: &Table) -> Vec<bool> {
        let interior: Vec<bool> = (0..table.cells.len())
            .map(|c| table.is_structural(c))
            .collect();
        if table.structural.is_empty() || !table.two_way || table.rows == 0 || table.cols == 0 {
            return interior;
        }
        let (rows, cols) = (table.rows, table.cols);
        let row_totals: Vec<bool> = (0..rows)
            .map(|r| (0..cols).all(|j| interior[r * cols + j]))
            .collect();
        let col_totals: Vec<bool> = (0..cols)
            .map(|j| (0..rows).all(|r| interior[r * cols + j]))
            .collect();
        let grand = interior.iter().all(|&s| s);
        let mut all = interior;
        all.extend(row_totals);
        all.extend(col_totals);
        all.push(grand);
        all
    }

    /// The cells of the line whose total is `total`, when that total counts pairs
    /// ([`Table::counting_pairs`]): a row's or column's cells, or for the grand total the
    /// row and column totals (a one-way table's cells).
    fn pair_line(&self, total: usize) -> Option<Vec<usize>> {
        let (interior, grand) = (self.interior(), self.grand());
        if total == grand {
            let by_gene = self.pair_rows || self.pair_cols;
            return by_gene.then(|| {
                if self.two_way {
                    (interior..grand).collect()
                } else {
                    (0..interior).collect()
                }
            });
        }
        if !self.two_way || total < interior {
            return None;
        }
        let (rows, cols) = (self.rows, self.cols);
        if total < interior + rows {
            let r = total - interior;
            self.pair_rows.then(|| (r * cols..(r + 1) * cols).collect())
        } else {
            let j = total - interior - rows;
            self.pair_cols
                .then(|| (0..rows).map(|r| r * cols + j).collect())
        }
    }

    /// Whether the pair rule hides `total` under `hidden`: a published total other than 0
    /// that counts pairs, whose line publishes no count. (A total of 0 says its line is
    /// empty, and publishes nothing else.)
    fn pair_forces(&self, total: usize, values: &[u64], hidden: &Hidden) -> bool {
        if values[total] == 0 || hidden.contains(total) {
            return false;
        }
        self.pair_line(total).is_some_and(|line| {
            !line
                .into_iter()
                .any(|c| values[c] > 0 && !hidden.contains(c))
        })
    }

    /// The totals the pair rule hides under `hidden` ([`Layout::pair_forces`]).
    fn pair_rule(&self, values: &[u64], hidden: &Hidden) -> Vec<usize> {
        (self.interior()..=self.grand())
            .filter(|&total| self.pair_forces(total, values, hidden))
            .collect()
    }

    /// The totals of the lines `cell` is a part of (not the total of): an interior cell's
    /// row and column totals, a row or column total's grand total; a one-way cell's grand
    /// total. [`NONE`] where there is none.
    fn parents(&self, cell: usize) -> [usize; 2] {
        let grand = self.grand();
        if cell == grand {
            [NONE, NONE]
        } else if !self.two_way || cell >= self.interior() {
            [grand, NONE]
        } else {
            let (r, j) = self.coordinates(cell);
            [self.interior() + r, self.interior() + self.rows + j]
        }
    }

    /// Whether anyone may take `cell` to be 0 when it is hidden: an interior cell of a
    /// two-way table; a one-way cell or a row total when rows are listed whether or not
    /// they hold a count; a column total likewise. Anything else lists at least 1.
    fn may_be_zero(&self, cell: usize) -> bool {
        if cell == self.grand() {
            false
        } else if !self.two_way {
            self.empty_rows
        } else if cell < self.interior() {
            true
        } else if cell < self.interior() + self.rows {
            self.empty_rows
        } else {
            self.empty_cols
        }
    }

    fn interior(&self) -> usize {
        self.rows * self.cols
    }

    fn grand(&self) -> usize {
        if self.two_way {
            self.interior() + self.rows + self.cols
        } else {
            self.interior()
        }
    }

    /// Complements prefer interior cells (0), then row and column totals (1), then the
    /// grand total (2): researchers lose least when an interior cell goes.
    fn class(&self, cell: usize) -> u8 {
        if cell < self.interior() {
            0
        } else if cell < self.grand() {
            1
        } else {
            2
        }
    }

    /// Coordinates of `cell` in the table extended by its totals: row `rows` holds the
    /// column totals, column `cols` the row totals, and (`rows`, `cols`) the grand total.
    fn coordinates(&self, cell: usize) -> (usize, usize) {
        if cell < self.interior() {
            (cell / self.cols, cell % self.cols)
        } else if cell < self.interior() + self.rows {
            (cell - self.interior(), self.cols)
        } else if cell < self.grand() {
            (self.rows, cell - self.interior() - self.rows)
        } else {
            (self.rows, self.cols)
        }
    }

    /// Every value in [`Layout`] order: the cells, then the totals.
    fn values(&self, cells: &[u64]) -> Result<Vec<u64>, SuppressError> {
        let mut values = cells.to_vec();
        if self.two_way {
            for i in 0..self.rows {
                values.push(sum(cells[i * self.cols..(i + 1) * self.cols]
                    .iter()
                    .copied())?);
            }
            for j in 0..self.cols {
                values.push(sum((0..self.rows).map(|i| cells[i * self.cols + j]))?);
            }
        }
        values.push(sum(cells.iter().copied())?);
        Ok(values)
    }
}

/// Flow amounts: counts fit in 64 bits, so `i128` never overflows below this sentinel.
type Amount = i128;
const UNBOUNDED: Amount = i128::MAX / 4;

/// The attacker's system as a network. Node numbering: two-way, the extended rows
/// `0..=rows` and then the extended columns; one-way, the single equation (0) and a node
/// without an equation (1). Every non-zero value, and every zero the zero rule can hide,
/// is an edge `from -> to` whose flow is `sign * (change of the value)`; only hidden
/// values are edges of the attacker's system, the others are candidates for hiding.
///
/// **The zero rule.** A zero that may be 0 ([`Layout::may_be_zero`]) and is not
/// structural is hidden exactly when a total of a line it is part of is hidden and no
/// other is a published 0 ([`Hidden::zero_rule`]), and published otherwise. So a hidden cell in such a line may be 0 (its least value is 0),
/// and any other hidden cell is at least 1: the attacker reads both from the pattern.
/// Zeros are never hidden for any other reason, and published zeros are never chosen as
/// complements. Hiding a total thus hides the zeros of its lines, which need protecting
/// like every hidden count: no answer proves the few patients of a hidden row to have
/// none of a category.
struct Network<'a> {
    values: &'a [u64],
    from: Vec<usize>,
    to: Vec<usize>,
    sign: Vec<i8>,
    /// Per node, the cells incident to it that can ever be hidden.
    incident: Vec<Vec<usize>>,
    class: Vec<u8>,
    /// Per cell, its parents ([`Layout::parents`]).
    parents: Vec<[usize; 2]>,
    /// Per cell, whether it may be 0 when hidden ([`Layout::may_be_zero`]).
    may_be_zero: Vec<bool>,
    /// Per total, the zeros the zero rule hides while it is hidden.
    zeros_under: Vec<Vec<usize>>,
}

impl<'a> Network<'a> {
    fn new(layout: &Layout, values: &'a [u64]) -> Network<'a> {
        let n = values.len();
        let nodes = if layout.two_way {
            layout.rows + layout.cols + 2
        } else {
            2
        };
        let mut net = Network {
            values,
            from: vec![0; n],
            to: vec![0; n],
            sign: vec![1; n],
            incident: vec![Vec::new(); nodes],
            class: (0..n).map(|c| layout.class(c)).collect(),
            parents: (0..n).map(|c| layout.parents(c)).collect(),
            may_be_zero: (0..n).map(|c| layout.may_be_zero(c)).collect(),
            zeros_under: vec![Vec::new(); n],
        };
        for (c, &value) in values.iter().enumerate() {
            let (from, to, sign) = if layout.two_way {
                let (r, col) = layout.coordinates(c);
                let s_row = if r == layout.rows { -1 } else { 1 };
                let t_col = if col == layout.cols { -1 } else { 1 };
                (layout.rows + 1 + col, r, s_row * t_col)
            } else {
                (1, 0, if c == layout.grand() { -1 } else { 1 })
            };
            net.from[c] = from;
            net.to[c] = to;
            net.sign[c] = sign;
            let hideable_zero = value == 0
                && net.may_be_zero[c]
                && !layout.structural.get(c).copied().unwrap_or(false)
                && net.parents[c][0] != NONE;
            if hideable_zero {
                for parent in net.parents[c] {
                    if parent != NONE {
                        net.zeros_under[parent].push(c);
                    }
                }
            }
            if value > 0 || hideable_zero {
                net.incident[from].push(c);
                net.incident[to].push(c);
            }
        }
        net
    }

    /// The least value the attacker knows hidden cell `c` to have under `hidden`: 0 when
    /// it may be 0 and a total of its lines is hidden (the zero rule would have hidden it
    /// as a zero), else 1.
    fn floor(&self, c: usize, hidden: &Hidden) -> u64 {
        let under_hidden = self.parents[c]
            .iter()
            .any(|&p| p != NONE && hidden.contains(p));
        u64::from(!(self.may_be_zero[c] && under_hidden))
    }

    /// Capacity of cell `c` in the forward (`from -> to`) or backward direction before any
    /// flow: a value can grow without bound and shrink to its floor.
    fn capacity(&self, c: usize, forward: bool, hidden: &Hidden) -> Amount {
        let slack = Amount::from(self.values[c]) - Amount::from(self.floor(c, hidden));
        if (self.sign[c] > 0) == forward {
            UNBOUNDED
        } else {
            slack
        }
    }

    /// The other end of `c` seen from `node`, and whether that traverses it forward.
    fn across(&self, c: usize, node: usize) -> (usize, bool) {
        if self.from[c] == node {
            (self.to[c], true)
        } else {
            (self.from[c], false)
        }
    }
}

/// The hidden cells, with each node's hidden cells, so that the attacker's network is
/// walked without looking at published cells.
struct Hidden {
    is: Vec<bool>,
    adjacent: Vec<Vec<usize>>,
}

impl Hidden {
    fn new(net: &Network<'_>, is: Vec<bool>) -> Hidden {
        let mut adjacent = vec![Vec::new(); net.incident.len()];
        for (c, _) in is.iter().enumerate().filter(|&(_, &h)| h) {
            adjacent[net.from[c]].push(c);
            adjacent[net.to[c]].push(c);
        }
        Hidden { is, adjacent }
    }

    fn contains(&self, c: usize) -> bool {
        self.is[c]
    }

    fn set(&mut self, net: &Network<'_>, c: usize, hide: bool) -> bool {
        if self.is[c] == hide {
            return false;
        }
        self.is[c] = hide;
        if hide {
            self.adjacent[net.from[c]].push(c);
            self.adjacent[net.to[c]].push(c);
        } else {
            self.adjacent[net.from[c]].retain(|&x| x != c);
            self.adjacent[net.to[c]].retain(|&x| x != c);
        }
        true
    }

    /// Hides `c` and whatever zeros the zero rule then hides; returns every cell hidden.
    fn hide(&mut self, net: &Network<'_>, c: usize) -> Vec<usize> {
        self.change(net, c, true)
    }

    /// Publishes `c` and whatever zeros the zero rule then publishes; returns every cell
    /// published.
    fn publish(&mut self, net: &Network<'_>, c: usize) -> Vec<usize> {
        self.change(net, c, false)
    }

    fn change(&mut self, net: &Network<'_>, c: usize, hide: bool) -> Vec<usize> {
        let mut changed = Vec::new();
        let mut next = vec![c];
        if self.set(net, c, hide) {
            changed.push(c);
        }
        // A zero total (a delay band no patient is in) can itself fall under the rule:
        // its own zeros follow it.
        while let Some(total) = next.pop() {
            for &z in &net.zeros_under[total] {
                if self.set(net, z, self.zero_rule(net, z)) {
                    changed.push(z);
                    next.push(z);
                }
            }
        }
        changed
    }

    /// Whether the zero rule hides zero `z`: a total of its lines is hidden, and none is a
    /// published 0 (that one already says `z` is 0: a column no patient is in).
    fn zero_rule(&self, net: &Network<'_>, z: usize) -> bool {
        let parents = net.parents[z].iter().filter(|&&p| p != NONE);
        let mut under_hidden = false;
        for &p in parents {
            if self.is[p] {
                under_hidden = true;
            } else if net.values[p] == 0 {
                return false;
            }
        }
        under_hidden
    }

    fn cells(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.is.len()).filter(|&c| self.is[c])
    }
}

/// Augmenting-path maximum flow on the hidden cells, capped at a limit, with reusable
/// scratch space.
struct Flows<'n, 'a> {
    net: &'n Network<'a>,
    /// Net forward flow per cell in the current computation.
    flow: Vec<Amount>,
    used: Vec<usize>,
    /// Per node: the cell and direction it was reached by, in the current search.
    parent: Vec<Option<(usize, bool)>>,
    seen: Vec<u32>,
    stamp: u32,
    /// Edges looked at by the searches so far.
    visits: u64,
}

impl<'n, 'a> Flows<'n, 'a> {
    fn new(net: &'n Network<'a>) -> Self {
        let nodes = net.incident.len();
        Flows {
            net,
            flow: vec![0; net.values.len()],
            used: Vec::new(),
            parent: vec![None; nodes],
            seen: vec![0; nodes],
            stamp: 0,
            visits: 0,
        }
    }

    fn residual(&self, c: usize, forward: bool, hidden: &Hidden) -> Amount {
        let cap = self.net.capacity(c, forward, hidden);
        if cap >= UNBOUNDED {
            return UNBOUNDED;
        }
        if forward {
            cap - self.flow[c]
        } else {
            cap + self.flow[c]
        }
    }

    fn reset(&mut self) {
        for &c in &self.used {
            self.flow[c] = 0;
        }
        self.used.clear();
    }

    /// Maximum flow from `s` to `t` over hidden cells other than `skip`, up to `limit`
    /// (`limit` at once when an unbounded path exists). Leaves the flow in place.
    fn max_flow(
        &mut self,
        s: usize,
        t: usize,
        skip: usize,
        hidden: &Hidden,
        limit: Amount,
    ) -> Amount {
        self.reset();
        let mut total: Amount = 0;
        while total < limit {
            let Some(bottleneck) = self.search(s, t, skip, hidden) else {
                break;
            };
            if bottleneck >= UNBOUNDED {
                return limit;
            }
            let push = bottleneck.min(limit - total);
            let mut node = t;
            while node != s {
                let (c, forward) = self.parent[node].expect("on the path");
                if self.flow[c] == 0 {
                    self.used.push(c);
                }
                if forward {
                    self.flow[c] += push;
                    node = self.net.from[c];
                } else {
                    self.flow[c] -= push;
                    node = self.net.to[c];
                }
            }
            total += push;
        }
        total
    }

    /// Breadth-first search for an augmenting path; its bottleneck.
    fn search(&mut self, s: usize, t: usize, skip: usize, hidden: &Hidden) -> Option<Amount> {
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            self.seen.iter_mut().for_each(|x| *x = 0);
            self.stamp = 1;
        }
        let mut queue = std::collections::VecDeque::from([s]);
        self.seen[s] = self.stamp;
        while let Some(node) = queue.pop_front() {
            self.visits += hidden.adjacent[node].len() as u64;
            for &c in &hidden.adjacent[node] {
                if c == skip {
                    continue;
                }
                let (other, forward) = self.net.across(c, node);
                if self.seen[other] == self.stamp || self.residual(c, forward, hidden) <= 0 {
                    continue;
                }
                self.seen[other] = self.stamp;
                self.parent[other] = Some((c, forward));
                if other == t {
                    let mut bottleneck = UNBOUNDED;
                    let mut n = t;
                    while n != s {
                        let (c, forward) = self.parent[n].expect("on the path");
                        bottleneck = bottleneck.min(self.residual(c, forward, hidden));
                        n = if forward {
                            self.net.from[c]
                        } else {
                            self.net.to[c]
                        };
                    }
                    return Some(bottleneck);
                }
                queue.push_back(other);
            }
        }
        None
    }

    /// Ends `(s, t)` of the return path when cell `c` grows: growing `x` moves flow along
    /// `c` forward if its sign is positive, so the cycle closes from `to` back to `from`.
    fn growth_ends(&self, c: usize) -> (usize, usize) {
        if self.net.sign[c] > 0 {
            (self.net.to[c], self.net.from[c])
        } else {
            (self.net.from[c], self.net.to[c])
        }
    }

    /// How far the attacker cannot rule out that hidden cell `c` is above its value, up
    /// to `limit`.
    fn up(&mut self, c: usize, hidden: &Hidden, limit: Amount) -> Amount {
        let (s, t) = self.growth_ends(c);
        self.max_flow(s, t, c, hidden, limit)
    }

    /// How far below its value, up to `limit` (and never below its floor).
    fn down(&mut self, c: usize, hidden: &Hidden, limit: Amount) -> Amount {
        let slack = Amount::from(self.net.values[c]) - Amount::from(self.net.floor(c, hidden));
        let limit = limit.min(slack);
        if limit <= 0 {
            return 0;
        }
        let (t, s) = self.growth_ends(c);
        self.max_flow(s, t, c, hidden, limit)
    }
}

/// The check of each hidden cell against the rules, and the choice of complements.
struct Audit<'n, 'a> {
    flows: Flows<'n, 'a>,
    rules: Rules,
}

impl<'n, 'a> Audit<'n, 'a> {
    fn new(net: &'n Network<'a>, rules: Rules) -> Self {
        Audit {
            flows: Flows::new(net),
            rules,
        }
    }

    /// How much room above its value cell `c` needs: `k - value` for a primary cell or a
    /// hidden zero (upper protection), then at least what the sliding protection still
    /// lacks given `down`.
    fn needed_up(&self, c: usize, down: Amount) -> Amount {
        let value = self.flows.net.values[c];
        let k = Amount::from(self.rules.k);
        // A hidden zero is protected as a small count is: an interval that stops below k
        // would tell it apart from one (every small count's reaches k), so it would say 0.
        let upper = if value < self.rules.k {
            k - Amount::from(value)
        } else {
            0
        };
        upper.max(Amount::from(self.rules.protection) - down)
    }

    /// Whether hidden cell `c` is safe under `hidden`.
    fn is_safe(&mut self, c: usize, hidden: &Hidden) -> bool {
        // Room above alone usually suffices: one flow instead of two.
        let most = self.needed_up(c, 0);
        let up = self.flows.up(c, hidden, most);
        if up >= most {
            return true;
        }
        // `up` is then exact (below its cap): add the room below.
        let down = self
            .flows
            .down(c, hidden, Amount::from(self.rules.protection));
        up >= self.needed_up(c, down)
    }

    /// Whether every hidden cell is safe; the cells in `first` are checked first (those
    /// most likely to fail), so that a failing audit usually ends early.
    fn all_safe(
        &mut self,
        hidden: &Hidden,
        first: &[usize],
        deadline: Instant,
    ) -> Result<bool, SuppressError> {
        // `first` may repeat cells: each is checked once.
        let mut checked = vec![false; hidden.is.len()];
        let first = first
            .iter()
            .copied()
            .filter(|&c| !std::mem::replace(&mut checked[c], true));
        let first: Vec<usize> = first.collect();
        let rest = hidden.cells().filter(|&c| !checked[c]);
        for (i, c) in first.into_iter().chain(rest).enumerate() {
            if i % 16 == 0 && Instant::now() >= deadline {
                return Err(SuppressError::OutOfTime {
                    budget: Duration::ZERO,
                });
            }
            if hidden.contains(c) && !self.is_safe(c, hidden) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Hides published cells until `c` is safe; returns the cells it hid.
    fn make_safe(&mut self, c: usize, hidden: &mut Hidden) -> Result<Vec<usize>, SuppressError> {
        if self.is_safe(c, hidden) {
            return Ok(Vec::new());
        }
        let down = self
            .flows
            .down(c, hidden, Amount::from(self.rules.protection));
        let need = self.needed_up(c, down);
        let mut added = Vec::new();
        if need <= 0 {
            return Ok(added);
        }
        loop {
            let up = self.flows.up(c, hidden, need);
            if up >= need {
                return Ok(added);
            }
            // `up` left its flow in place: find the cheapest path in the residual network
            // on which published cells, once hidden, carry more.
            let (s, t) = self.flows.growth_ends(c);
            let path = self
                .cheapest_path(s, t, c, hidden)
                .ok_or(SuppressError::Internal(
                    "a hidden cell cannot be protected by hiding more",
                ))?;
            if path.is_empty() {
                return Err(SuppressError::Internal("an augmenting path was missed"));
            }
            for cell in path {
                added.extend(hidden.hide(self.flows.net, cell));
            }
        }
    }

    /// Dijkstra from `s` to `t` over every non-zero cell but `skip` with residual room:
    /// hidden cells cost nothing, published ones their value (then their class, so totals
    /// go last). Returns the published cells on the cheapest path.
    fn cheapest_path(
        &self,
        s: usize,
        t: usize,
        skip: usize,
        hidden: &Hidden,
    ) -> Option<Vec<usize>> {
        let net = self.flows.net;
        let nodes = net.incident.len();
        let mut best: Vec<Option<u128>> = vec![None; nodes];
        let mut via: Vec<Option<usize>> = vec![None; nodes];
        let mut heap = BinaryHeap::from([Reverse((0u128, s))]);
        best[s] = Some(0);
        while let Some(Reverse((cost, node))) = heap.pop() {
            if best[node].is_some_and(|b| b < cost) {
                continue;
            }
            if node == t {
                break;
            }
            for &c in &net.incident[node] {
                if c == skip {
                    continue;
                }
                let (other, forward) = net.across(c, node);
                let room = if hidden.contains(c) {
                    self.flows.residual(c, forward, hidden)
                } else if net.values[c] == 0 {
                    // A published zero stays published: the zero rule alone hides zeros.
                    continue;
                } else {
                    net.capacity(c, forward, hidden)
                };
                if room <= 0 {
                    continue;
                }
                let step = if hidden.contains(c) {
                    0
                } else {
                    u128::from(net.values[c]) * 4 + u128::from(net.class[c]) + 1
                };
                let next = cost + step;
                if best[other].is_none_or(|b| next < b) {
                    best[other] = Some(next);
                    via[other] = Some(c);
                    heap.push(Reverse((next, other)));
                }
            }
        }
        best[t]?;
        let mut path = Vec::new();
        let mut node = t;
        while node != s {
            let c = via[node]?;
            if !hidden.contains(c) {
                path.push(c);
            }
            node = net.across(c, node).0;
        }
        Some(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(k: u64, p: u64) -> Rules {
        Rules::new(k, p).unwrap()
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(30)
    }

    fn run(t: &Table, k: u64, p: u64) -> Protected {
        protect(t, rules(k, p), soon()).unwrap()
    }

    /// Every hidden cell's interval, checked against the rules.
    fn assert_safe(t: &Table, p: &Protected, k: u64, level: u64) {
        let layout = Layout::of(t);
        let values = layout.values(&t.cells).unwrap();
        for (c, lo, hi) in attacker_intervals(t, p).unwrap() {
            let width = hi.map_or(u64::MAX, |h| h - lo);
            assert!(width >= level, "cell {c} = {} in [{lo}, {hi:?}]", values[c]);
            if values[c] < k {
                assert!(hi.is_none_or(|h| h >= k), "cell {c} proven below k");
            }
        }
    }

    #[test]
    fn one_small_cell_in_a_2x2_hides_all_four_interior_cells() {
        let t = Table::two_way(2, 2, vec![3, 10, 10, 10]).unwrap();
        let p = run(&t, 5, 1);
        assert_eq!(p.cells, vec![None; 4]);
        assert_eq!(p.row_totals, vec![Some(13), Some(20)]);
        assert_eq!(p.col_totals, vec![Some(13), Some(20)]);
        assert_eq!(p.grand_total, Some(33));
        assert_eq!((p.primary, p.secondary), (1, 3));
        assert_safe(&t, &p, 5, 1);
    }

    #[test]
    fn the_attacker_interval_of_a_2x2_is_the_lp_optimum() {
        let t = Table::two_way(2, 2, vec![3, 10, 10, 10]).unwrap();
        let p = run(&t, 5, 1);
        let intervals = attacker_intervals(&t, &p).unwrap();
        // x00 + x01 = 13, x00 + x10 = 13, x01 + x11 = 20, every x >= 1.
        assert_eq!(
            intervals,
            vec![
                (0, 1, Some(12)),
                (1, 1, Some(12)),
                (2, 1, Some(12)),
                (3, 8, Some(19))
            ]
        );
    }

    #[test]
    fn one_small_cell_in_a_one_way_table_needs_a_second_hidden_cell() {
        let t = Table::one_way(vec![3, 20, 10]);
        let p = run(&t, 5, 1);
        assert_eq!(p.cells, vec![None, Some(20), None]);
        assert_eq!(p.grand_total, Some(33));
        assert!(p.row_totals.is_empty() && p.col_totals.is_empty());
        assert_eq!((p.primary, p.secondary), (1, 1));
        assert_safe(&t, &p, 5, 1);
    }

    #[test]
    fn hidden_ones_are_not_left_pinned_by_their_total() {
        // [1, 1, 1] with 20 beside them: three hidden ones and G = 23 would leave each in
        // [1, 1] if 20 stayed published. 20 goes too: each one is then in [1, 18].
        let t = Table::one_way(vec![1, 1, 1, 20]);
        let p = run(&t, 5, 1);
        assert_eq!(p.cells, vec![None; 4]);
        assert_eq!(p.grand_total, Some(23));
        assert_safe(&t, &p, 5, 1);
    }

    #[test]
    fn a_one_way_table_of_small_cells_hides_its_total_too() {
        let p = run(&Table::one_way(vec![1, 0, 2]), 5, 1);
        assert_eq!(p.cells, vec![None, Some(0), None]);
        assert_eq!(p.grand_total, None);
        assert_eq!((p.primary, p.secondary), (3, 0));
    }

    #[test]
    fn combined_equations_cannot_pin_a_cell() {
        // The shape: margins large enough to publish, small cells scattered. An
        // attacker combining rows and columns with hidden >= 1 must not pin anything.
        #[rustfmt::skip]
        let t = Table::two_way(3, 3, vec![
            1, 6, 1,
            7, 1, 9,
            1, 8, 1,
        ]).unwrap();
        for (k, level) in [(2, 1), (3, 1), (5, 1), (5, 3), (10, 2)] {
            let p = run(&t, k, level);
            assert_safe(&t, &p, k, level);
        }
    }

    #[test]
    fn margins_below_k_are_hidden() {
        let t = Table::two_way(2, 2, vec![1, 1, 1, 1]).unwrap();
        let p = run(&t, 3, 1);
        assert_eq!(p.cells, vec![None; 4]);
        assert_eq!(p.row_totals, vec![None, None]);
        assert_eq!(p.col_totals, vec![None, None]);
        // Every row and column total is hidden, so every cell may be 0 (the zero rule would
        // have hidden a 0 there): with G = 4 published, each cell lies in [0, 3] and each
        // total in [1, 3], which reaches k. (Were hidden cells known to be at least 1,
        // G = 4 would pin all four to 1.)
        assert_eq!(p.grand_total, Some(4));
        assert_safe(&t, &p, 3, 1);
    }

    #[test]
    fn an_all_zero_table_is_published_whole() {
        let p = run(&Table::two_way(2, 3, vec![0; 6]).unwrap(), 5, 1);
        assert_eq!(p.cells, vec![Some(0); 6]);
        assert_eq!(p.row_totals, vec![Some(0); 2]);
        assert_eq!(p.col_totals, vec![Some(0); 3]);
        assert_eq!(p.grand_total, Some(0));
        assert_eq!((p.primary, p.secondary), (0, 0));
    }

    #[test]
    fn k_above_every_count_hides_everything_zeros_included() {
        // The zero's row and column totals are hidden, so the zero is too: published, it
        // would say that the few patients of its row have none of its column.
        let t = Table::two_way(2, 2, vec![0, 4, 5, 6]).unwrap();
        let p = run(&t, 100, 1);
        assert_eq!(p.cells, vec![None, None, None, None]);
        assert_eq!(p.row_totals, vec![None, None]);
        assert_eq!(p.col_totals, vec![None, None]);
        assert_eq!(p.grand_total, None);
        assert_eq!((p.primary, p.secondary), (8, 1));
        assert_safe(&t, &p, 100, 1);
    }

    #[test]
    fn a_higher_protection_level_hides_more() {
        #[rustfmt::skip]
        let t = Table::two_way(3, 4, vec![
            2, 30, 41, 12,
            25, 3, 60, 14,
            33, 47, 2, 90,
        ]).unwrap();
        let low = run(&t, 3, 1);
        let high = run(&t, 3, 20);
        assert_safe(&t, &low, 3, 1);
        assert_safe(&t, &high, 3, 20);
        let hidden = |p: &Protected| p.primary + p.secondary;
        assert!(hidden(&high) >= hidden(&low));
    }

    #[test]
    fn protection_is_deterministic() {
        let cells: Vec<u64> = (0..48u64).map(|i| (i * 7919 + 13) % 23 % 9).collect();
        let t = Table::two_way(6, 8, cells).unwrap();
        assert_eq!(run(&t, 5, 2), run(&t, 5, 2));
    }

    #[test]
    fn a_table_that_cannot_be_proven_in_time_is_refused() {
        let cells: Vec<u64> = (0..10_000u64).map(|i| (i * 7919 + 13) % 7).collect();
        let t = Table::two_way(100, 100, cells).unwrap();
        let past = Instant::now();
        assert!(matches!(
            protect(&t, rules(5, 1), past),
            Err(SuppressError::OutOfTime { .. })
        ));
    }

    #[test]
    fn bad_shapes_sizes_and_rules_are_refused() {
        assert_eq!(
            Table::two_way(2, 3, vec![1; 5]),
            Err(SuppressError::ShapeMismatch {
                rows: 2,
                cols: 3,
                len: 5
            })
        );
        assert_eq!(
            Table::two_way(usize::MAX, 2, vec![]),
            Err(SuppressError::ShapeMismatch {
                rows: usize::MAX,
                cols: 2,
                len: 0
            })
        );
        assert_eq!(
            Table::two_way(201, 100, vec![0; 20_100]),
            Err(SuppressError::TooLarge { cells: 20_100 })
        );
        assert_eq!(
            protect(&Table::one_way(vec![0; MAX_CELLS + 1]), rules(5, 1), soon()),
            Err(SuppressError::TooLarge {
                cells: MAX_CELLS + 1
            })
        );
        assert_eq!(Rules::new(1, 1), Err(SuppressError::BadThreshold { k: 1 }));
        assert_eq!(
            Rules::new(5, 0),
            Err(SuppressError::BadProtectionLevel { protection: 0 })
        );
        let not_one_way = Table {
            rows: 1,
            cols: 2,
            two_way: false,
            cells: vec![1, 2],
            empty_rows: false,
            empty_cols: false,
            structural: Vec::new(),
            pair_rows: false,
            pair_cols: false,
        };
        assert!(matches!(
            protect(&not_one_way, rules(5, 1), soon()),
            Err(SuppressError::ShapeMismatch { .. })
        ));
        let overflowing = Table::one_way(vec![u64::MAX, 1]);
        assert_eq!(
            protect(&overflowing, rules(5, 1), soon()),
            Err(SuppressError::TotalOverflow)
        );
    }
}
