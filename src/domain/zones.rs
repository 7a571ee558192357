//! The time zones a phone number may be in: its country, then every zone
//! of that country.
//!
//! - The country (region) comes from the number by libphonenumber's
//!   metadata, through the `phonenumber` crate
//!   (<https://docs.rs/phonenumber>): for a calling code shared by several
//!   countries (`+1`, `+7`) the number's area code decides.
//! - The zones of a country come from the tz database's `zone1970.tab`
//!   (public domain; <https://www.iana.org/time-zones>, embedded as
//!   `zone1970.tab` beside this file, release 2025b): one row per zone,
//!   each listing the countries it covers.
//! - The offsets come from the tz database bundled into `jiff`, so an
//!   image without `/usr/share/zoneinfo` keeps them.
//!
//! A number whose country has no zone (`+800` and the other
//! non-geographic codes, or a number libphonenumber does not place) has
//! none here: quiet hours cannot tell its night from its day.

use std::collections::HashMap;
use std::sync::OnceLock;

use jiff::tz::TimeZone;

use super::PhoneNumber;

/// `zone1970.tab` of the tz database, as published.
const ZONE1970_TAB: &str = include_str!("zone1970.tab");

/// Regions libphonenumber names that `zone1970.tab` lists under another
/// code: Ascension and Tristan da Cunha (Saint Helena's zone), Kosovo
/// (Serbia's).
const ALIASES: [(&str, &str); 3] = [("AC", "SH"), ("TA", "SH"), ("XK", "RS")];

/// Every country's zones, read from the table once.
fn table() -> &'static HashMap<&'static str, Vec<TimeZone>> {
    static TABLE: OnceLock<HashMap<&'static str, Vec<TimeZone>>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut zones: HashMap<&'static str, Vec<TimeZone>> = HashMap::new();
        let rows = ZONE1970_TAB.lines().filter(|l| !l.starts_with('#'));
        for row in rows {
            let mut columns = row.split('\t');
            let (Some(countries), Some(_), Some(name)) =
                (columns.next(), columns.next(), columns.next())
            else {
                continue;
            };
            // Every name of the table is in jiff's copy of the database
            // (a unit test checks).
            let Ok(zone) = TimeZone::get(name) else {
                continue;
            };
            for country in countries.split(',') {
                zones.entry(country).or_default().push(zone.clone());
            }
        }
        zones
    })
}

/// The zones of the country with ISO 3166 code `country` (`KE`); empty
/// for an unknown code.
pub fn zones_of_country(country: &str) -> &'static [TimeZone] {
    let country = ALIASES
        .iter()
        .find(|(alias, _)| *alias == country)
        .map_or(country, |(_, code)| code);
    table().get(country).map_or(&[], Vec::as_slice)
}

/// The country of `number` (`KE` for `+254…`), if libphonenumber places it.
pub fn country_of(number: &PhoneNumber) -> Option<String> {
    let parsed = phonenumber::parse(None, number.as_str()).ok()?;
    let id = parsed.country().id()?;
    Some(id.as_ref().to_owned())
}

/// The zones `number` may be in: its country's (empty if unknown).
pub fn zones_of(number: &PhoneNumber) -> &'static [TimeZone] {
    country_of(number).map_or(&[], |country| zones_of_country(&country))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(zones: &[TimeZone]) -> Vec<&str> {
        zones.iter().filter_map(TimeZone::iana_name).collect()
    }

    #[test]
    fn every_zone_of_the_table_is_in_the_bundled_database() {
        for row in ZONE1970_TAB.lines().filter(|l| !l.starts_with('#')) {
            let name = row.split('\t').nth(2).unwrap();
            assert!(TimeZone::get(name).is_ok(), "{name}");
        }
        assert!(table().len() > 240, "{} countries", table().len());
    }

    #[test]
    fn a_number_gives_its_country_and_the_country_its_zones() {
        for (number, country, zone) in [
            ("+254712345678", "KE", "Africa/Nairobi"),
            ("+447400123456", "GB", "Europe/London"),
            ("+4915112345678", "DE", "Europe/Berlin"),
            ("+16137827274", "CA", "America/Toronto"),
            ("+12015550123", "US", "America/New_York"),
            ("+79161234567", "RU", "Europe/Moscow"),
            ("+77011234567", "KZ", "Asia/Almaty"),
            ("+3545551234", "IS", "Africa/Abidjan"),
        ] {
            let number = PhoneNumber::parse(number).unwrap();
            assert_eq!(country_of(&number).as_deref(), Some(country), "{number:?}");
            assert!(
                names(zones_of(&number)).contains(&zone),
                "{country}: {:?}",
                names(zones_of(&number))
            );
        }
        assert_eq!(names(zones_of_country("KE")), ["Africa/Nairobi"]);
        assert!(zones_of_country("US").len() > 20, "the US spans many zones");
        assert!(zones_of_country("ZZ").is_empty());
    }

    #[test]
    fn libphonenumbers_own_regions_take_the_zone_they_keep_time_by() {
        for region in ["AC", "TA", "XK"] {
            assert!(!zones_of_country(region).is_empty(), "{region}");
        }
    }

    #[test]
    fn a_number_of_no_country_has_no_zone() {
        let freephone = PhoneNumber::parse("+80012345678").unwrap();
        assert_eq!(country_of(&freephone), None);
        assert!(zones_of(&freephone).is_empty());
    }

    #[test]
    fn every_region_libphonenumber_knows_has_a_zone() {
        // The regions of the calling codes, from the metadata itself.
        let mut missing = Vec::new();
        for code in 1..1000u16 {
            for id in phonenumber::metadata::DATABASE
                .by_code(&code)
                .into_iter()
                .flatten()
            {
                let region = id.id();
                if region != "001" && zones_of_country(region).is_empty() {
                    missing.push(region.to_owned());
                }
            }
        }
        assert!(missing.is_empty(), "regions without a zone: {missing:?}");
    }
}
