//! Conditions in the file (`when` of `[[entity.action]]`, `filter` of `[[listener]]`):
//! `{ column = "status", equals = "active" }`, combined with `all`, `any` and `not`.

use serde::Deserialize;
use serde_json::Value;
use serde_spanned::Spanned;

use super::Str;
use super::check::{Checker, substitute};
use crate::condition::{Cmp, Condition, Test};

/// Conditions nest at most this deep (a hostile file cannot exhaust the stack).
const MAX_DEPTH: usize = 16;

/// The tests a column condition may carry, for messages.
const TESTS: &str =
    "equals, not_equals, in, not_in, is_null, lt, lte, gt, gte, changed, changed_to, changed_from";

type RawValue = Option<Spanned<toml::Value>>;

/// One condition table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCondition {
    column: Str,
    equals: RawValue,
    not_equals: RawValue,
    #[serde(rename = "in")]
    in_list: RawValue,
    not_in: RawValue,
    is_null: Option<Spanned<bool>>,
    lt: RawValue,
    lte: RawValue,
    gt: RawValue,
    gte: RawValue,
    changed: Option<Spanned<bool>>,
    changed_to: RawValue,
    changed_from: RawValue,
    all: Option<Spanned<Vec<Spanned<RawCondition>>>>,
    any: Option<Spanned<Vec<Spanned<RawCondition>>>>,
    not: Option<Box<Spanned<RawCondition>>>,
}

impl Checker<'_> {
    /// A checked condition; `None` (reported) when it is malformed.
    pub(super) fn condition(
        &mut self,
        raw: &Spanned<RawCondition>,
        key: &str,
    ) -> Option<Condition> {
        self.condition_at(raw, key, 0)
    }

    fn condition_at(
        &mut self,
        raw: &Spanned<RawCondition>,
        key: &str,
        depth: usize,
    ) -> Option<Condition> {
        let at = raw.span().start;
        let c = raw.get_ref();
        if depth >= MAX_DEPTH {
            self.report(
                at,
                key,
                &format!("conditions nest deeper than {MAX_DEPTH} levels"),
                "flatten them with all/any",
            );
            return None;
        }
        let combinators = [c.all.is_some(), c.any.is_some(), c.not.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        let written = [
            c.equals.is_some(),
            c.not_equals.is_some(),
            c.in_list.is_some(),
            c.not_in.is_some(),
            c.is_null.is_some(),
            c.lt.is_some(),
            c.lte.is_some(),
            c.gt.is_some(),
            c.gte.is_some(),
            c.changed.is_some(),
            c.changed_to.is_some(),
            c.changed_from.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        let tests = self.tests(c, key);
        if tests.len() < written {
            // A test's value was reported already.
            return None;
        }
        match (&c.column, combinators) {
            (Some(_), n) if n > 0 => {
                self.report(
                    at,
                    key,
                    "a condition has both column and all/any/not",
                    "write the column test inside the list, like { all = [{ column = \"a\", equals = 1 }, { column = \"b\", is_null = true }] }",
                );
                None
            }
            (None, 0) if tests.is_empty() => {
                self.report(
                    at,
                    key,
                    "empty condition",
                    "write a column test like { column = \"status\", equals = \"active\" }, or combine tests with all = [...], any = [...] or not = {...}",
                );
                None
            }
            (None, 0) => {
                self.report(
                    at,
                    key,
                    "a test without column",
                    "add column = \"name\" to say which column it tests",
                );
                None
            }
            (None, n) if n > 1 || !tests.is_empty() => {
                self.report(
                    at,
                    key,
                    "a condition combines several of all, any, not and column tests",
                    "write one of them per table and nest them, like { all = [{ any = [...] }, { not = {...} }] }",
                );
                None
            }
            (None, _) => self.combinator(c, key, depth),
            (Some(column), _) => {
                let name = self.string(column, &format!("{key}.column"))?;
                let name = name.trim().to_owned();
                if name.is_empty() {
                    self.report(
                        column.span().start,
                        &format!("{key}.column"),
                        "empty column name",
                        "write the column name as stored in the table",
                    );
                    return None;
                }
                if tests.is_empty() {
                    self.report(
                        at,
                        key,
                        &format!("column {name:?} has no test"),
                        &format!("add one of {TESTS}"),
                    );
                    return None;
                }
                let mut tests: Vec<Condition> = tests
                    .into_iter()
                    .map(|test| Condition::Column {
                        column: name.clone(),
                        test,
                    })
                    .collect();
                // Several tests in one table must all hold (`gt` with `lt` is a range).
                Some(if tests.len() == 1 {
                    tests.remove(0)
                } else {
                    Condition::All(tests)
                })
            }
        }
    }

    fn combinator(&mut self, c: &RawCondition, key: &str, depth: usize) -> Option<Condition> {
        if let Some(not) = &c.not {
            let inner = self.condition_at(not, &format!("{key}.not"), depth + 1)?;
            return Some(Condition::Not(Box::new(inner)));
        }
        let (list, name, all) = match (&c.all, &c.any) {
            (Some(list), _) => (list, "all", true),
            (None, Some(list)) => (list, "any", false),
            (None, None) => return None,
        };
        if list.get_ref().is_empty() {
            self.report(
                list.span().start,
                &format!("{key}.{name}"),
                &format!("{name} lists no conditions"),
                "list at least one condition",
            );
            return None;
        }
        let mut out = Vec::new();
        let mut ok = true;
        for (i, item) in list.get_ref().iter().enumerate() {
            match self.condition_at(item, &format!("{key}.{name}[{i}]"), depth + 1) {
                Some(cond) => out.push(cond),
                None => ok = false,
            }
        }
        let cond = if all {
            Condition::All(out)
        } else {
            Condition::Any(out)
        };
        ok.then_some(cond)
    }

    /// The column tests of one table, in a fixed order.
    fn tests(&mut self, c: &RawCondition, key: &str) -> Vec<Test> {
        let mut tests = Vec::new();
        let mut one = |me: &mut Self, raw: &RawValue, name: &str, make: fn(Value) -> Test| {
            if let Some(v) = raw
                && let Some(value) = me.scalar(v, &format!("{key}.{name}"))
            {
                tests.push(make(value));
            }
        };
        one(self, &c.equals, "equals", Test::Equals);
        one(self, &c.not_equals, "not_equals", Test::NotEquals);
        one(self, &c.lt, "lt", |v| Test::Compare(Cmp::Lt, v));
        one(self, &c.lte, "lte", |v| Test::Compare(Cmp::Lte, v));
        one(self, &c.gt, "gt", |v| Test::Compare(Cmp::Gt, v));
        one(self, &c.gte, "gte", |v| Test::Compare(Cmp::Gte, v));
        one(self, &c.changed_to, "changed_to", Test::ChangedTo);
        one(self, &c.changed_from, "changed_from", Test::ChangedFrom);
        if let Some(list) = &c.in_list
            && let Some(values) = self.value_list(list, &format!("{key}.in"))
        {
            tests.push(Test::In(values));
        }
        if let Some(list) = &c.not_in
            && let Some(values) = self.value_list(list, &format!("{key}.not_in"))
        {
            tests.push(Test::NotIn(values));
        }
        if let Some(b) = &c.is_null {
            tests.push(Test::IsNull(*b.get_ref()));
        }
        if let Some(b) = &c.changed {
            tests.push(Test::Changed(*b.get_ref()));
        }
        tests
    }

    /// A string, number, boolean or date to compare with.
    fn scalar(&mut self, raw: &Spanned<toml::Value>, key: &str) -> Option<Value> {
        let at = raw.span().start;
        match raw.get_ref() {
            toml::Value::String(s) => match substitute(s, self.env) {
                Ok(s) => Some(Value::String(s)),
                Err((problem, fix)) => {
                    self.report(at, key, &problem, &fix);
                    None
                }
            },
            toml::Value::Integer(i) => Some(Value::from(*i)),
            toml::Value::Float(f) if f.is_finite() => Some(Value::from(*f)),
            toml::Value::Float(_) => {
                self.report(
                    at,
                    key,
                    "nan and inf cannot be compared",
                    "write a finite number",
                );
                None
            }
            toml::Value::Boolean(b) => Some(Value::Bool(*b)),
            toml::Value::Datetime(d) => Some(Value::String(d.to_string())),
            toml::Value::Array(_) | toml::Value::Table(_) => {
                self.report(
                    at,
                    key,
                    "expected a single value",
                    "compare with a string, number or boolean; use in = [...] for a list of values",
                );
                None
            }
        }
    }

    /// `in = [...]`: a non-empty list of single values.
    fn value_list(&mut self, raw: &Spanned<toml::Value>, key: &str) -> Option<Vec<Value>> {
        let at = raw.span().start;
        let toml::Value::Array(items) = raw.get_ref() else {
            self.report(
                at,
                key,
                "expected a list of values",
                "write in = [\"a\", \"b\"]",
            );
            return None;
        };
        if items.is_empty() {
            self.report(
                at,
                key,
                "the list is empty, so nothing would match",
                "list at least one value",
            );
            return None;
        }
        let mut values = Vec::with_capacity(items.len());
        for item in items {
            // Items of an inline array carry no position of their own: report at the list.
            let spanned = Spanned::new(at..raw.span().end, item.clone());
            values.push(self.scalar(&spanned, key)?);
        }
        Some(values)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::condition::{Cmp, Condition, Test};
    use crate::config::tests::{MINIMAL, errors, parse};

    fn when(cond: &str) -> String {
        format!("{MINIMAL}\n[[entity.action]]\nname = \"Hit\"\nwhen = {cond}\n")
    }

    #[test]
    fn conditions_parse_into_nested_tests() {
        let c = parse(&when(
            "{ any = [{ column = \"title_code\", in = [\"NYT\", 7] }, { all = [{ column = \"n\", gt = 1, lte = 2.5 }, { not = { column = \"x\", is_null = true } }] }] }",
        ))
        .unwrap();
        let col = |c: &str, test| Condition::Column {
            column: c.into(),
            test,
        };
        assert_eq!(
            c.entities[0].derived[0].when,
            Condition::Any(vec![
                col("title_code", Test::In(vec![json!("NYT"), json!(7)])),
                Condition::All(vec![
                    Condition::All(vec![
                        col("n", Test::Compare(Cmp::Lte, json!(2.5))),
                        col("n", Test::Compare(Cmp::Gt, json!(1))),
                    ]),
                    Condition::Not(Box::new(col("x", Test::IsNull(true)))),
                ]),
            ])
        );
    }

    #[test]
    fn malformed_conditions_name_the_problem_and_the_fix() {
        let cases = [
            ("{ }", "empty condition"),
            ("{ equals = 1 }", "a test without column"),
            ("{ column = \"a\" }", "column \"a\" has no test"),
            (
                "{ column = \"a\", equals = 1, all = [{ column = \"b\", equals = 2 }] }",
                "both column and all/any/not",
            ),
            ("{ all = [] }", "all lists no conditions"),
            ("{ column = \"a\", in = [] }", "the list is empty"),
            (
                "{ column = \"a\", equals = [1] }",
                "expected a single value",
            ),
            (
                "{ column = \"a\", in = \"x\" }",
                "expected a list of values",
            ),
            (
                "{ all = [{ column = \"a\", equals = 1 }], any = [{ column = \"b\", equals = 1 }] }",
                "combines several",
            ),
        ];
        for (cond, problem) in cases {
            let lines = errors(&when(cond));
            assert_eq!(lines.len(), 1, "{cond}: {lines:?}");
            assert!(
                lines[0].starts_with("walhook.toml:10:")
                    && lines[0].contains("entity[0].action[0].when")
                    && lines[0].contains(problem),
                "{cond}: {lines:?}"
            );
        }
        let lines = errors(&when("{ column = \"a\", eq = 1 }"));
        assert!(lines[0].contains("unknown key"), "{lines:?}");
    }
}
