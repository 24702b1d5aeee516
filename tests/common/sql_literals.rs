//! The SQL statements written as literals in the service's source, found by parsing it:
//! every `query(...)` / `db::query(...)` and `.execute_raw(...)` whose SQL is a string
//! literal, a string `const` of the same file (see [`Finder::constant`]), the variable of a
//! `for` loop over an array of these (not where a name bound in the loop hides it), or a
//! `format!` of plain placeholders naming only these, outside `#[cfg(test)]`, with the one
//! database it runs on when the source says so; with each, how many values the source
//! binds to it.
//! Also found: the columns each function reads by name, with the Rust type where the source
//! states it, and which functions call which. [`check`] holds them to what a database says
//! of each statement. Used by `build.rs`, which checks the SQLite statements against the
//! schema of `migrations/sqlite/` (so a statement the schema does not accept, a wrong
//! number of values, a column read that no statement returns or one read as another type
//! fails the build), and by `tests/api/statements.rs`, which checks
//! them on the database under test (SQLite, then PostgreSQL in the second pass of
//! `scripts/test`).
//!
//! A statement in a match arm whose pattern names one backend (`Db::Pg(..)`,
//! `Backend::Sqlite`, ...), or in an `if` branch whose condition plainly does
//! (`backend == Backend::Postgres`, `if let Db::Lite(..) = ..`, `matches!`; see
//! `condition_dialects`), runs on that backend only, and so does every statement of a
//! function listed in [`BACKEND_ONLY`]. Statements built from run-time values are not
//! found, and a function with one has its reads left unchecked: the suite runs them on
//! both databases instead.

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
    // Whether an unanswered COMMIT landed: asked on PostgreSQL only (`store::writer`).
    ("store/writer.rs", "landed", Dialect::Postgres),
    // The change log in two statements, with arrays (`store::research_index`).
    (
        "store/research_index.rs",
        "log_changes_pg",
        Dialect::Postgres,
    ),
    // The file SQLite opened, against the one the server's lock was taken beside.
    ("store/mod.rs", "check_opened_file", Dialect::Sqlite),
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
    /// The function it is in (see [`Read::scope`]), if any.
    pub scope: Option<Scope>,
    /// The one database it runs on, if only one.
    pub only: Option<Dialect>,
    pub sql: String,
    /// How many values it is given: the `.bind(..)` calls chained between `query(..)` and
    /// the call that runs it (`execute`, `fetch_*`), or none for `execute_raw`. `None` when
    /// the source binds them some other way (a loop, `rows`, `list`).
    pub binds: Option<usize>,
}

/// A function of the source, numbered in the order found.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    pub id: usize,
    /// Its name, for messages.
    pub name: String,
    /// The type of the `impl` it is in; `None` for a free function.
    pub owner: Option<String>,
}

/// A function calling another of its file (`helper(row)`, `Self::helper(row)`,
/// `self.helper(row)`, `.map(helper)`): the rows a helper without statements of its own
/// reads are its callers'.
#[derive(Debug)]
pub struct Use {
    pub file: PathBuf,
    pub scope: Scope,
    /// The function called: its `impl`'s type (`None` for a free function) and name.
    pub owner: Option<String>,
    pub name: String,
}

/// A column read by name: `row.try_get("name")` (with or without a turbofish).
#[derive(Debug)]
pub struct Read {
    pub file: PathBuf,
    /// The function it is in: its rows are taken to be those of the function's own
    /// statements.
    pub scope: Scope,
    pub column: String,
    /// The Rust type it is read as, where the source says: a turbofish
    /// (`try_get::<i64>(..)`), the type of the `let` it initialises (`let n: i64 =
    /// r.try_get(..)?`, also element by element of a tuple), or the field of a struct of
    /// the file, named plainly, it initialises (`Erasure { receipt_id: r.try_get(..)?, .. }`).
    pub rust: Option<Rust>,
}

/// A Rust type a column is read as ([`Decode`](../../src/store/db.rs)), without its
/// `Option`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rust {
    Int,
    Text,
    Blob,
    Bool,
    Time,
}

impl Rust {
    /// The type `ty` (its tokens), if it is one of the types rows are read as.
    fn of(ty: &str) -> Option<Rust> {
        let ty: String = ty.chars().filter(|c| !c.is_whitespace()).collect();
        let ty = ["Option<", "std::option::Option<"]
            .iter()
            .find_map(|o| ty.strip_prefix(o).and_then(|t| t.strip_suffix('>')))
            .unwrap_or(&ty);
        match ty {
            "i64" => Some(Rust::Int),
            "String" => Some(Rust::Text),
            "Vec<u8>" => Some(Rust::Blob),
            "bool" => Some(Rust::Bool),
            "DateTime<Utc>"
            | "DateTime<chrono::Utc>"
            | "chrono::DateTime<Utc>"
            | "chrono::DateTime<chrono::Utc>" => Some(Rust::Time),
            _ => None,
        }
    }

    /// Whether a column the database types `sql` (SQLite: the declared type of a table's
    /// column; PostgreSQL: the type's name) is read as this type; `None` when the type
    /// says nothing (an expression on SQLite, a type not used here).
    pub fn reads(self, dialect: Dialect, sql: &str) -> Option<bool> {
        let sql = sql.to_ascii_uppercase();
        let is = |kinds: &[Rust]| Some(kinds.contains(&self));
        match dialect {
            // SQLite keeps instants as integer milliseconds and flags as 0/1.
            Dialect::Sqlite if sql.contains("INT") => is(&[Rust::Int, Rust::Bool, Rust::Time]),
            Dialect::Sqlite if ["TEXT", "CHAR", "CLOB"].iter().any(|t| sql.contains(t)) => {
                is(&[Rust::Text])
            }
            Dialect::Sqlite if sql.contains("BLOB") => is(&[Rust::Blob]),
            Dialect::Postgres => match sql.as_str() {
                "INT8" | "INT4" | "INT2" => is(&[Rust::Int]),
                "TEXT" | "VARCHAR" | "CHAR" | "NAME" => is(&[Rust::Text]),
                "BYTEA" => is(&[Rust::Blob]),
                "BOOL" => is(&[Rust::Bool]),
                "TIMESTAMPTZ" => is(&[Rust::Time]),
                _ => None,
            },
            _ => None,
        }
    }
}

impl Statement {
    /// Whether it runs on `dialect`.
    pub fn runs_on(&self, dialect: Dialect) -> bool {
        self.only.is_none_or(|only| only == dialect)
    }
}

struct Finder<'a> {
    file: &'a Path,
    /// The file's `const NAME: &str = "..."` items ([`Consts`]).
    consts: std::collections::HashMap<String, String>,
    /// The variables of enclosing `for x in ["...", ...]` loops, with their literals;
    /// `None` once a `let` in the loop shadows one.
    loops: Vec<(String, Option<Vec<String>>)>,
    /// The type of the `impl` being visited (what `Self` names).
    impl_type: Option<String>,
    /// The function being visited.
    function: Option<Scope>,
    /// The number the next function gets (unique across files).
    next_scope: usize,
    /// The backend of the innermost enclosing arm or branch that names one.
    only: Vec<Option<Dialect>>,
    /// The file's structs with named fields: each field's type (tokens).
    structs: std::collections::HashMap<String, std::collections::HashMap<String, String>>,
    /// `try_get` calls whose type the code around them gives ([`Read::rust`]).
    expected: std::collections::HashMap<*const syn::ExprMethodCall, String>,
    /// `query(..)` calls seen as the root of a chain that runs them, with its binds.
    binds: std::collections::HashMap<*const syn::ExprCall, usize>,
    found: Vec<Statement>,
    reads: Vec<Read>,
    uses: Vec<Use>,
    /// Functions with a statement that is not a literal (`format!`, a variable).
    open: std::collections::HashSet<usize>,
}

/// The calls that run a [`query`](../../src/store/db.rs) built by a chain of `.bind(..)`s.
const RUNS: [&str; 7] = [
    "execute",
    "fetch",
    "fetch_all",
    "fetch_one",
    "fetch_optional",
    "fetch_scalar",
    "fetch_scalars",
];

impl Finder<'_> {
    fn only(&self) -> Option<Dialect> {
        let file = self.file.to_string_lossy();
        let listed = BACKEND_ONLY.iter().find(|(f, function, _)| {
            *f == file
                && (*function == "*" || self.function.as_ref().is_some_and(|s| s.name == *function))
        });
        if let Some((_, _, backend)) = listed {
            return Some(*backend);
        }
        self.only.iter().rev().find_map(|b| *b)
    }

    /// Records the statement(s) `arg` names: a literal, a constant of the file (`X`,
    /// `Self::X`, `Type::X`), or the variable of an enclosing loop over literals. Anything
    /// else (a `format!`, a variable) is not a literal statement, and the function's reads
    /// are then not checked.
    fn statement(&mut self, arg: &syn::Expr, binds: Option<usize>) {
        let Some(texts) = self.texts(arg) else {
            if let Some(scope) = &self.function {
                self.open.insert(scope.id);
            }
            return;
        };
        let only = self.only();
        for sql in texts {
            self.found.push(Statement {
                file: self.file.to_owned(),
                scope: self.function.clone(),
                only,
                sql,
                binds,
            });
        }
    }

    /// The text(s) `e` stands for: a literal, a constant (see [`Finder::constant`]), the
    /// variable of an enclosing loop over literals (each of them), or a `format!` whose
    /// every argument is one of these (each combination).
    fn texts(&self, e: &syn::Expr) -> Option<Vec<String>> {
        match unwrapped(e) {
            syn::Expr::Path(p) => {
                let loop_var = p.path.get_ident().and_then(|name| {
                    self.loops
                        .iter()
                        .rev()
                        .find(|(var, _)| name == var)
                        .map(|(_, literals)| literals.clone())
                });
                match loop_var {
                    Some(literals) => literals,
                    None => self.constant(&p.path).map(|sql| vec![sql]),
                }
            }
            syn::Expr::Macro(m) if m.mac.path.is_ident("format") => self.format(&m.mac),
            other => string_literal(other).map(|sql| vec![sql]),
        }
    }

    /// The texts of a `format!` whose placeholders are all plain (`{}`, `{0}`, `{NAME}`, no
    /// format spec) and whose arguments all have texts ([`Finder::texts`]): one per
    /// combination of their texts.
    fn format(&self, mac: &syn::Macro) -> Option<Vec<String>> {
        use syn::parse::Parser;
        let args = syn::punctuated::Punctuated::<syn::Expr, syn::Token![,]>::parse_terminated
            .parse2(mac.tokens.clone())
            .ok()?;
        let mut args = args.iter();
        let template = string_literal(args.next()?)?;
        let positional: Vec<Vec<String>> = args.map(|a| self.texts(a)).collect::<Option<_>>()?;
        let mut texts = vec![String::new()];
        let (mut chars, mut next) = (template.chars().peekable(), 0);
        while let Some(c) = chars.next() {
            let piece: Vec<String> = match c {
                '{' if chars.peek() == Some(&'{') => vec![chars.next()?.to_string()],
                '}' if chars.peek() == Some(&'}') => vec![chars.next()?.to_string()],
                '{' => {
                    let name: String = chars.by_ref().take_while(|c| *c != '}').collect();
                    if name.is_empty() {
                        next += 1;
                        positional.get(next - 1)?.clone()
                    } else if let Ok(i) = name.parse::<usize>() {
                        positional.get(i)?.clone()
                    } else {
                        let ident = syn::parse_str::<syn::Path>(&name).ok()?;
                        self.texts(&syn::parse_quote!(#ident))?
                    }
                }
                '}' => return None,
                c => vec![c.to_string()],
            };
            texts = texts
                .iter()
                .flat_map(|t| piece.iter().map(move |p| format!("{t}{p}")))
                .collect();
        }
        Some(texts)
    }

    /// The text of the string constant `path` names: `X` declared outside any `impl` in
    /// the file (at the top, in a function or a module), or `Self::X` / `Type::X` declared
    /// in an `impl` of the file (see [`Consts`]; a name declared twice with two texts, or
    /// once with something other than a literal, is not resolved, and neither is any other
    /// path, such as `module::X`).
    fn constant(&self, path: &syn::Path) -> Option<String> {
        let names: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        let key = match &names[..] {
            [name] => name.clone(),
            [ty, name] if ty == "Self" => format!("{}::{name}", self.impl_type.as_ref()?),
            [ty, name] => format!("{ty}::{name}"),
            _ => return None,
        };
        self.consts.get(&key).cloned()
    }

    /// `let x: T = r.try_get(..)?;` and `let (a, b): (T, U) = (r.try_get(..)?, ..);`: the
    /// types the reads are expected to have ([`Read::rust`]).
    fn expect_types(&mut self, local: &syn::Local) {
        // `let x: T = r.try_get(..)?;` and `let (a, b): (T, U) = (r.try_get(..)?, ..);`
        if let (syn::Pat::Type(typed), Some(init)) = (&local.pat, &local.init) {
            let pairs: Vec<(&syn::Type, &syn::Expr)> = match (&*typed.ty, unwrapped(&init.expr)) {
                (syn::Type::Tuple(types), syn::Expr::Tuple(values))
                    if types.elems.len() == values.elems.len() =>
                {
                    types.elems.iter().zip(values.elems.iter()).collect()
                }
                (ty, value) => vec![(ty, value)],
            };
            for (ty, value) in pairs {
                if let Some(call) = try_get_call(value) {
                    self.expected
                        .insert(call as *const _, quote::quote!(#ty).to_string());
                }
            }
        }
    }

    /// Records that the function being visited names the function `path` (`f` or
    /// `Self::f`): a helper of the file it may hand its rows to.
    fn uses_function(&mut self, path: &syn::Path) {
        let (owner, name) = match &path.segments.iter().collect::<Vec<_>>()[..] {
            [f] => (None, &f.ident),
            [ty, f] if ty.ident == "Self" => (self.impl_type.clone(), &f.ident),
            [ty, f] => (Some(ty.ident.to_string()), &f.ident),
            _ => return,
        };
        self.uses_method(owner, name);
    }

    /// Records that the function being visited calls `owner`'s function `name`.
    fn uses_method(&mut self, owner: Option<String>, name: &syn::Ident) {
        if let Some(scope) = &self.function {
            self.uses.push(Use {
                file: self.file.to_owned(),
                scope: scope.clone(),
                owner,
                name: name.to_string(),
            });
        }
    }

    fn in_function(&mut self, name: &syn::Ident, visit: impl FnOnce(&mut Self)) {
        let scope = Scope {
            id: self.next_scope,
            name: name.to_string(),
            owner: self.impl_type.clone(),
        };
        self.next_scope += 1;
        let outer = self.function.replace(scope);
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
    fn visit_expr_struct(&mut self, e: &'ast syn::ExprStruct) {
        // `Name { field: r.try_get(..)?, .. }` with `Name` a struct of the file.
        // Only a plain name: `module::Name` or `Enum::Variant` may be another type.
        let name = e.path.get_ident().map(|i| i.to_string());
        if let Some(fields) = name.and_then(|n| self.structs.get(&n)) {
            for field in &e.fields {
                if let (syn::Member::Named(member), Some(call)) =
                    (&field.member, try_get_call(&field.expr))
                    && let Some(ty) = fields.get(&member.to_string())
                {
                    self.expected.insert(call as *const _, ty.clone());
                }
            }
        }
        syn::visit::visit_expr_struct(self, e);
    }

    fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
        let outer = std::mem::replace(&mut self.impl_type, type_name(&i.self_ty));
        syn::visit::visit_item_impl(self, i);
        self.impl_type = outer;
    }

    fn visit_local(&mut self, local: &'ast syn::Local) {
        self.expect_types(local);
        // The value first: `let sql = sql.replace(..)` reads the loop's `sql`.
        if let Some(init) = &local.init {
            self.visit_local_init(init);
        }
        self.visit_pat(&local.pat);
    }

    /// A name bound inside a loop over literals (`let`, `if let`, a match arm, a closure's
    /// parameter) that is the loop's variable: from here to the end of the block, the
    /// name is not the literals.
    fn visit_pat_ident(&mut self, p: &'ast syn::PatIdent) {
        let name = p.ident.to_string();
        if self.loops.iter().any(|(var, _)| *var == name) {
            self.loops.push((name, None));
        }
        syn::visit::visit_pat_ident(self, p);
    }

    fn visit_block(&mut self, b: &'ast syn::Block) {
        let depth = self.loops.len();
        syn::visit::visit_block(self, b);
        self.loops.truncate(depth);
    }

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
        let depth = self.loops.len();
        if let syn::Pat::Ident(name) = &*l.pat {
            let literals = match unwrapped(&l.expr) {
                syn::Expr::Array(array) => array
                    .elems
                    .iter()
                    .map(|e| match unwrapped(e) {
                        syn::Expr::Path(p) => self.constant(&p.path),
                        other => string_literal(other),
                    })
                    .collect::<Option<Vec<String>>>(),
                _ => None,
            };
            self.visit_expr(&l.expr);
            self.loops.push((name.ident.to_string(), literals));
        } else {
            self.visit_expr(&l.expr);
            self.visit_pat(&l.pat);
        }
        // Not `syn::visit::visit_expr_for_loop`: the loop's own pattern is no shadow.
        self.visit_block(&l.body);
        self.loops.truncate(depth);
    }

    fn visit_expr_method_call(&mut self, call: &'ast syn::ExprMethodCall) {
        // `rows.iter().map(helper)`, `self.helper(row)`.
        if ["map", "and_then", "filter_map", "flat_map"]
            .iter()
            .any(|m| call.method == m)
            && let [syn::Expr::Path(p)] = call.args.iter().collect::<Vec<_>>()[..]
        {
            self.uses_function(&p.path);
        }
        if let syn::Expr::Path(p) = &*call.receiver
            && p.path.is_ident("self")
        {
            self.uses_method(self.impl_type.clone(), &call.method);
        }
        if call.method == "execute_raw"
            && let Some(arg) = call.args.first()
        {
            self.statement(arg, Some(0));
        }
        if call.method == "try_get"
            && let [arg] = call.args.iter().collect::<Vec<_>>()[..]
            && let Some(column) = string_literal(unwrapped(arg))
            && let Some(scope) = &self.function
        {
            let turbofish = call.turbofish.as_ref().and_then(|t| match t.args.first() {
                Some(syn::GenericArgument::Type(ty)) => Some(quote::quote!(#ty).to_string()),
                _ => None,
            });
            let ty = turbofish.or_else(|| self.expected.remove(&(call as *const _)));
            self.reads.push(Read {
                file: self.file.to_owned(),
                scope: scope.clone(),
                column,
                rust: ty.as_deref().and_then(Rust::of),
            });
        }
        if RUNS.iter().any(|m| call.method == m) {
            // `query(..).bind(a).bind(b).execute(..)`: two values.
            let (mut on, mut binds) = (&*call.receiver, 0);
            loop {
                match on {
                    syn::Expr::MethodCall(m) if m.method == "bind" => binds += 1,
                    syn::Expr::MethodCall(m) if m.method == "persistent" => {}
                    syn::Expr::Call(c) if is_query(c) => {
                        self.binds.insert(c as *const _, binds);
                        break;
                    }
                    _ => break,
                }
                let syn::Expr::MethodCall(m) = on else {
                    unreachable!()
                };
                on = &m.receiver;
            }
        }
        syn::visit::visit_expr_method_call(self, call);
    }

    fn visit_expr_call(&mut self, call: &'ast syn::ExprCall) {
        // `helper(row)`, `Self::helper(row)`.
        if let syn::Expr::Path(p) = &*call.func {
            self.uses_function(&p.path);
        }
        if is_query(call)
            && let Some(arg) = call.args.first()
        {
            let binds = self.binds.remove(&(call as *const _));
            self.statement(arg, binds);
        }
        syn::visit::visit_expr_call(self, call);
    }
}

/// Whether a statement returns no rows, from its text: it neither selects nor returns
/// (an `INSERT`/`UPDATE`/`DELETE` without `RETURNING`, a `SET`); in doubt, it returns.
fn returns_nothing(sql: &str) -> bool {
    let upper = sql.trim_start().to_ascii_uppercase();
    // Any PRAGMA may answer a row, also one that sets (`journal_mode = WAL`).
    let rows = ["SELECT", "RETURNING", "SHOW", "EXPLAIN"]
        .iter()
        .any(|word| upper.contains(word))
        || ["VALUES", "PRAGMA", "TABLE"]
            .iter()
            .any(|word| upper.starts_with(word));
    !rows
}

/// The name of a type, by its last segment (`store::Store` is `Store`).
fn type_name(ty: &syn::Type) -> Option<String> {
    match ty {
        syn::Type::Path(p) => p.path.segments.last().map(|s| s.ident.to_string()),
        _ => None,
    }
}

/// The `try_get` call `e` is, with or without a `?` after it.
fn try_get_call(e: &syn::Expr) -> Option<&syn::ExprMethodCall> {
    match unwrapped(e) {
        syn::Expr::Try(t) => try_get_call(&t.expr),
        syn::Expr::MethodCall(m) if m.method == "try_get" => Some(m),
        _ => None,
    }
}

/// `query(..)` or `db::query(..)`.
fn is_query(call: &syn::ExprCall) -> bool {
    matches!(&*call.func, syn::Expr::Path(path)
        if path.path.segments.last().is_some_and(|s| s.ident == "query"))
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
    /// The columns read by name.
    pub reads: Vec<Read>,
    /// Functions named by functions.
    pub uses: Vec<Use>,
    /// Functions with a statement that is not a literal: their reads are not checked.
    pub open: std::collections::HashSet<usize>,
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
    let (mut found, mut reads, mut uses, mut open, mut next_scope) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        std::collections::HashSet::new(),
        0,
    );
    for (file, ast) in &parsed {
        if test_files.iter().any(|t| file.starts_with(t)) {
            continue;
        }
        let mut consts_and_structs = Consts::default();
        consts_and_structs.visit_file(ast);
        let consts = std::mem::take(&mut consts_and_structs.texts)
            .into_iter()
            .filter_map(|(name, texts)| match &texts[..] {
                [Some(text)] => Some((name, text.clone())),
                _ => None,
            })
            .collect();
        let mut finder = Finder {
            file: file.strip_prefix(src).unwrap(),
            consts,
            structs: consts_and_structs.structs,
            expected: Default::default(),
            loops: Vec::new(),
            impl_type: None,
            function: None,
            next_scope,
            only: Vec::new(),
            binds: Default::default(),
            found: Vec::new(),
            reads: Vec::new(),
            uses: Vec::new(),
            open: Default::default(),
        };
        finder.visit_file(ast);
        next_scope = finder.next_scope;
        found.extend(finder.found);
        reads.extend(finder.reads);
        uses.extend(finder.uses);
        open.extend(finder.open);
    }
    Found {
        statements: found,
        reads,
        uses,
        open,
        unparsed,
    }
}

/// A file's string constants outside test code, wherever declared, each with its distinct
/// texts (`None` for a value that is not a literal): `X` for one outside any `impl` (at
/// the top, in a function or a module), `Type::X` for one in an `impl` of `Type`. Also the
/// file's structs with named fields (a name declared twice is left out).
#[derive(Default)]
struct Consts {
    texts: std::collections::HashMap<String, Vec<Option<String>>>,
    structs: std::collections::HashMap<String, std::collections::HashMap<String, String>>,
    twice: std::collections::HashSet<String>,
    impl_type: Option<String>,
}

impl Consts {
    fn add(&mut self, key: String, value: &syn::Expr) {
        let text = string_literal(value);
        let texts = self.texts.entry(key).or_default();
        if !texts.contains(&text) {
            texts.push(text);
        }
    }
}

impl<'ast> Visit<'ast> for Consts {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if !is_test_only(&m.attrs) {
            syn::visit::visit_item_mod(self, m);
        }
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if !is_test_only(&f.attrs) {
            syn::visit::visit_item_fn(self, f);
        }
    }

    fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
        let outer = std::mem::replace(&mut self.impl_type, type_name(&i.self_ty));
        syn::visit::visit_item_impl(self, i);
        self.impl_type = outer;
    }

    fn visit_item_const(&mut self, c: &'ast syn::ItemConst) {
        self.add(c.ident.to_string(), &c.expr);
        syn::visit::visit_item_const(self, c);
    }

    fn visit_impl_item_const(&mut self, c: &'ast syn::ImplItemConst) {
        if let Some(ty) = &self.impl_type {
            self.add(format!("{ty}::{}", c.ident), &c.expr);
        }
    }

    fn visit_item_struct(&mut self, s: &'ast syn::ItemStruct) {
        let name = s.ident.to_string();
        if let syn::Fields::Named(fields) = &s.fields
            && !self.twice.contains(&name)
        {
            let fields = fields
                .named
                .iter()
                .filter_map(|f| {
                    let ty = &f.ty;
                    Some((
                        f.ident.as_ref()?.to_string(),
                        quote::quote!(#ty).to_string(),
                    ))
                })
                .collect();
            if self.structs.insert(name.clone(), fields).is_some() {
                self.structs.remove(&name);
                self.twice.insert(name);
            }
        }
    }
}

/// What a database says of a statement it prepared.
pub struct Shape {
    /// Its number of parameters.
    pub params: usize,
    /// The names of its result columns, in order.
    pub columns: Vec<String>,
    /// Their types, where the database says (see [`Rust::reads`]).
    pub types: Vec<Option<String>>,
}

/// What SQLite says of `sql` prepared on `conn` (never run): for [`check`].
pub fn describe_sqlite(conn: &rusqlite::Connection, sql: &str) -> Result<Shape, String> {
    let statement = conn.prepare(sql).map_err(|e| e.to_string())?;
    Ok(Shape {
        params: statement.parameter_count(),
        columns: statement
            .column_names()
            .into_iter()
            .map(String::from)
            .collect(),
        types: statement
            .columns()
            .iter()
            .map(|c| c.decl_type().map(String::from))
            .collect(),
    })
}

/// What [`check`] checked, and what failed.
#[derive(Default)]
pub struct Report {
    pub statements: usize,
    pub binds: usize,
    pub reads: usize,
    /// Reads whose Rust type was held to the column's type.
    pub typed: usize,
    pub failures: Vec<String>,
}

/// Checks what `found` says of the source against what the database says of each statement
/// that runs on `dialect` (`describe`: prepare it, never run it):
/// - the statement prepares (its tables and columns exist, the dialect accepts it);
/// - it is given as many values as it has parameters, where the source shows how many
///   ([`Statement::binds`]);
/// - every column a function reads by name ([`Read`]) is returned by one of the function's
///   statements, and by that statement once (the runtime refuses a name two columns
///   share). A function with statements is held to them, all of them literals that run on
///   `dialect` (or return no rows); one with none, to those of each function of its file
///   that calls it ([`Use`]);
/// - a read whose Rust type the source gives ([`Read::rust`]) reads a column of that type
///   in one of those statements, where the database types the column ([`Rust::reads`]).
pub fn check(
    found: &Found,
    dialect: Dialect,
    mut describe: impl FnMut(&str) -> Result<Shape, String>,
) -> Report {
    use std::collections::HashMap;
    let mut report = Report::default();
    // Per function: the column lists of its statements, or `None` when one of them cannot
    // be described on this dialect.
    let mut functions: HashMap<usize, Option<Vec<Shape>>> = HashMap::new();
    for s in &found.statements {
        let columns = if s.runs_on(dialect) {
            report.statements += 1;
            match describe(&s.sql) {
                Ok(shape) => {
                    if let Some(binds) = s.binds {
                        report.binds += 1;
                        if binds != shape.params {
                            report.failures.push(format!(
                                "src/{}: {} value(s) bound to {} parameter(s)\n    {}",
                                s.file.display(),
                                binds,
                                shape.params,
                                s.sql
                            ));
                        }
                    }
                    Some(shape)
                }
                Err(e) => {
                    report
                        .failures
                        .push(format!("src/{}: {e}\n    {}", s.file.display(), s.sql));
                    None
                }
            }
        } else if returns_nothing(&s.sql) {
            // Another backend's statement that returns no rows (`SET TRANSACTION ..`):
            // no read comes from it.
            Some(Shape {
                params: 0,
                columns: Vec::new(),
                types: Vec::new(),
            })
        } else {
            None
        };
        if let Some(scope) = &s.scope {
            let entry = functions
                .entry(scope.id)
                .or_insert_with(|| Some(Vec::new()));
            match (entry.as_mut(), columns) {
                (Some(lists), Some(columns)) => lists.push(columns),
                _ => *entry = None,
            }
        }
    }
    for read in &found.reads {
        // The function's own statements, or, for a helper with none, each caller's in the
        // file whose statements are known.
        let own = functions.contains_key(&read.scope.id) || found.open.contains(&read.scope.id);
        let readers: Vec<&Scope> = if own {
            vec![&read.scope]
        } else {
            found
                .uses
                .iter()
                .filter(|u| {
                    u.file == read.file && u.name == read.scope.name && u.owner == read.scope.owner
                })
                .map(|u| &u.scope)
                .collect()
        };
        for reader in readers {
            if found.open.contains(&reader.id) {
                continue;
            }
            let Some(Some(lists)) = functions.get(&reader.id) else {
                continue;
            };
            report.reads += 1;
            let counts: Vec<usize> = lists
                .iter()
                .map(|shape| shape.columns.iter().filter(|c| **c == read.column).count())
                .collect();
            let via = if reader.id == read.scope.id {
                String::new()
            } else {
                format!(" (read by `{}`)", read.scope.name)
            };
            let problem = if counts.contains(&1) {
                // Its type, in each statement that returns it once.
                let typed = lists.iter().filter_map(|shape| {
                    let at = shape.columns.iter().position(|c| *c == read.column)?;
                    let sql = shape.types.get(at)?.as_deref()?;
                    Some((sql, read.rust?.reads(dialect, sql)?))
                });
                // Right if it is of that type in one of them (which statement a row comes
                // from is not known): wrong only if it is of another type in all.
                let (mut right, mut wrong) = (false, None);
                for (sql, matches) in typed {
                    report.typed += 1;
                    right |= matches;
                    if !matches {
                        wrong = Some(sql);
                    }
                }
                match (right, wrong, read.rust) {
                    (false, Some(sql), Some(rust)) => {
                        format!("is read as {rust:?} but is {sql} in the statements of")
                    }
                    _ => continue,
                }
            } else if counts.iter().any(|&n| n > 1) {
                "is a name two columns share in the statement of".to_owned()
            } else {
                "is returned by no statement of".to_owned()
            };
            report.failures.push(format!(
                "src/{}: the column \"{}\" read by name {problem} `{}`{via}",
                read.file.display(),
                read.column,
                reader.name
            ));
        }
    }
    report
}
