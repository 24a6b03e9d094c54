//! A small JSON value with ordered keys, printed in qemu-img's pretty style
//! (four-space indent, empty containers broken over two lines).

/// A JSON value.
#[derive(Debug, Clone)]
pub enum J {
    /// Unsigned integer.
    U(u64),
    /// Signed integer.
    I(i64),
    /// Boolean.
    B(bool),
    /// String.
    S(String),
    /// String given as bytes (a file name: need not be UTF-8).
    R(Vec<u8>),
    /// Array.
    A(Vec<J>),
    /// Object with keys in print order.
    O(Vec<(&'static str, J)>),
}

/// The code point of the sequence at the start of `b` (non-empty, no NUL
/// first) with the number of bytes it takes, as QEMU's JSON writer decodes
/// strings ("modified UTF-8"): `None` for an invalid sequence, which then
/// spans its lead byte and the continuation bytes that follow it; overlong
/// forms, surrogates, noncharacters and code points past U+10FFFF are
/// invalid, except the two-byte form of U+0000.
fn decode(b: &[u8]) -> (Option<u32>, usize) {
    let lead = b[0];
    if lead < 0x80 {
        return (Some(lead as u32), 1);
    }
    if lead >= 0xfe || lead & 0x40 == 0 {
        return (None, 1);
    }
    let len = lead.leading_ones() as usize;
    let mut cp = (lead & (0x7f >> len)) as u32;
    for i in 1..len {
        match b.get(i) {
            Some(&c) if c & 0xc0 == 0x80 => cp = cp << 6 | (c & 0x3f) as u32,
            _ => return (None, i),
        }
    }
    let min = [0, 0, 0x80, 0x800, 0x1_0000, 0x20_0000, 0x400_0000][len];
    let valid = (cp >= min || (len == 2 && cp == 0))
        && cp <= 0x10_ffff
        && !(0xd800..=0xdfff).contains(&cp)
        && !(0xfdd0..=0xfdef).contains(&cp)
        && cp & 0xfffe != 0xfffe;
    (valid.then_some(cp), len)
}

/// A JSON string exactly as qemu-img writes it: ASCII only, everything
/// outside printable ASCII as `\uXXXX` (surrogate pairs beyond the BMP),
/// invalid bytes as U+FFFD; the string ends at a NUL byte.
fn escape(s: &[u8], out: &mut String) {
    out.push('"');
    let mut rest = s;
    while let Some(&b0) = rest.first() {
        if b0 == 0 {
            break;
        }
        let (cp, n) = decode(rest);
        rest = &rest[n..];
        match cp {
            Some(0x22) => out.push_str("\\\""),
            Some(0x5c) => out.push_str("\\\\"),
            Some(0x0a) => out.push_str("\\n"),
            Some(0x0d) => out.push_str("\\r"),
            Some(0x09) => out.push_str("\\t"),
            Some(0x08) => out.push_str("\\b"),
            Some(0x0c) => out.push_str("\\f"),
            Some(c) if (0x20..0x7f).contains(&c) => out.push(c as u8 as char),
            Some(c) if c > 0xffff => {
                let v = c - 0x1_0000;
                out.push_str(&format!(
                    "\\u{:04X}\\u{:04X}",
                    0xd800 + (v >> 10),
                    0xdc00 + (v & 0x3ff)
                ));
            }
            c => out.push_str(&format!("\\u{:04X}", c.unwrap_or(0xfffd))),
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
        J::I(n) => out.push_str(&n.to_string()),
        J::B(b) => out.push_str(if *b { "true" } else { "false" }),
        J::S(s) => escape(s.as_bytes(), out),
        J::R(b) => escape(b, out),
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
                escape(k.as_bytes(), out);
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
    fn strings_as_qemu_writes_them() {
        let cases: &[(&[u8], &str)] = &[
            (b"a/b c.qcow2", r#""a/b c.qcow2""#),
            (b"q\"\\\n\t\x01\x7f", r#""q\"\\\n\t\u0001\u007F""#),
            ("b\u{e4}se".as_bytes(), r#""b\u00E4se""#),
            ("\u{1f600}".as_bytes(), r#""\uD83D\uDE00""#),
            (b"base\xff\xfe.qcow2", r#""base\uFFFD\uFFFD.qcow2""#),
            // Truncated sequence: one replacement for lead + continuations.
            (b"\xe2\x82x", r#""\uFFFDx""#),
            // Overlong, surrogate, noncharacter, past U+10FFFF, two-byte NUL.
            (b"\xe0\x80\xaf", r#""\uFFFD""#),
            (b"\xed\xa0\x80", r#""\uFFFD""#),
            (b"\xef\xbf\xbe", r#""\uFFFD""#),
            (b"\xf4\x90\x80\x80", r#""\uFFFD""#),
            (b"\xc0\x80", r#""\u0000""#),
            (b"ab\0cd", r#""ab""#),
        ];
        for (bytes, want) in cases {
            let mut out = String::new();
            escape(bytes, &mut out);
            assert_eq!(&out, want, "{bytes:?}");
        }
    }

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
