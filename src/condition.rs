//! Conditions on a row change: the `when` of a derived action and the `filter` of a
//! listener. Parsed once from the configuration (see `config::condition`), evaluated per
//! event on the JSON row, the old row and the changed columns.
//!
//! A column whose value is not known (absent from the row: unchanged TOAST without an old
//! value, or no such column) makes every test on it false, so a condition never matches on
//! a guess. NULL is a value: `is_null` matches it, `not_equals` and `not_in` match it, the
//! other comparisons do not (as with `IS DISTINCT FROM` in SQL).

use std::cmp::Ordering;

use serde_json::{Map, Value};

use crate::types::Action;

/// A condition, combined with `all`, `any` and `not`.
#[derive(Clone, Debug, PartialEq)]
pub enum Condition {
    /// Every condition holds (an empty list holds).
    All(Vec<Condition>),
    /// At least one condition holds (an empty list does not).
    Any(Vec<Condition>),
    /// The condition does not hold.
    Not(Box<Condition>),
    /// A test on one column.
    Column {
        /// The column name as in the table.
        column: String,
        /// What is tested.
        test: Test,
    },
}

/// A test on one column's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Test {
    /// The value equals this one.
    Equals(Value),
    /// The value is NULL or differs from this one.
    NotEquals(Value),
    /// The value equals one of these.
    In(Vec<Value>),
    /// The value is NULL or equals none of these.
    NotIn(Vec<Value>),
    /// The value is NULL (`true`) or not NULL (`false`).
    IsNull(bool),
    /// The value compares to this one as asked (numbers as numbers, text as text).
    Compare(Cmp, Value),
    /// The column is among the changed columns (`true`) or not (`false`). A Created event
    /// changes every column it carries; a Deleted event none; an update whose old row is
    /// not known changes nothing that can be told.
    Changed(bool),
    /// The column changed, and its new value equals this one.
    ChangedTo(Value),
    /// The column changed, and its old value equals this one.
    ChangedFrom(Value),
}

/// An ordering test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    /// `lt`: below.
    Lt,
    /// `lte`: below or equal.
    Lte,
    /// `gt`: above.
    Gt,
    /// `gte`: above or equal.
    Gte,
}

/// The change a condition is evaluated on.
#[derive(Clone, Copy, Debug)]
pub struct Change<'a> {
    /// The row action.
    pub action: Action,
    /// The new row; the old row for deletes.
    pub row: &'a Map<String, Value>,
    /// The old row of an update, when known.
    pub old: Option<&'a Map<String, Value>>,
    /// The changed columns of an update, when known.
    pub changed_fields: Option<&'a [String]>,
}

impl Change<'_> {
    /// Whether `column` changed; `false` when that cannot be told.
    fn changed(&self, column: &str) -> bool {
        match self.action {
            Action::Created => self.row.contains_key(column),
            Action::Updated => self
                .changed_fields
                .is_some_and(|f| f.iter().any(|c| c == column)),
            Action::Deleted | Action::Truncated => false,
        }
    }
}

impl Condition {
    /// Whether the condition holds for `change`.
    pub fn matches(&self, change: &Change<'_>) -> bool {
        match self {
            Condition::All(list) => list.iter().all(|c| c.matches(change)),
            Condition::Any(list) => list.iter().any(|c| c.matches(change)),
            Condition::Not(c) => !c.matches(change),
            Condition::Column { column, test } => test.matches(column, change),
        }
    }

    /// Every column the condition names, in order (with repeats).
    pub fn columns(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.collect_columns(&mut out);
        out
    }

    fn collect_columns<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Condition::All(list) | Condition::Any(list) => {
                for c in list {
                    c.collect_columns(out);
                }
            }
            Condition::Not(c) => c.collect_columns(out),
            Condition::Column { column, .. } => out.push(column),
        }
    }

    /// Renames column `from` to `to` wherever the condition names it (a rename followed
    /// under a running capture).
    pub fn rename(&mut self, from: &str, to: &str) {
        match self {
            Condition::All(list) | Condition::Any(list) => {
                for c in list {
                    c.rename(from, to);
                }
            }
            Condition::Not(c) => c.rename(from, to),
            Condition::Column { column, .. } => {
                if column == from {
                    to.clone_into(column);
                }
            }
        }
    }

    /// Whether any test needs to know what changed (and so the old row).
    pub fn needs_old_row(&self) -> bool {
        match self {
            Condition::All(list) | Condition::Any(list) => list.iter().any(Self::needs_old_row),
            Condition::Not(c) => c.needs_old_row(),
            Condition::Column { test, .. } => matches!(
                test,
                Test::Changed(_) | Test::ChangedTo(_) | Test::ChangedFrom(_)
            ),
        }
    }
}

impl Test {
    fn matches(&self, column: &str, change: &Change<'_>) -> bool {
        let value = change.row.get(column);
        match self {
            Test::Changed(want) => value.is_some() && change.changed(column) == *want,
            Test::ChangedTo(v) => change.changed(column) && value.is_some_and(|x| equal(x, v)),
            Test::ChangedFrom(v) => {
                change.changed(column)
                    && change
                        .old
                        .and_then(|old| old.get(column))
                        .is_some_and(|x| equal(x, v))
            }
            _ => {
                let Some(value) = value else {
                    return false;
                };
                match self {
                    Test::Equals(v) => equal(value, v),
                    Test::NotEquals(v) => !equal(value, v),
                    Test::In(vs) => vs.iter().any(|v| equal(value, v)),
                    Test::NotIn(vs) => !vs.iter().any(|v| equal(value, v)),
                    Test::IsNull(want) => value.is_null() == *want,
                    Test::Compare(cmp, v) => compare(value, v).is_some_and(|o| match cmp {
                        Cmp::Lt => o == Ordering::Less,
                        Cmp::Lte => o != Ordering::Greater,
                        Cmp::Gt => o == Ordering::Greater,
                        Cmp::Gte => o != Ordering::Less,
                    }),
                    Test::Changed(_) | Test::ChangedTo(_) | Test::ChangedFrom(_) => false,
                }
            }
        }
    }
}

/// A number as f64, from a JSON number or a numeric text (numeric columns arrive as text
/// so that no precision is lost).
fn as_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        _ => None,
    }
}

/// Whether a row value equals a configured value. NULL equals nothing; numbers compare as
/// numbers, also against numeric text.
fn equal(row: &Value, want: &Value) -> bool {
    match (row, want) {
        (Value::Null, _) | (_, Value::Null) => false,
        (Value::Number(a), Value::Number(b)) => match (a.as_i64(), b.as_i64()) {
            (Some(a), Some(b)) => a == b,
            _ => a.as_f64() == b.as_f64(),
        },
        (Value::String(_), Value::Number(_)) | (Value::Number(_), Value::String(_)) => {
            matches!((as_number(row), as_number(want)), (Some(a), Some(b)) if a == b)
        }
        _ => row == want,
    }
}

/// How a row value compares to a configured value: as numbers when either is a number,
/// as text when both are text; `None` when they cannot be compared (NULL, booleans,
/// text that is not a number against a number).
fn compare(row: &Value, want: &Value) -> Option<Ordering> {
    match (row, want) {
        (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
        (Value::Number(a), Value::Number(b)) => match (a.as_i64(), b.as_i64()) {
            (Some(a), Some(b)) => Some(a.cmp(&b)),
            _ => a.as_f64()?.partial_cmp(&b.as_f64()?),
        },
        (Value::Number(_), Value::String(_)) | (Value::String(_), Value::Number(_)) => {
            as_number(row)?.partial_cmp(&as_number(want)?)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn col(column: &str, test: Test) -> Condition {
        Condition::Column {
            column: column.into(),
            test,
        }
    }

    #[test]
    fn changed_to_and_from_need_the_column_among_the_changed_ones() {
        let row = map(json!({"status": "cancelled", "city": "Oslo"}));
        let old = map(json!({"status": "active", "city": "Oslo"}));
        let changed = ["status".to_owned()];
        let update = Change {
            action: Action::Updated,
            row: &row,
            old: Some(&old),
            changed_fields: Some(&changed),
        };
        assert!(col("status", Test::ChangedTo(json!("cancelled"))).matches(&update));
        assert!(col("status", Test::ChangedFrom(json!("active"))).matches(&update));
        assert!(!col("status", Test::ChangedFrom(json!("cancelled"))).matches(&update));
        assert!(!col("city", Test::ChangedTo(json!("Oslo"))).matches(&update));
        assert!(col("city", Test::Changed(false)).matches(&update));
        // Without the old row nothing is known to have changed.
        let unknown = Change {
            old: None,
            changed_fields: None,
            ..update
        };
        assert!(!col("status", Test::ChangedTo(json!("cancelled"))).matches(&unknown));
        assert!(!col("status", Test::Changed(true)).matches(&unknown));
        // A created row changes every column it carries; a deleted one none.
        let created = Change {
            action: Action::Created,
            old: None,
            changed_fields: None,
            ..update
        };
        assert!(col("status", Test::ChangedTo(json!("cancelled"))).matches(&created));
        assert!(!col("status", Test::ChangedFrom(json!("active"))).matches(&created));
        let deleted = Change {
            action: Action::Deleted,
            ..created
        };
        assert!(!col("status", Test::Changed(true)).matches(&deleted));
    }

    #[test]
    fn values_compare_as_numbers_across_numeric_text_and_nulls_match_only_null_tests() {
        let row = map(json!({"price": "10.50", "qty": 3, "code": "NYT", "gone": null}));
        let c = Change {
            action: Action::Created,
            row: &row,
            old: None,
            changed_fields: None,
        };
        let yes = |cond: Condition| assert!(cond.matches(&c), "{cond:?}");
        let no = |cond: Condition| assert!(!cond.matches(&c), "{cond:?}");
        yes(col("price", Test::Equals(json!(10.5))));
        yes(col("price", Test::Compare(Cmp::Gt, json!(10))));
        yes(col("qty", Test::Compare(Cmp::Lte, json!(3))));
        no(col("qty", Test::Compare(Cmp::Lt, json!(3))));
        yes(col("code", Test::In(vec![json!("NYT"), json!("WSJ")])));
        no(col("code", Test::In(vec![json!("WSJ")])));
        yes(col("code", Test::Compare(Cmp::Lt, json!("WSJ"))));
        no(col("code", Test::Compare(Cmp::Lt, json!(5))));
        yes(col("gone", Test::IsNull(true)));
        yes(col("gone", Test::NotEquals(json!("x"))));
        yes(col("gone", Test::NotIn(vec![json!("x")])));
        no(col("gone", Test::Equals(json!("x"))));
        no(col("gone", Test::Compare(Cmp::Gt, json!(0))));
        // An unknown column matches no test, not even a negative one.
        no(col("missing", Test::NotEquals(json!("x"))));
        no(col("missing", Test::IsNull(false)));
        yes(Condition::Not(Box::new(col("missing", Test::IsNull(true)))));
        yes(Condition::All(vec![
            col("qty", Test::Equals(json!(3))),
            Condition::Any(vec![
                col("code", Test::Equals(json!("no"))),
                col("price", Test::Compare(Cmp::Gte, json!("10.5"))),
            ]),
        ]));
        no(Condition::Any(vec![]));
        yes(Condition::All(vec![]));
    }
}
