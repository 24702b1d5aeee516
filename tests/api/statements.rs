//! Every SQL statement written as a literal in the service's source is prepared against the
//! real schema of the database under test, whether or not a test runs it: a misspelt table
//! or column, a column a migration dropped, or a statement one dialect does not accept fails
//! here, on SQLite in the first pass of `scripts/test` and on PostgreSQL in the second.
//!
//! This is the part of compile-time query checking that one SQL text for both databases
//! allows (sqlx's macros check a text against one database only): the statements are found
//! by parsing `src/` (`syn`), every `query("...")` / `db::query("...")` whose SQL is a
//! literal, outside `#[cfg(test)]`. A statement in a match arm or `if` branch that names one
//! backend (`Backend::Postgres`, `Db::Pg`, `Pool::Sqlite`, ...) is prepared on that backend
//! only, and so is every statement of a function listed in [`BACKEND_ONLY`]. Statements built
//! with `format!` are not found here; the suite runs them on both databases instead.

use std::path::{Path, PathBuf};

use syn::visit::Visit;

use ern_registry::store::{Backend, Store};

use crate::helpers::fresh_database;

/// Functions that run on one backend only (file under `src/`, function, `*` for the whole
/// file), whose statements are therefore prepared on that backend only.
const BACKEND_ONLY: &[(&str, &str, Backend)] = &[
    // Planner statistics: PostgreSQL's catalog (`store::statistics`: nothing on SQLite).
    ("store/statistics.rs", "*", Backend::Postgres),
    // The purge after an erasure: VACUUM on PostgreSQL, a WAL checkpoint on SQLite.
    ("store/purge.rs", "vacuum", Backend::Postgres),
    ("store/purge.rs", "checkpoint", Backend::Sqlite),
    ("store/purge.rs", "checkpoint_once", Backend::Sqlite),
];

/// The backend a piece of source is specific to, from the tokens of a match arm's pattern
/// or an `if`'s condition.
fn dialect_of(tokens: &str) -> Option<Backend> {
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
        (true, false) => Some(Backend::Postgres),
        (false, true) => Some(Backend::Sqlite),
        _ => None,
    }
}

/// A literal statement of the source: where, for which backends, and its text.
#[derive(Debug)]
struct Statement {
    file: PathBuf,
    only: Option<Backend>,
    sql: String,
}

struct Finder<'a> {
    file: &'a Path,
    /// The function being visited.
    function: Option<String>,
    /// The backend of the innermost enclosing arm or branch that names one.
    only: Vec<Option<Backend>>,
    found: Vec<Statement>,
}

impl Finder<'_> {
    fn only(&self) -> Option<Backend> {
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
            self.only.push(only.map(|b| match b {
                Backend::Postgres => Backend::Sqlite,
                Backend::Sqlite => Backend::Postgres,
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

/// Every literal statement under `src/`.
fn statements() -> Vec<Statement> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
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
        let parsed = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let mut finder = Finder {
            file: file.strip_prefix(&src).unwrap(),
            function: None,
            only: Vec::new(),
            found: Vec::new(),
        };
        finder.visit_file(&parsed);
        found.extend(finder.found);
    }
    found
}

#[tokio::test]
async fn every_literal_statement_of_the_source_prepares_on_the_schema() {
    let statements = statements();
    // The finder finds the store's statements (a guard against it silently finding none).
    assert!(
        statements.len() > 80,
        "only {} literal statements found under src/",
        statements.len()
    );
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database(&dir).await;
    let store = Store::connect(&url, 2).await.unwrap();
    store.migrate().await.unwrap();
    let backend = store.backend();
    let mut failures = Vec::new();
    let mut checked = 0;
    match backend {
        Backend::Sqlite => {
            let path = store.sqlite_path().expect("a file database").to_owned();
            let conn = rusqlite::Connection::open(&path).unwrap();
            for s in statements
                .iter()
                .filter(|s| s.only != Some(Backend::Postgres))
            {
                checked += 1;
                // Prepared, never run: nothing is written.
                if let Err(e) = conn.prepare(&s.sql) {
                    failures.push(format!("{}: {e}\n    {}", s.file.display(), s.sql));
                }
            }
        }
        Backend::Postgres => {
            use sqlx::{Connection as _, Executor as _};
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            for s in statements
                .iter()
                .filter(|s| s.only != Some(Backend::Sqlite))
            {
                checked += 1;
                if let Err(e) = (&mut conn).prepare(s.sql.as_str()).await {
                    failures.push(format!("{}: {e}\n    {}", s.file.display(), s.sql));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} statements do not prepare on {backend:?}:\n{}",
        failures.len(),
        failures.join("\n")
    );
    store.close().await;
}
