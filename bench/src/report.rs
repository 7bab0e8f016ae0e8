//! Result lines: one JSON object per line with `--json`, an aligned table otherwise.

use std::io::Write;

use serde::{Serialize, ser::SerializeMap};
use serde_json::Value;

/// One result: keys in the order they were added.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row(pub Vec<(&'static str, Value)>);

impl Row {
    /// A row of a scenario.
    pub fn new(scenario: &str) -> Self {
        Self(vec![("scenario", Value::from(scenario))])
    }

    /// Adds a key.
    pub fn with(mut self, key: &'static str, value: impl Into<Value>) -> Self {
        self.0.push((key, value.into()));
        self
    }

    /// Adds a number rounded to `digits` significant digits (`null` when not finite).
    pub fn num(self, key: &'static str, value: f64, digits: i32) -> Self {
        self.with(key, round(value, digits))
    }

    /// The value of a key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}

impl Serialize for Row {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, value) in &self.0 {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

/// `value` to `digits` significant digits, as JSON (`null` when not finite).
pub fn round(value: f64, digits: i32) -> Value {
    if !value.is_finite() {
        return Value::Null;
    }
    if value == 0.0 {
        return Value::from(0.0);
    }
    let magnitude = value.abs().log10().floor() as i32;
    let scale = 10f64.powi(digits - 1 - magnitude);
    Value::from((value * scale).round() / scale)
}

/// Prints rows: each at once as a JSON line with `--json`; otherwise as an aligned table of
/// every key seen, when the scenario is done ([`Printer::finish`]).
pub struct Printer {
    json: bool,
    rows: Vec<Row>,
}

impl Printer {
    /// A printer for `--json` or for people.
    pub fn new(json: bool) -> Self {
        Self {
            json,
            rows: Vec::new(),
        }
    }

    /// Prints (or keeps) a row.
    pub fn row(&mut self, row: &Row) {
        if self.json {
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string(row).unwrap_or_else(|_| "{}".to_owned())
            );
            let _ = out.flush();
        } else {
            eprintln!("  ... {}", progress(row));
            self.rows.push(row.clone());
        }
    }

    /// Prints the table of the rows kept.
    pub fn finish(&mut self) {
        if self.rows.is_empty() {
            return;
        }
        let mut keys: Vec<&'static str> = Vec::new();
        for row in &self.rows {
            for (key, _) in &row.0 {
                if !keys.contains(key) {
                    keys.push(key);
                }
            }
        }
        let table: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|row| {
                keys.iter()
                    .map(|k| row.get(k).map_or_else(|| "-".to_owned(), cell))
                    .collect()
            })
            .collect();
        let widths: Vec<usize> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                table
                    .iter()
                    .map(|r| r[i].len())
                    .max()
                    .unwrap_or(0)
                    .max(k.len())
            })
            .collect();
        let line = |cells: Vec<String>| {
            cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
        };
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let _ = writeln!(
            out,
            "{}",
            line(keys.iter().map(|k| k.to_string()).collect())
        );
        for cells in table {
            let _ = writeln!(out, "{}", line(cells));
        }
        let _ = out.flush();
        self.rows.clear();
    }
}

fn progress(row: &Row) -> String {
    row.0
        .iter()
        .take(4)
        .map(|(k, v)| format!("{k}={}", cell(v)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn cell(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_significant_digits() {
        assert_eq!(round(1234.567, 3), Value::from(1230.0));
        assert_eq!(round(0.012345, 2), Value::from(0.012));
        assert_eq!(round(f64::NAN, 2), Value::Null);
    }

    #[test]
    fn keeps_key_order() {
        let row = Row::new("x").with("b", 1).with("a", 2);
        assert_eq!(
            serde_json::to_string(&row).unwrap(),
            r#"{"scenario":"x","b":1,"a":2}"#
        );
    }
}
