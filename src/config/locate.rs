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
///
/// A key the parser refuses — defined twice (`name` twice in a table, a
/// `[table]` header twice), or a dotted key that extends a value — is not
/// in the parsed document. So each such key is given a name of its own,
/// the text parsed again (with recovery, so that a mistake elsewhere does
/// not hide the document), and the key named back in the path found.
pub(super) fn path_at(text: &str, offset: usize) -> Option<String> {
    let (_, errors) = toml::de::DeTable::parse_recoverable(text);
    let mut refused: Vec<Range<usize>> = errors
        .iter()
        .filter(|e| {
            let m = e.message();
            m.starts_with("duplicate key") || m.starts_with("cannot extend value")
        })
        .filter_map(|e| e.span())
        .collect();
    refused.sort_by_key(|s| s.start);
    let mut renamed = String::with_capacity(text.len());
    // (stand-in, the key as a path segment)
    let mut names: Vec<(String, String)> = Vec::new();
    let mut at = offset;
    let mut copied = 0;
    for span in refused {
        let Some(key) = text.get(span.clone()).filter(|_| span.start >= copied) else {
            continue;
        };
        let Some(name) = key_name(key) else {
            continue;
        };
        let stand_in = format!("__switchyard_refused_{}__", names.len());
        renamed.push_str(&text[copied..span.start]);
        if span.contains(&offset) {
            at = renamed.len();
        } else if span.end <= offset {
            at = at + stand_in.len() - key.len();
        }
        renamed.push_str(&stand_in);
        copied = span.end;
        names.push((stand_in, segment(&name).into_owned()));
    }
    renamed.push_str(&text[copied..]);
    let (doc, _) = toml::de::DeTable::parse_recoverable(&renamed);
    let (mut path, found) = containing_path(doc.get_ref(), at);
    if !found && path.is_empty() {
        return None;
    }
    for (stand_in, name) in &names {
        path = path.replace(stand_in, name);
    }
    Some(path)
}

/// The name of a key of one segment as written (bare or quoted), as TOML
/// reads it.
fn key_name(written: &str) -> Option<String> {
    let table: toml::Table = toml::from_str(&format!("{written} = 0")).ok()?;
    let mut entries = table.into_iter();
    match (entries.next(), entries.next()) {
        (Some((k, toml::Value::Integer(0))), None) => Some(k),
        _ => None,
    }
}

/// The deepest key or value of the document containing `offset` and
/// `true`; or, when no key or value contains it, the table descended into
/// last (`""` for the root) and `false`.
fn containing_path(doc: &toml::de::DeTable<'_>, offset: usize) -> (String, bool) {
    use toml::de::DeValue;
    let mut path = String::new();
    let mut table = doc;
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
            candidate.push_str(&segment(key.get_ref()));
            if in_key {
                return (candidate, true);
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
                        return (format!("{candidate}[{i}]"), true);
                    }
                    return (candidate, true);
                }
                _ => return (candidate, true),
            }
        }
        return (path, false);
    }
}

/// A key as a segment of a path: as is when bare, else quoted as TOML
/// would write it (`listener[0]."with space"`, `""`).
fn segment(key: &str) -> std::borrow::Cow<'_, str> {
    if !key.is_empty() && key.chars().all(is_bare) {
        return key.into();
    }
    let mut quoted = String::from('"');
    for c in key.chars() {
        match c {
            '"' | '\\' => {
                quoted.push('\\');
                quoted.push(c);
            }
            c if c.is_control() => quoted.push_str(&format!("\\u{:04X}", c as u32)),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted.into()
}

/// A character of a bare TOML key.
fn is_bare(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
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
    fn duplicate_keys_name_the_field() {
        let listener = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n";
        let cases = [
            (
                "[[listener]]\nname = \"a\"\n'name' = \"b\"\n".to_owned(),
                "test.toml:3:1: listener[0].name: duplicate key",
            ),
            (
                format!("{listener}[[listener.backend]]\nname = \"x\"\nweight = 1\nweight = 2\n"),
                "test.toml:7:1: listener[0].backend[0].weight: duplicate key",
            ),
            (
                format!("{listener}health_check = {{ fall = 1, fall = 2 }}\n"),
                "test.toml:4:28: listener[0].health_check.fall: duplicate key",
            ),
            (
                format!("{listener}health_check.fall = 1\nhealth_check . \"fall\" = 2\n"),
                "test.toml:5:16: listener[0].health_check.fall: duplicate key",
            ),
            (
                format!("{listener}[listener.sticky]\n[listener.sticky]\n"),
                "test.toml:5:11: listener[0].sticky: duplicate key",
            ),
            (
                "[admin]\n[global]\n[admin]\n".to_owned(),
                "test.toml:3:2: admin: duplicate key",
            ),
            (
                "bogus = 1\nbogus = 2\n".to_owned(),
                "test.toml:2:1: bogus: duplicate key",
            ),
            (
                format!(
                    "{listener}health_check = {{}}\n[[listener]]\n[listener.health_check]\n[ listener . health_check ]\n"
                ),
                "test.toml:7:14: listener[1].health_check: duplicate key",
            ),
            (
                format!("{listener}backend = []\n[[listener.backend]]\n"),
                "test.toml:5:12: listener[0].backend: duplicate key",
            ),
            (
                format!("{listener}\"with space\" = 1\n\"with space\" = 2\n"),
                "test.toml:5:1: listener[0].\"with space\": duplicate key",
            ),
            // Inside a key that is itself a duplicate.
            (
                format!(
                    "{listener}[listener.health_check]\npath = \"/\"\npath = {{ a = 0, a = 0 }}\n"
                ),
                "test.toml:6:17: listener[0].health_check.path.a: duplicate key",
            ),
        ];
        for (text, want) in cases {
            let e = error(&text);
            assert!(e.starts_with(want), "got {e:?}, want prefix {want:?}");
        }
    }

    #[test]
    fn keys_that_are_not_bare_are_quoted_in_the_path() {
        let e = error("\"\" = 1\n");
        assert!(
            e.starts_with("test.toml:1:1: \"\": unknown field ``"),
            "{e}"
        );
        let e = error("[[listener]]\n\"a \\\"b\\\"\" = 1\n");
        assert!(
            e.starts_with("test.toml:2:1: listener[0].\"a \\\"b\\\"\": unknown field"),
            "{e}"
        );
    }

    #[test]
    fn odd_text_is_located_without_a_panic() {
        // A key after a multi-byte character; a quoted key alone.
        for text in [
            "=\u{fffd}.\"\"",
            "\u{e9}\u{e9} = 1\n\u{e9}\u{e9} = 2",
            "\"\"",
        ] {
            let e = error(text);
            assert!(e.starts_with("test.toml:1:"), "{e}");
        }
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
