//! The SQL statements written as literals in the service's source, found by parsing it:
//! every `query("...")` / `db::query("...")` whose SQL is a string literal, outside
//! `#[cfg(test)]`, with the one database it runs on when the source says so. Used by
//! `build.rs`, which prepares each SQLite statement against the schema of
//! `migrations/sqlite/` (so a statement the schema does not accept fails the build), and
//! by `tests/api/statements.rs`, which prepares them on the database under test (SQLite,
//! then PostgreSQL in the second pass of `scripts/test`).
//!
//! A statement in a match arm or `if` branch that names one backend (`Backend::Postgres`,
//! `Db::Pg`, `Pool::Sqlite`, ...) runs on that backend only, and so does every statement of
//! a function listed in [`BACKEND_ONLY`]. Statements built with `format!` are not found:
//! the suite runs them on both databases instead.

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
    let pg = ["Postgres", "Pg"].iter().any(|n| {
        tokens
            .split(|c: char| !c.is_alphanumeric())
            .any(|t| t == *n)
    });
    let lite = ["Sqlite", "Lite"].iter().any(|n| {
        tokens
            .split(|c: char| !c.is_alphanumeric())
            .any(|t| t == *n)
    });
    match (pg, lite) {
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

    fn in_function(&mut self, name: &syn::Ident, visit: impl FnOnce(&mut Self)) {
        let outer = self.function.replace(name.to_string());
        visit(self);
        self.function = outer;
    }
}

fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg") && {
            let tokens = a.meta.require_list().map(|l| l.tokens.to_string());
            tokens.is_ok_and(|t| t.split(|c: char| !c.is_alphanumeric()).any(|w| w == "test"))
        }
    }) || attrs.iter().any(|a| a.path().is_ident("test"))
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
        let cond = &e.cond;
        let only = dialect_of(&quote::quote!(#cond).to_string());
        self.visit_expr(&e.cond);
        self.only.push(only);
        self.visit_block(&e.then_branch);
        self.only.pop();
        if let Some((_, other)) = &e.else_branch {
            // The other branch: the other backend, when the condition named one.
            self.only.push(only.map(|d| match d {
                Dialect::Postgres => Dialect::Sqlite,
                Dialect::Sqlite => Dialect::Postgres,
            }));
            self.visit_expr(other);
            self.only.pop();
        }
    }

    fn visit_expr_call(&mut self, call: &'ast syn::ExprCall) {
        if let syn::Expr::Path(path) = &*call.func
            && path
                .path
                .segments
                .last()
                .is_some_and(|s| s.ident == "query")
            && let Some(syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(sql),
                ..
            })) = call.args.first()
        {
            self.found.push(Statement {
                file: self.file.to_owned(),
                only: self.only(),
                sql: sql.value(),
            });
        }
        syn::visit::visit_expr_call(self, call);
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

/// Every literal statement under `src` (the service's `src/`).
pub fn statements(src: &Path) -> Vec<Statement> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut found = Vec::new();
    for file in &files {
        // Test-only files of the service (`#[cfg(test)] mod x;` elsewhere).
        if file
            .file_stem()
            .is_some_and(|s| s.to_string_lossy().ends_with("tests"))
        {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        // A file that does not parse is the compiler's to report.
        let Ok(parsed) = syn::parse_file(&text) else {
            continue;
        };
        let mut finder = Finder {
            file: file.strip_prefix(src).unwrap(),
            function: None,
            only: Vec::new(),
            found: Vec::new(),
        };
        finder.visit_file(&parsed);
        found.extend(finder.found);
    }
    found
}
