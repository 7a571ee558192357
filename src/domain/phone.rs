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

/// Digits a number written in free text may have: E.164's 8 to 15.
const NUMBER_DIGITS: std::ops::RangeInclusive<usize> = 8..=15;

/// Masks every phone number in free text, such as a provider's error
/// message, before it reaches a log, an event, a header or the store:
///
/// - `+` followed by 8 to 15 digits, which single spaces or hyphens may
///   group (`+254 798 765 432`); a group that would take it past 15 digits
///   is not part of it;
/// - any other run of 8 to 15 digits: an MSISDN written without its `+`
///   (and now and then a long id, which is a fair price).
///
/// All but the last four digits of each become `*`, as in
/// [`PhoneNumber::masked`]; everything else is kept as it was.
pub fn mask_numbers(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut masked = bytes.to_vec();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'+' {
            if let Some(digits) = e164_digits(bytes, i + 1) {
                for &at in &digits[..digits.len() - 4] {
                    masked[at] = b'*';
                }
                i = digits[digits.len() - 1] + 1;
                continue;
            }
            i += 1;
        } else if bytes[i].is_ascii_digit() {
            let end = digit_run_end(bytes, i);
            if NUMBER_DIGITS.contains(&(end - i)) {
                masked[i..end - 4].fill(b'*');
            }
            i = end;
        } else {
            i += 1;
        }
    }
    // Only ASCII digits were replaced, by an ASCII `*`: still UTF-8.
    String::from_utf8(masked).expect("masking keeps UTF-8 intact")
}

/// Where the digit run starting at `start` ends.
fn digit_run_end(bytes: &[u8], start: usize) -> usize {
    bytes[start..]
        .iter()
        .position(|b| !b.is_ascii_digit())
        .map_or(bytes.len(), |n| start + n)
}

/// The positions of the digits of an E.164-looking number that starts at
/// `start` (just after its `+`), if there is one.
fn e164_digits(bytes: &[u8], start: usize) -> Option<Vec<usize>> {
    let mut digits = Vec::new();
    let mut group = start;
    while bytes.get(group).is_some_and(u8::is_ascii_digit) {
        let end = digit_run_end(bytes, group);
        if digits.len() + (end - group) > *NUMBER_DIGITS.end() {
            break;
        }
        digits.extend(group..end);
        let grouped = matches!(bytes.get(end), Some(b' ' | b'-'))
            && bytes.get(end + 1).is_some_and(u8::is_ascii_digit);
        if !grouped {
            break;
        }
        group = end + 1;
    }
    NUMBER_DIGITS.contains(&digits.len()).then_some(digits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    #[test]
    fn numbers_in_free_text_keep_only_their_last_four_digits() {
        for (text, masked) in [
            (
                "The 'To' number +254798765432 is not a valid phone number",
                "The 'To' number +********5432 is not a valid phone number",
            ),
            ("to=254798765432&x=1", "to=********5432&x=1"),
            ("(+254 798 765 432)", "(+*** *** **5 432)"),
            ("+1-415-555-2671.", "+*-***-***-2671."),
            (
                "+12345678 and +123456789012345",
                "+****5678 and +***********2345",
            ),
            ("0712345678", "******5678"),
        ] {
            assert_eq!(mask_numbers(text), masked, "{text}");
        }
    }

    #[test]
    fn short_numbers_and_long_ids_are_left_alone() {
        for text in [
            "HTTP 400: error 21211",
            "retry in 1234567 ms",
            "+1234567",
            "id 1234567890123456789",
            "2026-11-22T10:00:00Z",
            "ünïcödé +x 12",
            "",
        ] {
            assert_eq!(mask_numbers(text), text);
        }
    }

    #[test]
    fn a_group_that_would_pass_fifteen_digits_ends_the_number() {
        assert_eq!(
            mask_numbers("+254 798 765 432 1234"),
            "+*** *** **5 432 1234"
        );
    }

    fn e164() -> impl Strategy<Value = String> {
        "\\+[1-9][0-9]{7,14}"
    }

    /// Text around a number: anything but digits, and not ending in `+`.
    fn words() -> impl Strategy<Value = String> {
        "[a-zA-Z :,.'()\\[\\]{}\"=ü]{0,20}"
    }

    proptest! {
        #[test]
        fn a_number_in_text_comes_out_as_masked_alone(
            before in words(),
            number in e164(),
            after in words(),
        ) {
            let phone = PhoneNumber::parse(&number).unwrap();
            let text = format!("{before}{number}{after}");
            prop_assert_eq!(mask_numbers(&text), format!("{before}{}{after}", phone.masked()));
        }

        #[test]
        fn the_digits_of_a_number_never_survive_in_a_row(
            before in words(),
            number in e164(),
            after in words(),
        ) {
            let text = format!("{before}{number} or {}{after}", &number[1..]);
            let masked = mask_numbers(&text);
            prop_assert!(!masked.contains(&number[1..]), "{}", masked);
        }

        #[test]
        fn masking_only_turns_digits_into_stars(text in any::<String>()) {
            let masked = mask_numbers(&text);
            prop_assert_eq!(masked.chars().count(), text.chars().count());
            for (was, is) in text.chars().zip(masked.chars()) {
                prop_assert!(was == is || (was.is_ascii_digit() && is == '*'));
            }
        }

        #[test]
        fn masking_twice_changes_nothing_more(text in "[0-9 +a-z-]{0,40}") {
            let once = mask_numbers(&text);
            prop_assert_eq!(mask_numbers(&once), once.clone());
        }

        #[test]
        fn text_with_only_short_digit_runs_is_unchanged(text in "([a-z ]{1,5}[0-9]{0,7})*") {
            prop_assert_eq!(mask_numbers(&text), text);
        }
    }
}
