//! Smart encoding: characters that only look like GSM-7 ones (curly quotes,
//! dashes, special spaces, the ellipsis, invisible zero-width characters,
//! accented capitals GSM-7 lacks) force a whole text into UCS-2, at 70
//! characters a part instead of 160. [`Smart::of`] replaces them with their
//! GSM-7 look-alikes, all or nothing, and only when that makes the text
//! GSM-7 in fewer parts: a text that needs UCS-2 anyway (Amharic, Chinese,
//! an emoji, Hausa's hooked letters) is never changed, nor one that would
//! take as many parts either way.
//!
//! The table is our own, after GOV.UK Notify's `SanitiseSMS`
//! (<https://github.com/alphagov/notifications-utils/blob/main/notifications_utils/sanitise_text.py>,
//! `REPLACEMENT_CHARACTERS`), with three quote marks of Twilio's Smart
//! Encoding list
//! (<https://www.twilio.com/docs/messaging/services/smart-encoding-char-list>)
//! and the accented capitals. What GSM-7 has is 3GPP TS 23.038's default
//! alphabet and extension table
//! (<https://www.unicode.org/Public/MAPPINGS/ETSI/GSM0338.TXT>), as
//! [`super::segments`] holds it.

use super::command::MessageText;
use super::segments::{count_segments, is_gsm7, Encoding};

/// A character outside GSM-7 and what it is replaced with.
#[derive(Debug, PartialEq, Eq)]
pub struct LookAlike {
    pub from: char,
    /// GSM-7 characters only; empty for an invisible character (Unicode
    /// general category Cf, format: it has no glyph), which is removed.
    pub to: &'static str,
    /// The character's Unicode name.
    pub name: &'static str,
}

const fn like(from: char, to: &'static str, name: &'static str) -> LookAlike {
    LookAlike { from, to, name }
}

/// Every replacement smart encoding makes. Nothing else is ever changed.
pub const LOOK_ALIKES: &[LookAlike] = &[
    // Quotation marks (Notify; U+201B, U+201F and U+02BC from Twilio's list).
    like('\u{2018}', "'", "LEFT SINGLE QUOTATION MARK"),
    like('\u{2019}', "'", "RIGHT SINGLE QUOTATION MARK"),
    like('\u{201A}', "'", "SINGLE LOW-9 QUOTATION MARK"),
    like('\u{201B}', "'", "SINGLE HIGH-REVERSED-9 QUOTATION MARK"),
    like('\u{02BC}', "'", "MODIFIER LETTER APOSTROPHE"),
    like('\u{201C}', "\"", "LEFT DOUBLE QUOTATION MARK"),
    like('\u{201D}', "\"", "RIGHT DOUBLE QUOTATION MARK"),
    like('\u{201E}', "\"", "DOUBLE LOW-9 QUOTATION MARK"),
    like('\u{201F}', "\"", "DOUBLE HIGH-REVERSED-9 QUOTATION MARK"),
    // Dashes (Notify).
    like('\u{2011}', "-", "NON-BREAKING HYPHEN"),
    like('\u{2013}', "-", "EN DASH"),
    like('\u{2014}', "-", "EM DASH"),
    like('\u{2212}', "-", "MINUS SIGN"),
    // Notify.
    like('\u{2026}', "...", "HORIZONTAL ELLIPSIS"),
    // Spaces (Notify).
    like('\u{00A0}', " ", "NO-BREAK SPACE"),
    like('\u{202F}', " ", "NARROW NO-BREAK SPACE"),
    like('\t', " ", "CHARACTER TABULATION"),
    // Notify removes these two; a line break is visible, so it stays one.
    like('\u{2028}', "\n", "LINE SEPARATOR"),
    like('\u{2029}', "\n", "PARAGRAPH SEPARATOR"),
    // Invisible (Cf), removed (Notify). Not the zero width joiner: it
    // holds emoji sequences together, and Notify keeps it in SMS too.
    like('\u{200B}', "", "ZERO WIDTH SPACE"),
    like('\u{200C}', "", "ZERO WIDTH NON-JOINER"),
    like('\u{2060}', "", "WORD JOINER"),
    like('\u{FEFF}', "", "ZERO WIDTH NO-BREAK SPACE"),
    like('\u{180E}', "", "MONGOLIAN VOWEL SEPARATOR"),
    // Accented capitals GSM-7 lacks (it has Ä Å Ç É Ñ Ö Ø Ü): capitals
    // often go without their accents in print. Lower-case letters keep
    // theirs: there an accent tells words apart (Spanish, Portuguese,
    // Yoruba tones), so such a text stays UCS-2.
    like('\u{00C0}', "A", "LATIN CAPITAL LETTER A WITH GRAVE"),
    like('\u{00C1}', "A", "LATIN CAPITAL LETTER A WITH ACUTE"),
    like('\u{00C2}', "A", "LATIN CAPITAL LETTER A WITH CIRCUMFLEX"),
    like('\u{00C3}', "A", "LATIN CAPITAL LETTER A WITH TILDE"),
    like('\u{00C8}', "E", "LATIN CAPITAL LETTER E WITH GRAVE"),
    like('\u{00CA}', "E", "LATIN CAPITAL LETTER E WITH CIRCUMFLEX"),
    like('\u{00CB}', "E", "LATIN CAPITAL LETTER E WITH DIAERESIS"),
    like('\u{00CC}', "I", "LATIN CAPITAL LETTER I WITH GRAVE"),
    like('\u{00CD}', "I", "LATIN CAPITAL LETTER I WITH ACUTE"),
    like('\u{00CE}', "I", "LATIN CAPITAL LETTER I WITH CIRCUMFLEX"),
    like('\u{00CF}', "I", "LATIN CAPITAL LETTER I WITH DIAERESIS"),
    like('\u{00D2}', "O", "LATIN CAPITAL LETTER O WITH GRAVE"),
    like('\u{00D3}', "O", "LATIN CAPITAL LETTER O WITH ACUTE"),
    like('\u{00D4}', "O", "LATIN CAPITAL LETTER O WITH CIRCUMFLEX"),
    like('\u{00D5}', "O", "LATIN CAPITAL LETTER O WITH TILDE"),
    like('\u{00D9}', "U", "LATIN CAPITAL LETTER U WITH GRAVE"),
    like('\u{00DA}', "U", "LATIN CAPITAL LETTER U WITH ACUTE"),
    like('\u{00DB}', "U", "LATIN CAPITAL LETTER U WITH CIRCUMFLEX"),
    like('\u{00DD}', "Y", "LATIN CAPITAL LETTER Y WITH ACUTE"),
];

/// The look-alike of `c`, if the table has one.
pub fn look_alike(c: char) -> Option<&'static LookAlike> {
    LOOK_ALIKES.iter().find(|l| l.from == c)
}

/// One character replaced throughout a text, and how often.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replacement {
    pub look_alike: &'static LookAlike,
    pub count: usize,
}

/// The most characters without a look-alike [`Smart::naming`] is asked to
/// name (`sms-service segments` names this many).
pub const MAX_NAMED: usize = 8;

/// Why smart encoding left a text as written, when it had look-alikes.
pub const NO_FEWER_PARTS: &str = "it would not take fewer parts";

/// What smart encoding does with one text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Smart {
    /// Every character is GSM-7 already: sent as written.
    Gsm7,
    /// Sent as `text`: replacing the look-alikes made it GSM-7 in fewer
    /// parts. `text` obeys the rules of [`MessageText`].
    Replaced {
        text: String,
        replacements: Vec<Replacement>,
    },
    /// Sent as written: replacing `replacements` would make the text
    /// GSM-7, but `why` (it would not take fewer parts, or would break a
    /// rule of [`MessageText`], such as its length).
    Kept {
        replacements: Vec<Replacement>,
        why: &'static str,
    },
    /// Sent as written, in UCS-2: these characters (the first distinct
    /// ones, as many as asked for) are outside GSM-7 and have no
    /// look-alike.
    Ucs2 { without_look_alike: Vec<char> },
}

impl Smart {
    /// Decides what smart encoding does with `text`, naming the first
    /// character without a look-alike if there is one: the service's
    /// decision, which stops reading a text at that character.
    pub fn of(text: &str) -> Self {
        Self::naming(text, 1)
    }

    /// As [`Smart::of`], naming up to `names` distinct characters without
    /// a look-alike (at least one), which costs reading further.
    pub fn naming(text: &str, names: usize) -> Self {
        let mut replacements: Vec<Replacement> = Vec::new();
        let mut without: Vec<char> = Vec::new();
        for c in text.chars().filter(|c| !is_gsm7(*c)) {
            match look_alike(c) {
                Some(l) => match replacements.iter_mut().find(|r| r.look_alike.from == c) {
                    Some(r) => r.count += 1,
                    None => replacements.push(Replacement {
                        look_alike: l,
                        count: 1,
                    }),
                },
                None if without.contains(&c) => {}
                None => {
                    without.push(c);
                    if without.len() >= names {
                        break;
                    }
                }
            }
        }
        if !without.is_empty() {
            return Self::Ucs2 {
                without_look_alike: without,
            };
        }
        if replacements.is_empty() {
            return Self::Gsm7;
        }
        let text_replaced: String =
            text.chars()
                .fold(String::with_capacity(text.len()), |mut out, c| {
                    match look_alike(c) {
                        Some(l) => out.push_str(l.to),
                        None => out.push(c),
                    }
                    out
                });
        if let Err(why) = MessageText::parse(&text_replaced) {
            return Self::Kept { replacements, why };
        }
        if count_segments(&text_replaced).1 >= count_segments(text).1 {
            return Self::Kept {
                replacements,
                why: NO_FEWER_PARTS,
            };
        }
        Self::Replaced {
            text: text_replaced,
            replacements,
        }
    }

    /// The text as sent: the replaced one, else `original`.
    pub fn text<'a>(&'a self, original: &'a str) -> &'a str {
        match self {
            Self::Replaced { text, .. } => text,
            _ => original,
        }
    }
}

/// What a text costs as sent: its encoding, parts and characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    pub encoding: Encoding,
    pub segments: u32,
    pub characters: usize,
}

impl Cost {
    pub fn of(text: &str) -> Self {
        let (encoding, segments) = count_segments(text);
        Self {
            encoding,
            segments,
            characters: text.chars().count(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn smart(text: &str) -> String {
        Smart::of(text).text(text).to_owned()
    }

    fn filler(n: usize) -> String {
        "Habari ".repeat(n / 7 + 1)[..n].to_owned()
    }

    #[test]
    fn the_table_maps_only_non_gsm7_characters_to_gsm7_text_each_once() {
        for (i, l) in LOOK_ALIKES.iter().enumerate() {
            assert!(!is_gsm7(l.from), "{:?} is GSM-7 already", l.from);
            assert!(l.to.chars().all(is_gsm7), "{:?} -> {:?}", l.from, l.to);
            assert!(
                LOOK_ALIKES[i + 1..].iter().all(|o| o.from != l.from),
                "{:?} twice",
                l.from
            );
            assert!(!l.name.is_empty());
        }
    }

    /// Unicode general category Cf (format characters, no glyph): the only
    /// characters smart encoding removes.
    const INVISIBLE: [char; 5] = ['\u{200B}', '\u{200C}', '\u{2060}', '\u{FEFF}', '\u{180E}'];

    #[test]
    fn only_invisible_characters_are_removed() {
        let removed: Vec<char> = LOOK_ALIKES
            .iter()
            .filter(|l| l.to.is_empty())
            .map(|l| l.from)
            .collect();
        assert_eq!(removed, INVISIBLE);
    }

    #[test]
    fn curly_quotes_and_dashes_are_replaced_when_that_saves_parts() {
        let text = format!(
            "\u{201C}Asante\u{201D} \u{2014} it\u{2019}s paid. {}",
            filler(60)
        );
        let Smart::Replaced {
            text: sent,
            replacements,
        } = Smart::of(&text)
        else {
            panic!("{:?}", Smart::of(&text));
        };
        assert_eq!(sent, format!("\"Asante\" - it's paid. {}", filler(60)));
        assert_eq!(Cost::of(&text).segments, 2);
        assert_eq!(Cost::of(&sent).segments, 1);
        let counted: Vec<(char, usize)> = replacements
            .iter()
            .map(|r| (r.look_alike.from, r.count))
            .collect();
        assert_eq!(
            counted,
            [
                ('\u{201C}', 1),
                ('\u{201D}', 1),
                ('\u{2014}', 1),
                ('\u{2019}', 1)
            ],
            "in order of first appearance"
        );
    }

    #[test]
    fn each_kind_of_look_alike_becomes_its_gsm7_form() {
        let cases = [
            ("a\u{00A0}b\u{202F}c\td", "a b c d"),
            ("wait\u{2026}", "wait..."),
            ("gov\u{200B}.uk\u{200C}\u{2060}\u{FEFF}\u{180E}", "gov.uk"),
            ("one\u{2028}two\u{2029}three", "one\ntwo\nthree"),
            ("\u{2018}a\u{201A}\u{201B}\u{02BC}", "'a'''"),
            ("\u{201E}b\u{201F}", "\"b\""),
            ("1\u{2011}2\u{2013}3\u{2212}4", "1-2-3-4"),
            (
                "\u{00C0}\u{00C1}\u{00C2}\u{00C3} \u{00C8}\u{00CA}\u{00CB}",
                "AAAA EEE",
            ),
            ("\u{00CC}\u{00CD}\u{00CE}\u{00CF}", "IIII"),
            (
                "\u{00D2}\u{00D3}\u{00D4}\u{00D5} \u{00D9}\u{00DA}\u{00DB} \u{00DD}",
                "OOOO UUU Y",
            ),
        ];
        for (given, sent) in cases {
            // Long enough that UCS-2 takes more parts than GSM-7.
            let given = format!("{given} {}", filler(100));
            assert_eq!(
                smart(&given),
                format!("{sent} {}", filler(100)),
                "{given:?}"
            );
        }
    }

    #[test]
    fn a_text_that_saves_no_part_is_sent_as_written() {
        let text = "Can\u{2019}t wait!";
        assert_eq!(
            Smart::of(text),
            Smart::Kept {
                replacements: vec![Replacement {
                    look_alike: look_alike('\u{2019}').unwrap(),
                    count: 1
                }],
                why: NO_FEWER_PARTS
            }
        );
        // 70 ellipses: one UCS-2 part, but 210 septets (two parts) as dots.
        let dots = "\u{2026}".repeat(70);
        assert!(matches!(
            Smart::of(&dots),
            Smart::Kept {
                why: NO_FEWER_PARTS,
                ..
            }
        ));
        assert_eq!(smart(&dots), dots);
    }

    #[test]
    fn a_text_that_would_break_the_text_rules_is_sent_as_written() {
        // Zero-width spaces only: nothing would be left.
        let invisible = "\u{200B}".repeat(80);
        assert_eq!(
            Smart::of(&invisible),
            Smart::Kept {
                replacements: vec![Replacement {
                    look_alike: look_alike('\u{200B}').unwrap(),
                    count: 80
                }],
                why: "text must not be empty"
            }
        );
        // 1000 + 3 x 600 characters: fewer parts, but past 1600 characters.
        let long = format!("{}{}", "a".repeat(1000), "\u{2026}".repeat(600));
        assert!(Cost::of(&long).segments > 19, "UCS-2: 24 parts");
        assert!(matches!(
            Smart::of(&long),
            Smart::Kept {
                why: "text must be at most 1600 characters",
                ..
            }
        ));
    }

    #[test]
    fn texts_that_need_ucs2_anyway_are_never_changed() {
        let amharic = "\u{2018}ሰላም\u{2019} \u{2014} ክፍያዎ ደርሷል።";
        assert_eq!(
            Smart::naming(amharic, MAX_NAMED),
            Smart::Ucs2 {
                without_look_alike: vec!['ሰ', 'ላ', 'ም', 'ክ', 'ፍ', 'ያ', 'ዎ', 'ደ']
            },
            "the first eight distinct, in order"
        );
        assert_eq!(
            Smart::of(amharic),
            Smart::Ucs2 {
                without_look_alike: vec!['ሰ']
            },
            "the service reads no further than the first"
        );
        for text in [
            amharic,
            "\u{201C}你好\u{201D}",
            "Thanks\u{2019} \u{1F600}",
            // Hausa with its hooked letters: UCS-2 whatever is replaced.
            "Na gode \u{2014} an biya ku\u{0257}in ki\u{0257}a \u{2018}yanzu\u{2019}",
            // A lower-case accent keeps its letter, and so its text.
            "\u{201C}Ol\u{00E1}\u{201D}",
        ] {
            let long = format!("{text} {}", filler(200));
            assert!(matches!(Smart::of(&long), Smart::Ucs2 { .. }), "{text}");
            assert_eq!(smart(&long), long);
        }
    }

    #[test]
    fn swahili_and_hausa_in_plain_letters_are_gsm7_already() {
        for text in [
            "Malipo yamepokelewa. Asante sana!",
            "Mun karbi kudin ku. Na gode!",
            "{Price} [EUR] \u{20AC}5 ~ ^ | \\",
        ] {
            assert_eq!(Smart::of(text), Smart::Gsm7, "{text}");
        }
    }

    #[test]
    fn the_cost_counts_characters_not_bytes() {
        let cost = Cost::of("Asante \u{2019}");
        assert_eq!(
            (cost.encoding, cost.segments, cost.characters),
            (Encoding::Ucs2, 1, 8)
        );
    }

    /// Strings mixing GSM-7, look-alikes, characters that force UCS-2 and
    /// anything at all.
    fn texts() -> impl Strategy<Value = String> {
        let gsm: Vec<char> = "Aaz09 .,!?@£$¥èéÉÆÑ\n\r{}[]~|^\\€".chars().collect();
        let alikes: Vec<char> = LOOK_ALIKES.iter().map(|l| l.from).collect();
        let foreign: Vec<char> = vec!['ሰ', '你', '\u{1F600}', 'ɗ', 'á', 'ж', '\u{200D}'];
        let c = prop_oneof![
            6 => proptest::sample::select(gsm),
            3 => proptest::sample::select(alikes),
            1 => proptest::sample::select(foreign),
            1 => any::<char>(),
        ];
        proptest::collection::vec(c, 1..400).prop_map(|cs| cs.into_iter().collect())
    }

    /// Whether `sent` is `given` with look-alikes of the table replaced:
    /// walking `given`, each character is either in `sent` as itself or a
    /// table entry whose `to` is in `sent` at that point; nothing else.
    fn only_look_alikes_replaced(given: &str, sent: &str) -> bool {
        let mut rest = sent;
        for c in given.chars() {
            if let Some(after) = rest.strip_prefix(c) {
                rest = after;
            } else if let Some(after) = look_alike(c).and_then(|l| rest.strip_prefix(l.to)) {
                rest = after;
            } else {
                return false;
            }
        }
        rest.is_empty()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn never_more_segments_than_the_original(text in texts()) {
            let sent = smart(&text);
            prop_assert!(Cost::of(&sent).segments <= Cost::of(&text).segments);
        }

        #[test]
        fn smart_encoding_twice_is_smart_encoding_once(text in texts()) {
            let once = smart(&text);
            prop_assert_eq!(smart(&once), once);
        }

        #[test]
        fn a_changed_text_is_gsm7_in_fewer_parts_with_only_look_alikes_replaced(text in texts()) {
            let sent = smart(&text);
            if sent != text {
                let (before, after) = (Cost::of(&text), Cost::of(&sent));
                prop_assert_eq!(after.encoding, Encoding::Gsm7);
                prop_assert!(after.segments < before.segments);
                prop_assert!(only_look_alikes_replaced(&text, &sent));
                prop_assert!(MessageText::parse(&sent).is_ok());
            }
        }

        #[test]
        fn a_text_with_a_character_without_look_alike_is_unchanged(
            text in texts(),
            at in any::<proptest::sample::Index>(),
            foreign in proptest::sample::select(vec!['ሰ', '你', '\u{1F600}', 'ɗ', 'á']),
        ) {
            let mut chars: Vec<char> = text.chars().collect();
            chars.insert(at.index(chars.len() + 1), foreign);
            let text: String = chars.into_iter().collect();
            prop_assert_eq!(smart(&text), text);
        }
    }
}
