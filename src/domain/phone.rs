//! E.164 phone numbers, and the masking that keeps them out of logs.

use std::fmt;

/// A phone number in E.164 form: `+` then 8 to 15 digits.
#[derive(Clone, PartialEq, Eq)]
pub struct PhoneNumber(String);

impl PhoneNumber {
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        let digits = raw.strip_prefix('+').ok_or("phoneNumber must be E.164")?;
        if !(8..=15).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err("phoneNumber must be E.164");
        }
        if digits.starts_with('0') {
            return Err("phoneNumber must be E.164 (no leading 0 after +)");
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The number with all but its last four digits hidden, for logs.
    pub fn masked(&self) -> String {
        mask_phone(&self.0)
    }
}

/// Debug never shows the full number, so a stray `{:?}` cannot leak it.
impl fmt::Debug for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PhoneNumber({})", self.masked())
    }
}

/// Masks any string that may be a phone number: everything but the last four
/// characters becomes `*` (a leading `+` is kept). Strings of four characters
/// or fewer are masked whole.
pub fn mask_phone(raw: &str) -> String {
    let chars: Vec<char> = raw.chars().take(32).collect();
    if chars.len() <= 4 {
        return "*".repeat(chars.len());
    }
    let keep_from = chars.len() - 4;
    chars
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if (i == 0 && *c == '+') || i >= keep_from {
                *c
            } else {
                '*'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_e164_numbers_of_8_to_15_digits() {
        for ok in ["+25471234", "+254712345678", "+123456789012345"] {
            assert!(PhoneNumber::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_everything_that_is_not_e164() {
        for bad in [
            "",
            "+",
            "254712345678",
            "+2547123",
            "+1234567890123456",
            "+25471234567a",
            "+254 712 345 678",
            "++254712345678",
            "+0254712345678",
            "+２５４７１２３４５６７８",
        ] {
            assert!(PhoneNumber::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn masking_keeps_only_the_last_four_digits() {
        let phone = PhoneNumber::parse("+254712345678").unwrap();
        assert_eq!(phone.masked(), "+********5678");
        assert_eq!(format!("{phone:?}"), "PhoneNumber(+********5678)");
        assert_eq!(mask_phone("123"), "***");
        assert_eq!(mask_phone("0712345678"), "******5678");
    }
}
