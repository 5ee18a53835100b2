//! The list of problems found in one config text.
//!
//! Both passes over a config (reading its shape in `file.rs`, checking its
//! values in `validate.rs`) push into one [`Report`], which locates each
//! problem's line with the [`Locator`] and keeps one problem per key: once a
//! key (or a table above it) has a problem, later ones about it are
//! consequences (a value of the wrong type then also looks "missing") and
//! are dropped. A key can also be covered without a problem of its own: a
//! required key that is missing because it was misspelt is reported once,
//! as the unknown key.

use super::locate::{render_path, Locator, Seg};
use super::Problem;

pub(super) struct Report<'t> {
    locator: Locator<'t>,
    problems: Vec<Problem>,
    /// Keys whose problems are explained by another one.
    covered: Vec<String>,
}

impl<'t> Report<'t> {
    pub(super) fn new(text: &'t str) -> Self {
        Report {
            locator: Locator::new(text),
            problems: Vec::new(),
            covered: Vec::new(),
        }
    }

    /// Drops any later problem about `at` (and the keys under it).
    pub(super) fn cover(&mut self, at: &[Seg<'_>]) {
        self.covered.push(render_path(at));
    }

    pub(super) fn push(&mut self, at: &[Seg<'_>], message: impl Into<String>) {
        let key = render_path(at);
        if self.covered(&key) {
            return;
        }
        self.problems.push(Problem {
            line: self.locator.line_of(at),
            key,
            message: message.into(),
        });
    }

    /// `Some(value)`, or pushes the message at `at` and gives `None`.
    pub(super) fn check<T>(&mut self, at: &[Seg<'_>], result: Result<T, String>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(message) => {
                self.push(at, message);
                None
            }
        }
    }

    /// Whether `key` or a table above it already has a problem.
    fn covered(&self, key: &str) -> bool {
        let under = |outer: &str| {
            !outer.is_empty()
                && key.strip_prefix(outer).is_some_and(|rest| {
                    rest.is_empty() || rest.starts_with('.') || rest.starts_with('[')
                })
        };
        self.problems.iter().any(|p| under(&p.key)) || self.covered.iter().any(|k| under(k))
    }

    /// The problems ordered by line (stable: problems on one line keep the
    /// order they were found in; file-wide ones, without a line, come
    /// first), or `Ok` when there are none.
    pub(super) fn finish(self) -> Result<(), Vec<Problem>> {
        let mut problems = self.problems;
        if problems.is_empty() {
            return Ok(());
        }
        problems.sort_by_key(|p| p.line);
        Err(problems)
    }
}
