//! The option tokens of the qemu-img-style commands parsed by hand (`amend`,
//! `resize`, `commit`, `rebase`, `measure`): `--long=value`, `--long value`,
//! `-xvalue`, `-x value`, and getopt's wording for unknown ones.

use crate::Fail;

/// One option token split into its key (`-x` or `--long`) and an inline
/// value (`--long=v`, `-xv`), if any.
pub fn split(s: &str) -> (String, Option<String>) {
    match s.strip_prefix("--") {
        Some(l) => match l.split_once('=') {
            Some((k, v)) => (format!("--{k}"), Some(v.to_string())),
            None => (s.to_string(), None),
        },
        None if s.len() > 2 => (s[..2].to_string(), Some(s[2..].to_string())),
        None => (s.to_string(), None),
    }
}

/// The value of option `key`: inline, or the next argument; a missing one is
/// getopt's "option requires an argument" through `usage`.
pub fn value(
    key: &str,
    inline: &Option<String>,
    it: &mut impl Iterator<Item = String>,
    usage: impl Fn(&str) -> Fail,
) -> Result<String, Fail> {
    match inline {
        Some(v) => Ok(v.clone()),
        None => it.next().ok_or_else(|| {
            usage(&format!(
                "option requires an argument -- '{}'",
                key.trim_start_matches('-')
            ))
        }),
    }
}

/// getopt's complaint about the unknown option `key` (`-x` or `--long`).
pub fn unknown(key: &str) -> String {
    let k = key.trim_start_matches('-');
    if k.len() == 1 {
        format!("invalid option -- '{k}'")
    } else {
        format!("unrecognized option '--{k}'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert_eq!(split("--shrink"), ("--shrink".into(), None));
        assert_eq!(split("--object=x"), ("--object".into(), Some("x".into())));
        assert_eq!(split("-ofoo"), ("-o".into(), Some("foo".into())));
        assert_eq!(split("-q"), ("-q".into(), None));
        let mut it = vec!["next".to_string()].into_iter();
        assert_eq!(
            value("-o", &None, &mut it, |m: &str| Fail::new(m)).unwrap(),
            "next"
        );
        assert!(value("-o", &None, &mut it, |m: &str| Fail::new(m)).is_err());
    }
}
