//! Patient pseudonyms (`docs/pseudonyms.md`).
//!
//! `pseudonym = HMAC-SHA256(K_registry,v, encode(normalise(identifiers)))`, where
//! `K_registry,v = HKDF-SHA256(salt, master secret, info = registry code ‖ key version)`.
//! The same patient gets the same pseudonym from any centre within one registry, and
//! unlinkable pseudonyms in different registries. Identifiers live only in
//! [`PatientIdentity`], which zeroises its memory on drop and never prints its content.
//!
//! [`Pseudonymiser::candidates`] and [`Candidates::choose`] are the derivation of a
//! patient's pseudonym in a registry, key versions included (the caller looks up which of
//! the older pseudonyms the registry knows): `service::Services::derive_pseudonym` uses
//! them behind its rate limit, and `demo` for its synthetic patients.
//! Synthetic patients (`demo`, tests, benchmarks) carry national identifiers of their own
//! issuer, [`SYNTHETIC_ISSUER`]: a code no country can ever hold, so a synthetic patient
//! can never be given a real patient's pseudonym, and they take the same validation and
//! derivation as real identifiers.

use std::collections::HashMap;
use std::fmt;
use std::sync::{LazyLock, RwLock};

use chrono::NaiveDate;
use data_encoding::{Encoding, Specification};
use ring::{hkdf, hmac};
use secrecy::ExposeSecret;
use unicode_normalization::{UnicodeNormalization, char::is_combining_mark};
use zeroize::Zeroizing;

use crate::domain::{CountryCode, DomainError, FieldViolations, MIN_YEAR, Sex};
use crate::keys::MasterSecret;

/// Domain separation of the HMAC input.
pub const ENCODING_TAG: &[u8] = b"ern-registry/pseudonym/v1";
/// HKDF salt of the registry keys.
pub const HKDF_SALT: &[u8] = b"ern-registry/v1 pseudonym";
/// Longest accepted identifier field, in characters.
pub const MAX_FIELD_CHARS: usize = 128;

/// Crockford's base32 alphabet (no I, L, O, U).
const ALPHABET: &str = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Crockford's base32 over [`ALPHABET`]: most significant bit first, no padding (a
/// pseudonym encodes 160 bits, exactly 32 characters).
static BASE32: LazyLock<Encoding> = LazyLock::new(|| {
    let mut spec = Specification::new();
    spec.symbols.push_str(ALPHABET);
    spec.encoding().expect("32 distinct ASCII symbols")
});
/// Length of a pseudonym's text: `R000-V000-` + 32 characters + check character.
pub const PSEUDONYM_LEN: usize = 43;

/// The issuer of synthetic national identifiers (`docs/pseudonyms.md`, "Synthetic
/// identifiers").
///
/// `XT` is an ISO 3166-1 *user-assigned* code element. ISO 3166 leaves AA, QM to QZ, XA
/// to XZ and ZZ to users and its maintenance agency never assigns them to a country, so
/// no state issues personal identifiers under `XT`. The user-assigned codes that do
/// stand for real people somewhere were passed over: XK (Kosovo), XI and XU (Northern
/// Ireland, the rest of the United Kingdom, in EU customs and VAT), and XX and ZZ, which
/// systems use for an unknown or invalid country (a real patient's identifier of unknown
/// origin could arrive under them). The service accepts no other code that is not
/// officially assigned, and an `XT` value must have the synthetic format
/// ([`is_synthetic_value`]): an identifier under `XT` is a synthetic patient's, never a
/// real one's, while it passes the same validation, encoding and HMAC as a real one. A
/// Dutch test BSN range would not do: far too small for the generator's millions.
pub const SYNTHETIC_ISSUER: &str = "XT";
/// A synthetic identifier's value: these letters, then [`SYNTHETIC_DIGITS`] digits.
pub const SYNTHETIC_PREFIX: &str = "SYN";
/// Digits of a synthetic identifier's value, after [`SYNTHETIC_PREFIX`].
pub const SYNTHETIC_DIGITS: usize = 9;

/// Whether `compact` (spaces, dots and dashes removed, upper case) is a synthetic
/// identifier's value: [`SYNTHETIC_PREFIX`] and [`SYNTHETIC_DIGITS`] digits, e.g.
/// `SYN000000042`.
pub fn is_synthetic_value(compact: &str) -> bool {
    compact
        .strip_prefix(SYNTHETIC_PREFIX)
        .is_some_and(|d| d.len() == SYNTHETIC_DIGITS && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Who issued a national identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Issuer {
    /// A country, by its officially assigned ISO 3166-1 alpha-2 code.
    Country(CountryCode),
    /// The synthetic-data generator: [`SYNTHETIC_ISSUER`].
    Synthetic,
}

impl Issuer {
    /// The code, as it enters the HMAC input.
    pub fn code(&self) -> &str {
        match self {
            Issuer::Country(country) => country.as_str(),
            Issuer::Synthetic => SYNTHETIC_ISSUER,
        }
    }
}

/// Normalised patient identifiers. Zeroised on drop; `Debug` prints nothing of them.
///
/// Every identifying field is a `Zeroizing<String>`; the derive checks it (a field added
/// without `skip` is wiped too) and marks the type `ZeroizeOnDrop`. The countries and
/// the sex are not identifying on their own.
#[derive(zeroize::ZeroizeOnDrop)]
pub enum PatientIdentity {
    National {
        #[zeroize(skip)]
        issuer: Issuer,
        value: Zeroizing<String>,
    },
    Demographic {
        given_names: Zeroizing<String>,
        family_name: Zeroizing<String>,
        date_of_birth: Zeroizing<String>,
        #[zeroize(skip)]
        sex: Sex,
        place_of_birth: Zeroizing<String>,
        #[zeroize(skip)]
        country_of_birth: CountryCode,
        /// Given names, family name and place of birth as they were folded before
        /// 2026-12-05, each as typed and lower-cased first (six, in that order), when that
        /// differs; empty otherwise ([`PatientIdentity::as_folded_before`]).
        folded_before: Vec<Zeroizing<String>>,
    },
}

impl fmt::Debug for PatientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PatientIdentity::National { .. } => f.write_str("PatientIdentity::National(..)"),
            PatientIdentity::Demographic { .. } => f.write_str("PatientIdentity::Demographic(..)"),
        }
    }
}

/// Folds a name or place for keying: Unicode NFKD, diacritics dropped, letters that do
/// not decompose mapped (ø→o, ß→ss, æ→ae, ...), lower case (Greek final ς as σ, the
/// lower case of Σ wherever it stands), and everything that is not a letter or digit
/// (spaces, hyphens, apostrophes, dots) removed, the apostrophes and primes Unicode
/// counts as modifier letters (ʹ ʺ ʻ ʼ ʽ ʾ ʿ ˈ) included.
pub fn normalise_text(s: &str) -> Zeroizing<String> {
    fold(s, Fold::Current)
}

/// How names were folded: today, or before 2026-12-05 (Greek final ς and the
/// modifier-letter apostrophes kept), which pseudonyms made then are still found by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fold {
    Current,
    Before20261205,
}

fn fold(s: &str, how: Fold) -> Zeroizing<String> {
    // Sized once, for at most three bytes out per byte of the decomposition (a lower
    // case is at most that much longer): nothing is reallocated and left unwiped.
    let decomposed: usize = s.nfkd().map(|c| c.len_utf8() * 3).sum();
    let mut out = Zeroizing::new(String::with_capacity(decomposed));
    let current = how == Fold::Current;
    for c in s.nfkd().filter(|c| !is_combining_mark(*c)) {
        for lower in c.to_lowercase() {
            match lower {
                'ς' if current => out.push('σ'),
                '\u{02B9}'..='\u{02BF}' | '\u{02C8}' if current => {}
                'ø' => out.push('o'),
                'ł' => out.push('l'),
                'đ' | 'ð' => out.push('d'),
                'ħ' => out.push('h'),
                'ı' => out.push('i'),
                'ß' => out.push_str("ss"),
                'æ' => out.push_str("ae"),
                'œ' => out.push_str("oe"),
                'þ' => out.push_str("th"),
                c if c.is_alphanumeric() => out.push(c),
                _ => {}
            }
        }
    }
    out
}

/// A national identifier's value as it is pseudonymised: decomposed with NFKD (full-width
/// digits are digits), separators dropped (any white space, dots, the ASCII dash, U+2010
/// to U+2015 and the minus sign), upper-cased. `None` unless what is left is one or more
/// ASCII letters and digits.
///
/// Counted and checked in one pass that stops at the first character refused, then
/// written into a string sized to it and never grown (nothing left unwiped: each
/// character kept is one ASCII byte, and a valid value's characters decompose into the
/// NFKD iterator's inline buffer).
pub fn compact_national(raw: &str) -> Option<Zeroizing<String>> {
    let kept = |c: &char| {
        !(c.is_whitespace() || matches!(c, '.' | '-' | '\u{2010}'..='\u{2015}' | '\u{2212}'))
    };
    let len = raw
        .nfkd()
        .filter(kept)
        .try_fold(0usize, |n, c| c.is_ascii_alphanumeric().then_some(n + 1))
        .filter(|&n| n > 0)?;
    let mut compact = Zeroizing::new(String::with_capacity(len));
    compact.extend(raw.nfkd().filter(kept).map(|c| c.to_ascii_uppercase()));
    Some(compact)
}

/// Checks a Dutch citizen service number (BSN): 9 digits (8 are left-padded with a 0)
/// passing the 11-check. Returns the 9-digit form. The padded copy is wiped when dropped,
/// also when the check fails (a mistyped BSN is mostly a real one).
pub fn check_bsn(digits: &str) -> Option<Zeroizing<String>> {
    if !(8..=9).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Sized once (nothing reallocated and left unwiped); the digits on the stack.
    let mut padded = Zeroizing::new(String::with_capacity(9));
    padded.extend(std::iter::repeat_n('0', 9 - digits.len()));
    padded.push_str(digits);
    let mut d = Zeroizing::new([0i64; 9]);
    for (d, b) in d.iter_mut().zip(padded.bytes()) {
        *d = i64::from(b - b'0');
    }
    let sum: i64 = d[..8]
        .iter()
        .zip((2..=9).rev())
        .map(|(d, w)| d * w)
        .sum::<i64>()
        - d[8];
    (sum % 11 == 0 && d.iter().any(|&x| x != 0)).then_some(padded)
}

fn bounded<'a>(v: &mut FieldViolations, field: &str, s: &'a str) -> Option<&'a str> {
    if s.trim().is_empty() {
        v.push(field, "is required");
        None
    } else if s.chars().count() > MAX_FIELD_CHARS {
        v.push(
            field,
            format!("must be at most {MAX_FIELD_CHARS} characters"),
        );
        None
    } else {
        Some(s)
    }
}

fn country(v: &mut FieldViolations, field: &str, s: &str) -> Option<CountryCode> {
    let upper = Zeroizing::new(s.trim().to_ascii_uppercase());
    // Either case is taken here (`docs/pseudonyms.md`), so the code's own message ("in
    // upper case") would mislead.
    v.check(
        field,
        CountryCode::parse(&upper).map_err(|e| match e {
            DomainError::Format(_) => DomainError::Format(IDENTIFIER_COUNTRY),
            other => other,
        }),
    )
}

/// What an identifier's country must be.
const IDENTIFIER_COUNTRY: &str = "an ISO 3166-1 alpha-2 country code, e.g. \"NL\" (either case)";

/// A national identifier's issuer: a country, or [`SYNTHETIC_ISSUER`] (only here: it is
/// no country of birth, centre or research dimension).
fn issuer(v: &mut FieldViolations, field: &str, s: &str) -> Option<Issuer> {
    if s.trim().eq_ignore_ascii_case(SYNTHETIC_ISSUER) {
        return Some(Issuer::Synthetic);
    }
    country(v, field, s).map(Issuer::Country)
}

/// A name field folded today and as before 2026-12-05 ([`Fold`]).
fn text_field(
    v: &mut FieldViolations,
    field: &str,
    s: &str,
) -> Option<(Zeroizing<String>, [Zeroizing<String>; 2])> {
    let s = bounded(v, field, s)?;
    let n = normalise_text(s);
    if n.is_empty() {
        v.push(field, "must contain letters or digits");
        return None;
    }
    // The earlier fold of the text as typed (what was stored for it then), and of the
    // text lower-cased first, where a word-final Σ becomes ς (Unicode's Final_Sigma rule),
    // so that a name registered as "Παπαδόπουλος" is found when sent in capitals.
    let lowered = Zeroizing::new(s.to_lowercase());
    Some((
        n,
        [
            fold(s, Fold::Before20261205),
            fold(&lowered, Fold::Before20261205),
        ],
    ))
}

/// Identifiers as they arrive, before any check: borrowed from the request (which wipes
/// itself when dropped), the sex at birth already mapped from its wire value.
#[derive(Debug, Clone, Copy)]
pub enum IdentifiersInput<'a> {
    National(NationalInput<'a>),
    Demographic(DemographicInput<'a>),
}

#[derive(Clone, Copy)]
pub struct NationalInput<'a> {
    pub issuing_country: &'a str,
    pub value: &'a str,
}

#[derive(Clone, Copy)]
pub struct DemographicInput<'a> {
    pub given_names: &'a str,
    pub family_name: &'a str,
    pub date_of_birth: &'a str,
    pub sex_at_birth: Result<Sex, crate::domain::DomainError>,
    pub place_of_birth: &'a str,
    pub country_of_birth: &'a str,
}

// Identifiers never print.
impl fmt::Debug for NationalInput<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NationalInput")
            .field("issuing_country", &self.issuing_country)
            .field("value", &"<redacted>")
            .finish()
    }
}

impl fmt::Debug for DemographicInput<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DemographicInput").finish_non_exhaustive()
    }
}

impl PatientIdentity {
    /// Validates and normalises identifiers as they arrive (`api::convert::patient_identity`
    /// builds the input from the wire). Violations name the field (`national.value`,
    /// `demographic.date_of_birth`) and never contain the value.
    pub fn parse(input: Option<IdentifiersInput<'_>>) -> Result<Self, FieldViolations> {
        let mut v = FieldViolations::new();
        match input {
            None => {
                v.push("kind", "national or demographic identifiers are required");
                Err(v)
            }
            Some(IdentifiersInput::National(n)) => {
                let issuer = issuer(&mut v, "national.issuing_country", n.issuing_country);
                let value = bounded(&mut v, "national.value", n.value).and_then(|raw| {
                    let Some(compact) = compact_national(raw) else {
                        v.push(
                            "national.value",
                            "must be letters and digits (spaces, dots and dashes are ignored)",
                        );
                        return None;
                    };
                    match &issuer {
                        Some(Issuer::Country(c)) if c.as_str() == "NL" => {
                            let bsn = check_bsn(&compact);
                            if bsn.is_none() {
                                v.push(
                                    "national.value",
                                    "must be a valid BSN: 9 digits passing the 11-check",
                                );
                            }
                            bsn
                        }
                        Some(Issuer::Synthetic) if !is_synthetic_value(&compact) => {
                            v.push(
                                "national.value",
                                format!(
                                    "must be a synthetic identifier: \"{SYNTHETIC_PREFIX}\" and {SYNTHETIC_DIGITS} digits"
                                ),
                            );
                            None
                        }
                        _ => Some(compact),
                    }
                });
                v.into_result()?;
                Ok(PatientIdentity::National {
                    issuer: issuer.expect("no violations"),
                    value: value.expect("no violations"),
                })
            }
            Some(IdentifiersInput::Demographic(d)) => {
                let given_names = text_field(&mut v, "demographic.given_names", d.given_names);
                let family_name = text_field(&mut v, "demographic.family_name", d.family_name);
                let date_of_birth = bounded(&mut v, "demographic.date_of_birth", d.date_of_birth).and_then(|s| {
                    // The shape first (so that chrono's leniency, e.g. a sign or one-digit
                    // month, is not relied on), then a real date: nothing formatted.
                    let shaped = s.len() == 10
                        && s.bytes().enumerate().all(|(i, b)| if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() });
                    let ok = shaped
                        && NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok_and(|date| date.year_ok());
                    if ok {
                        Some(Zeroizing::new(s.to_owned()))
                    } else {
                        v.push("demographic.date_of_birth", "must be a real date \"YYYY-MM-DD\", from 1880 on and not in the future");
                        None
                    }
                });
                let sex = v.check("demographic.sex_at_birth", d.sex_at_birth);
                let place_of_birth =
                    text_field(&mut v, "demographic.place_of_birth", d.place_of_birth);
                let country_of_birth =
                    country(&mut v, "demographic.country_of_birth", d.country_of_birth);
                v.into_result()?;
                let (given_names, given_before) = given_names.expect("no violations");
                let (family_name, family_before) = family_name.expect("no violations");
                let (place_of_birth, place_before) = place_of_birth.expect("no violations");
                let differs = [
                    (&given_before, &given_names),
                    (&family_before, &family_name),
                    (&place_before, &place_of_birth),
                ]
                .iter()
                .any(|(before, now)| before.iter().any(|b| **b != ***now));
                Ok(PatientIdentity::Demographic {
                    given_names,
                    family_name,
                    date_of_birth: date_of_birth.expect("no violations"),
                    sex: sex.expect("no violations"),
                    place_of_birth,
                    country_of_birth: country_of_birth.expect("no violations"),
                    folded_before: if differs {
                        [given_before, family_before, place_before]
                            .into_iter()
                            .flatten()
                            .collect()
                    } else {
                        Vec::new()
                    },
                })
            }
        }
    }

    /// The same identifiers with their names folded as before 2026-12-05, when that
    /// gives another encoding (a Greek final ς, a modifier-letter apostrophe): every
    /// combination of each name folded today, as typed before or lower-cased first
    /// before (at most 26 besides today's, each once), whose pseudonyms are looked up
    /// ([`Pseudonymiser::candidates`]). A name registered with one field in capitals and
    /// another not is found whichever way it is sent now.
    pub fn as_folded_before(&self) -> Vec<PatientIdentity> {
        let PatientIdentity::Demographic {
            given_names: now_given,
            family_name: now_family,
            date_of_birth,
            sex,
            place_of_birth: now_place,
            country_of_birth,
            folded_before: before,
        } = self
        else {
            return Vec::new();
        };
        let [g0, g1, f0, f1, p0, p1] = &before[..] else {
            return Vec::new();
        };
        // Each field as folded today, or as before (as typed, lower-cased first): a field
        // the change does not touch was stored as it folds today.
        let mut out: Vec<PatientIdentity> = Vec::new();
        for g in [now_given, g0, g1] {
            for f in [now_family, f0, f1] {
                for p in [now_place, p0, p1] {
                    let today = *g == *now_given && *f == *now_family && *p == *now_place;
                    let seen = out.iter().any(|o| {
                        matches!(o, PatientIdentity::Demographic { given_names, family_name, place_of_birth, .. }
                            if *given_names == *g && *family_name == *f && *place_of_birth == *p)
                    });
                    if today || seen {
                        continue;
                    }
                    out.push(PatientIdentity::Demographic {
                        given_names: g.clone(),
                        family_name: f.clone(),
                        date_of_birth: date_of_birth.clone(),
                        sex: *sex,
                        place_of_birth: p.clone(),
                        country_of_birth: country_of_birth.clone(),
                        folded_before: Vec::new(),
                    });
                }
            }
        }
        out
    }

    /// Whether these are synthetic identifiers ([`SYNTHETIC_ISSUER`]).
    pub fn is_synthetic(&self) -> bool {
        matches!(
            self,
            PatientIdentity::National {
                issuer: Issuer::Synthetic,
                ..
            }
        )
    }

    /// The HMAC input: the tag, then every field as a 4-byte big-endian length and
    /// its UTF-8 bytes, so no two different identities encode alike.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(128));
        let mut field = |bytes: &[u8]| {
            out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            out.extend_from_slice(bytes);
        };
        field(ENCODING_TAG);
        match self {
            PatientIdentity::National { issuer, value } => {
                field(b"national");
                field(issuer.code().as_bytes());
                field(value.as_bytes());
            }
            PatientIdentity::Demographic {
                given_names,
                family_name,
                date_of_birth,
                sex,
                place_of_birth,
                country_of_birth,
                folded_before: _,
            } => {
                field(b"demographic");
                field(given_names.as_bytes());
                field(family_name.as_bytes());
                field(date_of_birth.as_bytes());
                field(sex.as_str().as_bytes());
                field(place_of_birth.as_bytes());
                field(country_of_birth.as_str().as_bytes());
            }
        }
        out
    }
}

trait YearOk {
    fn year_ok(&self) -> bool;
}

impl YearOk for NaiveDate {
    /// From [`MIN_YEAR`] on, and not after today anywhere on Earth: the UTC date plus one
    /// day, so that a child born early in the day east of Greenwich (in CET, before 01:00)
    /// is not refused as born in the future.
    fn year_ok(&self) -> bool {
        use chrono::Datelike;
        let latest = chrono::Utc::now().date_naive() + chrono::Days::new(1);
        self.year() >= MIN_YEAR && *self <= latest
    }
}

/// Which registry key to use: the registry's number (1..=999, shown in the pseudonym),
/// its code (bound into the key) and the key version.
#[derive(Debug, Clone, Copy)]
pub struct RegistryRef<'a> {
    pub seq: u16,
    pub code: &'a str,
    pub key_version: u16,
}

/// The pseudonyms a patient may have in a registry: under the active key version, and
/// under each older one. A patient the registry does not know gets the active version's;
/// one it knows under an older version keeps that pseudonym (`docs/pseudonyms.md`, "Key
/// rotation"), so that records and consent stay linked.
pub struct Candidates {
    current: Pseudonym,
    older: Vec<Pseudonym>,
}

impl Candidates {
    /// The older versions' pseudonyms, and those of the names folded as before
    /// 2026-12-05 at every version, to look up among those with consent on file.
    pub fn older(&self) -> Vec<&str> {
        self.older.iter().map(Pseudonym::as_str).collect()
    }

    /// The patient's pseudonym, given which older one (if any) the registry knows.
    pub fn choose(self, known: Option<&str>) -> Pseudonym {
        known
            .and_then(|known| self.older.into_iter().find(|p| p.as_str() == known))
            .unwrap_or(self.current)
    }
}

/// Derives pseudonyms; holds the HKDF pseudo-random key and a cache of registry keys.
///
/// Both are ring key types, not `secrecy` boxes: ring gives no way to read their bytes
/// back and their `Debug` names only the algorithm, which is what a `SecretBox` would add.
/// ring does not wipe them on drop; they live as long as the process. The bytes a
/// registry key is made from are wiped (`Zeroizing`).
pub struct Pseudonymiser {
    prk: hkdf::Prk,
    keys: RwLock<HashMap<(String, u16), hmac::Key>>,
}

struct KeyLen;

impl hkdf::KeyType for KeyLen {
    fn len(&self) -> usize {
        32
    }
}

impl Pseudonymiser {
    pub fn new(master: &MasterSecret) -> Self {
        Pseudonymiser {
            prk: hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(master.expose_secret()),
            keys: RwLock::new(HashMap::new()),
        }
    }

    fn registry_key(&self, code: &str, version: u16) -> hmac::Key {
        if let Some(key) = self
            .keys
            .read()
            .expect("key cache")
            .get(&(code.to_owned(), version))
        {
            return key.clone();
        }
        let mut info = Vec::with_capacity(64);
        info.extend_from_slice(b"registry-key");
        info.extend_from_slice(&(code.len() as u32).to_be_bytes());
        info.extend_from_slice(code.as_bytes());
        info.extend_from_slice(&u32::from(version).to_be_bytes());
        let info = [info.as_slice()];
        let mut bytes = Zeroizing::new([0u8; 32]);
        self.prk
            .expand(&info, KeyLen)
            .and_then(|okm| okm.fill(bytes.as_mut()))
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let key = hmac::Key::new(hmac::HMAC_SHA256, bytes.as_ref());
        self.keys
            .write()
            .expect("key cache")
            .insert((code.to_owned(), version), key.clone());
        key
    }

    /// The pseudonym of `identity` under one key version of a registry. To find a
    /// patient's pseudonym in a registry, use [`Self::candidates`].
    pub fn derive(&self, registry: RegistryRef<'_>, identity: &PatientIdentity) -> Pseudonym {
        let key = self.registry_key(registry.code, registry.key_version);
        let tag = hmac::sign(&key, &identity.encode());
        Pseudonym::from_tag(registry.seq, registry.key_version, &tag.as_ref()[..20])
    }

    /// The candidate pseudonyms of `identity` in the registry `active` refers to (its
    /// active key version): see [`Candidates`].
    ///
    /// Synthetic identifiers are derived like any other, and counted in
    /// `ern_synthetic_pseudonym_derivations_total`, once per identity pseudonymised
    /// (whatever the number of key versions): a deployment sees synthetic patients arrive.
    pub fn candidates(&self, active: RegistryRef<'_>, identity: &PatientIdentity) -> Candidates {
        if identity.is_synthetic() {
            metrics::counter!("ern_synthetic_pseudonym_derivations_total").increment(1);
        }
        let at = |key_version| RegistryRef {
            key_version,
            ..active
        };
        let mut older: Vec<Pseudonym> = (1..active.key_version)
            .map(|key_version| self.derive(at(key_version), identity))
            .collect();
        // Names folded as before 2026-12-05, at every version up to the active one: a
        // patient registered then keeps the pseudonym made then.
        for before in identity.as_folded_before() {
            older.extend((1..=active.key_version).map(|v| self.derive(at(v), &before)));
        }
        Candidates {
            current: self.derive(active, identity),
            older,
        }
    }
}

/// Luhn mod 32 check character over the alphabet values of `chars`.
fn check_char(chars: &[u8]) -> u8 {
    let mut sum = 0u32;
    let mut factor = 2;
    for &c in chars.iter().rev() {
        let addend = factor * value_of(c).expect("alphabet character");
        factor = if factor == 2 { 1 } else { 2 };
        sum += addend / 32 + addend % 32;
    }
    ALPHABET.as_bytes()[((32 - sum % 32) % 32) as usize]
}

fn value_of(c: u8) -> Option<u32> {
    ALPHABET.bytes().position(|a| a == c).map(|p| p as u32)
}

/// Why a pseudonym given by a client was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PseudonymError {
    #[error(
        "must be a pseudonym as issued: \"R<3 digits>-V<3 digits>-\" and 33 characters of Crockford base32 (43 in all)"
    )]
    Format,
    #[error("has a wrong check character (mistyped?)")]
    Check,
}

/// A patient pseudonym, e.g. `R009-V001-` + 33 characters. 160 bits of the HMAC, the
/// registry number and key version in clear, and a check character that catches any
/// single mistyped character and most swaps of neighbours.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pseudonym(String);

impl fmt::Debug for Pseudonym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pseudonym({}…)", &self.0[..10])
    }
}

impl Pseudonym {
    fn from_tag(seq: u16, version: u16, tag: &[u8]) -> Self {
        debug_assert!(seq <= 999 && version <= 999 && tag.len() == 20);
        let mut body = BASE32.encode(tag).into_bytes();
        let mut checked: Vec<u8> = format!("{seq:03}{version:03}").into_bytes();
        checked.extend_from_slice(&body);
        body.push(check_char(&checked));
        let mut text = format!("R{seq:03}-V{version:03}-");
        text.push_str(std::str::from_utf8(&body).expect("ascii"));
        Pseudonym(text)
    }

    pub fn parse(s: &str) -> Result<Self, PseudonymError> {
        let b = s.as_bytes();
        let shape = b.len() == PSEUDONYM_LEN
            && has_prefix(b)
            && b[10..].iter().all(|&c| value_of(c).is_some());
        if !shape {
            return Err(PseudonymError::Format);
        }
        let mut checked: Vec<u8> = [&b[1..4], &b[6..9], &b[10..PSEUDONYM_LEN - 1]].concat();
        if check_char(&checked) != b[PSEUDONYM_LEN - 1] {
            return Err(PseudonymError::Check);
        }
        checked.clear();
        Ok(Pseudonym(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The registry number in the prefix.
    pub fn registry_seq(&self) -> u16 {
        self.0[1..4].parse().expect("checked at construction")
    }

    pub fn key_version(&self) -> u16 {
        self.0[6..9].parse().expect("checked at construction")
    }
}

/// The key version a pseudonym's prefix (`R<3 digits>-V<3 digits>-`) names, read from the
/// prefix alone: for the writer, which takes pseudonyms as text parsed (or derived)
/// earlier. `None` for text without that prefix.
pub fn key_version_of(text: &str) -> Option<u16> {
    has_prefix(text.as_bytes())
        .then(|| text[6..9].parse().ok())
        .flatten()
}

/// Whether `b` starts with a pseudonym's prefix, `R<3 digits>-V<3 digits>-`.
fn has_prefix(b: &[u8]) -> bool {
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    b.len() >= 10
        && b[0] == b'R'
        && digits(1..4)
        && &b[4..6] == b"-V"
        && digits(6..9)
        && b[9] == b'-'
}

impl fmt::Display for Pseudonym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;
    use proptest::prelude::*;

    fn master() -> MasterSecret {
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = i as u8;
        }
        MasterSecret::from_bytes(bytes)
    }

    use crate::fixtures::{BSN, national};

    /// The fixture's demographic identifiers with every field but the sex replaced.
    fn demographic(
        given: &str,
        family: &str,
        dob: &str,
        place: &str,
        country: &str,
    ) -> proto::PatientIdentifiers {
        crate::fixtures::demographic(proto::DemographicIdentifiers {
            given_names: given.into(),
            family_name: family.into(),
            date_of_birth: dob.into(),
            place_of_birth: place.into(),
            country_of_birth: country.into(),
            ..crate::fixtures::person()
        })
    }

    fn derive(p: &proto::PatientIdentifiers, code: &str, seq: u16, version: u16) -> String {
        let identity = crate::api::convert::patient_identity(p).unwrap();
        Pseudonymiser::new(&master())
            .derive(
                RegistryRef {
                    seq,
                    code,
                    key_version: version,
                },
                &identity,
            )
            .to_string()
    }

    #[test]
    fn the_key_version_is_read_from_the_prefix_alone() {
        let p = derive(&national("NL", BSN), "ERN-EYE", 9, 7);
        assert_eq!(key_version_of(&p), Some(7));
        assert_eq!(key_version_of("R013-V002-anything"), Some(2));
        for text in [
            "",
            "R013-V002",
            "R013-W002-x",
            "R01x-V002-x",
            "R013-V0x2-x",
            "r013-V002-x",
        ] {
            assert_eq!(key_version_of(text), None, "{text:?}");
        }
    }

    #[test]
    fn normalisation_folds_spelling_variants() {
        assert_eq!(
            *normalise_text("Van den Broeck-Müller"),
            "vandenbroeckmuller"
        );
        assert_eq!(
            *normalise_text("VAN DEN BROECK MULLER"),
            "vandenbroeckmuller"
        );
        assert_eq!(
            *normalise_text("Søren Łukasz Þór Straße Æsa"),
            "sorenlukaszthorstrasseaesa"
        );
        assert_eq!(
            *normalise_text("Ｚｏë\u{0301}"),
            "zoe",
            "full-width and stacked marks"
        );
        assert_eq!(*normalise_text("O'Brien, Jr."), "obrienjr");
        assert_eq!(
            *normalise_text("Δημήτρης"),
            "δημητρησ",
            "other scripts are kept, accents dropped, final sigma as Σ lower-cases"
        );
        // A name written in capitals, as Greek documents often have it, is the same name.
        assert_eq!(
            normalise_text("ΠΑΠΑΔΟΠΟΥΛΟΣ"),
            normalise_text("Παπαδόπουλος")
        );
        // Apostrophes typed as modifier letters (Ukrainian ʼ, ʻ, primes) go like ' does.
        for apostrophe in ["'", "\u{2019}", "\u{02BC}", "\u{02BB}", "\u{02B9}"] {
            assert_eq!(*normalise_text(&format!("Мар{apostrophe}яна")), "маряна");
        }
    }

    /// A patient registered before 2026-12-05 under a name with a final ς keeps that
    /// pseudonym: the fold of then is a candidate at every key version, and chosen when on
    /// file. A name the change does not touch (capitals, plain apostrophes) has none.
    #[test]
    fn a_name_folded_as_before_2026_12_05_is_still_found() {
        let pseudonymiser = Pseudonymiser::new(&master());
        let at = |key_version| RegistryRef {
            seq: 9,
            code: "ERN-EYE",
            key_version,
        };
        let typed = crate::api::convert::patient_identity(&demographic(
            "Δημήτρης",
            "Παπαδόπουλος",
            "1978-03-25",
            "Θεσσαλονίκη",
            "GR",
        ))
        .unwrap();
        // What the earlier fold made of it: the final ς kept.
        let before = PatientIdentity::Demographic {
            given_names: Zeroizing::new("δημητρης".into()),
            family_name: Zeroizing::new("παπαδοπουλος".into()),
            date_of_birth: Zeroizing::new("1978-03-25".into()),
            sex: Sex::Female,
            place_of_birth: Zeroizing::new("θεσσαλονικη".into()),
            country_of_birth: CountryCode::parse("GR").unwrap(),
            folded_before: Vec::new(),
        };
        let holds = |identity: &PatientIdentity, wanted: &PatientIdentity| {
            identity
                .as_folded_before()
                .iter()
                .any(|b| b.encode() == wanted.encode())
        };
        assert!(holds(&typed, &before));
        for active in 1..=3 {
            let candidates = pseudonymiser.candidates(at(active), &typed);
            for version in 1..=active {
                let then = pseudonymiser.derive(at(version), &before);
                assert!(
                    candidates.older().contains(&then.as_str()),
                    "v{version} of {active}"
                );
                let chosen = pseudonymiser
                    .candidates(at(active), &typed)
                    .choose(Some(then.as_str()));
                assert_eq!(chosen, then);
            }
            // Nothing on file: today's fold at the active version.
            assert_eq!(
                candidates.choose(None),
                pseudonymiser.derive(at(active), &typed)
            );
        }
        // Sent in capitals, the name of a patient registered in lower case is found too.
        let capitals = crate::api::convert::patient_identity(&demographic(
            "ΔΗΜΗΤΡΗΣ",
            "ΠΑΠΑΔΟΠΟΥΛΟΣ",
            "1978-03-25",
            "ΘΕΣΣΑΛΟΝΙΚΗ",
            "GR",
        ))
        .unwrap();
        assert_eq!(capitals.encode(), typed.encode());
        assert!(holds(&capitals, &before));
        // Registered with the family name in capitals and the given name not: stored as
        // "νικος" (final ς kept) and "παπαδοπουλοσ" (Σ lower-cased letter by letter).
        let mixed = |given: &str, family: &str| {
            crate::api::convert::patient_identity(&demographic(
                given,
                family,
                "1978-03-25",
                "Θεσσαλονίκη",
                "GR",
            ))
            .unwrap()
        };
        let registered = PatientIdentity::Demographic {
            given_names: Zeroizing::new("νικος".into()),
            family_name: Zeroizing::new("παπαδοπουλοσ".into()),
            date_of_birth: Zeroizing::new("1978-03-25".into()),
            sex: Sex::Female,
            place_of_birth: Zeroizing::new("θεσσαλονικη".into()),
            country_of_birth: CountryCode::parse("GR").unwrap(),
            folded_before: Vec::new(),
        };
        for (given, family) in [
            ("Νίκος", "ΠΑΠΑΔΟΠΟΥΛΟΣ"),
            ("ΝΙΚΟΣ", "ΠΑΠΑΔΟΠΟΥΛΟΣ"),
            ("Νίκος", "Παπαδόπουλος"),
            ("ΝΙΚΟΣ", "Παπαδόπουλος"),
        ] {
            assert!(
                holds(&mixed(given, family), &registered),
                "{given} {family}"
            );
        }
        for untouched in [
            demographic("Mar'yana", "O'Brien", "1978-03-25", "Kyiv", "UA"),
            demographic("Anna", "Jansen", "1978-03-25", "Athens", "GR"),
        ] {
            let identity = crate::api::convert::patient_identity(&untouched).unwrap();
            assert!(identity.as_folded_before().is_empty());
            assert_eq!(pseudonymiser.candidates(at(2), &identity).older().len(), 1);
        }
    }

    #[test]
    fn bsn_eleven_check() {
        assert_eq!(
            check_bsn("123456782").as_deref().map(String::as_str),
            Some("123456782")
        );
        assert_eq!(
            check_bsn("12345672").as_deref().map(String::as_str),
            Some("012345672"),
            "8 digits are left-padded"
        );
        for bad in ["123456781", "000000000", "1234567820", "12345a782", ""] {
            assert!(check_bsn(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn national_identifiers_are_compacted_and_checked() {
        let a = derive(&national("NL", "1234.56.782"), "ERN-EYE", 9, 1);
        let b = derive(&national("nl", " 123-456-782 "), "ERN-EYE", 9, 1);
        assert_eq!(a, b);
        let err = crate::api::convert::patient_identity(&national("NL", "123456781")).unwrap_err();
        assert_eq!(
            err.iter().map(|v| v.field.as_str()).collect::<Vec<_>>(),
            ["national.value"]
        );
        assert!(err.iter().all(|v| !v.description.contains("123456781")));
        assert!(crate::api::convert::patient_identity(&national("DE", "123456781")).is_ok());
        let err =
            crate::api::convert::patient_identity(&national("XX", &"9".repeat(200))).unwrap_err();
        assert_eq!(err.len(), 2);
        // Either case is taken, and the message does not ask for upper case.
        let issuer = err
            .iter()
            .find(|v| v.field == "national.issuing_country")
            .unwrap_or_else(|| panic!("{err:?}"));
        assert!(issuer.description.contains("(either case)"), "{issuer:?}");
        assert!(!issuer.description.contains("upper case"), "{issuer:?}");
        // Any space (tab, no-break space), any dash or hyphen, and full-width digits, as a
        // value copied from a document or a spreadsheet may hold them.
        for written in [
            "\t123456782",
            "123\u{00A0}456\u{00A0}782",
            "123\u{2013}456\u{2010}782",
            "１２３４５６７８２",
        ] {
            assert_eq!(
                derive(&national("NL", written), "ERN-EYE", 9, 1),
                a,
                "{written:?}"
            );
        }
        // A compatibility character longer decomposed than encoded (U+2167 ROMAN NUMERAL
        // EIGHT: 3 bytes, "VIII") is read as what it decomposes to, with or without a
        // separator beside it.
        let eight = derive(&national("DE", "VIII1234"), "ERN-EYE", 9, 1);
        for written in ["\u{2167}1234", "\u{2167} 1234", "\u{2177}.1234"] {
            assert_eq!(
                derive(&national("DE", written), "ERN-EYE", 9, 1),
                eight,
                "{written:?}"
            );
        }
        // What is neither a separator nor an ASCII letter or digit is refused.
        for bad in ["123456782€", "12345678\u{0662}", "\u{FDFA}"] {
            assert!(
                crate::api::convert::patient_identity(&national("DE", bad)).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn demographic_fields_are_all_checked() {
        let err = crate::api::convert::patient_identity(&demographic(
            "",
            "--",
            "2015-02-30",
            "Gent",
            "Belgium",
        ))
        .unwrap_err();
        let fields: Vec<_> = err.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "demographic.given_names",
                "demographic.family_name",
                "demographic.date_of_birth",
                "demographic.country_of_birth"
            ]
        );
        assert!(
            crate::api::convert::patient_identity(&demographic("a", "b", "2999-01-01", "c", "BE"))
                .is_err()
        );
        // Not after today anywhere: tomorrow by UTC is still today east of Greenwich; the
        // day after is refused. Only the shape "YYYY-MM-DD" is taken.
        let day = |days: i64| {
            (chrono::Utc::now().date_naive() + chrono::Duration::days(days))
                .format("%Y-%m-%d")
                .to_string()
        };
        let born = |date: &str| {
            crate::api::convert::patient_identity(&demographic("a", "b", date, "c", "BE"))
        };
        assert!(born(&day(1)).is_ok());
        assert!(born(&day(2)).is_err());
        for bad in ["2015-6-02", "+015-06-02", "2015/06/02", "1879-12-31"] {
            assert!(born(bad).is_err(), "{bad}");
        }
        assert!(born("1880-01-01").is_ok());
        assert!(
            crate::api::convert::patient_identity(&proto::PatientIdentifiers { kind: None })
                .is_err()
        );
    }

    #[test]
    fn same_patient_same_registry_same_pseudonym_other_registry_unlinkable() {
        let id = national("NL", BSN);
        assert_eq!(derive(&id, "ERN-EYE", 9, 1), derive(&id, "ERN-EYE", 9, 1));
        let eye = derive(&id, "ERN-EYE", 9, 1);
        let lung = derive(&id, "ERN-LUNG", 13, 1);
        assert_ne!(eye[10..], lung[10..]);
        let v2 = derive(&id, "ERN-EYE", 9, 2);
        assert!(v2.starts_with("R009-V002-"));
        assert_ne!(
            eye[10..],
            v2[10..],
            "a new key version gives new pseudonyms"
        );
        // The code is bound into the key: the same number with another code differs.
        assert_ne!(eye[10..], derive(&id, "ERN-EYF", 9, 1)[10..]);
    }

    #[test]
    fn encoding_is_unambiguous() {
        // Shifting characters between fields must change the encoding.
        let a = crate::api::convert::patient_identity(&demographic(
            "anne",
            "marie",
            "2015-06-02",
            "gent",
            "BE",
        ))
        .unwrap();
        let b = crate::api::convert::patient_identity(&demographic(
            "annem",
            "arie",
            "2015-06-02",
            "gent",
            "BE",
        ))
        .unwrap();
        assert_ne!(*a.encode(), *b.encode());
        assert_eq!(format!("{a:?}"), "PatientIdentity::Demographic(..)");
    }

    #[test]
    fn check_character_catches_typos() {
        let p = derive(&national("NL", BSN), "ERN-EYE", 9, 1);
        assert_eq!(p.len(), PSEUDONYM_LEN);
        let parsed = Pseudonym::parse(&p).unwrap();
        assert_eq!((parsed.registry_seq(), parsed.key_version()), (9, 1));
        assert!(!format!("{parsed:?}").contains(&p[10..]));
        let mut bytes = p.clone().into_bytes();
        for i in (1..4).chain(6..9).chain(10..PSEUDONYM_LEN) {
            let orig = bytes[i];
            for c in ALPHABET.bytes().filter(|&c| c != orig) {
                if i < 10 && !c.is_ascii_digit() {
                    continue;
                }
                bytes[i] = c;
                let typo = String::from_utf8(bytes.clone()).unwrap();
                assert_eq!(
                    Pseudonym::parse(&typo),
                    Err(PseudonymError::Check),
                    "position {i}"
                );
                bytes[i] = orig;
            }
        }
        for bad in [
            "",
            "R009-V001-",
            &p.to_lowercase(),
            &p[..42],
            &format!("{p}0"),
        ] {
            assert_eq!(Pseudonym::parse(bad), Err(PseudonymError::Format));
        }
    }

    /// The vectors published in `docs/pseudonyms.md` are what the code computes.
    #[test]
    fn published_test_vectors_hold() {
        let doc = include_str!("../docs/pseudonyms.md");
        let mut checked = 0;
        for line in doc.lines().filter(|l| l.starts_with("| V")) {
            let cells: Vec<&str> = line
                .split('|')
                .map(|c| c.trim().trim_matches('`'))
                .collect();
            // | id | registry | seq | version | kind | fields | pseudonym |
            let (code, seq, version, kind, fields, expected) = (
                cells[2],
                cells[3].parse().unwrap(),
                cells[4].parse().unwrap(),
                cells[5],
                cells[6],
                cells[7],
            );
            let f: Vec<&str> = fields.split(" / ").collect();
            let identifiers = match kind {
                "national" => national(f[0], f[1]),
                _ => demographic(f[0], f[1], f[2], f[3], f[4]),
            };
            assert_eq!(derive(&identifiers, code, seq, version), expected, "{line}");
            checked += 1;
        }
        assert!(checked >= 9, "the vectors table was not found");
    }

    #[test]
    fn synthetic_identifiers_have_their_own_issuer_and_format() {
        let synthetic =
            crate::api::convert::patient_identity(&national("XT", "SYN000000042")).unwrap();
        assert!(synthetic.is_synthetic());
        assert!(
            !crate::api::convert::patient_identity(&national("NL", "123456782"))
                .unwrap()
                .is_synthetic()
        );
        // Compacted and upper-cased like any national identifier.
        assert_eq!(
            derive(&national(" xt ", "syn-000.000 042"), "ERN-EYE", 9, 1),
            derive(&national("XT", "SYN000000042"), "ERN-EYE", 9, 1)
        );
        // The issuer is part of the HMAC input, as a country's is.
        assert_ne!(
            derive(&national("XT", "SYN000000042"), "ERN-EYE", 9, 1)[10..],
            derive(&national("DE", "SYN000000042"), "ERN-EYE", 9, 1)[10..]
        );
        for bad in [
            "SYN00000042",
            "SYN0000000042",
            "SYN",
            "XYZ000000042",
            "123456782",
        ] {
            let err = crate::api::convert::patient_identity(&national("XT", bad)).unwrap_err();
            assert_eq!(
                err.iter().map(|v| v.field.as_str()).collect::<Vec<_>>(),
                ["national.value"],
                "{bad}"
            );
        }
        // No other user-assigned code is an issuer, and XT is no country of birth.
        for code in ["XX", "ZZ", "XK", "XI", "AA", "QM", "XS"] {
            let err =
                crate::api::convert::patient_identity(&national(code, "SYN000000042")).unwrap_err();
            assert_eq!(
                err.iter().map(|v| v.field.as_str()).collect::<Vec<_>>(),
                ["national.issuing_country"],
                "{code}"
            );
        }
        assert!(
            crate::api::convert::patient_identity(&demographic("a", "b", "2015-01-01", "c", "XT"))
                .is_err()
        );
    }

    /// Pseudonym texts as the hand-written Crockford encoder made them (computed before
    /// it was replaced by `data-encoding`): stored pseudonyms must keep matching.
    #[test]
    fn pseudonym_text_is_unchanged_by_the_base32_encoder() {
        let pattern = |f: fn(u8) -> u8| -> Vec<u8> { (0..20).map(f).collect() };
        let cases: [(u16, u16, Vec<u8>, &str); 5] = [
            (
                1,
                1,
                vec![0; 20],
                "R001-V001-00000000000000000000000000000000X",
            ),
            (
                999,
                999,
                vec![0xff; 20],
                "R999-V999-ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZF",
            ),
            (
                9,
                1,
                pattern(|i| i),
                "R009-V001-000G40R40M30E209185GR38E1W8124GK2",
            ),
            (
                13,
                2,
                pattern(|i| i.wrapping_mul(37).wrapping_add(11)),
                "R013-V002-1CR5AYMZRKMGWCTRFPHCFV0H6SDR19EAN",
            ),
            (
                42,
                3,
                pattern(|i| if i % 2 == 0 { 0xa5 } else { 0x5a }),
                "R042-V003-MNDAAPN5BAJNN9ATMNDAAPN5BAJNN9AT0",
            ),
        ];
        for (seq, version, tag, expected) in cases {
            let text = Pseudonym::from_tag(seq, version, &tag).to_string();
            assert_eq!(text, expected, "seq {seq}, version {version}");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,50}") {
            let _ = Pseudonym::parse(&s);
        }

        #[test]
        fn derived_pseudonyms_parse(tag in proptest::collection::vec(any::<u8>(), 20), seq in 1u16..1000, v in 1u16..1000) {
            let p = Pseudonym::from_tag(seq, v, &tag);
            let parsed = Pseudonym::parse(p.as_str()).unwrap();
            prop_assert_eq!(parsed.registry_seq(), seq);
            prop_assert_eq!(parsed.key_version(), v);
        }

        /// The encoder agrees with RFC 4648 base32 (`data-encoding`'s own) read through
        /// Crockford's alphabet, for any tag.
        #[test]
        fn pseudonym_body_is_crockford_base32(tag in proptest::collection::vec(any::<u8>(), 20)) {
            let p = Pseudonym::from_tag(1, 1, &tag);
            let rfc: String = data_encoding::BASE32_NOPAD
                .encode(&tag)
                .chars()
                .map(|c| {
                    let i = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567".find(c).unwrap();
                    char::from(ALPHABET.as_bytes()[i])
                })
                .collect();
            prop_assert_eq!(&p.as_str()[10..42], rfc.as_str());
        }

        #[test]
        fn normalisation_is_idempotent(s in "\\PC{0,40}") {
            let once = normalise_text(&s);
            prop_assert_eq!(&*normalise_text(&once), &*once);
        }
    }
}
