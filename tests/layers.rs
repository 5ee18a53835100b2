//! The layer check: dependencies inside berth run one way.
//!
//! Reads every `src/**/*.rs`, maps each file to its top-level module, and
//! collects the modules it refers to (`crate::x`, `use crate::{x, y}`,
//! `super::` paths that leave the module, and `berth::x` in the binary).
//! It fails when a module refers to one in a higher layer, or when modules
//! refer to each other in a cycle. Comments and string literals are not
//! read as code. Run it alone with `cargo test --test layers`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The architecture in one line: layers from the top, `>` between layers.
/// A module may refer to modules in its own layer (one way) or below.
const LAYERS: &str = "main demo > app > admin status reload rebalance drain listener > proxy \
                      > balancer auth affinity ws routing lifecycle \
                      > config metrics body io limits tls tls_stream";

/// Upward references that another branch removes, with the reason. Each
/// must still occur: once it is gone, its entry must go too.
const PENDING: &[(&str, &str, &str)] = &[];

#[test]
fn the_source_tree_respects_the_layers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    collect(&root.join("src"), root, &mut files);
    assert!(files.len() > 10, "found only {} source files", files.len());
    let problems = check(&files, LAYERS, PENDING);
    assert!(
        problems.is_empty(),
        "layer check failed (order: {LAYERS}):\n{}",
        problems.join("\n")
    );
}

fn collect(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.push((rel, std::fs::read_to_string(&path).unwrap()));
        }
    }
}

/// One reference from a file to another top-level module.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Edge {
    from: String,
    to: String,
    /// `file:line` of the first reference.
    at: String,
}

/// Every problem in `files` (path relative to the crate, contents), as
/// `file:line: message` lines; empty when the layers hold.
fn check(files: &[(String, String)], layers: &str, pending: &[(&str, &str, &str)]) -> Vec<String> {
    let rank: BTreeMap<&str, usize> = layers
        .split('>')
        .enumerate()
        .flat_map(|(i, layer)| layer.split_whitespace().map(move |m| (m, i)))
        .collect();
    let mut problems = Vec::new();
    let mut edges: Vec<Edge> = Vec::new();
    for (path, text) in files {
        let Some(module) = module_path(path) else {
            continue;
        };
        if !rank.contains_key(module[0].as_str()) {
            problems.push(format!("{path}:1: module {} is in no layer", module[0]));
        }
        for (to, line) in references(&module, text) {
            if to != module[0] && !edges.iter().any(|e| e.from == module[0] && e.to == to) {
                edges.push(Edge {
                    from: module[0].clone(),
                    to,
                    at: format!("{path}:{line}"),
                });
            }
        }
    }
    let mut used_pending = BTreeSet::new();
    for e in &edges {
        let (Some(&from), Some(&to)) = (rank.get(e.from.as_str()), rank.get(e.to.as_str())) else {
            if !rank.contains_key(e.to.as_str()) {
                problems.push(format!(
                    "{}: {} refers to {}, which is in no layer",
                    e.at, e.from, e.to
                ));
            }
            continue;
        };
        if to < from {
            if let Some(p) = pending.iter().find(|p| p.0 == e.from && p.1 == e.to) {
                used_pending.insert((p.0, p.1));
                continue;
            }
            problems.push(format!(
                "{}: {} (layer {from}) imports {} (layer {to}), a higher layer",
                e.at, e.from, e.to
            ));
        }
    }
    for p in pending {
        if !used_pending.contains(&(p.0, p.1)) {
            problems.push(format!(
                "tests/layers.rs: the pending exception {} -> {} is no longer needed; remove it",
                p.0, p.1
            ));
        }
    }
    for cycle in cycles(&edges) {
        problems.push(format!("import cycle: {cycle}"));
    }
    problems
}

/// `src/a/b.rs` -> `[a, b]`, `src/a/mod.rs` -> `[a]`, `src/main.rs` ->
/// `[main]`; `None` for the crate root `src/lib.rs`.
fn module_path(path: &str) -> Option<Vec<String>> {
    let rel = path.replace('\\', "/");
    let rel = rel.strip_prefix("src/")?.strip_suffix(".rs")?;
    if rel == "lib" {
        return None;
    }
    let mut parts: Vec<String> = rel.split('/').map(str::to_string).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    Some(parts)
}

/// The top-level modules `text` (the file of `module`) refers to, each
/// with a line number, in order of appearance.
fn references(module: &[String], text: &str) -> Vec<(String, usize)> {
    let tokens = tokenize(&strip(text));
    // The binary is its own crate: it reaches the library as `berth::`.
    let root = if module == ["main"] { "berth" } else { "crate" };
    let mut out = Vec::new();
    // Inline modules open at a brace depth: `mod tests { use super::*; }`.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < tokens.len() {
        let (tok, line) = (&tokens[i].0, tokens[i].1);
        match tok.as_str() {
            "{" => depth += 1,
            "}" => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            "mod" if tokens.get(i + 2).is_some_and(|t| t.0 == "{") => {
                inline.push((tokens[i + 1].0.clone(), depth));
            }
            _ => {}
        }
        let after_dollar = i > 0 && tokens[i - 1].0 == "$";
        let after_path = i > 0 && tokens[i - 1].0 == "::";
        if !after_dollar && !after_path && tokens.get(i + 1).is_some_and(|t| t.0 == "::") {
            if tok == root {
                out.extend(targets(&tokens, i + 2).into_iter().map(|t| (t, line)));
            } else if tok == "super" {
                let mut here: Vec<String> = module.to_vec();
                here.extend(inline.iter().map(|(m, _)| m.clone()));
                let mut j = i;
                while tokens.get(j).is_some_and(|t| t.0 == "super")
                    && tokens.get(j + 1).is_some_and(|t| t.0 == "::")
                {
                    here.pop();
                    j += 2;
                }
                if here.is_empty() {
                    out.extend(targets(&tokens, j).into_iter().map(|t| (t, line)));
                }
            }
        }
        i += 1;
    }
    out
}

/// The first segments named at `tokens[at..]`: one identifier, or each
/// entry of a `{...}` group.
fn targets(tokens: &[(String, usize)], at: usize) -> Vec<String> {
    let Some((first, _)) = tokens.get(at) else {
        return Vec::new();
    };
    if first != "{" {
        return if is_ident(first) && first != "self" {
            vec![first.clone()]
        } else {
            Vec::new()
        };
    }
    let mut out = Vec::new();
    let mut depth = 0;
    let mut expect_entry = true;
    for (tok, _) in &tokens[at..] {
        match tok.as_str() {
            "{" => {
                depth += 1;
                if depth > 1 {
                    expect_entry = false;
                }
            }
            "}" => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            "," if depth == 1 => expect_entry = true,
            t if depth == 1 && expect_entry => {
                if is_ident(t) && t != "self" {
                    out.push(t.to_string());
                }
                expect_entry = false;
            }
            _ => {}
        }
    }
    out
}

fn is_ident(t: &str) -> bool {
    t.chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
        && t.chars().all(|c| c.is_alphanumeric() || c == '_')
}

/// Identifiers, `::`, and single punctuation characters, with line numbers.
fn tokenize(code: &str) -> Vec<(String, usize)> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push((chars[start..i].iter().collect(), line));
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push(("::".to_string(), line));
            i += 2;
        } else {
            out.push((c.to_string(), line));
            i += 1;
        }
    }
    out
}

/// `text` with comments and the contents of string and character literals
/// blanked out (newlines kept, so line numbers stay right).
fn strip(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let keep_lines = |s: &[char], out: &mut String| {
        out.extend(s.iter().filter(|&&ch| ch == '\n'));
        out.push(' ');
    };
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut i = 0;
    while i < c.len() {
        let prev_ident = i > 0 && ident(c[i - 1]);
        if c[i] == '/' && c.get(i + 1) == Some(&'/') {
            let end = (i..c.len()).find(|&j| c[j] == '\n').unwrap_or(c.len());
            i = end;
        } else if c[i] == '/' && c.get(i + 1) == Some(&'*') {
            let (mut j, mut nest) = (i + 2, 1);
            while j < c.len() && nest > 0 {
                if c[j] == '/' && c.get(j + 1) == Some(&'*') {
                    nest += 1;
                    j += 2;
                } else if c[j] == '*' && c.get(j + 1) == Some(&'/') {
                    nest -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            keep_lines(&c[i..j], &mut out);
            i = j;
        } else if !prev_ident && raw_string_start(&c, i).is_some() {
            let (hashes, open) = raw_string_start(&c, i).unwrap_or((0, i));
            let mut j = open + 1;
            while j < c.len() && !(c[j] == '"' && (1..=hashes).all(|k| c.get(j + k) == Some(&'#')))
            {
                j += 1;
            }
            let end = (j + 1 + hashes).min(c.len());
            keep_lines(&c[i..end], &mut out);
            i = end;
        } else if c[i] == '"' {
            let mut j = i + 1;
            while j < c.len() && c[j] != '"' {
                j += if c[j] == '\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(c.len());
            keep_lines(&c[i..end], &mut out);
            i = end;
        } else if c[i] == '\'' && c.get(i + 1) == Some(&'\\') {
            // An escape: the character after the backslash may be a quote.
            let end = (i + 3..c.len())
                .find(|&j| c[j] == '\'')
                .map_or(c.len(), |j| j + 1);
            out.push(' ');
            i = end;
        } else if c[i] == '\'' && c.get(i + 2) == Some(&'\'') {
            out.push(' ');
            i += 3;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// `r"`, `r#"`, `br##"`...: the number of `#` and the index of the `"`.
fn raw_string_start(c: &[char], i: usize) -> Option<(usize, usize)> {
    let mut j = i;
    if c.get(j) == Some(&'b') {
        j += 1;
    }
    if c.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let hashes = (j..c.len()).take_while(|&k| c[k] == '#').count();
    (c.get(j + hashes) == Some(&'"')).then_some((hashes, j + hashes))
}

/// Every pair of modules that import each other, and the shortest cycle
/// through each module that is on a longer one; each cycle once, written
/// `a (file:line) -> b (file:line) -> a`, where each place is the
/// reference that makes the arrow.
fn cycles(edges: &[Edge]) -> Vec<String> {
    let nodes: BTreeSet<&str> = edges.iter().map(|e| e.from.as_str()).collect();
    let mut found: BTreeMap<Vec<&str>, String> = BTreeMap::new();
    for ab in edges.iter().filter(|e| e.from < e.to) {
        if let Some(ba) = edges.iter().find(|e| e.from == ab.to && e.to == ab.from) {
            found.insert(
                vec![ab.from.as_str(), ab.to.as_str()],
                format!(
                    "{} ({}) -> {} ({}) -> {}",
                    ab.from, ab.at, ab.to, ba.at, ab.from
                ),
            );
        }
    }
    for &start in &nodes {
        // Breadth first from `start`, remembering how each module was reached.
        let mut came: BTreeMap<&str, &Edge> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([start]);
        let mut back = None;
        'search: while let Some(n) = queue.pop_front() {
            for e in edges.iter().filter(|e| e.from == n) {
                if e.to == start {
                    back = Some(e);
                    break 'search;
                }
                if !came.contains_key(e.to.as_str()) {
                    came.insert(e.to.as_str(), e);
                    queue.push_back(e.to.as_str());
                }
            }
        }
        let Some(mut edge) = back else { continue };
        let mut path = vec![edge];
        while edge.from != start {
            edge = came[edge.from.as_str()];
            path.push(edge);
        }
        path.reverse();
        // The same cycle found from another of its modules reads the same.
        let first = (0..path.len()).min_by_key(|&i| &path[i].from).unwrap_or(0);
        path.rotate_left(first);
        let key: Vec<&str> = path.iter().map(|e| e.from.as_str()).collect();
        let mut text = String::new();
        for e in &path {
            text.push_str(&format!("{} ({}) -> ", e.from, e.at));
        }
        text.push_str(&path[0].from);
        found.entry(key).or_insert(text);
    }
    found.into_values().collect()
}

#[cfg(test)]
mod checker {
    use super::*;

    fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(p, t)| (p.to_string(), t.to_string()))
            .collect()
    }

    const SMALL: &str = "top > mid other > low";

    #[test]
    fn a_planted_upward_import_and_cycle_are_both_reported() {
        let tree = files(&[
            (
                "src/lib.rs",
                "pub mod top; pub mod mid; pub mod other; pub mod low;",
            ),
            ("src/top.rs", "use crate::mid::Thing;\n"),
            // mid <-> other: a cycle inside one layer.
            (
                "src/mid.rs",
                "use crate::low::Base;\nuse crate::other::Peer;\n",
            ),
            ("src/other/mod.rs", "mod inner;\n"),
            (
                "src/other/inner.rs",
                "fn f() {\n    super::super::mid::g();\n}\n",
            ),
            // low -> top: upward.
            (
                "src/low.rs",
                "// crate::mid in a comment is not code\nfn f() -> crate::top::T { todo!() }\n",
            ),
        ]);
        let problems = check(&tree, SMALL, &[]);
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert_eq!(
            problems[0],
            "src/low.rs:2: low (layer 2) imports top (layer 0), a higher layer"
        );
        assert!(
            problems.iter().any(|p| p.starts_with(
                "import cycle: mid (src/mid.rs:2) -> other (src/other/inner.rs:2) -> mid"
            )),
            "{problems:#?}"
        );
        // low -> top -> mid -> low is a cycle too.
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("import cycle: low (src/low.rs:2) -> top")),
            "{problems:#?}"
        );
    }

    #[test]
    fn a_clean_tree_passes() {
        let tree = files(&[
            (
                "src/top.rs",
                "use crate::{mid::A, low};\nuse crate::other::B;\n",
            ),
            (
                "src/mid.rs",
                "use crate::low::{self, C};\nuse crate::other::D;\n",
            ),
            ("src/other.rs", "use crate::low::E;\n"),
            (
                "src/low.rs",
                "pub(crate) fn f() {}\n#[cfg(test)]\nmod tests {\n    use super::*;\n}\n",
            ),
        ]);
        assert_eq!(check(&tree, SMALL, &[]), Vec::<String>::new());
    }

    #[test]
    fn strings_comments_and_macros_are_not_imports() {
        let text = r####"
            /* crate::top /* nested */ crate::top */
            const A: &str = "crate::top::X";
            const B: &str = r#"crate::top "quoted" "#;
            const C: char = '{';
            const D: char = '\'';
            fn f<'a>(x: &'a str) -> &'a str { x }
            macro_rules! m { () => { $crate::top::f() } }
            mod tests { fn g() { super::h(); } }
            use crate::mid::Y;
        "####;
        let refs = references(&["low".to_string()], text);
        assert_eq!(refs, vec![("mid".to_string(), 10)]);
    }

    #[test]
    fn super_that_leaves_the_module_counts() {
        let module = vec!["proxy".to_string(), "forward".to_string()];
        let text = "use super::headers;\nuse super::super::routing::Routing;\nmod t { use super::super::ConnInfo; use super::super::super::app; }\n";
        let refs: Vec<String> = references(&module, text).into_iter().map(|r| r.0).collect();
        assert_eq!(refs, vec!["routing", "app"]);
    }

    #[test]
    fn the_binary_refers_through_the_crate_name() {
        let refs = references(
            &["main".to_string()],
            "use berth::app::App;\nuse crate::cli;\n",
        );
        assert_eq!(refs, vec![("app".to_string(), 1)]);
    }

    #[test]
    fn unknown_modules_and_stale_exceptions_are_reported() {
        let tree = files(&[("src/stray.rs", "use crate::low::X;\n"), ("src/low.rs", "")]);
        let problems = check(&tree, SMALL, &[("low", "top", "was fixed")]);
        assert_eq!(
            problems,
            vec![
                "src/stray.rs:1: module stray is in no layer".to_string(),
                "tests/layers.rs: the pending exception low -> top is no longer needed; remove it"
                    .to_string(),
            ]
        );
    }

    #[test]
    fn a_pending_exception_excuses_only_its_own_edge() {
        let tree = files(&[("src/low.rs", "use crate::top::X;\nuse crate::mid::Y;\n")]);
        let problems = check(&tree, SMALL, &[("low", "top", "moving")]);
        assert_eq!(
            problems,
            vec!["src/low.rs:2: low (layer 2) imports mid (layer 1), a higher layer".to_string()]
        );
    }
}
