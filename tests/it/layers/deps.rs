//! Which rooms a source file depends on, read from its syntax tree (syn), not from its text:
//! comments and string contents cannot hide a path, and every way of naming another module is
//! resolved: `use` trees (grouped, nested, renamed, glob), `crate::`, `self::`, `super::…`
//! from any depth (inline `mod` blocks included), paths inline in types, expressions,
//! patterns and attributes, paths inside macro invocations (their tokens are not parsed by
//! syn, so they are scanned), and paths written as strings in attributes
//! (`#[serde(default = "super::defaults::x")]`).
//!
//! A room is a top-level module of `src/` (a file or a folder). The library's rooms are the
//! `mod` lines of `lib.rs`; the binary's are `main` (what `main.rs` defines) and the `mod`
//! lines of `main.rs` (`cli`), which reach the library as `dualsync::…`.

use std::collections::BTreeSet;

use proc_macro2::{Ident, Spacing, TokenStream, TokenTree};
use syn::visit::{self, Visit};

/// Code of room `from`, at `at`, names something in room `to`.
#[derive(Debug, Clone)]
pub struct Edge {
    pub from: String,
    pub to: String,
    /// `apply/share.rs:12`: where, relative to `src/`.
    pub at: String,
}

/// The rooms of the two crates, from the `mod` lines of `lib.rs` and `main.rs`.
pub struct Rooms {
    pub lib: BTreeSet<String>,
    pub bin: BTreeSet<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Crate {
    Lib,
    Bin,
}

impl Rooms {
    /// Reads the `mod` lines of `lib.rs` and `main.rs` among `sources` (paths relative to src/).
    pub fn declared(sources: &[(String, String)], problems: &mut Vec<String>) -> Rooms {
        let mods = |root: &str, problems: &mut Vec<String>| {
            let Some((_, text)) = sources.iter().find(|(path, _)| path == root) else {
                return BTreeSet::new();
            };
            match syn::parse_file(text) {
                Ok(file) => {
                    let mut rooms = BTreeSet::new();
                    for item in &file.items {
                        match item {
                            syn::Item::Mod(m) if m.content.is_none() => {
                                unfollowable_mod(root, m, problems);
                                rooms.insert(m.ident.to_string());
                            }
                            // main.rs is a room of its own; the library's root only declares.
                            _ if root == "main.rs" => {}
                            _ => problems.push(
                                "lib.rs: holds more than `mod` lines: the library's root only \
                                 declares the rooms (move the rest into one)"
                                    .to_string(),
                            ),
                        }
                    }
                    rooms
                }
                Err(e) => {
                    problems.push(format!("{root}: does not parse: {e}"));
                    BTreeSet::new()
                }
            }
        };
        let lib = mods("lib.rs", problems);
        let mut bin = mods("main.rs", problems);
        if sources.iter().any(|(path, _)| path == "main.rs") {
            bin.insert("main".to_string());
        }
        Rooms { lib, bin }
    }

    /// Every room of both crates.
    pub fn all(&self) -> BTreeSet<String> {
        self.lib.union(&self.bin).cloned().collect()
    }

    /// The room and crate of a file (path relative to `src/`); `None` for `lib.rs`, the
    /// library's root, which only declares the rooms.
    fn of_file(&self, path: &str) -> Option<Result<(String, Crate), String>> {
        if path == "lib.rs" {
            return None;
        }
        let first = path.split('/').next().unwrap_or_default();
        let room = first.trim_end_matches(".rs").to_string();
        Some(if self.bin.contains(&room) {
            Ok((room, Crate::Bin))
        } else if self.lib.contains(&room) {
            Ok((room, Crate::Lib))
        } else {
            Err(format!(
                "{path}: `{room}` is declared by neither lib.rs nor main.rs (a file nobody compiles?)"
            ))
        })
    }
}

/// A `mod` the checker cannot follow: `#[path]` moves its file, `#[macro_use]` lends its
/// macros to rooms that never name it.
fn unfollowable_mod(file: &str, item: &syn::ItemMod, problems: &mut Vec<String>) {
    for attr in &item.attrs {
        if attr.path().is_ident("path") || attr.path().is_ident("macro_use") {
            let line = item.ident.span().start().line;
            problems.push(format!(
                "{file}:{line}: `mod {}` with #[path] or #[macro_use] hides where code comes \
                 from: use the default file and paths",
                item.ident
            ));
        }
    }
}

/// The module path of a file inside its crate: `apply/share.rs` → `[apply, share]`,
/// `apply/mod.rs` → `[apply]`, `main.rs` → `[]`.
fn module_path(path: &str) -> Vec<String> {
    if path == "main.rs" || path == "lib.rs" {
        return Vec::new();
    }
    let mut parts: Vec<String> = path
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_string)
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The room dependencies of one file, or what the checker could not resolve (a problem is a
/// failure: a path the checker cannot follow is a path that could hide an upward import).
pub fn scan(rooms: &Rooms, path: &str, text: &str, problems: &mut Vec<String>) -> Vec<Edge> {
    let (room, krate) = match rooms.of_file(path) {
        None => return Vec::new(),
        Some(Err(problem)) => {
            problems.push(problem);
            return Vec::new();
        }
        Some(Ok(found)) => found,
    };
    let file = match syn::parse_file(text) {
        Ok(file) => file,
        Err(e) => {
            let line = e.span().start().line;
            problems.push(format!("{path}:{line}: does not parse: {e}"));
            return Vec::new();
        }
    };
    let mut scanner = Scanner {
        rooms,
        file: path,
        room,
        krate,
        module: module_path(path),
        edges: Vec::new(),
        problems,
    };
    scanner.visit_file(&file);
    scanner.edges
}

struct Scanner<'a> {
    rooms: &'a Rooms,
    file: &'a str,
    room: String,
    krate: Crate,
    /// The module the code being visited is in (inline `mod` blocks pushed).
    module: Vec<String>,
    edges: Vec<Edge>,
    problems: &'a mut Vec<String>,
}

/// What a path names.
enum Target {
    Room(String),
    /// Something outside both crates (std, a dependency) or inside the current room.
    Elsewhere,
}

impl Scanner<'_> {
    /// Records the room that `segments` (a path as written here) names.
    fn path(&mut self, leading_colon: bool, segments: &[String], line: usize) {
        match self.resolve(leading_colon, segments) {
            Ok(Target::Room(to)) => {
                if to != self.room {
                    self.edges.push(Edge {
                        from: self.room.clone(),
                        to,
                        at: format!("{}:{line}", self.file),
                    });
                }
            }
            Ok(Target::Elsewhere) => {}
            Err(why) => self.problems.push(format!(
                "{}:{line}: `{}{}` {why}",
                self.file,
                if leading_colon { "::" } else { "" },
                segments.join("::")
            )),
        }
    }

    fn resolve(&self, leading_colon: bool, segments: &[String]) -> Result<Target, String> {
        let Some(first) = segments.first() else {
            return Ok(Target::Elsewhere);
        };
        if leading_colon || (first == "dualsync" && self.krate == Crate::Bin) {
            // `::name` is always a crate name; `dualsync` from the binary is the library.
            if first != "dualsync" {
                return Ok(Target::Elsewhere);
            }
            return self.room_in(Crate::Lib, &segments[1..]);
        }
        let absolute: Vec<String> = match first.as_str() {
            "crate" => segments[1..].to_vec(),
            "self" | "super" => {
                let mut module = self.module.clone();
                let mut rest = segments;
                if rest.first().is_some_and(|s| s == "self") {
                    rest = &rest[1..];
                }
                while rest.first().is_some_and(|s| s == "super") {
                    if module.pop().is_none() {
                        return Err("goes above the crate root".to_string());
                    }
                    rest = &rest[1..];
                }
                module.extend(rest.iter().cloned());
                module
            }
            // At a crate root, a bare name may be one of its rooms (`cli::…` in main.rs);
            // elsewhere it is a name of this module, of the prelude or of a dependency.
            _ if self.module.is_empty() => {
                let own = match self.krate {
                    Crate::Lib => &self.rooms.lib,
                    Crate::Bin => &self.rooms.bin,
                };
                if !own.contains(first) {
                    return Ok(Target::Elsewhere);
                }
                segments.to_vec()
            }
            _ => return Ok(Target::Elsewhere),
        };
        self.room_in(self.krate, &absolute)
    }

    /// The room of a path from a crate's root.
    fn room_in(&self, krate: Crate, absolute: &[String]) -> Result<Target, String> {
        let Some(first) = absolute.first() else {
            if krate == Crate::Bin {
                return Ok(Target::Room("main".to_string())); // main.rs is the binary's root
            }
            return Err(
                "names the crate root itself, which hides what is used: name the room".into(),
            );
        };
        match krate {
            Crate::Lib if self.rooms.lib.contains(first) => Ok(Target::Room(first.clone())),
            Crate::Lib => Err(format!("names `{first}`, which is no room of the library")),
            Crate::Bin if self.rooms.bin.contains(first) => Ok(Target::Room(first.clone())),
            // Anything else at the binary's root is defined in main.rs.
            Crate::Bin => Ok(Target::Room("main".to_string())),
        }
    }

    /// A `use` tree below `prefix`.
    fn use_tree(&mut self, leading_colon: bool, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        let line = |ident: &Ident| ident.span().start().line;
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(leading_colon, prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(syn::UseName { ident })
            | syn::UseTree::Rename(syn::UseRename { ident, .. }) => {
                let mut full = prefix.clone();
                // `use a::{self}` imports `a` itself.
                if ident != "self" || full.is_empty() {
                    full.push(ident.to_string());
                }
                self.path(leading_colon, &full, line(ident));
            }
            syn::UseTree::Glob(glob) => {
                let at = glob.star_token.span.start().line;
                self.path(leading_colon, &prefix.clone(), at);
            }
            syn::UseTree::Group(group) => {
                for item in &group.items {
                    self.use_tree(leading_colon, prefix, item);
                }
            }
        }
    }

    /// Paths in tokens syn leaves unparsed (macro arguments, attribute arguments): every
    /// `a::b…` sequence and, with `strings` (attributes, whose derives read them as paths:
    /// `#[serde(default = "…")]`), string literals that parse as a path of two or more
    /// segments. A macro's strings are text (format strings), not paths.
    fn tokens(&mut self, tokens: TokenStream, strings: bool) {
        let tokens: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < tokens.len() {
            let start = i;
            let leading_colon = is_colon2(&tokens, i);
            if leading_colon {
                i += 2;
            }
            let mut segments = Vec::new();
            let mut line = 0;
            while let Some(TokenTree::Ident(ident)) = tokens.get(i) {
                if segments.is_empty() {
                    line = ident.span().start().line;
                }
                segments.push(ident.to_string());
                i += 1;
                if !is_colon2(&tokens, i) {
                    break;
                }
                i += 2;
            }
            if segments.len() >= 2 || (leading_colon && !segments.is_empty()) {
                self.path(leading_colon, &segments, line);
            }
            if i == start {
                match &tokens[i] {
                    TokenTree::Group(group) => self.tokens(group.stream(), strings),
                    TokenTree::Literal(literal) if strings => self.string_path(literal),
                    _ => {}
                }
                i += 1;
            }
        }
    }

    /// A string literal that holds a path (`"super::defaults::x"`, as serde takes them).
    fn string_path(&mut self, literal: &proc_macro2::Literal) {
        let syn::Lit::Str(text) = syn::Lit::new(literal.clone()) else {
            return;
        };
        if let Ok(path) = syn::parse_str::<syn::Path>(&text.value()) {
            if path.segments.len() >= 2 || path.leading_colon.is_some() {
                let segments = segments(&path);
                self.path(
                    path.leading_colon.is_some(),
                    &segments,
                    literal.span().start().line,
                );
            }
        }
    }
}

fn is_colon2(tokens: &[TokenTree], i: usize) -> bool {
    matches!(
        (tokens.get(i), tokens.get(i + 1)),
        (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b)))
            if a.as_char() == ':' && a.spacing() == Spacing::Joint && b.as_char() == ':'
    )
}

fn segments(path: &syn::Path) -> Vec<String> {
    path.segments.iter().map(|s| s.ident.to_string()).collect()
}

impl<'ast> Visit<'ast> for Scanner<'_> {
    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        unfollowable_mod(self.file, item, self.problems);
        // A `mod x;` line is the file x.rs, scanned on its own; a `mod x { … }` block is code.
        if item.content.is_some() {
            self.module.push(item.ident.to_string());
            visit::visit_item_mod(self, item);
            self.module.pop();
        }
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        for attr in &item.attrs {
            self.visit_attribute(attr);
        }
        self.use_tree(item.leading_colon.is_some(), &mut Vec::new(), &item.tree);
    }

    fn visit_item_extern_crate(&mut self, item: &'ast syn::ItemExternCrate) {
        let line = item.ident.span().start().line;
        self.problems.push(format!(
            "{}:{line}: `extern crate` can rename a crate behind the checker's back: use a path",
            self.file
        ));
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        // One segment is a local name (`self` the receiver, a type, a variable), never a room.
        if path.segments.len() >= 2 || path.leading_colon.is_some() {
            let line = path.segments[0].ident.span().start().line;
            self.path(path.leading_colon.is_some(), &segments(path), line);
        }
        visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        if mac.path.is_ident("include") {
            let line = mac.path.segments[0].ident.span().start().line;
            self.problems.push(format!(
                "{}:{line}: include! pastes code from another file behind the checker's back: \
                 make it a module",
                self.file
            ));
        }
        visit::visit_macro(self, mac);
        self.tokens(mac.tokens.clone(), false);
    }

    fn visit_attribute(&mut self, attr: &'ast syn::Attribute) {
        if attr.path().is_ident("doc") {
            return; // prose: intra-doc links are no dependency
        }
        visit::visit_attribute(self, attr);
        match &attr.meta {
            syn::Meta::List(list) => self.tokens(list.tokens.clone(), true),
            syn::Meta::NameValue(nv) => {
                if let syn::Expr::Lit(syn::ExprLit {
                    lit: syn::Lit::Str(s),
                    ..
                }) = &nv.value
                {
                    self.string_path(&s.token());
                }
            }
            syn::Meta::Path(_) => {}
        }
    }

    fn visit_visibility(&mut self, _: &'ast syn::Visibility) {
        // `pub(in crate::a)` restricts who sees an item; it uses nothing.
    }
}
