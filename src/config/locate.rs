//! Where in the file a mistake is: the path of a field
//! (`listener[1].backend[0].weight`) and its line and column.
//!
//! Validation names the field it rejects by path, knowing nothing of the
//! text; serde names a byte offset, knowing nothing of the fields. This
//! module turns either into the other, so every error reads
//! `file:line:column: field: message`.

use std::fmt;
use std::ops::Range;

/// A validation failure before it is located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FieldError {
    pub(super) path: FieldPath,
    pub(super) message: String,
}

/// Path of a field in the document: `listener[1].backend[0].weight`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct FieldPath(Vec<Segment>);

/// One step of a path: a key, or the index into an array of tables.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(&'static str),
    Index(usize),
}

impl FieldPath {
    pub(super) fn key(&self, key: &'static str) -> FieldPath {
        let mut p = self.clone();
        p.0.push(Segment::Key(key));
        p
    }
    pub(super) fn item(&self, key: &'static str, index: usize) -> FieldPath {
        let mut p = self.key(key);
        p.0.push(Segment::Index(index));
        p
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Segment::Key(k) if i == 0 => write!(f, "{k}")?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// 1-based line and column of a byte offset.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, column)
}

/// The span of the deepest part of `path` that exists in the document: the
/// field itself, or the table it is missing from.
pub(super) fn span_of(text: &str, path: &FieldPath) -> Option<Range<usize>> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut span = None;
    let mut table: Option<&toml::de::DeTable<'_>> = Some(doc.get_ref());
    let mut value: Option<&toml::Spanned<toml::de::DeValue<'_>>> = None;
    for seg in &path.0 {
        let next = match (seg, table, value) {
            (Segment::Key(k), Some(t), _) => t.get(*k),
            (Segment::Key(k), None, Some(v)) => v.get_ref().get(*k),
            (Segment::Index(i), _, Some(v)) => v.get_ref().get(*i),
            _ => None,
        };
        let Some(next) = next else { break };
        span = Some(next.span());
        table = None;
        value = Some(next);
    }
    span
}

/// The path of the deepest key or value that contains byte `offset`.
pub(super) fn path_at(text: &str, offset: usize) -> Option<String> {
    use toml::de::DeValue;
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut path = String::new();
    let mut table = doc.get_ref();
    'descend: loop {
        for (key, value) in table.iter() {
            let in_key = key.span().contains(&offset);
            // Table values may span only their header: look inside too.
            if !in_key && !value_contains(value, offset) {
                continue;
            }
            let mut candidate = path.clone();
            if !candidate.is_empty() {
                candidate.push('.');
            }
            candidate.push_str(key.get_ref());
            if in_key {
                return Some(candidate);
            }
            match value.get_ref() {
                DeValue::Table(t) => {
                    path = candidate;
                    table = t;
                    continue 'descend;
                }
                DeValue::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        if !value_contains(item, offset) {
                            continue;
                        }
                        if let DeValue::Table(t) = item.get_ref() {
                            path = format!("{candidate}[{i}]");
                            table = t;
                            continue 'descend;
                        }
                        return Some(format!("{candidate}[{i}]"));
                    }
                    return Some(candidate);
                }
                _ => return Some(candidate),
            }
        }
        return (!path.is_empty()).then_some(path);
    }
}

/// Whether a value, or any key or value inside it, contains `offset`.
fn value_contains(value: &toml::Spanned<toml::de::DeValue<'_>>, offset: usize) -> bool {
    use toml::de::DeValue;
    value.span().contains(&offset)
        || match value.get_ref() {
            DeValue::Table(t) => t
                .iter()
                .any(|(k, v)| k.span().contains(&offset) || value_contains(v, offset)),
            DeValue::Array(items) => items.iter().any(|item| value_contains(item, offset)),
            _ => false,
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::error;

    #[test]
    fn serde_errors_name_the_field_by_position() {
        let e = error(
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n[[listener.backend]]\nname = \"y\"\naddress = \"127.0.0.1:3\"\nweight = -1\n",
        );
        assert!(
            e.starts_with("test.toml:10:10: listener[0].backend[1].weight: invalid value"),
            "{e}"
        );
        let e = error("[global]\nshutdown_timeout = 5\n");
        assert!(
            e.starts_with("test.toml:2:20: global.shutdown_timeout: "),
            "{e}"
        );
        let e = error("[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nretries = \"x\"\n");
        assert!(
            e.starts_with("test.toml:4:11: listener[0].retries: "),
            "{e}"
        );
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
