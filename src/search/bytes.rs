//! Byte sizes as people write them. Every unit is binary: `K`, `M`, `G`, `T` (with or without `B` or
//! `iB`) mean 1024, 1024², 1024³, 1024⁴ bytes, because GPU memory is sold and reported that way
//! (a "24 GB" card has 24 GiB). A bare number is bytes. Decimals are allowed: `1.5G`.

/// A size the user wrote that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BytesError {
    #[error("`{0}` is not a size; expected e.g. 24G, 24GiB, 24000M or 25769803776")]
    Invalid(String),
    #[error("unknown unit `{unit}` in `{text}`; expected B, K, M, G or T (binary: G = GiB)")]
    Unit { text: String, unit: String },
}

/// Parses `24G`, `24GB`, `24GiB`, `24000M`, `25769803776`, `1.5 G`, case-insensitively.
pub fn parse_bytes(text: &str) -> Result<u64, BytesError> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number = number.replace('_', "");
    let value: f64 = number
        .parse()
        .map_err(|_| BytesError::Invalid(text.to_string()))?;
    let unit_lower = unit.trim().to_ascii_lowercase();
    let exponent = match unit_lower.as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 1,
        "m" | "mb" | "mib" => 2,
        "g" | "gb" | "gib" => 3,
        "t" | "tb" | "tib" => 4,
        _ => {
            return Err(BytesError::Unit {
                text: text.to_string(),
                unit: unit.trim().to_string(),
            });
        }
    };
    let bytes = value * 1024f64.powi(exponent);
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(BytesError::Invalid(text.to_string()));
    }
    if exponent == 0 && number.contains('.') {
        return Err(BytesError::Invalid(text.to_string()));
    }
    Ok(bytes.round() as u64)
}

/// `1.50 GiB`, `512.0 MiB`, `900 B`: three significant figures in the largest binary unit that keeps
/// the number at least 1.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else if value >= 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_ways_people_write_gpu_memory() {
        let gib24 = 24 * 1024 * 1024 * 1024;
        assert_eq!(parse_bytes("24G"), Ok(gib24));
        assert_eq!(parse_bytes("24GB"), Ok(gib24));
        assert_eq!(parse_bytes("24GiB"), Ok(gib24));
        assert_eq!(parse_bytes("24 gib"), Ok(gib24));
        assert_eq!(parse_bytes("25769803776"), Ok(gib24));
        assert_eq!(parse_bytes("24000M"), Ok(24_000 * 1024 * 1024));
        assert_eq!(parse_bytes("1.5G"), Ok(1536 * 1024 * 1024));
        assert_eq!(parse_bytes("512k"), Ok(512 * 1024));
        assert_eq!(parse_bytes("100B"), Ok(100));
    }

    #[test]
    fn rejects_what_is_not_a_size() {
        assert!(matches!(parse_bytes("24X"), Err(BytesError::Unit { .. })));
        assert!(matches!(parse_bytes("GiB"), Err(BytesError::Invalid(_))));
        assert!(matches!(parse_bytes(""), Err(BytesError::Invalid(_))));
        assert!(matches!(parse_bytes("1.5"), Err(BytesError::Invalid(_))));
        assert!(matches!(parse_bytes("-3G"), Err(BytesError::Invalid(_))));
        assert!(matches!(
            parse_bytes("99999999999T"),
            Err(BytesError::Invalid(_))
        ));
    }

    #[test]
    fn formats_in_binary_units() {
        assert_eq!(format_bytes(900), "900 B");
        assert_eq!(format_bytes(1536 * 1024 * 1024), "1.50 GiB");
        assert_eq!(format_bytes(24 * 1024 * 1024 * 1024), "24.0 GiB");
        assert_eq!(format_bytes(512 * 1024 * 1024), "512 MiB");
    }
}
