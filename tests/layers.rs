//! The module layering that docs/design.md describes holds in the code.
//!
//! Goal: a top-level module of the crate refers only to modules listed before it in the fenced
//! block under "## Layers" in docs/design.md, and that block names every module src/lib.rs
//! declares, so the document and the code cannot drift apart. Method: every `.rs` file under
//! src/ (except lib.rs and main.rs) is mapped to its top-level module (src/engine/write.rs ->
//! engine); comments, doc comments, string and character literals are blanked; `#[cfg(test)]`
//! modules (inline `mod tests { .. }` and file modules declared `#[cfg(test)] mod tests;`) are
//! skipped, since test code is not part of the layering; every remaining `crate::x` path (also
//! inside `use crate::{a, b::c}` groups) is resolved to the module `x` names or, for an item the
//! crate root re-exports (`crate::Error`), to the module it comes from. A reference to a module
//! later in the list fails, naming file, line and both modules, unless [`ALLOWED`] lists it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// References to a higher module that are accepted, as (from, to, why). An entry that matches no
/// reference any more fails the test, so a back-edge that is fixed is also removed here.
const ALLOWED: &[(&str, &str, &str)] = &[
    (
        "error",
        "ids",
        "the error variants name the session they concern (`UnknownSession(SessionId)` and \
         others), while `ids` builds its checked values with `Error::invalid`: the two are \
         mutually dependent; `error` sits lower because every module returns `crate::Result`",
    ),
    (
        "error",
        "state",
        "`NotActive` and `ExtentTerminated` carry the session's state and the extent's reason as \
         typed values, which a caller matches on; `state` builds nothing with `Error`",
    ),
    (
        "error",
        "activity",
        "`Corruption::BadVersion` prints the table format version this build reads, \
         `activity::format::FORMAT_VERSION`; carrying it in the variant instead would change a \
         public error type",
    ),
];

/// A token of Rust source after comments and literals are blanked: its text and 1-based line.
#[derive(Debug, Clone, PartialEq)]
struct Token {
    text: String,
    line: usize,
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `Some(number of #)` when a raw string literal (`r"`, `r#"`, `br#"`) starts at `i`.
fn raw_string_start(c: &[char], i: usize) -> Option<usize> {
    if c[i] != 'r' {
        return None;
    }
    let starts_token = match i {
        0 => true,
        1 => !is_ident_char(c[0]) || c[0] == 'b',
        _ => !is_ident_char(c[i - 1]) || (c[i - 1] == 'b' && !is_ident_char(c[i - 2])),
    };
    if !starts_token {
        return None;
    }
    let hashes = c[i + 1..].iter().take_while(|&&x| x == '#').count();
    (c.get(i + 1 + hashes) == Some(&'"')).then_some(hashes)
}

/// `src` with comments (line, block, doc), string literals and character literals replaced by
/// spaces; newlines are kept, so line numbers stay the same.
fn blank_non_code(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |out: &mut String, ch: char| out.push(if ch == '\n' { '\n' } else { ' ' });
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        let next = c.get(i + 1).copied();
        if ch == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if ch == '/' && next == Some('*') {
            let mut depth = 0usize;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
        } else if let Some(hashes) = raw_string_start(&c, i) {
            // `r`, the hashes and the opening quote.
            for _ in 0..hashes + 2 {
                out.push(' ');
            }
            i += hashes + 2;
            while i < c.len() {
                if c[i] == '"' && c[i + 1..].iter().take_while(|&&x| x == '#').count() >= hashes {
                    for _ in 0..hashes + 1 {
                        out.push(' ');
                    }
                    i += hashes + 1;
                    break;
                }
                blank(&mut out, c[i]);
                i += 1;
            }
        } else if ch == '"' {
            out.push(' ');
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' && i + 1 < c.len() {
                    blank(&mut out, c[i]);
                    i += 1;
                }
                blank(&mut out, c[i]);
                i += 1;
            }
            if i < c.len() {
                out.push(' ');
                i += 1;
            }
        } else if ch == '\'' && next == Some('\\') {
            // An escaped character literal: '\n', '\'', '\u{1F600}'.
            out.push_str("  ");
            i += 2;
            if i < c.len() {
                blank(&mut out, c[i]);
                i += 1;
            }
            while i < c.len() && c[i] != '\'' {
                blank(&mut out, c[i]);
                i += 1;
            }
            if i < c.len() {
                out.push(' ');
                i += 1;
            }
        } else if ch == '\'' && c.get(i + 2) == Some(&'\'') {
            // A one-character literal: 'a', '"'.
            let inner = c[i + 1];
            out.push(' ');
            blank(&mut out, inner);
            out.push(' ');
            i += 3;
        } else {
            // Code, including the quote of a lifetime ('a, 'static).
            out.push(ch);
            i += 1;
        }
    }
    out
}

/// The tokens of blanked source: identifiers, `::`, and single punctuation characters.
fn tokenize(code: &str) -> Vec<Token> {
    let c: Vec<char> = code.chars().collect();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if is_ident_char(ch) {
            let start = i;
            while i < c.len() && is_ident_char(c[i]) {
                i += 1;
            }
            tokens.push(Token {
                text: c[start..i].iter().collect(),
                line,
            });
        } else if ch == ':' && c.get(i + 1) == Some(&':') {
            tokens.push(Token {
                text: "::".into(),
                line,
            });
            i += 2;
        } else {
            tokens.push(Token {
                text: ch.to_string(),
                line,
            });
            i += 1;
        }
    }
    tokens
}

fn is_ident(t: &str) -> bool {
    t.chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
}

/// Index just past the bracket that closes the one opened at `open` (`[`, `(` or `{`).
fn past_matching(tokens: &[Token], open: usize) -> usize {
    let (o, c) = match tokens[open].text.as_str() {
        "[" => ("[", "]"),
        "(" => ("(", ")"),
        _ => ("{", "}"),
    };
    let mut depth = 0usize;
    for (k, t) in tokens.iter().enumerate().skip(open) {
        if t.text == o {
            depth += 1;
        } else if t.text == c {
            depth -= 1;
            if depth == 0 {
                return k + 1;
            }
        }
    }
    tokens.len()
}

fn text(tokens: &[Token], i: usize) -> &str {
    tokens.get(i).map_or("", |t| t.text.as_str())
}

/// `tokens` without the bodies of inline `#[cfg(test)]` modules, and the names of the file
/// modules declared `#[cfg(test)] mod name;`.
fn drop_test_modules(tokens: &[Token]) -> (Vec<Token>, Vec<String>) {
    let cfg_test = ["#", "[", "cfg", "(", "test", ")", "]"];
    let mut kept = Vec::new();
    let mut test_files = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let is_cfg_test = (0..cfg_test.len()).all(|k| text(tokens, i + k) == cfg_test[k]);
        if is_cfg_test {
            // Further outer attributes, then `pub` or `pub(..)`, then `mod name`.
            let mut j = i + cfg_test.len();
            while text(tokens, j) == "#" && text(tokens, j + 1) == "[" {
                j = past_matching(tokens, j + 1);
            }
            if text(tokens, j) == "pub" {
                j += 1;
                if text(tokens, j) == "(" {
                    j = past_matching(tokens, j);
                }
            }
            if text(tokens, j) == "mod" && is_ident(text(tokens, j + 1)) {
                match text(tokens, j + 2) {
                    "{" => {
                        i = past_matching(tokens, j + 2);
                        continue;
                    }
                    ";" => test_files.push(text(tokens, j + 1).to_string()),
                    _ => {}
                }
            }
        }
        kept.push(tokens[i].clone());
        i += 1;
    }
    (kept, test_files)
}

/// Every `crate::name` in `tokens` (also each `name` of `crate::{name, name::x}`), with its line.
fn crate_refs(tokens: &[Token]) -> Vec<(String, usize)> {
    let mut refs = Vec::new();
    for i in 0..tokens.len() {
        if tokens[i].text != "crate" || text(tokens, i + 1) != "::" {
            continue;
        }
        let first = text(tokens, i + 2);
        if is_ident(first) {
            refs.push((first.to_string(), tokens[i + 2].line));
        } else if first == "{" {
            let end = past_matching(tokens, i + 2);
            let mut depth = 0usize;
            let mut expect_item = false;
            for t in &tokens[i + 2..end] {
                match t.text.as_str() {
                    "{" => {
                        depth += 1;
                        expect_item = depth == 1;
                    }
                    "}" => depth -= 1,
                    "," if depth == 1 => expect_item = true,
                    name if expect_item && is_ident(name) => {
                        if name != "self" {
                            refs.push((name.to_string(), t.line));
                        }
                        expect_item = false;
                    }
                    _ => expect_item = false,
                }
            }
        }
    }
    refs
}

/// What src/lib.rs declares at its top level: its file modules (`mod x;`) in order, and the
/// items it re-exports by name (`pub use x::{A, b::C}`), each mapped to the first segment of its
/// path. Inline modules (`mod prelude { .. }`) are facades over the layers, not layers: they are
/// skipped with their bodies.
fn lib_rs(src: &str) -> (Vec<String>, BTreeMap<String, String>) {
    let tokens = tokenize(&blank_non_code(src));
    let mut modules = Vec::new();
    let mut reexports = BTreeMap::new();
    let mut i = 0;
    while i < tokens.len() {
        let t = tokens[i].text.as_str();
        if t == "mod" && is_ident(text(&tokens, i + 1)) {
            if text(&tokens, i + 2) == "{" {
                i = past_matching(&tokens, i + 2);
                continue;
            }
            modules.push(tokens[i + 1].text.clone());
        } else if t == "use" {
            let end = (i..tokens.len())
                .find(|&k| tokens[k].text == ";")
                .unwrap_or(tokens.len());
            let mut first = i + 1;
            if matches!(text(&tokens, first), "crate" | "self") && text(&tokens, first + 1) == "::"
            {
                first += 2;
            }
            let from = text(&tokens, first).to_string();
            // The name each leaf is known by at the root: the identifier before `,`, `}` or `;`.
            for k in first + 1..end {
                let next = text(&tokens, k + 1);
                if is_ident(&tokens[k].text) && matches!(next, "," | "}" | ";") {
                    reexports.insert(tokens[k].text.clone(), from.clone());
                }
            }
            i = end;
        } else if t == "{" {
            // The body of a function, an impl or a macro at the top level: nothing in it
            // declares a module or re-exports at the root.
            i = past_matching(&tokens, i);
            continue;
        }
        i += 1;
    }
    (modules, reexports)
}

/// The modules named in the fenced block under "## Layers" in `design`, lowest first: the first
/// word of each line that does not start with white space (a trailing `/` or `.rs` is dropped).
fn layer_list(design: &str) -> Vec<String> {
    let mut lines = design
        .lines()
        .skip_while(|l| l.trim_end() != "## Layers")
        .skip(1)
        .take_while(|l| !l.starts_with("## "));
    assert!(
        lines.any(|l| l.starts_with("```")),
        "docs/design.md has no fenced block under \"## Layers\""
    );
    lines
        .take_while(|l| !l.starts_with("```"))
        .filter(|l| !l.is_empty() && !l.starts_with(char::is_whitespace))
        .filter_map(|l| l.split_whitespace().next())
        .map(|w| {
            let w = w.strip_suffix('/').unwrap_or(w);
            w.strip_suffix(".rs").unwrap_or(w).to_string()
        })
        .collect()
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The directory holding the file modules that `file` declares (`mod x;` -> DIR/x.rs).
fn child_dir(file: &Path) -> PathBuf {
    let parent = file.parent().expect("file in a directory");
    match file.file_stem().and_then(|s| s.to_str()) {
        Some("mod" | "lib" | "main") => parent.to_path_buf(),
        Some(stem) => parent.join(stem),
        None => parent.to_path_buf(),
    }
}

/// A reference from one top-level module to another.
#[derive(Debug)]
struct Edge {
    file: String,
    line: usize,
    from: String,
    to: String,
}

/// Every reference between different top-level modules in the crate at `root` (not counting
/// test modules), or messages about what could not be resolved.
fn edges(root: &Path, modules: &[String], reexports: &BTreeMap<String, String>) -> Vec<Edge> {
    let src = root.join("src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    let mut parsed = Vec::new();
    // Files and directories that hold `#[cfg(test)]` file modules (and their children).
    let mut test_only: Vec<PathBuf> = Vec::new();
    for f in &files {
        let source =
            std::fs::read_to_string(f).unwrap_or_else(|e| panic!("read {}: {e}", f.display()));
        let (tokens, test_files) = drop_test_modules(&tokenize(&blank_non_code(&source)));
        for name in test_files {
            let dir = child_dir(f);
            test_only.push(dir.join(format!("{name}.rs")));
            test_only.push(dir.join(name));
        }
        parsed.push((f.clone(), tokens));
    }
    let mut found = Vec::new();
    for (f, tokens) in parsed {
        let rel = f.strip_prefix(root).expect("under root");
        let inner = f.strip_prefix(&src).expect("under src");
        if inner == Path::new("lib.rs") || inner == Path::new("main.rs") {
            continue;
        }
        if test_only.iter().any(|t| f.starts_with(t)) {
            continue;
        }
        let first = inner.components().next().expect("a file name");
        let first = first.as_os_str().to_str().expect("UTF-8 path");
        let from = first.strip_suffix(".rs").unwrap_or(first).to_string();
        assert!(
            modules.contains(&from),
            "{}: module `{from}` is not declared in src/lib.rs",
            rel.display()
        );
        for (name, line) in crate_refs(&tokens) {
            let to = if modules.contains(&name) {
                name
            } else if let Some(m) = reexports.get(&name).filter(|m| modules.contains(m)) {
                m.clone()
            } else {
                panic!(
                    "{}:{line}: `crate::{name}` is neither a module of src/lib.rs nor an item it \
                     re-exports",
                    rel.display()
                )
            };
            if to != from {
                found.push(Edge {
                    file: rel.display().to_string(),
                    line,
                    from: from.clone(),
                    to,
                });
            }
        }
    }
    found
}

/// Problems with the layering of the crate at `root`, one message each.
fn violations(root: &Path) -> Vec<String> {
    let design = std::fs::read_to_string(root.join("docs/design.md")).expect("read design.md");
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).expect("read lib.rs");
    let layers = layer_list(&design);
    let (modules, reexports) = lib_rs(&lib);
    let mut problems = Vec::new();
    for m in &modules {
        if !layers.contains(m) {
            problems.push(format!(
                "module `{m}` (src/lib.rs) is missing from the layer list in docs/design.md"
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for l in &layers {
        if !modules.contains(l) {
            problems.push(format!(
                "the layer list in docs/design.md names `{l}`, which src/lib.rs does not declare"
            ));
        }
        if !seen.insert(l) {
            problems.push(format!(
                "the layer list in docs/design.md names `{l}` twice"
            ));
        }
    }
    if !problems.is_empty() {
        return problems;
    }
    let rank = |m: &str| layers.iter().position(|l| l == m).expect("listed");
    let mut used_allowances = BTreeSet::new();
    for e in edges(root, &modules, &reexports) {
        if rank(&e.to) < rank(&e.from) {
            continue;
        }
        if let Some(k) = ALLOWED
            .iter()
            .position(|&(from, to, _)| from == e.from && to == e.to)
        {
            used_allowances.insert(k);
            continue;
        }
        problems.push(format!(
            "{}:{}: `{}` refers to `{}`, which is higher in the layer list (docs/design.md, \
             \"## Layers\")",
            e.file, e.line, e.from, e.to
        ));
    }
    for (k, (from, to, why)) in ALLOWED.iter().enumerate() {
        if !used_allowances.contains(&k) {
            problems.push(format!(
                "the allowed reference from `{from}` to `{to}` in tests/layers.rs ({why}) no \
                 longer occurs or no longer goes upward: remove it"
            ));
        }
    }
    problems
}

#[test]
fn modules_refer_only_to_lower_layers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let problems = violations(root);
    assert!(
        problems.is_empty(),
        "the module layering is broken:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn blanking_keeps_code_and_lines_only() {
    let src = "use crate::a; // crate::b\n/* crate::c /* nested */ crate::d */ let s = \
               \"crate::e\\\"\"; let r = r#\"crate::f\"#;\nlet c = '\"'; fn f<'a>(x: &'a u8) \
               { crate::g::h(); }\n/// crate::i\nlet q = '\\''; crate::{j, k::{l, m}, self};";
    let tokens = tokenize(&blank_non_code(src));
    let refs = crate_refs(&tokens);
    let want: Vec<(String, usize)> = [("a", 1), ("g", 3), ("j", 5), ("k", 5)]
        .iter()
        .map(|&(n, l)| (n.to_string(), l))
        .collect();
    assert_eq!(refs, want);
}

#[test]
fn test_modules_are_skipped() {
    let src = "#[cfg(test)]\n#[allow(x)]\nmod tests { use crate::a; }\n#[cfg(test)]\nmod more;\n\
               #[cfg(test)]\nfn helper() { crate::b::f(); }\nmod real { use crate::c; }";
    let (tokens, files) = drop_test_modules(&tokenize(&blank_non_code(src)));
    let names: Vec<String> = crate_refs(&tokens).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["b", "c"]);
    assert_eq!(files, ["more"]);
}

#[test]
fn layer_list_and_lib_rs_are_read() {
    let design = "# x\n## Layers\n\ntext\n```\nunits      sizes\n           more\nengine/    \
                  the engine\n```\n## Next\n```\nnot this\n```\n";
    assert_eq!(layer_list(design), ["units", "engine"]);
    let lib = "pub mod a;\n#[cfg(feature = \"f\")]\npub mod b;\npub use a::{Error, Result};\n\
               /// doc\npub use b::inner::thing;\npub use self::b::Other;\n\
               pub mod prelude {\n    pub use crate::a::Error;\n    pub use crate::b::Inner;\n}\n";
    let (modules, reexports) = lib_rs(lib);
    assert_eq!(modules, ["a", "b"]);
    assert_eq!(reexports.get("Error").map(String::as_str), Some("a"));
    assert_eq!(reexports.get("Result").map(String::as_str), Some("a"));
    assert_eq!(reexports.get("thing").map(String::as_str), Some("b"));
    assert_eq!(reexports.get("Other").map(String::as_str), Some("b"));
    assert_eq!(reexports.get("Inner"), None);
}
