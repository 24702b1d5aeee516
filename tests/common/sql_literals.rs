//! The SQL statements written as literals in the service's source, found by parsing it:
//! every `query(...)` / `db::query(...)` and `.execute_raw(...)` whose SQL is a string
//! literal, a `const` of the same file, or the variable of a `for` loop over an array of
//! literals, outside `#[cfg(test)]`, with the one database it runs on when the source
//! says so. Used by
//! `build.rs`, which prepares each SQLite statement against the schema of
//! `migrations/sqlite/` (so a statement the schema does not accept fails the build), and
//! by `tests/api/statements.rs`, which prepares them on the database under test (SQLite,
//! then PostgreSQL in the second pass of `scripts/test`).
//!
//! A statement in a match arm whose pattern names one backend (`Db::Pg(..)`,
//! `Backend::Sqlite`, ...), or in an `if` branch whose condition plainly does
//! (`backend == Backend::Postgres`, `if let Db::Lite(..) = ..`, `matches!`; see
//! `condition_dialects`), runs on that backend only, and so does every statement of a
//! function listed in [`BACKEND_ONLY`]. Statements built with `format!` are not found: the
//! suite runs them on both databases instead.

use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// A database the service runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// Functions that run on one backend only (file under `src/`, function, `*` for the whole
/// file), whose statements are therefore prepared on that backend only.
const BACKEND_ONLY: &[(&str, &str, Dialect)] = &[
    // Planner statistics: PostgreSQL's catalog (`store::statistics`: nothing on SQLite).
    ("store/statistics.rs", "*", Dialect::Postgres),
    // The purge after an erasure: VACUUM on PostgreSQL, a WAL checkpoint on SQLite.
    ("store/purge.rs", "vacuum", Dialect::Postgres),
    ("store/purge.rs", "checkpoint", Dialect::Sqlite),
    ("store/purge.rs", "checkpoint_once", Dialect::Sqlite),
];

/// The backend a piece of source is specific to, from the tokens of a match arm's pattern
/// or an `if`'s condition.
fn dialect_of(tokens: &str) -> Option<Dialect> {
    let names = |of: [&str; 2]| {
        tokens
            .split(|c: char| !c.is_alphanumeric())
            .any(|t| of.contains(&t))
    };
    match (names(["Postgres", "Pg"]), names(["Sqlite", "Lite"])) {
        (true, false) => Some(Dialect::Postgres),
        (false, true) => Some(Dialect::Sqlite),
        _ => None,
    }
}

/// A literal statement of the source: where, for which backends, and its text.
#[derive(Debug)]
pub struct Statement {
    /// The file, under `src/`.
    pub file: PathBuf,
    /// The one database it runs on, if only one.
    pub only: Option<Dialect>,
    pub sql: String,
}

impl Statement {
    /// Whether it runs on `dialect`.
    pub fn runs_on(&self, dialect: Dialect) -> bool {
        self.only.is_none_or(|only| only == dialect)
    }
}

struct Finder<'a> {
    file: &'a Path,
    /// The file's `const NAME: &str = "..."` items.
    consts: std::collections::HashMap<String, String>,
    /// The variables of enclosing `for x in ["...", ...]` loops, with their literals.
    loops: Vec<(String, Vec<String>)>,
    /// The function being visited.
    function: Option<String>,
    /// The backend of the innermost enclosing arm or branch that names one.
    only: Vec<Option<Dialect>>,
    found: Vec<Statement>,
}

impl Finder<'_> {
    fn only(&self) -> Option<Dialect> {
        let file = self.file.to_string_lossy();
        let listed = BACKEND_ONLY.iter().find(|(f, function, _)| {
            *f == file && (*function == "*" || self.function.as_deref() == Some(*function))
        });
        if let Some((_, _, backend)) = listed {
            return Some(*backend);
        }
        self.only.iter().rev().find_map(|b| *b)
    }

    /// Records the statement(s) `arg` names: a literal, a constant of the file, or the
    /// variable of an enclosing loop over literals. Anything else (a `format!`, a
    /// variable) is not a literal statement.
    fn statement(&mut self, arg: &syn::Expr) {
        let texts = match unwrapped(arg) {
            syn::Expr::Path(p) => p.path.get_ident().and_then(|name| {
                let name = name.to_string();
                self.loops
                    .iter()
                    .rev()
                    .find(|(var, _)| *var == name)
                    .map(|(_, literals)| literals.clone())
                    .or_else(|| self.consts.get(&name).map(|sql| vec![sql.clone()]))
            }),
            other => string_literal(other).map(|sql| vec![sql]),
        };
        let only = self.only();
        for sql in texts.into_iter().flatten() {
            self.found.push(Statement {
                file: self.file.to_owned(),
                only,
                sql,
            });
        }
    }

    fn in_function(&mut self, name: &syn::Ident, visit: impl FnOnce(&mut Self)) {
        let outer = self.function.replace(name.to_string());
        visit(self);
        self.function = outer;
    }
}

/// `#[cfg(test)]` or `#[test]`: code that is not in the service's build.
fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("test")
            || (a.path().is_ident("cfg")
                && a.meta
                    .require_list()
                    .is_ok_and(|l| l.tokens.to_string() == "test"))
    })
}

impl<'ast> Visit<'ast> for Finder<'_> {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if !is_test_only(&m.attrs) {
            syn::visit::visit_item_mod(self, m);
        }
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if !is_test_only(&f.attrs) {
            self.in_function(&f.sig.ident, |v| syn::visit::visit_item_fn(v, f));
        }
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if !is_test_only(&f.attrs) {
            self.in_function(&f.sig.ident, |v| syn::visit::visit_impl_item_fn(v, f));
        }
    }

    fn visit_arm(&mut self, arm: &'ast syn::Arm) {
        let pat = &arm.pat;
        self.only.push(dialect_of(&quote::quote!(#pat).to_string()));
        syn::visit::visit_arm(self, arm);
        self.only.pop();
    }

    fn visit_expr_if(&mut self, e: &'ast syn::ExprIf) {
        let (then, other) = condition_dialects(&e.cond);
        self.visit_expr(&e.cond);
        self.only.push(then);
        self.visit_block(&e.then_branch);
        self.only.pop();
        if let Some((_, branch)) = &e.else_branch {
            self.only.push(other);
            self.visit_expr(branch);
            self.only.pop();
        }
    }

    fn visit_expr_for_loop(&mut self, l: &'ast syn::ExprForLoop) {
        // `for sql in ["...", "..."] { query(sql) ... }`: each literal of the array is a
        // statement wherever the loop's variable is one.
        let bound = match (&*l.pat, unwrapped(&l.expr)) {
            (syn::Pat::Ident(name), syn::Expr::Array(array)) => {
                let literals: Option<Vec<String>> = array
                    .elems
                    .iter()
                    .map(|e| match unwrapped(e) {
                        syn::Expr::Path(p) => p
                            .path
                            .get_ident()
                            .and_then(|c| self.consts.get(&c.to_string()).cloned()),
                        other => string_literal(other),
                    })
                    .collect();
                literals.map(|literals| (name.ident.to_string(), literals))
            }
            _ => None,
        };
        let pushed = bound.is_some();
        if let Some(bound) = bound {
            self.loops.push(bound);
        }
        syn::visit::visit_expr_for_loop(self, l);
        if pushed {
            self.loops.pop();
        }
    }

    fn visit_expr_method_call(&mut self, call: &'ast syn::ExprMethodCall) {
        if call.method == "execute_raw"
            && let Some(arg) = call.args.first()
        {
            self.statement(arg);
        }
        syn::visit::visit_expr_method_call(self, call);
    }

    fn visit_expr_call(&mut self, call: &'ast syn::ExprCall) {
        if let syn::Expr::Path(path) = &*call.func
            && path
                .path
                .segments
                .last()
                .is_some_and(|s| s.ident == "query")
            && let Some(arg) = call.args.first()
        {
            self.statement(arg);
        }
        syn::visit::visit_expr_call(self, call);
    }
}

/// `e` without the references and parentheses around it (`&SQL`, `(sql)`).
fn unwrapped(e: &syn::Expr) -> &syn::Expr {
    match e {
        syn::Expr::Reference(r) => unwrapped(&r.expr),
        syn::Expr::Paren(p) => unwrapped(&p.expr),
        other => other,
    }
}

/// The text of a string literal expression.
fn string_literal(e: &syn::Expr) -> Option<String> {
    match e {
        syn::Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Str(s),
            ..
        }) => Some(s.value()),
        _ => None,
    }
}

/// The backends of an `if`'s two branches, from its condition: only a plain comparison of a
/// backend (`x == Backend::Postgres`: the other branch is the other backend, `Backend` has
/// two), or a pattern (`if let Db::Pg(..) = ..`, `matches!(.., Db::Pg(..))`: the other
/// branch may be either). Anything else (negations, `&&`, `||`, calls) decides nothing.
fn condition_dialects(cond: &syn::Expr) -> (Option<Dialect>, Option<Dialect>) {
    let other = |d: Option<Dialect>| {
        d.map(|d| match d {
            Dialect::Postgres => Dialect::Sqlite,
            Dialect::Sqlite => Dialect::Postgres,
        })
    };
    match cond {
        // `x == Backend::X` (either side): the other branch is the other backend.
        syn::Expr::Binary(b) if matches!(b.op, syn::BinOp::Eq(_)) => {
            let backend = |e: &syn::Expr| match e {
                syn::Expr::Path(p)
                    if p.path.segments.len() == 2 && p.path.segments[0].ident == "Backend" =>
                {
                    dialect_of(&p.path.segments[1].ident.to_string())
                }
                _ => None,
            };
            let d = backend(&b.left).or_else(|| backend(&b.right));
            (d, other(d))
        }
        syn::Expr::Let(l) => {
            let pat = &l.pat;
            (dialect_of(&quote::quote!(#pat).to_string()), None)
        }
        syn::Expr::Macro(m) if m.mac.path.is_ident("matches") => {
            (dialect_of(&m.mac.tokens.to_string()), None)
        }
        syn::Expr::Paren(p) => condition_dialects(&p.expr),
        _ => (None, None),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// What [`statements`] found.
pub struct Found {
    pub statements: Vec<Statement>,
    /// Files `syn` could not parse (their statements are not in `statements`).
    pub unparsed: Vec<PathBuf>,
}

/// Every literal statement under `src` (the service's `src/`).
pub fn statements(src: &Path) -> Found {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut unparsed = Vec::new();
    let mut parsed = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        match syn::parse_file(&text) {
            Ok(ast) => parsed.push((file, ast)),
            Err(_) => unparsed.push(file),
        }
    }
    // The files of `#[cfg(test)] mod name;` declarations (test code in a file of its own),
    // with everything below them: `name.rs` or `name/mod.rs` beside a `mod.rs`, `lib.rs` or
    // `main.rs`, else in the directory named after the declaring file.
    let mut test_files: Vec<PathBuf> = Vec::new();
    for (file, ast) in &parsed {
        let dir = file.parent().unwrap_or(src);
        let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned());
        let base = match stem.as_deref() {
            Some("mod" | "lib" | "main") | None => dir.to_owned(),
            Some(stem) => dir.join(stem),
        };
        for item in &ast.items {
            if let syn::Item::Mod(m) = item
                && m.content.is_none()
                && is_test_only(&m.attrs)
            {
                let name = m.ident.to_string();
                test_files.push(base.join(format!("{name}.rs")));
                test_files.push(base.join(name));
            }
        }
    }
    let mut found = Vec::new();
    for (file, ast) in &parsed {
        if test_files.iter().any(|t| file.starts_with(t)) {
            continue;
        }
        let consts = ast
            .items
            .iter()
            .filter_map(|item| match item {
                syn::Item::Const(c) => {
                    string_literal(&c.expr).map(|sql| (c.ident.to_string(), sql))
                }
                _ => None,
            })
            .collect();
        let mut finder = Finder {
            file: file.strip_prefix(src).unwrap(),
            consts,
            loops: Vec::new(),
            function: None,
            only: Vec::new(),
            found: Vec::new(),
        };
        finder.visit_file(ast);
        found.extend(finder.found);
    }
    Found {
        statements: found,
        unparsed,
    }
}
