//! `sms-service segments TEXT`: what a text costs as the service sends it,
//! so that a copywriter can check a template before it goes out: encoding,
//! parts and characters with smart encoding and without, each replacement
//! smart encoding makes, and why it makes none when it makes none.

use std::fmt::Write;

use crate::domain::{Cost, Encoding, MessageText, Replacement, Smart, MAX_NAMED};

/// The report on `text`; `smart_on` is `encoding.smart` of the settings.
/// A text the service would refuse (empty, longer than 1600 characters) is
/// an error, in the words of SmsFailed's detail.
pub fn segments_report(text: &str, smart_on: bool) -> anyhow::Result<String> {
    MessageText::parse(text).map_err(|why| anyhow::anyhow!("{why}"))?;
    let smart = Smart::naming(text, MAX_NAMED);
    let mut out = String::new();
    let with = Cost::of(smart.text(text));
    let without = Cost::of(text);
    // Writing to a String cannot fail.
    let _ = writeln!(out, "with smart encoding:    {}", cost(with));
    let _ = writeln!(out, "without smart encoding: {}", cost(without));
    match &smart {
        Smart::Gsm7 => out.push_str("replaced: nothing (every character is GSM-7)\n"),
        Smart::Replaced { replacements, .. } => {
            out.push_str("replaced:\n");
            list(&mut out, replacements);
        }
        Smart::Kept { replacements, why } => {
            let _ = writeln!(out, "replaced: nothing, as {why}; the look-alikes are:");
            list(&mut out, replacements);
        }
        Smart::Ucs2 { without_look_alike } => {
            let named: Vec<String> = without_look_alike
                .iter()
                .map(|c| format!("{c} (U+{:04X})", u32::from(*c)))
                .collect();
            let _ = writeln!(
                out,
                "replaced: nothing, the text needs UCS-2: no GSM-7 look-alike for {}",
                named.join(", ")
            );
        }
    }
    if !smart_on {
        out.push_str(
            "encoding.smart is false in these settings: the service sends the text as written\n",
        );
    }
    Ok(out)
}

fn cost(c: Cost) -> String {
    let encoding = match c.encoding {
        Encoding::Gsm7 => "GSM-7",
        Encoding::Ucs2 => "UCS-2",
    };
    let plural =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    format!(
        "{encoding}, {}, {}",
        plural(c.segments as usize, "segment", "segments"),
        plural(c.characters, "character", "characters")
    )
}

/// One line per replaced character: the glyph where it has one, its code
/// point and name, what it becomes, and how often.
fn list(out: &mut String, replacements: &[Replacement]) {
    for r in replacements {
        let l = r.look_alike;
        let glyph = if l.to.is_empty() || l.from.is_whitespace() {
            String::new()
        } else {
            format!("{} ", l.from)
        };
        let becomes = match l.to {
            "" => "removed".to_owned(),
            " " => "-> a space".to_owned(),
            "\n" => "-> a line break".to_owned(),
            to => format!("-> {to}"),
        };
        let _ = writeln!(
            out,
            "  {glyph}U+{:04X} {} {becomes} (x{})",
            u32::from(l.from),
            l.name,
            r.count
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_text_shows_both_costs_and_each_replacement() {
        let text = format!(
            "\u{201C}Asante\u{201D}\u{00A0}\u{2014} it\u{2019}s paid\u{200B}. {}",
            "a".repeat(60)
        );
        assert_eq!(
            segments_report(&text, true).unwrap(),
            "with smart encoding:    GSM-7, 1 segment, 82 characters\n\
             without smart encoding: UCS-2, 2 segments, 83 characters\n\
             replaced:\n\
             \x20 \u{201C} U+201C LEFT DOUBLE QUOTATION MARK -> \" (x1)\n\
             \x20 \u{201D} U+201D RIGHT DOUBLE QUOTATION MARK -> \" (x1)\n\
             \x20 U+00A0 NO-BREAK SPACE -> a space (x1)\n\
             \x20 \u{2014} U+2014 EM DASH -> - (x1)\n\
             \x20 \u{2019} U+2019 RIGHT SINGLE QUOTATION MARK -> ' (x1)\n\
             \x20 U+200B ZERO WIDTH SPACE removed (x1)\n"
        );
    }

    #[test]
    fn a_text_left_as_written_says_why() {
        assert_eq!(
            segments_report("Ok", true).unwrap(),
            "with smart encoding:    GSM-7, 1 segment, 2 characters\n\
             without smart encoding: GSM-7, 1 segment, 2 characters\n\
             replaced: nothing (every character is GSM-7)\n"
        );
        assert_eq!(
            segments_report("Can\u{2019}t\u{2028}wait", true).unwrap(),
            "with smart encoding:    UCS-2, 1 segment, 10 characters\n\
             without smart encoding: UCS-2, 1 segment, 10 characters\n\
             replaced: nothing, as it would not take fewer parts; the look-alikes are:\n\
             \x20 \u{2019} U+2019 RIGHT SINGLE QUOTATION MARK -> ' (x1)\n\
             \x20 U+2028 LINE SEPARATOR -> a line break (x1)\n"
        );
        assert_eq!(
            segments_report("\u{2018}Selam\u{2019} ሰላም", false).unwrap(),
            "with smart encoding:    UCS-2, 1 segment, 11 characters\n\
             without smart encoding: UCS-2, 1 segment, 11 characters\n\
             replaced: nothing, the text needs UCS-2: no GSM-7 look-alike for ሰ (U+1230), ላ (U+120B), ም (U+121D)\n\
             encoding.smart is false in these settings: the service sends the text as written\n"
        );
    }

    #[test]
    fn a_text_the_service_would_refuse_is_an_error() {
        assert_eq!(
            segments_report(" ", true).unwrap_err().to_string(),
            "text must not be empty"
        );
        assert_eq!(
            segments_report(&"a".repeat(1601), true)
                .unwrap_err()
                .to_string(),
            "text must be at most 1600 characters"
        );
    }
}
