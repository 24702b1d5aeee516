//! The attacker of a published table, written independently of `aggregate::suppress`.
//!
//! It takes only what an answer publishes — the shape, every published cell and total,
//! the published zeros — plus what anyone knows about counts and the zero rule: a hidden
//! count is a whole number, at least 0 when it may be 0 (an interior cell of a two-way
//! table, a one-way cell or a total of a line listed even when empty) and a total of a
//! line it is part of is hidden (the service hides zeros there), and at least 1 otherwise
//! (a zero there would be published). For every
//! hidden cell it solves two linear programs with a general LP solver (good_lp with
//! microlp: a simplex method in floating point, nothing in common with the service's
//! integer network flows): the least and the greatest value the cell can take. The
//! bounds are rounded inwards to integers with a small tolerance, so a float error could
//! only make the attacker *weaker* by at most 1e-6 of a patient, never claim a leak that
//! is not there; `confirm` checks each finite bound against the true table, exactly.

#![allow(dead_code)]

use good_lp::{
    Expression, ResolutionError, Solution, SolverModel, Variable, constraint, microlp, variable,
    variables,
};

/// A cell of a published table, as the attacker names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cell {
    Inner(usize, usize),
    Row(usize),
    Col(usize),
    Grand,
}

/// What an answer publishes. A one-way table has `cols == 1`, no row or column totals.
#[derive(Debug, Clone)]
pub struct Published {
    pub rows: usize,
    pub cols: usize,
    pub two_way: bool,
    /// Rows (a one-way table's cells) are listed even when they hold no count.
    pub empty_rows: bool,
    /// Columns are listed even when they hold no count (the delay bands).
    pub empty_cols: bool,
    /// Every hidden cell and column total may be 0: a one-row answer, which lists, hidden,
    /// the zeros of the larger table it is protected as (the attacker cannot tell them
    /// from counts). Its row total, the grand total, is at least 1.
    pub one_row: bool,
    /// Row-major.
    pub cells: Vec<Option<u64>>,
    pub row_totals: Vec<Option<u64>>,
    pub col_totals: Vec<Option<u64>>,
    pub grand: Option<u64>,
}

/// The interval the attacker proves for a hidden cell; `hi == None`: unbounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    pub cell: Cell,
    pub lo: u64,
    pub hi: Option<u64>,
}

impl Interval {
    pub fn width(&self) -> u64 {
        self.hi.map_or(u64::MAX, |hi| hi - self.lo)
    }
}

impl Published {
    fn value(&self, cell: Cell) -> Option<u64> {
        match cell {
            Cell::Inner(i, j) => self.cells[i * self.cols + j],
            Cell::Row(i) => self.row_totals[i],
            Cell::Col(j) => self.col_totals[j],
            Cell::Grand => self.grand,
        }
    }

    fn all_cells(&self) -> Vec<Cell> {
        let mut out: Vec<Cell> = (0..self.rows)
            .flat_map(|i| (0..self.cols).map(move |j| Cell::Inner(i, j)))
            .collect();
        if self.two_way {
            out.extend((0..self.rows).map(Cell::Row));
            out.extend((0..self.cols).map(Cell::Col));
        }
        out.push(Cell::Grand);
        out
    }

    /// `sum(parts) == total`, every relation the table satisfies.
    fn relations(&self) -> Vec<(Vec<Cell>, Cell)> {
        let mut out = Vec::new();
        if self.rows == 0 {
            // A table that lists nothing but its total: no relation.
            return out;
        }
        if self.two_way {
            for i in 0..self.rows {
                out.push((
                    (0..self.cols).map(|j| Cell::Inner(i, j)).collect(),
                    Cell::Row(i),
                ));
            }
            for j in 0..self.cols {
                out.push((
                    (0..self.rows).map(|i| Cell::Inner(i, j)).collect(),
                    Cell::Col(j),
                ));
            }
            out.push(((0..self.rows).map(Cell::Row).collect(), Cell::Grand));
            out.push(((0..self.cols).map(Cell::Col).collect(), Cell::Grand));
        } else {
            out.push((
                (0..self.rows).map(|i| Cell::Inner(i, 0)).collect(),
                Cell::Grand,
            ));
        }
        out
    }

    /// The same answer read with rows and columns swapped (a two-way table).
    pub fn transposed(&self) -> Published {
        assert!(self.two_way, "only a two-way table has a transpose");
        let cells = (0..self.cols)
            .flat_map(|j| (0..self.rows).map(move |i| (i, j)))
            .map(|(i, j)| self.cells[i * self.cols + j])
            .collect();
        Published {
            rows: self.cols,
            cols: self.rows,
            two_way: true,
            empty_rows: self.empty_cols,
            empty_cols: self.empty_rows,
            one_row: false,
            cells,
            row_totals: self.col_totals.clone(),
            col_totals: self.row_totals.clone(),
            grand: self.grand,
        }
    }

    /// What two answers about the same table publish together: a value either publishes.
    pub fn combined(&self, other: &Published) -> Published {
        assert_eq!(
            (self.rows, self.cols, self.two_way),
            (other.rows, other.cols, other.two_way),
            "two answers about the same table, in the same layout"
        );
        let either = |a: &[Option<u64>], b: &[Option<u64>]| -> Vec<Option<u64>> {
            a.iter().zip(b).map(|(x, y)| x.or(*y)).collect()
        };
        Published {
            rows: self.rows,
            cols: self.cols,
            two_way: self.two_way,
            empty_rows: self.empty_rows,
            empty_cols: self.empty_cols,
            one_row: self.one_row,
            cells: either(&self.cells, &other.cells),
            row_totals: either(&self.row_totals, &other.row_totals),
            col_totals: either(&self.col_totals, &other.col_totals),
            grand: self.grand.or(other.grand),
        }
    }

    pub fn hidden(&self) -> Vec<Cell> {
        self.all_cells()
            .into_iter()
            .filter(|&c| self.value(c).is_none())
            .collect()
    }

    /// The least value a hidden `cell` can have: 0 when it may be 0 and a total of a line
    /// it is part of is hidden, else 1.
    pub fn floor(&self, cell: Cell) -> u64 {
        if self.one_row && matches!(cell, Cell::Inner(..) | Cell::Col(_)) {
            return 0;
        }
        let under_hidden = self.parents(cell).iter().any(|&p| self.value(p).is_none());
        u64::from(!(self.may_be_zero(cell) && under_hidden))
    }

    /// The totals of the lines `cell` is a part of.
    pub fn parents(&self, cell: Cell) -> Vec<Cell> {
        match cell {
            Cell::Inner(i, j) if self.two_way => vec![Cell::Row(i), Cell::Col(j)],
            Cell::Grand => vec![],
            _ => vec![Cell::Grand],
        }
    }

    /// Whether `cell` can be 0 in a table listed this way.
    pub fn may_be_zero(&self, cell: Cell) -> bool {
        match cell {
            Cell::Inner(..) if !self.two_way => self.empty_rows,
            Cell::Inner(..) => true,
            Cell::Row(_) => self.empty_rows,
            Cell::Col(_) => self.empty_cols,
            Cell::Grand => false,
        }
    }

    /// A published value.
    pub fn shown(&self, cell: Cell) -> Option<u64> {
        self.value(cell)
    }

    /// One LP: optimise `target` (maximise or minimise) over the hidden cells.
    fn optimise(&self, target: Cell, maximise: bool) -> Result<f64, ResolutionError> {
        let mut vars = variables!();
        let hidden = self.hidden();
        let var: Vec<(Cell, Variable)> = hidden
            .iter()
            .map(|&c| (c, vars.add(variable().min(self.floor(c) as f64))))
            .collect();
        let term = |c: Cell| -> Expression {
            match self.value(c) {
                Some(v) => Expression::from(v as f64),
                None => Expression::from(var.iter().find(|(h, _)| *h == c).unwrap().1),
            }
        };
        let objective = term(target);
        let mut model = if maximise {
            vars.maximise(objective.clone()).using(microlp)
        } else {
            vars.minimise(objective.clone()).using(microlp)
        };
        for (parts, total) in self.relations() {
            let mut sum = Expression::from(0.0);
            for p in parts {
                sum += term(p);
            }
            model = model.with(constraint!(sum == term(total)));
        }
        let solution = model.solve()?;
        Ok(solution.eval(&objective))
    }

    /// The attacker's interval for every hidden cell.
    pub fn attack(&self) -> Vec<Interval> {
        const TOLERANCE: f64 = 1e-6;
        self.hidden()
            .into_iter()
            .map(|cell| {
                let lo = self
                    .optimise(cell, false)
                    .expect("the published table is consistent, so the LP is feasible");
                let hi = match self.optimise(cell, true) {
                    Ok(v) => Some((v + TOLERANCE).floor() as u64),
                    Err(ResolutionError::Unbounded) => None,
                    Err(e) => panic!("LP failed: {e}"),
                };
                Interval {
                    cell,
                    lo: (lo - TOLERANCE).ceil().max(self.floor(cell) as f64) as u64,
                    hi,
                }
            })
            .collect()
    }
}

/// The true value of `cell` in a table of `rows x cols` counts (row-major).
pub fn truth(cells: &[u64], cols: usize, cell: Cell) -> u64 {
    let rows = cells.len() / cols;
    match cell {
        Cell::Inner(i, j) => cells[i * cols + j],
        Cell::Row(i) => cells[i * cols..(i + 1) * cols].iter().sum(),
        Cell::Col(j) => (0..rows).map(|i| cells[i * cols + j]).sum(),
        Cell::Grand => cells.iter().sum(),
    }
}

/// The attacker's claims hold for the true table (the attacker is sound).
pub fn confirm(cells: &[u64], cols: usize, intervals: &[Interval]) {
    for iv in intervals {
        let v = truth(cells, cols, iv.cell);
        assert!(
            iv.lo <= v && iv.hi.is_none_or(|hi| v <= hi),
            "the attacker is unsound: {iv:?} excludes the true {v}"
        );
    }
}

/// Every way the intervals break the rules (k, protection level p): a hidden cell
/// narrower than p, or a hidden count below k (a zero included) proven below k.
pub fn violations(
    cells: &[u64],
    cols: usize,
    intervals: &[Interval],
    k: u64,
    p: u64,
) -> Vec<String> {
    let mut out = Vec::new();
    for iv in intervals {
        let v = truth(cells, cols, iv.cell);
        if iv.width() < p {
            out.push(format!(
                "{:?} = {v} narrowed to [{}, {:?}]",
                iv.cell, iv.lo, iv.hi
            ));
        }
        if v < k && iv.hi.is_some_and(|hi| hi < k) {
            out.push(format!(
                "{:?} = {v} proven below k = {k}: at most {:?}",
                iv.cell, iv.hi
            ));
        }
    }
    out
}
