//! Documentation guards for config keys: every key berth accepts (the
//! `*_KEYS` lists the reader checks files against) is set, with a comment,
//! in the example `config/berth.toml`, and has a row in the README's
//! Configuration tables. A key added to the reader without its docs fails
//! here, naming the key.

use toml_edit::{ImDocument, Item, TableLike};

use super::{readme_rows, readme_subsection};
use crate::config::file::TABLES;
use crate::config::locate::line_at;

const EXAMPLE: &str = include_str!("../../../config/berth.toml");

/// Whether `path` (`pools.NAME.auth`) names a table rather than a value;
/// `pools` is the table of `pools.NAME` tables.
fn is_table(path: &str) -> bool {
    let named = format!("{path}.NAME");
    TABLES.iter().any(|(t, _)| *t == path || *t == named)
}

fn join(table: &str, key: &str) -> String {
    if table.is_empty() {
        key.to_string()
    } else {
        format!("{table}.{key}")
    }
}

/// Every instance of `table` in the example: each pool for `NAME`, each
/// entry of an array of tables, inline tables too; with the byte offset it
/// starts at, where the file says (a `[header]`; an implicit table such as
/// `pools.account.auth` has none).
fn instances<'d>(
    doc: &'d ImDocument<&str>,
    table: &str,
) -> Vec<(&'d dyn TableLike, Option<usize>)> {
    let mut found: Vec<(&dyn TableLike, Option<usize>)> = vec![(doc.as_table(), Some(0))];
    for seg in table.split('.').filter(|s| !s.is_empty()) {
        let mut next = Vec::new();
        for (t, _) in found {
            let items: Vec<&Item> = if seg == "NAME" {
                t.iter().map(|(_, item)| item).collect()
            } else {
                t.get(seg).into_iter().collect()
            };
            for item in items {
                match item {
                    Item::ArrayOfTables(array) => {
                        next.extend(array.iter().map(|t| (t as &dyn TableLike, span_start(t))));
                    }
                    Item::Table(t) => next.push((t as &dyn TableLike, span_start(t))),
                    Item::Value(v) => {
                        if let Some(t) = v.as_inline_table() {
                            next.push((t as &dyn TableLike, v.span().map(|s| s.start)));
                        }
                    }
                    Item::None => {}
                }
            }
        }
        found = next;
    }
    found
}

fn span_start(t: &toml_edit::Table) -> Option<usize> {
    t.span().map(|s| s.start)
}

/// The example's lines, 1-based line `n` at index `n - 1`.
fn line(n: usize) -> &'static str {
    EXAMPLE.lines().nth(n - 1).unwrap_or("")
}

fn is_comment(text: &str) -> bool {
    text.trim_start().starts_with('#')
}

/// A commented-out setting of `key`: `# key = value`.
fn sets_commented_out(text: &str, key: &str) -> bool {
    text.trim_start()
        .strip_prefix('#')
        .and_then(|rest| rest.trim_start().strip_prefix(key))
        .is_some_and(|rest| rest.trim_start().starts_with('='))
}

/// Where `key` of `table` is set in the example, with a comment: on its
/// line (the line directly above, or the key's own line after the value),
/// or, where no instance sets it, as a commented-out `# key = ...` line
/// inside one of the table's `[headers]`, itself under a comment. `None`
/// when neither.
fn example_line(doc: &ImDocument<&str>, table: &str, key: &str) -> Result<usize, String> {
    let all = instances(doc, table);
    if all.is_empty() {
        return Err(format!("no [{table}] table in config/berth.toml"));
    }
    for (t, _) in &all {
        let Some((k, _)) = t.get_key_value(key) else {
            continue;
        };
        let at = k
            .span()
            .map(|s| line_at(EXAMPLE, s.start))
            .ok_or_else(|| format!("{key}: no position"))?;
        let commented = (at > 1 && is_comment(line(at - 1))) || line(at).contains(" # ");
        return if commented {
            Ok(at)
        } else {
            Err(format!(
                "line {at} sets {} without a comment above it",
                join(table, key)
            ))
        };
    }
    // Not set anywhere: a commented-out line in one of the table's
    // sections (from its header to the next header).
    for (_, start) in all {
        let Some(start) = start else { continue };
        let first = line_at(EXAMPLE, start);
        let mut n = first;
        loop {
            n += 1;
            let text = line(n);
            if n > EXAMPLE.lines().count() || (text.starts_with('[') && n > first) {
                break;
            }
            if sets_commented_out(text, key) && is_comment(line(n - 1)) {
                return Ok(n);
            }
        }
    }
    // An inline table (`tls = { ... }`) has no section of its own: its key
    // counts when a commented-out example of the table spells it out.
    let inline = format!("{} = {{", table.rsplit('.').next().unwrap_or(table));
    let spelled = format!("{key} = ");
    for n in 2..=EXAMPLE.lines().count() {
        let text = line(n);
        if is_comment(text) && text.contains(&inline) && text.contains(&spelled) {
            return Ok(n);
        }
    }
    Err(format!(
        "{} is neither set nor shown as a commented-out `# {key} = ...` line",
        join(table, key)
    ))
}

/// Docs guard: every key berth accepts appears in `config/berth.toml` (the
/// example "sets every key, each with a comment"): set in one instance of
/// its table, with a comment on the line directly above (or after the value
/// on its own line). A key the example cannot set and stay valid or
/// runnable (the alternatives `secret` / `secret_file`, and `jwks_url` /
/// `jwks_file` / `secret_file`, of which exactly one is allowed; a cookie
/// `domain` that would stop the cookie working on localhost; `trusted_proxies`
/// beside a hash key that is not `client_ip`) counts when it is shown as a
/// commented-out line, `# key = value`, inside its table, under a comment.
/// A key that is a table (`[pools.NAME.health]`) counts when the example
/// has that table; its own keys are checked in turn.
#[test]
fn the_example_config_sets_every_key_with_a_comment() {
    // Every `*_KEYS` list of the reader is in TABLES.
    let lists = include_str!("../file.rs")
        .matches("_KEYS: &[&str] = ")
        .count();
    assert_eq!(lists, TABLES.len(), "a *_KEYS list is missing from TABLES");
    let doc = ImDocument::parse(EXAMPLE).expect("the example parses");
    let mut problems = Vec::new();
    for (table, keys) in TABLES {
        for key in *keys {
            let path = join(table, key);
            if is_table(&path) {
                if instances(&doc, &path).is_empty() {
                    problems.push(format!("no [{path}] table in config/berth.toml"));
                }
            } else if let Err(problem) = example_line(&doc, table, key) {
                problems.push(problem);
            }
        }
    }
    assert!(
        problems.is_empty(),
        "config/berth.toml:\n{}",
        problems.join("\n")
    );
}

/// The README subsection of `table`: its heading names `` `[table]` `` or
/// `` `[[table]]` ``; the top level's is "Top level".
fn readme_table(table: &str) -> Option<&'static str> {
    if table.is_empty() {
        return readme_subsection("Top level");
    }
    readme_subsection(&format!("`[{table}]`"))
        .or_else(|| readme_subsection(&format!("`[[{table}]]`")))
}

/// Docs guard: every key berth accepts has a row in the README's
/// Configuration section, in its table's subsection (`### [pools.NAME.dns]`);
/// a row may name alternatives (`` `secret` / `secret_file` ``). A key that
/// is a table is documented by its own subsection (or its tables'
/// subsections, for `auth`), or by a row of its parent when it is written
/// inline (`tls = { cert = ..., key = ... }`); the keys of an inline table
/// are then named in that row as `key = `.
#[test]
fn the_readme_documents_every_key() {
    let mut problems = Vec::new();
    for (table, keys) in TABLES {
        for key in *keys {
            let path = join(table, key);
            let row = || readme_table(table).is_some_and(|s| !readme_rows(s, key).is_empty());
            let documented = if is_table(&path) {
                readme_table(&path).is_some()
                    || readme_subsection(&format!("`[{path}.")).is_some()
                    || row()
            } else if readme_table(table).is_some() {
                row()
            } else {
                // An inline table: its keys are spelled out in its parent's row.
                let (parent, name) = table.rsplit_once('.').unwrap_or(("", table));
                // Or in a row of its own, named `tls.ticket_keys`.
                readme_table(parent).is_some_and(|s| {
                    readme_rows(s, name)
                        .iter()
                        .any(|r| r.contains(&format!("{key} = ")))
                        || !readme_rows(s, &format!("{name}.{key}")).is_empty()
                })
            };
            if !documented {
                problems.push(path);
            }
        }
    }
    assert!(
        problems.is_empty(),
        "keys missing from the README's Configuration tables: {problems:?}"
    );
}
