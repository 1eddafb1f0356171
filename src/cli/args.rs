//! Value parsers for the command line: every flag's range is checked while parsing, so a value
//! out of range is a usage error (exit 2) that states the valid range.

use crate::limits;
use crate::model::ExtentSpec;
use crate::units::{format_size, parse_size};
use crate::{Error, Result};

/// Shown under `--help` of commands that take sizes.
pub const SIZES_HELP: &str = "Sizes: a number of bytes with an optional binary suffix \
(K, M, G, T, with or without B or iB: 1K = 1KiB = 1024 bytes, 1M = 1048576) and an optional \
fraction that comes to whole bytes (1.5G).";

/// A size (`64KiB`, `1.5G`).
pub fn size(s: &str) -> std::result::Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// A size within `min..=max`, a multiple of `unit`.
fn size_in(s: &str, min: u64, max: u64, unit: u64) -> std::result::Result<u64, String> {
    let n = size(s)?;
    if n < min || n > max || n % unit != 0 {
        let unit = if unit > 1 {
            format!(", a multiple of {}", format_size(unit))
        } else {
            String::new()
        };
        return Err(format!(
            "{s} is out of range (valid: {} to {}{unit})",
            format_size(min),
            format_size(max)
        ));
    }
    Ok(n)
}

/// `--rate`: at least one byte per second.
pub fn rate(s: &str) -> std::result::Result<u64, String> {
    size_in(s, 1, u64::MAX, 1).map_err(|_| format!("{s}: the rate must be at least 1 byte/s"))
}

/// `--threads` of the copier: 1 to 64.
pub fn threads(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=64).contains(&n) => Ok(n),
        _ => Err(format!("{s} is out of range (valid: 1 to 64 threads)")),
    }
}

/// `--batch`: 4 KiB to 4 MiB per copy request.
pub fn batch(s: &str) -> std::result::Result<u64, String> {
    size_in(
        s,
        u64::from(limits::GRAIN_MIN_BYTES),
        limits::COPY_BATCH_BYTES_MAX,
        1,
    )
}

/// `--depth` of `copy`: requests each worker has in flight in each direction.
pub fn depth(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=limits::COPY_DEPTH_MAX).contains(&n) => Ok(n),
        _ => Err(format!(
            "{s} is out of range (valid: 1 to {} requests)",
            limits::COPY_DEPTH_MAX
        )),
    }
}

/// `--journal` of `init`: per journal copy.
pub fn journal(s: &str) -> std::result::Result<u64, String> {
    size_in(
        s,
        limits::JOURNAL_MIN_BYTES,
        limits::JOURNAL_MAX_BYTES,
        limits::JOURNAL_BLOCK_BYTES as u64,
    )
}

/// `--capacity` of `init`: per checkpoint area.
pub fn capacity(s: &str) -> std::result::Result<u64, String> {
    size_in(
        s,
        limits::CHECKPOINT_MIN_BYTES,
        limits::CHECKPOINT_MAX_BYTES,
        4096,
    )
}

/// `--log-size`: 0 (no copy log) or a multiple of 4 KiB from 64 KiB to 1 GiB.
pub fn log_size(s: &str) -> std::result::Result<u64, String> {
    if size(s)? == 0 {
        return Ok(0);
    }
    size_in(s, limits::LOG_MIN_BYTES, limits::LOG_MAX_BYTES, 4096)
}

/// `--grain`: a power of two from 4 KiB to 1 MiB.
pub fn grain(s: &str) -> std::result::Result<u64, String> {
    let n = size(s)?;
    let (min, max) = (
        u64::from(limits::GRAIN_MIN_BYTES),
        u64::from(limits::GRAIN_MAX_BYTES),
    );
    if !n.is_power_of_two() || n < min || n > max {
        return Err(format!(
            "{s} is not a valid grain (valid: a power of two from {} to {})",
            format_size(min),
            format_size(max)
        ));
    }
    Ok(n)
}

/// `read`'s length: 1 byte to 64 MiB (`export` writes whole images).
pub fn read_len(s: &str) -> std::result::Result<u64, String> {
    size_in(s, 1, limits::IO_BYTES_MAX, 1)
        .map_err(|_| format!("{s} is out of range (valid: 1 byte to 64MiB; use export for more)"))
}

/// `--extent`: checks the syntax and keeps the text (it travels to a serving process as is).
pub fn extent(s: &str) -> std::result::Result<String, String> {
    parse_extent(s).map(|_| s.to_string()).map_err(|e| match e {
        Error::Invalid { why, .. } => why,
        e => e.to_string(),
    })
}

/// Parse `OFFSET:LEN[@TARGET_OFFSET]` (see [`ExtentSpec::parse`]).
///
/// # Errors
/// [`Error::Invalid`] naming the text.
pub fn parse_extent(s: &str) -> Result<ExtentSpec> {
    ExtentSpec::parse(s)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests unwrap to fail loudly")]
    use super::*;

    #[test]
    fn ranges_are_stated() {
        assert!(rate("0").unwrap_err().contains("at least 1"));
        assert_eq!(rate("1.5M").unwrap(), 3 << 19);
        assert!(threads("0").unwrap_err().contains("1 to 64"));
        assert!(threads("65").is_err());
        assert!(batch("8MiB").unwrap_err().contains("4KiB to 4MiB"));
        assert!(journal("1000").unwrap_err().contains("multiple of 512B"));
        assert!(grain("3KiB").unwrap_err().contains("power of two"));
        assert!(extent("1M").unwrap_err().contains("OFFSET:LEN"));
        assert!(extent("0:0").unwrap_err().contains("length is 0"));
        assert_eq!(
            parse_extent("1MiB:1MiB@0").unwrap(),
            ExtentSpec {
                source_offset: 1 << 20,
                target_offset: 0,
                len: 1 << 20
            }
        );
    }
}
