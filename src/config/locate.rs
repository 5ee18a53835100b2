//! Source locations for config keys.
//!
//! This module owns the mapping between dotted key paths
//! (`pools.chat.backends[1].address`) and places in the TOML text. It parses
//! the text a second time with `toml_edit::ImDocument`, which keeps byte spans
//! for keys, values and table headers, and answers two questions:
//!
//! * [`Locator::line_of`]: on which line is this key written? When the key is
//!   absent (a missing required key) the answer is the line of the deepest
//!   ancestor that exists, e.g. the `[[listeners]]` header.
//! * [`Locator::path_at`]: which key does this byte range belong to? Used to
//!   name the key behind a serde error, which only carries a span.

use std::ops::Range;

use toml_edit::{ImDocument, Item, Table, Value};

/// One step of a key path: a table key or an array index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// Line of `path` in `text` (1-based), falling back to the deepest ancestor
/// of `path` that is written in the file.
#[allow(dead_code)] // convenience wrapper; validation reuses one `Locator`
pub(super) fn line_of(text: &str, path: &[Seg<'_>]) -> Option<usize> {
    Locator::new(text).line_of(path)
}

/// Dotted path of the innermost item whose source text contains `span`;
/// empty when nothing (or only the document root) contains it.
pub(super) fn path_at(text: &str, span: Range<usize>) -> String {
    Locator::new(text).path_at(span)
}

/// Renders a key path the way problems name keys: `a.b[2].c`. Keys that are
/// not TOML bare keys are quoted, so the path can be pasted back into a file.
pub(super) fn render_path(path: &[Seg<'_>]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                push_key(&mut out, key);
            }
            Seg::Index(i) => {
                out.push('[');
                out.push_str(&i.to_string());
                out.push(']');
            }
        }
    }
    out
}

fn push_key(out: &mut String, key: &str) {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        out.push_str(key);
    } else {
        out.push('"');
        for c in key.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// 1-based line number of byte `offset` in `text` (offsets past the end map
/// to the last line).
pub(super) fn line_at(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// A parsed view of one config text, reused for every lookup.
pub(super) struct Locator<'t> {
    text: &'t str,
    /// `None` when the text is not valid TOML; lookups then find nothing.
    doc: Option<ImDocument<&'t str>>,
}

/// Where a path lookup currently stands in the document.
#[derive(Clone, Copy)]
enum Node<'d> {
    Item(&'d Item),
    Table(&'d Table),
    Value(&'d Value),
}

/// An owned path step, used while walking the document.
#[derive(Clone, Debug)]
enum OwnedSeg {
    Key(String),
    Index(usize),
}

impl<'t> Locator<'t> {
    pub(super) fn new(text: &'t str) -> Self {
        Locator {
            text,
            doc: ImDocument::parse(text).ok(),
        }
    }

    /// See [`line_of`].
    pub(super) fn line_of(&self, path: &[Seg<'_>]) -> Option<usize> {
        let doc = self.doc.as_ref()?;
        let mut node = Node::Item(doc.as_item());
        let mut best: Option<usize> = None;
        for seg in path {
            let (start, next) = match step(node, *seg) {
                Some(found) => found,
                None => break,
            };
            if let Some(start) = start {
                best = Some(start);
            }
            node = next;
        }
        best.map(|offset| line_at(self.text, offset))
    }

    /// See [`path_at`].
    pub(super) fn path_at(&self, span: Range<usize>) -> String {
        let Some(doc) = self.doc.as_ref() else {
            return String::new();
        };
        let mut best: Option<(usize, Vec<OwnedSeg>)> = None;
        let mut trail = Vec::new();
        walk_table(doc.as_table(), &span, &mut trail, &mut best);
        match best {
            Some((_, path)) => {
                let segs: Vec<Seg<'_>> = path
                    .iter()
                    .map(|s| match s {
                        OwnedSeg::Key(k) => Seg::Key(k.as_str()),
                        OwnedSeg::Index(i) => Seg::Index(*i),
                    })
                    .collect();
                render_path(&segs)
            }
            None => String::new(),
        }
    }
}

/// Follows one path step from `node`; returns where the child is written (if
/// known) and the child itself.
fn step<'d>(node: Node<'d>, seg: Seg<'_>) -> Option<(Option<usize>, Node<'d>)> {
    match (node, seg) {
        (Node::Item(Item::Table(table)) | Node::Table(table), Seg::Key(key)) => {
            let (k, item) = table.get_key_value(key)?;
            let start = k.span().or_else(|| item.span()).map(|s| s.start);
            Some((start, Node::Item(item)))
        }
        (Node::Item(Item::Value(value)) | Node::Value(value), Seg::Key(key)) => {
            let inline = value.as_inline_table()?;
            let (k, item) = inline.get_key_value(key)?;
            let start = k.span().or_else(|| item.span()).map(|s| s.start);
            Some((start, Node::Item(item)))
        }
        (Node::Item(Item::ArrayOfTables(array)), Seg::Index(i)) => {
            let table = array.get(i)?;
            Some((table.span().map(|s| s.start), Node::Table(table)))
        }
        (Node::Item(Item::Value(value)) | Node::Value(value), Seg::Index(i)) => {
            let element = value.as_array()?.get(i)?;
            Some((element.span().map(|s| s.start), Node::Value(element)))
        }
        _ => None,
    }
}

fn contains(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

/// Records `trail` as the best match when `extent` contains `target` and is
/// no larger than the current best (ties go to the deeper path, which is
/// visited later).
fn consider(
    extent: Option<Range<usize>>,
    target: &Range<usize>,
    trail: &[OwnedSeg],
    best: &mut Option<(usize, Vec<OwnedSeg>)>,
) {
    let Some(extent) = extent else { return };
    if trail.is_empty() || !contains(&extent, target) {
        return;
    }
    let size = extent.end - extent.start;
    let better = match best {
        Some((best_size, best_path)) => {
            size < *best_size || (size == *best_size && trail.len() >= best_path.len())
        }
        None => true,
    };
    if better {
        *best = Some((size, trail.to_vec()));
    }
}

fn join(a: Option<Range<usize>>, b: Option<Range<usize>>) -> Option<Range<usize>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.start.min(b.start)..a.end.max(b.end)),
        (a, b) => a.or(b),
    }
}

/// Visits every entry of a table (standard, dotted or array element). Every
/// child is visited whatever the parent's extent: a `[pools.chat]` table's
/// span ends before its `[[pools.chat.backends]]` children begin.
fn walk_table(
    table: &Table,
    target: &Range<usize>,
    trail: &mut Vec<OwnedSeg>,
    best: &mut Option<(usize, Vec<OwnedSeg>)>,
) {
    for (key, item) in table.iter() {
        let key_span = table.key(key).and_then(|k| k.span());
        trail.push(OwnedSeg::Key(key.to_string()));
        match item {
            Item::None => {}
            Item::Value(value) => {
                consider(join(key_span, value.span()), target, trail, best);
                walk_value(value, target, trail, best);
            }
            Item::Table(child) => {
                // A header table's span runs from `[` to its last value; an
                // implicit table has none, so only its children can match.
                consider(child.span(), target, trail, best);
                walk_table(child, target, trail, best);
            }
            Item::ArrayOfTables(array) => {
                for (i, child) in array.iter().enumerate() {
                    trail.push(OwnedSeg::Index(i));
                    consider(child.span(), target, trail, best);
                    walk_table(child, target, trail, best);
                    trail.pop();
                }
            }
        }
        trail.pop();
    }
}

fn walk_value(
    value: &Value,
    target: &Range<usize>,
    trail: &mut Vec<OwnedSeg>,
    best: &mut Option<(usize, Vec<OwnedSeg>)>,
) {
    match value {
        Value::InlineTable(inline) => {
            for (key, child) in inline.iter() {
                let key_span = inline.key(key).and_then(|k| k.span());
                trail.push(OwnedSeg::Key(key.to_string()));
                consider(join(key_span, child.span()), target, trail, best);
                walk_value(child, target, trail, best);
                trail.pop();
            }
        }
        Value::Array(array) => {
            for (i, child) in array.iter().enumerate() {
                trail.push(OwnedSeg::Index(i));
                consider(child.span(), target, trail, best);
                walk_value(child, target, trail, best);
                trail.pop();
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"shutdown_window = "10s"

[[listeners]]
name = "public"
bind = "127.0.0.1:8080"

[[listeners]]
name = "tls"
bind = "127.0.0.1:8443"
tls = { cert = "a.crt", key = "a.key" }

[pools.chat]
balance = "round_robin"
ids = [
  "x",
  "y",
]

[[pools.chat.backends]]
id = "chat-1"
address = "127.0.0.1:9001"

[[pools.chat.backends]]
id = "chat-2"
address = "127.0.0.1:9002"
"#;

    fn span_of(needle: &str) -> Range<usize> {
        let start = TEXT
            .find(needle)
            .unwrap_or_else(|| panic!("{needle} not in text"));
        start..start + needle.len()
    }

    #[test]
    fn line_of_finds_keys_tables_and_array_entries() {
        use Seg::{Index, Key};
        assert_eq!(line_of(TEXT, &[Key("shutdown_window")]), Some(1));
        assert_eq!(line_of(TEXT, &[Key("listeners"), Index(0)]), Some(3));
        assert_eq!(
            line_of(TEXT, &[Key("listeners"), Index(1), Key("bind")]),
            Some(9)
        );
        assert_eq!(
            line_of(TEXT, &[Key("listeners"), Index(1), Key("tls"), Key("key")]),
            Some(10)
        );
        assert_eq!(line_of(TEXT, &[Key("pools"), Key("chat")]), Some(12));
        assert_eq!(
            line_of(TEXT, &[Key("pools"), Key("chat"), Key("ids"), Index(1)]),
            Some(16)
        );
        assert_eq!(
            line_of(
                TEXT,
                &[
                    Key("pools"),
                    Key("chat"),
                    Key("backends"),
                    Index(1),
                    Key("address")
                ]
            ),
            Some(25)
        );
    }

    #[test]
    fn line_of_falls_back_to_the_deepest_existing_ancestor() {
        use Seg::{Index, Key};
        // Missing key in an array-of-tables entry: the entry's header.
        assert_eq!(
            line_of(TEXT, &[Key("listeners"), Index(0), Key("tls")]),
            Some(3)
        );
        // Missing key in an inline table: the inline table's key.
        assert_eq!(
            line_of(TEXT, &[Key("listeners"), Index(1), Key("tls"), Key("nope")]),
            Some(10)
        );
        assert_eq!(
            line_of(
                TEXT,
                &[
                    Key("pools"),
                    Key("chat"),
                    Key("backends"),
                    Index(0),
                    Key("weight")
                ]
            ),
            Some(19)
        );
        assert_eq!(line_of(TEXT, &[Key("admin"), Key("bind")]), None);
        assert_eq!(line_of("not = [valid", &[Key("not")]), None);
    }

    #[test]
    fn path_at_names_the_innermost_item() {
        assert_eq!(path_at(TEXT, span_of("\"10s\"")), "shutdown_window");
        assert_eq!(
            path_at(TEXT, span_of("\"127.0.0.1:8443\"")),
            "listeners[1].bind"
        );
        assert_eq!(path_at(TEXT, span_of("\"a.key\"")), "listeners[1].tls.key");
        assert_eq!(path_at(TEXT, span_of("\"y\"")), "pools.chat.ids[1]");
        assert_eq!(path_at(TEXT, span_of("round_robin")), "pools.chat.balance");
        assert_eq!(
            path_at(TEXT, span_of("\"127.0.0.1:9002\"")),
            "pools.chat.backends[1].address"
        );
        // A table header belongs to its table.
        let second_backend = TEXT.rfind("[[pools.chat.backends]]").unwrap_or(0);
        assert_eq!(
            path_at(TEXT, second_backend..second_backend + 2),
            "pools.chat.backends[1]"
        );
        assert_eq!(path_at(TEXT, 0..0), "shutdown_window");
        assert_eq!(path_at("a = [", 0..1), "");
    }

    #[test]
    fn render_path_quotes_non_bare_keys() {
        use Seg::{Index, Key};
        assert_eq!(
            render_path(&[
                Key("pools"),
                Key("a.b"),
                Key("backends"),
                Index(3),
                Key("id")
            ]),
            "pools.\"a.b\".backends[3].id"
        );
        assert_eq!(render_path(&[]), "");
    }

    #[test]
    fn line_at_counts_newlines() {
        assert_eq!(line_at("a\nb\nc", 0), 1);
        assert_eq!(line_at("a\nb\nc", 2), 2);
        assert_eq!(line_at("a\nb\nc", 99), 3);
    }
}
