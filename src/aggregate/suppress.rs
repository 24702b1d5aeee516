//! Statistical disclosure control for frequency tables: primary and complementary cell
//! suppression, with an exact audit.
//!
//! A researcher receives counts of patients, with row totals, column totals and a grand
//! total. Every count in `1..k` is hidden (*primary* suppression), margins included; zeros
//! are published. Hiding small cells is not enough: the published cells and totals form a
//! linear system, and a hidden cell that the system determines is as good as published.
//! So further cells are hidden (*complementary* suppression) until no hidden value can be
//! recomputed.
//!
//! The audit is exact linear algebra, in the spirit of Statistics Norway's Gaussian
//! elimination method (`GaussSuppression`, in the R packages SSBtools and GaussSuppression,
//! Langsrud 2024): the unknowns are the hidden cells, the equations are the table's
//! additivity relations, and a hidden cell is recoverable exactly when its unit vector lies
//! in the row space of the equations restricted to the hidden cells. That is decided on a
//! reduced row echelon form computed with checked integer arithmetic, so the audit is never
//! wrong: it answers, or it returns [`SuppressError::ArithmeticOverflow`]. Complements are
//! chosen greedily and deterministically: for each recoverable cell, the published
//! non-zero cell sharing an equation with it with the smallest value (then interior before
//! margins before the grand total, then position), or failing that the smallest published
//! non-zero cell anywhere; the audit is repeated until it finds nothing (one complement per
//! audit at first, in batches once a table needs very many). A final pass tries to publish
//! each complement again, largest first, keeping it published when the audit still finds
//! nothing. Zeros are never hidden: counts are non-negative, so hidden cells that had to
//! add up to 0 would all be 0. tau-Argus and sdcTable offer the heavier references: HITAS
//! (optimal suppression by mixed-integer programming, with a protection interval for every
//! hidden cell) and HYPERCUBE (a geometric heuristic with a similar aim).
//!
//! Limits, on purpose: this protects against *exact* recovery from *one* table. It does not
//! guarantee a protection interval: linear programming on the published values (with
//! non-negativity) can still bound a hidden cell, sometimes tightly. It does not protect
//! against differencing between several queries (linked tables, a filter that removes one
//! patient): that is the job of the query audit and rate limits. `docs/privacy.md` states
//! the guarantees and the limits for researchers and for the data protection officer.

/// Most interior cells of a table this module protects. The audit is polynomial, but a
/// finer table is mostly suppressed anyway and only costs time.
pub const MAX_CELLS: usize = 20_000;

/// Audits with one complement each before complements are added in batches.
const SEQUENTIAL_ROUNDS: usize = 256;
/// Most complements tried for publication again after the greedy pass.
const PRUNE_ATTEMPTS: usize = 256;

/// A frequency table of non-negative counts. `cols == 1` with `two_way == false` is a
/// one-way table: its cells and a grand total (no row/column totals are published).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub rows: usize,
    pub cols: usize,
    /// Whether row and column totals are published (a two-way table).
    pub two_way: bool,
    /// Row-major, `rows * cols` counts.
    pub cells: Vec<u64>,
}

impl Table {
    /// A one-way table: one cell per category, and a grand total.
    pub fn one_way(cells: Vec<u64>) -> Table {
        Table {
            rows: cells.len(),
            cols: 1,
            two_way: false,
            cells,
        }
    }

    /// A two-way table with row totals, column totals and a grand total; `cells` is
    /// row-major. A single row or column is legal: its total then equals the grand total.
    pub fn two_way(rows: usize, cols: usize, cells: Vec<u64>) -> Result<Table, SuppressError> {
        let table = Table {
            rows,
            cols,
            two_way: true,
            cells,
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
        Ok(())
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

/// Why a table cannot be protected. Every variant but the last two is the caller's to fix.
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
    #[error("the suppression threshold k must be at least 2, got {k}")]
    KTooSmall { k: u64 },
    #[error("a total of the table does not fit in 64 bits")]
    TotalOverflow,
    #[error("exact elimination overflowed 64-bit integers; refusing to guess")]
    ArithmeticOverflow,
    /// A broken invariant of this module (a bug), reported rather than publishing.
    #[error("internal error in cell suppression: {0}")]
    Internal(&'static str),
}

/// Protects `table`: hides every count in `1..k` (margins included), then as many further
/// non-zero cells as needed so that no hidden value follows from the published ones.
/// Deterministic: the same table and `k` always give the same result.
pub fn protect(table: &Table, k: u64) -> Result<Protected, SuppressError> {
    if k < 2 {
        return Err(SuppressError::KTooSmall { k });
    }
    table.check()?;
    let layout = Layout::of(table);
    let values = layout.values(&table.cells)?;
    let equations = layout.equations();
    let mut member_of: Vec<Vec<usize>> = vec![Vec::new(); values.len()];
    for (e, eq) in equations.iter().enumerate() {
        for &(cell, _) in eq {
            member_of[cell].push(e);
        }
    }
    let preference = |cell: usize| (values[cell], layout.class(cell), cell);

    let mut hidden: Vec<bool> = values.iter().map(|&v| (1..k).contains(&v)).collect();
    let primary = hidden.iter().filter(|&&h| h).count();
    let mut secondary = 0;

    // The fallback candidates, best first; hidden cells only accumulate, so a cursor that
    // never moves back finds the best published one.
    let mut fallback: Vec<usize> = (0..values.len()).filter(|&c| values[c] > 0).collect();
    fallback.sort_unstable_by_key(|&c| preference(c));
    let mut cursor = 0;

    // Termination: zeros are never hidden, and every round but the last hides at least
    // one more non-zero cell. Once every non-zero cell is hidden, no hidden cell is
    // recoverable: a hidden interior cell x_ij >= 1 moves by +1 together with R_i >= x_ij,
    // C_j >= x_ij and G >= R_i (all non-zero, hence hidden) without breaking an equation;
    // a hidden margin is non-zero, so it has a non-zero (hidden) part that moves it the
    // same way; in a one-way table x_i moves with G. So while an audit finds a recoverable
    // cell, some non-zero cell is still published. Within a round the complements of the
    // first exposed cells may use the last ones up; the others are then safe already.
    let mut rounds = 0;
    loop {
        let mut exposed = recoverable(&equations, &hidden)?;
        if exposed.is_empty() {
            // Linear algebra pins nothing; but a hidden cell is never zero, and bounds
            // propagated through the equations can still pin one (e.g. two hidden ones
            // in a row whose total is 2). Treat such a cell as exposed too.
            match pinned_by_bounds(&equations, &hidden, &values) {
                Some(cell) => exposed = vec![cell],
                None => break,
            }
        }
        // One complement per round while rounds are few: a complement often protects
        // several exposed cells at once, and batching would hide more than needed. Large
        // tables needing many complements fall back to one per exposed cell per round.
        rounds += 1;
        if rounds <= SEQUENTIAL_ROUNDS {
            exposed.truncate(1);
        }
        let before = secondary;
        for cell in exposed {
            if !hidden[cell] {
                continue;
            }
            if let Some(rectangle) = layout
                .cheapest_rectangle(cell, &values, &hidden)
                .filter(|r| !r.is_empty())
            {
                // A rectangle of hidden cells in the table extended by its totals is a
                // cycle: moving its corners by +1/-1 alternately keeps every equation.
                for c in rectangle {
                    hidden[c] = true;
                    secondary += 1;
                }
                continue;
            }
            let neighbour = member_of[cell]
                .iter()
                .flat_map(|&e| equations[e].iter().map(|&(c, _)| c))
                .filter(|&c| !hidden[c] && values[c] > 0)
                .min_by_key(|&c| preference(c));
            let complement = neighbour.or_else(|| {
                while cursor < fallback.len() && hidden[fallback[cursor]] {
                    cursor += 1;
                }
                fallback.get(cursor).copied()
            });
            let Some(complement) = complement else { break };
            hidden[complement] = true;
            secondary += 1;
        }
        if secondary == before {
            // Impossible by the argument above; never publish a table the audit rejects.
            return Err(SuppressError::Internal(
                "a hidden cell is recoverable and no cell is left to hide",
            ));
        }
    }

    // Greedy choices can still hide more than needed. Try to publish each complement
    // again, largest value first (the most useful to a researcher), and keep it published
    // if the audit still finds nothing recoverable; bounded for large tables.
    let mut complements: Vec<usize> = (0..values.len())
        .filter(|&c| hidden[c] && !(1..k).contains(&values[c]))
        .collect();
    complements.sort_unstable_by_key(|&c| std::cmp::Reverse(preference(c)));
    for cell in complements.into_iter().take(PRUNE_ATTEMPTS) {
        hidden[cell] = false;
        if recoverable(&equations, &hidden)?.is_empty()
            && pinned_by_bounds(&equations, &hidden, &values).is_none()
        {
            secondary -= 1;
        } else {
            hidden[cell] = true;
        }
    }

    let publish = |range: std::ops::Range<usize>| -> Vec<Option<u64>> {
        range.map(|c| (!hidden[c]).then_some(values[c])).collect()
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
        grand_total: (!hidden[grand]).then_some(values[grand]),
        primary,
        secondary,
    })
}

/// The range of `coef * x` for a cell with bounds `lo..=hi`.
fn term_range(lo: &[i128], hi: &[i128], c: usize, coef: i64) -> (i128, i128) {
    let (a, b) = (i128::from(coef) * lo[c], i128::from(coef) * hi[c]);
    (a.min(b), a.max(b))
}

/// A hidden cell whose value interval collapses to one value when the attacker's bounds
/// are propagated through the equations: published cells are exact, hidden cells are at
/// least 1 (zeros are never hidden) and unbounded above; each equation then bounds each
/// of its cells by the others' bounds, repeated until nothing changes. Not a full linear
/// program, but it catches what bounds reveal one equation at a time (two hidden ones in a
/// row of total 2; a hidden total forced to its smallest possible value by another).
fn pinned_by_bounds(equations: &[Equation], hidden: &[bool], values: &[u64]) -> Option<usize> {
    const INF: i128 = i128::MAX / 4;
    let mut lo: Vec<i128> = Vec::with_capacity(values.len());
    let mut hi: Vec<i128> = Vec::with_capacity(values.len());
    for (c, &v) in values.iter().enumerate() {
        let (l, h) = if hidden[c] {
            (1, INF)
        } else {
            (i128::from(v), i128::from(v))
        };
        lo.push(l);
        hi.push(h);
    }
    let clamp = |x: i128| x.clamp(-INF, INF);
    // Every pass tightens some bound or stops; bounds are integers between the true value
    // and 1 or INF, so this ends, and a fixed cap keeps the cost linear in practice.
    for _ in 0..64 {
        let mut changed = false;
        for eq in equations {
            if !eq.iter().any(|&(c, _)| hidden[c]) {
                continue;
            }
            // sum(coef * x) = 0. The range of each term is [min, max] of coef * bounds;
            // sums keep the finite parts and count the infinite ones, so that each term
            // can be bounded by the others alone.
            let (mut low, mut low_inf, mut high, mut high_inf) = (0i128, 0u32, 0i128, 0u32);
            for &(c, coef) in eq {
                let (a, b) = term_range(&lo, &hi, c, coef);
                if a <= -INF {
                    low_inf += 1
                } else {
                    low += a
                }
                if b >= INF { high_inf += 1 } else { high += b }
            }
            for &(c, coef) in eq {
                if !hidden[c] {
                    continue;
                }
                let (a, b) = term_range(&lo, &hi, c, coef);
                // The others' sum: finite when no other term is infinite.
                let others_low = match (a <= -INF, low_inf) {
                    (true, 1) => Some(low),
                    (false, 0) => Some(low - a),
                    _ => None,
                };
                let others_high = match (b >= INF, high_inf) {
                    (true, 1) => Some(high),
                    (false, 0) => Some(high - b),
                    _ => None,
                };
                // coef * x = -(sum of the others).
                let (mut l, mut h) = (
                    others_high.map_or(-INF, |v| -v),
                    others_low.map_or(INF, |v| -v),
                );
                if coef < 0 {
                    (l, h) = (-h, -l);
                }
                if l > lo[c] {
                    lo[c] = clamp(l);
                    changed = true;
                }
                if h < hi[c] {
                    hi[c] = clamp(h);
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    (0..values.len()).find(|&c| hidden[c] && lo[c] >= hi[c])
}

fn sum(values: impl Iterator<Item = u64>) -> Result<u64, SuppressError> {
    let mut total = 0u64;
    for v in values {
        total = total.checked_add(v).ok_or(SuppressError::TotalOverflow)?;
    }
    Ok(total)
}

/// One additivity relation over the cells: `(cell, coefficient)`, +1 for the parts and -1
/// for the total, so the coefficients times the true values sum to zero.
type Equation = Vec<(usize, i64)>;

/// Numbering of every cell of a table: the interior row-major, then (two-way only) the row
/// totals, the column totals, and last the grand total.
struct Layout {
    rows: usize,
    cols: usize,
    two_way: bool,
}

impl Layout {
    fn of(table: &Table) -> Layout {
        Layout {
            rows: table.rows,
            cols: table.cols,
            two_way: table.two_way,
        }
    }

    fn interior(&self) -> usize {
        self.rows * self.cols
    }

    fn row_total(&self, i: usize) -> usize {
        self.interior() + i
    }

    fn col_total(&self, j: usize) -> usize {
        self.interior() + self.rows + j
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

    /// The cell at (`r`, `c`) of the table extended by its totals: row `rows` holds the
    /// column totals, column `cols` the row totals, and (`rows`, `cols`) the grand total.
    fn extended(&self, r: usize, c: usize) -> usize {
        match (r < self.rows, c < self.cols) {
            (true, true) => r * self.cols + c,
            (true, false) => self.row_total(r),
            (false, true) => self.col_total(c),
            (false, false) => self.grand(),
        }
    }

    /// Coordinates of `cell` in the extended table.
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

    /// The published cells to hide so that `cell` becomes a corner of a rectangle of
    /// hidden cells in the extended table (two-way tables only), choosing the rectangle
    /// that hides the least: smallest total value, then fewest totals, then position.
    /// Zeros are never hidden, so rectangles through a published zero do not count.
    fn cheapest_rectangle(
        &self,
        cell: usize,
        values: &[u64],
        hidden: &[bool],
    ) -> Option<Vec<usize>> {
        if !self.two_way {
            return None;
        }
        let (r, c) = self.coordinates(cell);
        // (total value hidden, totals hidden, row, column) of the best rectangle so far.
        type Cost = (u128, u8, usize, usize);
        let mut best: Option<(Cost, Vec<usize>)> = None;
        for k in (0..=self.rows).filter(|&k| k != r) {
            for l in (0..=self.cols).filter(|&l| l != c) {
                let corners = [
                    self.extended(r, l),
                    self.extended(k, c),
                    self.extended(k, l),
                ];
                if corners.iter().any(|&x| !hidden[x] && values[x] == 0) {
                    continue;
                }
                let new: Vec<usize> = corners.into_iter().filter(|&x| !hidden[x]).collect();
                let cost: u128 = new.iter().map(|&x| u128::from(values[x])).sum();
                let margins = new.iter().map(|&x| self.class(x)).sum::<u8>();
                let key = (cost, margins, k, l);
                if best.as_ref().is_none_or(|(b, _)| key < *b) {
                    best = Some((key, new));
                }
            }
        }
        best.map(|(_, new)| new)
    }

    /// The values of all cells, margins computed.
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

    /// Every equation the published table satisfies. Two-way: each row, each column, and
    /// the grand total as the sum of the row totals and of the column totals. One-way: the
    /// grand total as the sum of the cells. (Any other relation is a combination of these.)
    fn equations(&self) -> Vec<Equation> {
        let (rows, cols) = (self.rows, self.cols);
        let total = |parts: &mut dyn Iterator<Item = usize>, total: usize| -> Equation {
            parts.map(|c| (c, 1)).chain([(total, -1)]).collect()
        };
        if !self.two_way {
            return vec![total(&mut (0..self.interior()), self.grand())];
        }
        let mut equations = Vec::with_capacity(rows + cols + 2);
        for i in 0..rows {
            equations.push(total(&mut (i * cols..(i + 1) * cols), self.row_total(i)));
        }
        for j in 0..cols {
            equations.push(total(
                &mut (0..rows).map(|i| i * cols + j),
                self.col_total(j),
            ));
        }
        equations.push(total(
            &mut (0..rows).map(|i| self.row_total(i)),
            self.grand(),
        ));
        equations.push(total(
            &mut (0..cols).map(|j| self.col_total(j)),
            self.grand(),
        ));
        equations
    }
}

/// The hidden cells whose value the equations determine, in cell order.
///
/// Unknowns are the hidden cells; published values move to the right-hand side, which does
/// not change what is determined. A hidden cell `j` is determined iff `e_j` is in the row
/// space of the restricted coefficient matrix. In any reduced form (each pivot row has its
/// pivot and zeros in every other pivot column) that means: `j` is a pivot column and its
/// row has no other non-zero entry. (If `e_j = sum c_p r_p`, reading the pivot columns
/// gives `c_p = [p == j]`.)
fn recoverable(equations: &[Equation], hidden: &[bool]) -> Result<Vec<usize>, SuppressError> {
    let mut column_of = vec![usize::MAX; hidden.len()];
    let mut cell_of = Vec::new();
    for (cell, _) in hidden.iter().enumerate().filter(|(_, h)| **h) {
        column_of[cell] = cell_of.len();
        cell_of.push(cell);
    }
    // Only equations touching a hidden cell say anything about the hidden cells.
    let mut system: Vec<Row> = Vec::new();
    for eq in equations {
        let mut row: Row = eq
            .iter()
            .filter(|(cell, _)| hidden[*cell])
            .map(|&(cell, a)| (column_of[cell], a))
            .collect();
        row.sort_unstable_by_key(|&(c, _)| c);
        row.dedup_by(|later, earlier| {
            let same = later.0 == earlier.0;
            if same {
                // A cell twice in one equation: add the coefficients (checked below).
                earlier.1 = earlier.1.saturating_add(later.1);
            }
            same
        });
        if row.iter().any(|&(_, a)| a == i64::MIN || a == i64::MAX) {
            return Err(SuppressError::ArithmeticOverflow);
        }
        row.retain(|&(_, a)| a != 0);
        if !row.is_empty() {
            system.push(row);
        }
    }

    let mut reduced = Reduced::new(cell_of.len());
    for (eq, preferred) in elimination_order(&system, cell_of.len()) {
        reduced.insert(std::mem::take(&mut system[eq]), preferred)?;
    }
    let mut exposed: Vec<usize> = reduced
        .rows
        .iter()
        .filter(|row| row.len() == 1)
        .map(|row| cell_of[row[0].0])
        .collect();
    exposed.sort_unstable();
    Ok(exposed)
}

/// A sparse row of the system: `(column, coefficient)`, sorted by column, no zeros.
type Row = Vec<(usize, i64)>;

/// The order in which equations enter the elimination, and the pivot column each prefers.
///
/// Correctness does not depend on it (any reduced form answers the question); speed does.
/// Equations sharing a column are neighbours; we take a breadth-first forest and insert
/// its leaves first, each pivoting on the column that links it to its parent. For a table
/// (every cell in exactly two equations, the incidence matrix of a bipartite graph) an
/// equation then only absorbs its children's rows, a pivot never has to be eliminated from
/// earlier rows, and a reduced row holds only the hidden cells that close a cycle through
/// it: the fill-in stays near the size of the answer instead of rows x hidden cells.
fn elimination_order(system: &[Row], columns: usize) -> Vec<(usize, Option<usize>)> {
    let mut equations_of: Vec<Vec<usize>> = vec![Vec::new(); columns];
    for (e, row) in system.iter().enumerate() {
        for &(c, _) in row {
            equations_of[c].push(e);
        }
    }
    let mut visited = vec![false; system.len()];
    let mut parent_column = vec![None; system.len()];
    let mut order = Vec::with_capacity(system.len());
    for root in 0..system.len() {
        if visited[root] {
            continue;
        }
        visited[root] = true;
        let mut head = order.len();
        order.push(root);
        while head < order.len() {
            let e = order[head];
            head += 1;
            for &(c, _) in &system[e] {
                for &f in &equations_of[c] {
                    if !visited[f] {
                        visited[f] = true;
                        parent_column[f] = Some(c);
                        order.push(f);
                    }
                }
            }
        }
    }
    order.reverse();
    order.into_iter().map(|e| (e, parent_column[e])).collect()
}

/// A reduced row echelon form built one equation at a time, in exact integer arithmetic.
///
/// Rows are kept fraction-free: a row stands for itself divided by its pivot, and is
/// divided by the gcd of its entries after every operation, so entries stay small (for a
/// table's totally unimodular matrix they stay in {-1, 0, 1}). Every multiplication and
/// addition is checked; overflow is an error, never a wrong answer.
struct Reduced {
    rows: Vec<Row>,
    /// Pivot column of each row.
    pivots: Vec<usize>,
    /// For each column, the row it is the pivot of.
    pivot_row: Vec<Option<usize>>,
    /// Dense scratch row for reducing a new equation, with the columns it touched.
    scratch: Vec<i64>,
    touched: Vec<usize>,
    is_touched: Vec<bool>,
}

fn overflow() -> SuppressError {
    SuppressError::ArithmeticOverflow
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// `x * a + y * b`, checked.
fn combine(x: i64, a: i64, y: i64, b: i64) -> Result<i64, SuppressError> {
    x.checked_mul(a)
        .zip(y.checked_mul(b))
        .and_then(|(p, q)| p.checked_add(q))
        .ok_or_else(overflow)
}

/// Factors `(a, b)` with `a * entry + b * pivot == 0` and `a > 0`: `a` scales the row being
/// reduced (which holds `entry`), `b` the pivot row.
fn cancel(pivot: i64, entry: i64) -> Result<(i64, i64), SuppressError> {
    let g = gcd(pivot.unsigned_abs(), entry.unsigned_abs());
    let g = i64::try_from(g).map_err(|_| overflow())?;
    let (a, b) = (pivot / g, -(entry / g));
    if a < 0 {
        Ok((
            a.checked_neg().ok_or_else(overflow)?,
            b.checked_neg().ok_or_else(overflow)?,
        ))
    } else {
        Ok((a, b))
    }
}

/// Divides a row by the gcd of its entries and makes the entry at `pivot` positive.
fn normalise(row: &mut Row, pivot: usize) -> Result<(), SuppressError> {
    let g = row.iter().fold(0, |g, &(_, v)| gcd(g, v.unsigned_abs()));
    let g = i64::try_from(g).map_err(|_| overflow())?;
    let negative = row.iter().any(|&(c, v)| c == pivot && v < 0);
    let g = if negative { -g } else { g };
    if g != 1 {
        for (_, v) in row.iter_mut() {
            *v /= g;
        }
    }
    Ok(())
}

fn entry(row: &Row, column: usize) -> Option<i64> {
    row.binary_search_by_key(&column, |&(c, _)| c)
        .ok()
        .map(|i| row[i].1)
}

impl Reduced {
    fn new(columns: usize) -> Reduced {
        Reduced {
            rows: Vec::new(),
            pivots: Vec::new(),
            pivot_row: vec![None; columns],
            scratch: vec![0; columns],
            touched: Vec::new(),
            is_touched: vec![false; columns],
        }
    }

    fn touch(&mut self, column: usize) {
        if !self.is_touched[column] {
            self.is_touched[column] = true;
            self.touched.push(column);
        }
    }

    /// Adds one equation, keeping the form reduced.
    fn insert(&mut self, row: Row, preferred: Option<usize>) -> Result<(), SuppressError> {
        // Reduce against the pivot rows. They are zero in each other's pivot columns, so
        // subtracting one never brings another pivot column back in: one pass over the
        // pivot columns of the original row is enough.
        for &(c, v) in &row {
            self.scratch[c] = v;
            self.touch(c);
        }
        for &(c, _) in &row {
            let Some(p) = self.pivot_row[c] else { continue };
            let entry = self.scratch[c];
            if entry == 0 {
                continue;
            }
            let pivot = entry_of_pivot(&self.rows[p], c)?;
            let (a, b) = cancel(pivot, entry)?;
            if a != 1 {
                for &t in &self.touched {
                    self.scratch[t] = self.scratch[t].checked_mul(a).ok_or_else(overflow)?;
                }
            }
            for i in 0..self.rows[p].len() {
                let (col, val) = self.rows[p][i];
                self.scratch[col] = combine(1, self.scratch[col], b, val)?;
                self.touch(col);
            }
        }
        let mut reduced: Row = Vec::with_capacity(self.touched.len());
        for &t in &self.touched {
            if self.scratch[t] != 0 {
                reduced.push((t, self.scratch[t]));
            }
            self.scratch[t] = 0;
            self.is_touched[t] = false;
        }
        self.touched.clear();
        if reduced.is_empty() {
            return Ok(()); // A consequence of the equations already in.
        }
        reduced.sort_unstable_by_key(|&(c, _)| c);

        let pivot = preferred
            .filter(|&c| entry(&reduced, c).is_some())
            .unwrap_or(reduced[0].0);
        normalise(&mut reduced, pivot)?;
        let pivot_value = entry_of_pivot(&reduced, pivot)?;

        // Clear the new pivot column from the earlier rows.
        for q in 0..self.rows.len() {
            let Some(v) = entry(&self.rows[q], pivot) else {
                continue;
            };
            let (a, b) = cancel(pivot_value, v)?;
            let merged = merge(&self.rows[q], a, &reduced, b)?;
            self.rows[q] = merged;
            normalise(&mut self.rows[q], self.pivots[q])?;
        }
        self.pivot_row[pivot] = Some(self.rows.len());
        self.pivots.push(pivot);
        self.rows.push(reduced);
        Ok(())
    }
}

fn entry_of_pivot(row: &Row, pivot: usize) -> Result<i64, SuppressError> {
    entry(row, pivot).ok_or(SuppressError::Internal("a pivot row lost its pivot"))
}

/// `a * x + b * y` for sparse rows, dropping zeros.
fn merge(x: &Row, a: i64, y: &Row, b: i64) -> Result<Row, SuppressError> {
    let mut out = Vec::with_capacity(x.len() + y.len());
    let (mut i, mut j) = (0, 0);
    while i < x.len() || j < y.len() {
        let next = match (x.get(i), y.get(j)) {
            (Some(&(cx, vx)), Some(&(cy, _))) if cx < cy => {
                i += 1;
                (cx, combine(vx, a, 0, 0)?)
            }
            (Some(&(cx, _)), Some(&(cy, vy))) if cy < cx => {
                j += 1;
                (cy, combine(0, 0, vy, b)?)
            }
            (Some(&(cx, vx)), Some(&(_, vy))) => {
                i += 1;
                j += 1;
                (cx, combine(vx, a, vy, b)?)
            }
            (Some(&(cx, vx)), None) => {
                i += 1;
                (cx, combine(vx, a, 0, 0)?)
            }
            (None, Some(&(cy, vy))) => {
                j += 1;
                (cy, combine(0, 0, vy, b)?)
            }
            (None, None) => unreachable!("loop condition"),
        };
        if next.1 != 0 {
            out.push(next);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hidden_cells(p: &Protected) -> Vec<usize> {
        (0..p.cells.len())
            .filter(|&i| p.cells[i].is_none())
            .collect()
    }

    #[test]
    fn one_small_cell_in_a_2x2_hides_all_four_interior_cells() {
        let t = Table::two_way(2, 2, vec![3, 10, 10, 10]).unwrap();
        let p = protect(&t, 5).unwrap();
        assert_eq!(p.cells, vec![None; 4]);
        assert_eq!(p.row_totals, vec![Some(13), Some(20)]);
        assert_eq!(p.col_totals, vec![Some(13), Some(20)]);
        assert_eq!(p.grand_total, Some(33));
        assert_eq!((p.primary, p.secondary), (1, 3));
    }

    #[test]
    fn one_small_cell_among_large_ones_is_hidden_in_a_rectangle_of_the_smallest() {
        #[rustfmt::skip]
        let t = Table::two_way(3, 3, vec![
            2, 50, 60,
            40, 70, 80,
            90, 100, 110,
        ]).unwrap();
        let p = protect(&t, 5).unwrap();
        // x00 first takes its smallest neighbour x10 (40); then x00 takes x01 (50) and
        // x10 takes x11 (70), which closes the rectangle.
        assert_eq!(hidden_cells(&p), vec![0, 1, 3, 4]);
        assert!(
            p.row_totals
                .iter()
                .chain(&p.col_totals)
                .all(Option::is_some)
        );
        assert_eq!((p.primary, p.secondary), (1, 3));
    }

    #[test]
    fn one_small_cell_in_a_one_way_table_needs_a_second_hidden_cell() {
        let p = protect(&Table::one_way(vec![3, 20, 10]), 5).unwrap();
        assert_eq!(p.cells, vec![None, Some(20), None]);
        assert_eq!(p.grand_total, Some(33));
        assert!(p.row_totals.is_empty() && p.col_totals.is_empty());
        assert_eq!((p.primary, p.secondary), (1, 1));
    }

    #[test]
    fn a_one_way_table_of_small_cells_hides_its_total_too() {
        let p = protect(&Table::one_way(vec![1, 0, 2]), 5).unwrap();
        assert_eq!(p.cells, vec![None, Some(0), None]);
        assert_eq!(p.grand_total, None);
        assert_eq!((p.primary, p.secondary), (3, 0));
    }

    #[test]
    fn margins_below_k_are_hidden() {
        let t = Table::two_way(2, 2, vec![1, 1, 1, 1]).unwrap();
        let p = protect(&t, 3).unwrap();
        assert_eq!(p.cells, vec![None; 4]);
        assert_eq!(p.row_totals, vec![None, None]);
        assert_eq!(p.col_totals, vec![None, None]);
        // With G = 4 published, four hidden cells that are each at least 1 are all 1.
        assert_eq!(p.grand_total, None);
        assert_eq!((p.primary, p.secondary), (8, 1));
    }

    #[test]
    fn a_small_row_total_is_protected_by_another_total() {
        let t = Table::two_way(2, 2, vec![0, 3, 10, 10]).unwrap();
        let p = protect(&t, 5).unwrap();
        // R0 = 3 and x01 = 3 are primary; R0 would follow from G - R1 and x01 from C1 - x11.
        assert_eq!(p.cells, vec![Some(0), None, Some(10), None]);
        assert_eq!(p.row_totals, vec![None, None]);
        assert_eq!(p.col_totals, vec![Some(10), Some(13)]);
        assert_eq!(p.grand_total, Some(23));
        assert_eq!((p.primary, p.secondary), (2, 2));
    }

    #[test]
    fn an_all_zero_table_is_published_whole() {
        let p = protect(&Table::two_way(2, 3, vec![0; 6]).unwrap(), 5).unwrap();
        assert_eq!(p.cells, vec![Some(0); 6]);
        assert_eq!(p.row_totals, vec![Some(0); 2]);
        assert_eq!(p.col_totals, vec![Some(0); 3]);
        assert_eq!(p.grand_total, Some(0));
        assert_eq!((p.primary, p.secondary), (0, 0));
    }

    #[test]
    fn k_above_every_count_hides_everything_but_the_zeros() {
        let t = Table::two_way(2, 2, vec![0, 4, 5, 6]).unwrap();
        let p = protect(&t, 100).unwrap();
        assert_eq!(p.cells, vec![Some(0), None, None, None]);
        assert_eq!(p.row_totals, vec![None, None]);
        assert_eq!(p.col_totals, vec![None, None]);
        assert_eq!(p.grand_total, None);
        assert_eq!((p.primary, p.secondary), (8, 0));
    }

    #[test]
    fn a_small_cell_beside_zeros_takes_a_complement_from_elsewhere() {
        // x00 = 3 with zeros beside it: R0 = C0 = 3 are hidden too, yet all three follow
        // from G - R1. Zeros are never hidden, so the complement is G: x00, R0, C0 and G
        // are a rectangle of the table extended by its totals (one free parameter).
        let t = Table::two_way(2, 2, vec![3, 0, 0, 10]).unwrap();
        let p = protect(&t, 5).unwrap();
        assert_eq!(p.cells, vec![None, Some(0), Some(0), Some(10)]);
        assert_eq!(p.row_totals, vec![None, Some(10)]);
        assert_eq!(p.col_totals, vec![None, Some(10)]);
        assert_eq!(p.grand_total, None);
        assert_eq!((p.primary, p.secondary), (3, 1));
    }

    #[test]
    fn bounds_can_pin_cells_the_linear_audit_leaves_free() {
        // k = 2 hides the ones (x02, x11, R0, C1, C2). Linear algebra then needs R1 hidden
        // (else x11 = R1 - 2). With G = 4 published, R0 + R1 = 4 and R1 = 2 + x11 >= 3 pin
        // R0 = 1 for an attacker who knows hidden cells are at least 1: G goes too.
        let t = Table::two_way(2, 3, vec![0, 0, 1, 2, 1, 0]).unwrap();
        let p = protect(&t, 2).unwrap();
        assert_eq!(
            p.cells,
            vec![Some(0), Some(0), None, Some(2), None, Some(0)]
        );
        assert_eq!(p.row_totals, vec![None, None]);
        assert_eq!(p.col_totals, vec![Some(2), None, None]);
        assert_eq!(p.grand_total, None);
        assert_eq!((p.primary, p.secondary), (5, 2));
    }

    #[test]
    fn protection_is_deterministic() {
        let cells: Vec<u64> = (0..48u64).map(|i| (i * 7919 + 13) % 23 % 9).collect();
        let t = Table::two_way(6, 8, cells).unwrap();
        assert_eq!(protect(&t, 5).unwrap(), protect(&t, 5).unwrap());
    }

    #[test]
    fn bad_shapes_sizes_and_thresholds_are_refused() {
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
            protect(&Table::one_way(vec![0; MAX_CELLS + 1]), 5),
            Err(SuppressError::TooLarge {
                cells: MAX_CELLS + 1
            })
        );
        let t = Table::one_way(vec![1, 2]);
        assert_eq!(protect(&t, 1), Err(SuppressError::KTooSmall { k: 1 }));
        assert_eq!(protect(&t, 0), Err(SuppressError::KTooSmall { k: 0 }));
        let not_one_way = Table {
            rows: 1,
            cols: 2,
            two_way: false,
            cells: vec![1, 2],
        };
        assert!(matches!(
            protect(&not_one_way, 5),
            Err(SuppressError::ShapeMismatch { .. })
        ));
        let overflowing = Table::one_way(vec![u64::MAX, 1]);
        assert_eq!(protect(&overflowing, 5), Err(SuppressError::TotalOverflow));
    }

    #[test]
    fn hiding_every_non_zero_cell_is_safe() {
        let t = Table::two_way(3, 4, vec![0, 1, 7, 0, 2, 0, 0, 9, 0, 0, 4, 1]).unwrap();
        let layout = Layout::of(&t);
        let values = layout.values(&t.cells).unwrap();
        let hidden: Vec<bool> = values.iter().map(|&v| v > 0).collect();
        assert_eq!(
            recoverable(&layout.equations(), &hidden).unwrap(),
            Vec::<usize>::new()
        );
    }

    #[test]
    fn the_audit_is_exact_beyond_unit_coefficients() {
        // 2a + 4b + c = ., a + 2b = .: c is determined, a and b are not.
        let eqs = vec![vec![(0, 2), (1, 4), (2, 1)], vec![(0, 1), (1, 2)]];
        assert_eq!(recoverable(&eqs, &[true; 3]).unwrap(), vec![2]);
        // 2a + 3b = ., a + b = .: both determined.
        let eqs = vec![vec![(0, 2), (1, 3)], vec![(0, 1), (1, 1)]];
        assert_eq!(recoverable(&eqs, &[true; 2]).unwrap(), vec![0, 1]);
        // Only hidden cells count: with b published, a + b = . gives a away.
        let eqs = vec![vec![(0, 1), (1, 1)]];
        assert_eq!(recoverable(&eqs, &[true, false]).unwrap(), vec![0]);
    }

    #[test]
    fn overflow_is_an_error_not_an_answer() {
        let big = i64::MAX / 2 + 1;
        let eqs = vec![
            vec![(0, 3), (1, big), (2, 1)],
            vec![(0, 2), (1, 1), (2, big)],
        ];
        assert_eq!(
            recoverable(&eqs, &[true; 3]),
            Err(SuppressError::ArithmeticOverflow)
        );
    }
}
