//! How many SMS parts a text needs. GSM-7 texts take 160 septets in one
//! part, 153 per part when concatenated (extension characters take two
//! septets and are never split across parts); any other text is sent as
//! UCS-2: 70 UTF-16 units in one part, 67 per part, surrogate pairs kept whole.

/// The alphabet a text is sent in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Gsm7,
    Ucs2,
}

const GSM7_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
const GSM7_EXTENSION: &str = "^{}\\[~]|€\u{000C}";

/// Whether `c` is in the GSM 03.38 basic set or its extension table.
pub(super) fn is_gsm7(c: char) -> bool {
    gsm7_septets(c).is_some()
}

fn gsm7_septets(c: char) -> Option<usize> {
    if GSM7_BASIC.contains(c) {
        Some(1)
    } else if GSM7_EXTENSION.contains(c) {
        Some(2)
    } else {
        None
    }
}

/// Returns the encoding a text is sent in and the number of parts it needs.
pub fn count_segments(text: &str) -> (Encoding, u32) {
    let septets: Option<Vec<usize>> = text.chars().map(gsm7_septets).collect();
    match septets {
        Some(units) => (Encoding::Gsm7, parts(&units, 160, 153)),
        None => {
            let units: Vec<usize> = text.chars().map(char::len_utf16).collect();
            (Encoding::Ucs2, parts(&units, 70, 67))
        }
    }
}

/// Packs indivisible units into parts: one part if all fit in `single`,
/// otherwise parts of at most `multi`.
fn parts(units: &[usize], single: usize, multi: usize) -> u32 {
    if units.iter().sum::<usize>() <= single {
        return 1;
    }
    let (mut count, mut used) = (1u32, 0usize);
    for &u in units {
        if used + u > multi {
            count += 1;
            used = 0;
        }
        used += u;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm7_text_of_160_characters_is_one_part() {
        assert_eq!(count_segments(&"a".repeat(160)), (Encoding::Gsm7, 1));
        assert_eq!(
            count_segments("Payment received. Thank you!"),
            (Encoding::Gsm7, 1)
        );
    }

    #[test]
    fn gsm7_text_over_160_is_split_in_parts_of_153() {
        assert_eq!(count_segments(&"a".repeat(161)).1, 2);
        assert_eq!(count_segments(&"a".repeat(306)).1, 2);
        assert_eq!(count_segments(&"a".repeat(307)).1, 3);
    }

    #[test]
    fn extension_characters_count_twice_and_are_not_split() {
        assert_eq!(count_segments(&"€".repeat(80)), (Encoding::Gsm7, 1));
        assert_eq!(count_segments(&"€".repeat(81)).1, 2);
        // 152 plain septets then one escape pair: the pair moves to part two.
        let text = format!("{}€{}", "a".repeat(152), "a".repeat(10));
        assert_eq!(count_segments(&text).1, 2);
    }

    #[test]
    fn non_gsm_text_is_ucs2_with_70_and_67() {
        assert_eq!(count_segments(&"ж".repeat(70)), (Encoding::Ucs2, 1));
        assert_eq!(count_segments(&"ж".repeat(71)).1, 2);
        assert_eq!(count_segments(&"ж".repeat(134)).1, 2);
        assert_eq!(count_segments(&"ж".repeat(135)).1, 3);
    }

    #[test]
    fn surrogate_pairs_are_never_split() {
        assert_eq!(count_segments(&"😀".repeat(35)).1, 1);
        // 66 units then a pair: the pair does not fit in 67 and moves on.
        let text = format!("{}😀{}", "ж".repeat(66), "ж".repeat(10));
        assert_eq!(count_segments(&text).1, 2);
        let text = format!("{}😀", "ж".repeat(133));
        assert_eq!(count_segments(&text).1, 3);
    }
}
