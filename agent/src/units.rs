//! Parsing of human quantities on the command line and in config files ("128M", "0.5").

/// Parses a byte size: a plain number of bytes, or a number with K, M, G (powers of 1024),
/// optionally followed by "i" and/or "B" ("128M", "64MiB", "1G", "4096").
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_uppercase();
    let unit = unit.trim_end_matches('B').trim_end_matches('I');
    let mult: u64 = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return Err(format!("{s:?}: unknown unit (use K, M or G)")),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 128M"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("{s:?} is not a size like 128M"));
    }
    let bytes = n * mult as f64;
    if bytes > u64::MAX as f64 {
        return Err(format!("{s:?} is too large"));
    }
    Ok(bytes as u64)
}

/// Formats bytes for people: 1.5M, 128M, 4096B.
pub fn format_size(b: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)];
    for (u, m) in UNITS {
        if b >= m {
            let v = b as f64 / m as f64;
            return if v.fract() == 0.0 {
                format!("{v:.0}{u}")
            } else {
                format!("{v:.1}{u}")
            };
        }
    }
    format!("{b}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("128M"), Ok(128 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0.5K"), Ok(512));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("-1M").is_err());
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(128 << 20), "128M");
        assert_eq!(format_size(1536 << 10), "1.5M");
        assert_eq!(format_size(100), "100B");
    }
}
