//! Number parsing and formatting with qemu's conventions.
//!
//! Sizes are written as plain decimal, `0x` hex, or a decimal with an
//! optional fraction followed by a binary suffix (`b`, `k`, `m`, `g`, `t`,
//! `p`, `e`, case-insensitive); a fraction needs a suffix other than `b`.

/// Why a size did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// Not a number, or an unknown suffix.
    Invalid,
    /// Above `i64::MAX`.
    TooLarge,
}

fn suffix_shift(c: char) -> Option<u32> {
    Some(match c.to_ascii_lowercase() {
        'b' => 0,
        'k' => 10,
        'm' => 20,
        'g' => 30,
        't' => 40,
        'p' => 50,
        'e' => 60,
        _ => return None,
    })
}

/// Parses a size the way qemu-img and qemu-io do.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    parse_size_below(s, i64::MAX as u128)
}

/// Parses the value of a size-typed creation option (`-o name=value`) as
/// QEMU's option parser does: any value up to `u64::MAX`. The errors are
/// QEMU's messages (without the file name prefix).
pub fn parse_option_size(name: &str, v: &str) -> Result<u64, String> {
    let invalid = || {
        format!(
            "Parameter '{name}' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively."
        )
    };
    let range = || format!("Value '{v}' is out of range for parameter '{name}'");
    if let Some(neg) = v.trim_start().strip_prefix('-') {
        return match parse_size_below(neg, u64::MAX as u128) {
            Ok(_) | Err(SizeError::TooLarge) => Err(range()),
            Err(SizeError::Invalid) => Err(invalid()),
        };
    }
    match parse_size_below(v, u64::MAX as u128) {
        Ok(n) => Ok(n),
        Err(SizeError::TooLarge) => Err(range()),
        Err(SizeError::Invalid) => Err(invalid()),
    }
}

fn parse_size_below(s: &str, limit: u128) -> Result<u64, SizeError> {
    let t = s.trim_start();
    let t = t.strip_prefix('+').unwrap_or(t);
    if t.is_empty() {
        return Err(SizeError::Invalid);
    }
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(SizeError::Invalid);
        }
        let digits = hex.trim_start_matches('0');
        if digits.len() > 16 {
            return Err(SizeError::TooLarge);
        }
        let v = if digits.is_empty() {
            0
        } else {
            u64::from_str_radix(digits, 16).map_err(|_| SizeError::Invalid)?
        } as u128;
        return if v > limit {
            Err(SizeError::TooLarge)
        } else {
            Ok(v as u64)
        };
    }
    let bytes = t.as_bytes();
    let mut i = 0;
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        i += 1;
    }
    let int_part = &t[..i];
    let mut frac_part = "";
    if i < bytes.len() && bytes[i] == b'.' {
        let start = i + 1;
        let mut j = start;
        while j < bytes.len() && bytes[j].is_ascii_digit() {
            j += 1;
        }
        frac_part = &t[start..j];
        i = j;
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(SizeError::Invalid);
        }
    } else if int_part.is_empty() {
        return Err(SizeError::Invalid);
    }
    let had_dot = t[..i].contains('.');
    let rest = &t[i..];
    let shift = match rest.chars().count() {
        0 => None,
        1 => Some(suffix_shift(rest.chars().next().unwrap_or(' ')).ok_or(SizeError::Invalid)?),
        _ => return Err(SizeError::Invalid),
    };
    if had_dot && shift.unwrap_or(0) == 0 {
        return Err(SizeError::Invalid);
    }
    let shift = shift.unwrap_or(0);
    let int_digits = int_part.trim_start_matches('0');
    if int_digits.len() > 20 {
        return Err(SizeError::TooLarge);
    }
    let int_v: u128 = if int_digits.is_empty() {
        0
    } else {
        int_digits.parse().map_err(|_| SizeError::TooLarge)?
    };
    let mut v = int_v << shift;
    if !frac_part.is_empty() {
        // floor(0.frac * 2^shift), exactly, using at most 18 digits.
        let digits = &frac_part[..frac_part.len().min(18)];
        let num: u128 = digits.parse().map_err(|_| SizeError::Invalid)?;
        let den = 10u128.pow(digits.len() as u32);
        let add = (num << shift) / den;
        v += add;
    }
    if v > limit {
        return Err(SizeError::TooLarge);
    }
    Ok(v as u64)
}

/// `%0.3g`-style formatting of a value below 1000 (or slightly above).
fn fmt_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let exp = v.abs().log10().floor() as i32;
    // round to 3 significant digits
    let decimals = (2 - exp).max(0) as usize;
    let s = format!("{:.*}", decimals, v);
    let rounded: f64 = s.parse().unwrap_or(v);
    let exp2 = if rounded == 0.0 {
        0
    } else {
        rounded.abs().log10().floor() as i32
    };
    if !(-4..3).contains(&exp2) {
        let m = rounded / 10f64.powi(exp2);
        let ms = format!("{:.2}", m);
        let ms = trim_zeros(&ms);
        return format!(
            "{}e{}{:02}",
            ms,
            if exp2 < 0 { '-' } else { '+' },
            exp2.abs()
        );
    }
    let decimals = (2 - exp2).max(0) as usize;
    trim_zeros(&format!("{:.*}", decimals, rounded))
}

fn trim_zeros(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s.to_string()
    }
}

/// qemu-img's human size (`196 KiB`, `1 MiB`, `0 B`).
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let mut i = 0usize;
    // largest i with val >= 1000 * 1024^(i-1)
    while i < 6 && (val as u128) >= 1000u128 * (1u128 << (10 * i)) {
        i += 1;
    }
    let div = (1u128 << (10 * i)) as f64;
    format!("{} {}B", fmt_g3(val as f64 / div), SUFFIXES[i])
}

/// qemu-io's statistics number format (`64 KiB`, `34.415 MiB`, `512 bytes`).
pub fn cvtstr(value: f64) -> String {
    const UNITS: [(f64, &str); 6] = [
        (1152921504606846976.0, " EiB"),
        (1125899906842624.0, " PiB"),
        (1099511627776.0, " TiB"),
        (1073741824.0, " GiB"),
        (1048576.0, " MiB"),
        (1024.0, " KiB"),
    ];
    let (v, suffix) = UNITS
        .iter()
        .find(|(u, _)| value >= *u)
        .map(|(u, s)| (value / u, *s))
        .unwrap_or((value, " bytes"));
    let s = format!("{:.3}", v);
    match s.strip_suffix(".000") {
        Some(t) => format!("{t}{suffix}"),
        None => format!("{s}{suffix}"),
    }
}

/// qemu-io's elapsed time (`00.00 sec`, `01:02.50`).
pub fn timestr(secs: f64) -> String {
    let total_cs = (secs * 100.0).round() as u64;
    let (s, cs) = (total_cs / 100, total_cs % 100);
    if s >= 3600 {
        format!("{}:{:02}:{:02}.{:02}", s / 3600, (s / 60) % 60, s % 60, cs)
    } else if s >= 60 {
        format!("{:02}:{:02}.{:02}", s / 60, s % 60, cs)
    } else {
        format!("{:02}.{:02} sec", s, cs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0x10"), Ok(16));
        assert_eq!(parse_size("0X10"), Ok(16));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("1.k"), Ok(1024));
        assert_eq!(parse_size(".5k"), Ok(512));
        assert_eq!(parse_size("0.1k"), Ok(102));
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("64T"), Ok(64 << 40));
        assert_eq!(parse_size("1e"), Ok(1 << 60));
        assert_eq!(parse_size("1.5e"), Ok(3 << 59));
        assert_eq!(parse_size("1b"), Ok(1));
        assert_eq!(parse_size("010"), Ok(10));
        assert_eq!(parse_size("+5"), Ok(5));
        assert_eq!(parse_size("0"), Ok(0));
        for bad in [
            "0x10k", "1kB", "1.5e3", "0x1.8k", "0.5b", "1.5", "00x10", "0x", "", "-5", "abc", "1x",
            ".",
        ] {
            assert_eq!(parse_size(bad), Err(SizeError::Invalid), "{bad}");
        }
        assert_eq!(parse_size("8E"), Err(SizeError::TooLarge));
        assert_eq!(parse_size("16E"), Err(SizeError::TooLarge));
        assert_eq!(
            parse_size("99999999999999999999999"),
            Err(SizeError::TooLarge)
        );
    }

    #[test]
    fn option_sizes_reach_u64_max() {
        assert_eq!(parse_option_size("x", "15E"), Ok(15 << 60));
        assert_eq!(parse_option_size("x", "18446744073709551615"), Ok(u64::MAX));
        assert_eq!(
            parse_option_size("x", "18446744073709551616"),
            Err("Value '18446744073709551616' is out of range for parameter 'x'".into())
        );
        assert_eq!(
            parse_option_size("x", "-1"),
            Err("Value '-1' is out of range for parameter 'x'".into())
        );
        assert!(parse_option_size("x", "-abc")
            .unwrap_err()
            .starts_with("Parameter 'x' expects a non-negative number"));
        assert!(parse_option_size("x", "")
            .unwrap_err()
            .starts_with("Parameter 'x' expects a non-negative number"));
    }

    #[test]
    fn human() {
        assert_eq!(size_to_str(200704), "196 KiB");
        assert_eq!(size_to_str(197120), "192 KiB");
        assert_eq!(size_to_str(1048576), "1 MiB");
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(5120), "5 KiB");
        assert_eq!(size_to_str(1610612736), "1.5 GiB");
        assert_eq!(cvtstr(65536.0), "64 KiB");
        assert_eq!(cvtstr(512.0), "512 bytes");
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(4466.0402), "4.361 KiB");
        assert_eq!(timestr(0.001), "00.00 sec");
    }
}
