//! A small JSON value with ordered keys, printed in qemu-img's pretty style
//! (four-space indent, empty containers broken over two lines).

/// A JSON value.
#[derive(Debug, Clone)]
pub enum J {
    /// Unsigned integer.
    U(u64),
    /// Boolean.
    B(bool),
    /// String.
    S(String),
    /// Array.
    A(Vec<J>),
    /// Object with keys in print order.
    O(Vec<(&'static str, J)>),
}

fn escape(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) == 0x7f => {
                out.push_str(&format!("\\u{:04X}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn indent(level: usize, out: &mut String) {
    for _ in 0..level {
        out.push_str("    ");
    }
}

fn write(v: &J, level: usize, out: &mut String) {
    match v {
        J::U(n) => out.push_str(&n.to_string()),
        J::B(b) => out.push_str(if *b { "true" } else { "false" }),
        J::S(s) => escape(s, out),
        J::A(items) => {
            out.push('[');
            for (i, it) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push('\n');
                indent(level + 1, out);
                write(it, level + 1, out);
            }
            out.push('\n');
            indent(level, out);
            out.push(']');
        }
        J::O(items) => {
            out.push('{');
            for (i, (k, it)) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push('\n');
                indent(level + 1, out);
                escape(k, out);
                out.push_str(": ");
                write(it, level + 1, out);
            }
            out.push('\n');
            indent(level, out);
            out.push('}');
        }
    }
}

/// Pretty-prints `v` the way qemu-img does (no trailing newline).
pub fn pretty(v: &J) -> String {
    let mut out = String::new();
    write(v, 0, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let v = J::O(vec![
            ("children", J::A(vec![])),
            ("a", J::U(1)),
            (
                "d",
                J::O(vec![("type", J::S("file".into())), ("data", J::O(vec![]))]),
            ),
        ]);
        assert_eq!(
            pretty(&v),
            "{\n    \"children\": [\n    ],\n    \"a\": 1,\n    \"d\": {\n        \"type\": \"file\",\n        \"data\": {\n        }\n    }\n}"
        );
    }
}
