//! Parsing and printing of byte sizes (`64KiB`, `1MiB`, `4096`).

/// Parse a size such as `4096`, `64K`, `64KiB`, `1MiB`, `2G`, `1TiB` (binary multiples).
///
/// # Errors
/// [`crate::Error::Invalid`] for anything else, or on overflow.
pub fn parse_size(s: &str) -> crate::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(crate::Error::invalid(
            "size",
            format!("'{s}' does not start with a number"),
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| crate::Error::invalid("size", format!("'{s}' is too large")))?;
    let mult: u64 = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(crate::Error::invalid(
                "size",
                format!("unknown suffix '{other}' in '{s}'"),
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| crate::Error::invalid("size", format!("'{s}' overflows 64 bits")))
}

/// Print a byte count with a binary suffix when it divides evenly.
#[must_use]
pub fn format_size(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, m) in UNITS {
        if n >= m && n % m == 0 {
            return format!("{}{name}", n / m);
        }
    }
    format!("{n}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert!(parse_size("").is_err());
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("99999999999999TiB").is_err());
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(65536), "64KiB");
        assert_eq!(format_size(1000), "1000B");
        assert_eq!(format_size(3 << 30), "3GiB");
    }
}
