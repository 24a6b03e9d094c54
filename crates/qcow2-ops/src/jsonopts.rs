//! QEMU's `json:{...}` file names: the JSON object flattened to the
//! dotted option names QEMU's block layer uses (`file.filename`,
//! `file.inject-error.0.event`).

/// The options of the JSON object `text` (what follows `json:`), with
/// QEMU's messages for text that is not one.
pub fn json_options(text: &str) -> Result<Vec<(String, String)>, String> {
    let v: serde_json::Value = serde_json::from_str(&single_quotes(text))
        .map_err(|e| format!("Could not parse the JSON options: {e}"))?;
    if !v.is_object() {
        return Err("Invalid JSON object given".into());
    }
    let mut flat = Vec::new();
    flatten("", &v, &mut flat);
    Ok(flat)
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        // QEMU's flattened lists: `inject-error.0.event`.
        serde_json::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                flatten(&format!("{prefix}.{i}"), v, out);
            }
        }
        serde_json::Value::String(s) => out.push((prefix.to_string(), s.clone())),
        serde_json::Value::Null => out.push((prefix.to_string(), "null".to_string())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// QEMU's JSON parser also takes 'single-quoted' strings: turn them into
/// standard JSON strings.
fn single_quotes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    let mut in_double = false;
    while let Some(c) = it.next() {
        match c {
            '"' => {
                in_double = !in_double;
                out.push(c);
            }
            '\\' => {
                out.push(c);
                if let Some(n) = it.next() {
                    out.push(n);
                }
            }
            '\'' if !in_double => {
                out.push('"');
                while let Some(c) = it.next() {
                    match c {
                        '\'' => break,
                        '"' => out.push_str("\\\""),
                        '\\' => match it.next() {
                            Some('\'') => out.push('\''),
                            Some(n) => {
                                out.push('\\');
                                out.push(n);
                            }
                            None => {}
                        },
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_objects_lists_and_single_quotes() {
        let o = json_options(
            "{'driver': 'qcow2', 'file': {'driver': 'blkdebug', 'inject-error': [{'event': 'l2_load', 'once': true}], 'image.filename': \"a'b\"}}",
        )
        .unwrap();
        let get = |k: &str| o.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str());
        assert_eq!(get("driver"), Some("qcow2"));
        assert_eq!(get("file.inject-error.0.event"), Some("l2_load"));
        assert_eq!(get("file.inject-error.0.once"), Some("true"));
        assert_eq!(get("file.image.filename"), Some("a'b"));
        assert_eq!(
            json_options("[1]").unwrap_err(),
            "Invalid JSON object given"
        );
        assert!(json_options("{").is_err());
    }
}
