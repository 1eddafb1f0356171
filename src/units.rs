//! Parsing and printing of byte sizes (`64KiB`, `1MiB`, `4096`).

/// Parse a size such as `4096`, `64K`, `64KiB`, `1MiB`, `1.5G`, `2G`, `1TiB`. Suffixes are
/// binary multiples (`1K` = 1024, `1M` = 1024 KiB, ...), with or without `B`/`iB`; a fraction
/// must come to a whole number of bytes (`1.5K` = 1536, `0.1K` is refused).
///
/// # Errors
/// [`crate::Error::Invalid`] for anything else, or on overflow.
pub fn parse_size(s: &str) -> crate::Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        return Err(crate::Error::invalid(
            "size",
            format!("'{s}' does not start with a number"),
        ));
    }
    let mult: u64 = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(crate::Error::invalid(
                "size",
                format!("unknown suffix '{other}' in '{s}' (use K, M, G or T: binary, 1K = 1024)"),
            ))
        }
    };
    let too_large = || crate::Error::invalid("size", format!("'{s}' overflows 64 bits"));
    let whole: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| too_large())?
    };
    let mut bytes = whole.checked_mul(mult).ok_or_else(too_large)?;
    if !frac.is_empty() {
        // frac / 10^digits of `mult`, exactly (at most 19 digits fit a u128 product).
        if frac.len() > 18 {
            return Err(crate::Error::invalid(
                "size",
                format!("'{s}' has too many decimal places"),
            ));
        }
        let f: u128 = frac.parse().map_err(|_| too_large())?;
        let den = 10u128.pow(u32::try_from(frac.len()).unwrap_or(18));
        let num = f * u128::from(mult);
        if !num.is_multiple_of(den) {
            return Err(crate::Error::invalid(
                "size",
                format!("'{s}' is not a whole number of bytes"),
            ));
        }
        let part = u64::try_from(num / den).map_err(|_| too_large())?;
        bytes = bytes.checked_add(part).ok_or_else(too_large)?;
    }
    Ok(bytes)
}

/// Milliseconds since the Unix epoch as an RFC 3339 UTC time with milliseconds
/// (`2026-12-01T23:08:00.123Z`).
#[must_use]
#[cfg(feature = "cli")]
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        unix_ms % 1000
    )
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
        if n >= m && n.is_multiple_of(m) {
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
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("1.5K").unwrap(), 1536);
        assert_eq!(parse_size(".5M").unwrap(), 1 << 19);
        assert!(parse_size("0.1K").is_err());
        assert!(parse_size("1.2.3K").is_err());
        assert!(parse_size(".").is_err());
    }

    #[test]
    #[cfg(feature = "cli")]
    fn rfc3339() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339_ms(1_798_758_123_456), "2026-12-31T23:02:03.456Z");
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(65536), "64KiB");
        assert_eq!(format_size(1000), "1000B");
        assert_eq!(format_size(3 << 30), "3GiB");
    }
}
