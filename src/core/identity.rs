//! Who a customer is: the keys 1C, AmoCRM and the till know them by.
//!
//! Every key is normalised once, here, so that `+7 (912) 345-67-89` typed by a manager in
//! AmoCRM and `89123456789` typed by a cashier in 1C find the same customer.

use std::fmt;

use chrono::{Datelike, NaiveDate};

/// A phone number in E.164 (`+79123456789`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Phone(String);

impl Phone {
    /// Normalises a phone as people type it. Russian conventions are the default: a number
    /// written without a country code is Russian (`8 912 …`, `912 …`). Foreign numbers must
    /// carry `+` or `00`/`810` (the Russian international prefix). Returns `None` for text
    /// that cannot be a phone number, so a typo never links two customers.
    pub fn parse(text: &str) -> Option<Phone> {
        let trimmed = text.trim();
        let plus = trimmed.starts_with('+');
        let mut digits = String::with_capacity(16);
        for c in trimmed.chars() {
            match c {
                '0'..='9' => digits.push(c),
                ' ' | '-' | '(' | ')' | '.' | '+' | '\u{a0}' | '/' => {}
                _ => return None,
            }
        }
        if trimmed.chars().skip(1).any(|c| c == '+') {
            return None;
        }
        let international = if plus {
            digits
        } else if let Some(rest) = digits.strip_prefix("810") {
            if digits.len() > 11 {
                rest.to_string()
            } else {
                digits
            }
        } else if let Some(rest) = digits.strip_prefix("00") {
            rest.to_string()
        } else if digits.len() == 11 && (digits.starts_with('8') || digits.starts_with('7')) {
            format!("7{}", &digits[1..])
        } else if digits.len() == 10 {
            format!("7{digits}")
        } else {
            return None;
        };
        if international.starts_with('0') || !(8..=15).contains(&international.len()) {
            return None;
        }
        if international.starts_with('7') && international.len() != 11 {
            return None;
        }
        Some(Phone(format!("+{international}")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last ten digits: how AmoCRM's fuzzy search finds a number typed any way.
    pub fn last_ten(&self) -> &str {
        let s = self.0.as_str();
        &s[s.len().saturating_sub(10)..]
    }
}

impl fmt::Display for Phone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An e-mail address compared case-insensitively (local parts are case-sensitive in theory,
/// never in practice, and a case mismatch must not split one customer into two).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Email(String);

impl Email {
    pub fn parse(text: &str) -> Option<Email> {
        let t = text.trim().to_lowercase();
        let (local, domain) = t.split_once('@')?;
        if local.is_empty()
            || domain.len() < 3
            || !domain.contains('.')
            || domain.starts_with('.')
            || domain.ends_with('.')
            || domain.contains('@')
            || t.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return None;
        }
        Some(Email(t))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Normalises a loyalty card number: spaces and dashes removed, letters upper-cased.
pub fn normalize_card(text: &str) -> Option<String> {
    let card: String = text
        .trim()
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '\u{a0}'))
        .flat_map(char::to_uppercase)
        .collect();
    if card.is_empty() || card.len() > 64 || card.chars().any(char::is_control) {
        None
    } else {
        Some(card)
    }
}

/// Every key a document can name its customer by. All optional: a sale without a
/// customer still counts in the shop's totals, it just earns nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CustomerIdentity {
    pub card: Option<String>,
    pub phone: Option<Phone>,
    pub email: Option<Email>,
    /// 1C counterparty (Контрагент) id.
    pub onec_id: Option<String>,
    /// AmoCRM contact id.
    pub amocrm_id: Option<i64>,
    pub name: Option<String>,
    /// For the birthday bonus.
    pub birthday: Option<chrono::NaiveDate>,
    /// The card number of the customer who referred this one (referral program).
    pub referred_by: Option<String>,
    /// An invite code for a closed program.
    pub invite_code: Option<String>,
    /// Values the source gave that cannot be used — (field, the text as given, why) — such as
    /// a birth date of 31.02: the document still counts, and the customer's history says so.
    pub unreadable: Vec<(String, String, String)>,
}

/// One key of a customer, as stored in the ledger's `customer_keys`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CustomerKey {
    Card(String),
    OneC(String),
    AmoCrm(i64),
    Phone(Phone),
    Email(Email),
}

impl CustomerKey {
    /// Stable kind names used in the database and on the command line.
    pub fn kind(&self) -> &'static str {
        match self {
            CustomerKey::Card(_) => "card",
            CustomerKey::OneC(_) => "onec",
            CustomerKey::AmoCrm(_) => "amocrm",
            CustomerKey::Phone(_) => "phone",
            CustomerKey::Email(_) => "email",
        }
    }

    pub fn value(&self) -> String {
        match self {
            CustomerKey::Card(v) | CustomerKey::OneC(v) => v.clone(),
            CustomerKey::AmoCrm(v) => v.to_string(),
            CustomerKey::Phone(p) => p.as_str().to_string(),
            CustomerKey::Email(e) => e.as_str().to_string(),
        }
    }
}

impl CustomerIdentity {
    /// Keys in the order they are trusted when they disagree: a card is presented by its
    /// holder, a counterparty id is chosen by the cashier, a phone or an e-mail is typed.
    pub fn keys(&self) -> Vec<CustomerKey> {
        let mut keys = Vec::with_capacity(5);
        if let Some(c) = self.card.as_deref().and_then(normalize_card) {
            keys.push(CustomerKey::Card(c));
        }
        if let Some(id) = &self.onec_id {
            keys.push(CustomerKey::OneC(id.clone()));
        }
        if let Some(id) = self.amocrm_id {
            keys.push(CustomerKey::AmoCrm(id));
        }
        if let Some(p) = &self.phone {
            keys.push(CustomerKey::Phone(p.clone()));
        }
        if let Some(e) = &self.email {
            keys.push(CustomerKey::Email(e.clone()));
        }
        keys
    }

    pub fn is_empty(&self) -> bool {
        self.keys().is_empty()
    }
}

/// How a person names a customer on the command line: `id:42`, an e-mail, a phone in any
/// spelling, or a card number. Digits alone are tried as a card first, then as a phone.
pub fn parse_customer_query(text: &str) -> Vec<CustomerQuery> {
    let t = text.trim();
    if let Some(id) = t.strip_prefix("id:").and_then(|s| s.trim().parse::<i64>().ok()) {
        return vec![CustomerQuery::Id(id)];
    }
    if let Some(e) = t.contains('@').then(|| Email::parse(t)).flatten() {
        return vec![CustomerQuery::Key(CustomerKey::Email(e))];
    }
    let mut out = Vec::new();
    if let Some(c) = normalize_card(t) {
        out.push(CustomerQuery::Key(CustomerKey::Card(c)));
    }
    if let Some(p) = Phone::parse(t) {
        out.push(CustomerQuery::Key(CustomerKey::Phone(p)));
    }
    if let Some(v) = t.strip_prefix("onec:") {
        out.insert(0, CustomerQuery::Key(CustomerKey::OneC(v.to_string())));
    }
    if let Some(v) = t.strip_prefix("amocrm:").and_then(|s| s.parse().ok()) {
        out.insert(0, CustomerQuery::Key(CustomerKey::AmoCrm(v)));
    }
    out
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CustomerQuery {
    Id(i64),
    Key(CustomerKey),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Option<&str>) {
        assert_eq!(
            Phone::parse(input).as_ref().map(Phone::as_str),
            expected,
            "phone {input:?}"
        );
    }

    #[test]
    fn phones_normalise_to_e164() {
        check("+7 (912) 345-67-89", Some("+79123456789"));
        check("89123456789", Some("+79123456789"));
        check("8 912 345 67 89", Some("+79123456789"));
        check("+79123456789", Some("+79123456789"));
        check("79123456789", Some("+79123456789"));
        check("9123456789", Some("+79123456789"));
        check("8-912-345-67-89", Some("+79123456789"));
        check("+375 29 123-45-67", Some("+375291234567"));
        check("00 49 30 1234567", Some("+49301234567"));
        check("810 49 30 1234567", Some("+49301234567"));
        check("+1 (415) 555-0100", Some("+14155550100"));
        check("+7 912 345", None);
        check("12345", None);
        check("call me", None);
        check("", None);
        check("+7912+3456789", None);
    }

    #[test]
    fn emails_compare_case_insensitively() {
        assert_eq!(
            Email::parse(" Ivan.Petrov@Example.RU ").unwrap().as_str(),
            "ivan.petrov@example.ru"
        );
        assert!(Email::parse("no-at-sign").is_none());
        assert!(Email::parse("a@b").is_none());
        assert!(Email::parse("a b@example.ru").is_none());
    }

    #[test]
    fn cli_queries_try_card_then_phone() {
        let q = parse_customer_query("8 912 345 67 89");
        assert_eq!(
            q,
            vec![
                CustomerQuery::Key(CustomerKey::Card("89123456789".into())),
                CustomerQuery::Key(CustomerKey::Phone(Phone::parse("+79123456789").unwrap())),
            ]
        );
        assert_eq!(parse_customer_query("id:7"), vec![CustomerQuery::Id(7)]);
        assert_eq!(
            parse_customer_query("A@B.ru"),
            vec![CustomerQuery::Key(CustomerKey::Email(
                Email::parse("a@b.ru").unwrap()
            ))]
        );
    }
}

/// Letters and digits a person cannot misread: no 0/O, 1/I/L.
const CODE_ALPHABET: &[u8; 31] = b"23456789ABCDEFGHJKMNPQRSTUVWXYZ";
const CODE_BASE: i128 = 31;
/// Six symbols of payload: 31⁶ ≈ 887 million customers.
const CODE_SPACE: i128 = 887_503_681;

/// What makes one program's codes its own. Ids are spread over the code space by multiplying
/// with a number prime to it (consecutive customers do not get consecutive, guessable codes)
/// and the check symbol is shifted; each ledger draws both once (its `meta` row
/// `friend_code_key`), so a friend code of another shop's program — another kopilka — fails
/// the check (30 times in 31) or names a random id nobody here has, instead of decoding to
/// one of this shop's members.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeKey {
    spread: i128,
    shift: i128,
}

impl CodeKey {
    /// The key of ledgers made before keys were drawn (their codes are published and stay),
    /// and of voucher codes, which are looked up as stored.
    pub const SHIPPED: CodeKey = CodeKey {
        spread: 387_420_489,
        shift: 0,
    };

    /// Reads `spread:shift` as stored in `meta`; `None` for anything else (a spread that is
    /// not prime to the space would give two customers one code).
    pub fn parse(text: &str) -> Option<CodeKey> {
        let (a, b) = text.split_once(':')?;
        let spread: i128 = a.trim().parse().ok()?;
        let shift: i128 = b.trim().parse().ok()?;
        ((1..CODE_SPACE).contains(&spread) && spread % CODE_BASE != 0 && (0..CODE_BASE).contains(&shift))
            .then_some(CodeKey { spread, shift })
    }

    fn inverse(&self) -> i128 {
        // extended Euclid: spread⁻¹ mod CODE_SPACE
        let (mut r0, mut r1) = (self.spread, CODE_SPACE);
        let (mut s0, mut s1) = (1i128, 0i128);
        while r1 != 0 {
            let q = r0 / r1;
            (r0, r1) = (r1, r0 - q * r1);
            (s0, s1) = (s1, s0 - q * s1);
        }
        s0.rem_euclid(CODE_SPACE)
    }

    fn check(&self, symbols: &[i128]) -> i128 {
        (symbols
            .iter()
            .enumerate()
            .map(|(i, s)| s * (i as i128 + 2))
            .sum::<i128>()
            + self.shift)
            % CODE_BASE
    }
}

/// A member's referral code: seven symbols (six of payload and a check symbol that catches a
/// mistyped or swapped one), stable and unique because it is the customer's id, spread by
/// the program's key. `None` for ids beyond the code space.
pub fn referral_code(customer_id: i64, key: CodeKey) -> Option<String> {
    let id = i128::from(customer_id);
    if !(0..CODE_SPACE).contains(&id) {
        return None;
    }
    let mut x = id * key.spread % CODE_SPACE;
    let mut symbols = [0i128; 6];
    for s in symbols.iter_mut().rev() {
        *s = x % CODE_BASE;
        x /= CODE_BASE;
    }
    let check = key.check(&symbols);
    Some(
        symbols
            .iter()
            .chain(std::iter::once(&check))
            .map(|s| CODE_ALPHABET[*s as usize] as char)
            .collect(),
    )
}

/// The customer id a referral code stands for, read as people type it (any case, spaces and
/// dashes ignored); `None` when it is no code of this program: the wrong length, a symbol
/// outside the alphabet, or a failed check (a card number, a typo or, mostly, another
/// program's code is never taken for someone's code).
pub fn referral_id(code: &str, key: CodeKey) -> Option<i64> {
    let symbols: Vec<i128> = code
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .map(|c| {
            let c = c.to_ascii_uppercase() as u8;
            CODE_ALPHABET.iter().position(|a| *a == c).map(|p| p as i128)
        })
        .collect::<Option<_>>()?;
    if symbols.len() != 7 || key.check(&symbols[..6]) != symbols[6] {
        return None;
    }
    let x = symbols[..6].iter().fold(0i128, |acc, s| acc * CODE_BASE + s);
    i64::try_from(x * key.inverse() % CODE_SPACE).ok()
}

#[cfg(test)]
mod referral_code_tests {
    use super::*;

    const K: CodeKey = CodeKey::SHIPPED;

    #[test]
    fn codes_are_stable_unique_unambiguous_and_read_back() {
        let mut seen = std::collections::HashSet::new();
        for id in (1..20_000).chain([CODE_SPACE as i64 - 1, 123_456_789]) {
            let code = referral_code(id, K).unwrap();
            assert_eq!(code.len(), 7);
            assert!(!code.contains(['0', 'O', '1', 'I', 'L']), "{code}");
            assert!(seen.insert(code.clone()), "{code} twice");
            assert_eq!(referral_id(&code, K), Some(id), "{code}");
            assert_eq!(referral_id(&code.to_lowercase(), K), Some(id));
        }
        assert_eq!(referral_code(42, K), referral_code(42, K));
        // neighbours do not look alike
        assert_ne!(
            referral_code(1, K).unwrap()[..5],
            referral_code(2, K).unwrap()[..5]
        );
        assert_eq!(referral_code(CODE_SPACE as i64, K), None);
    }

    #[test]
    fn a_mistyped_or_swapped_symbol_is_no_code() {
        let code = referral_code(4242, K).unwrap();
        let with = |i: usize, c: char| {
            let mut s: Vec<char> = code.chars().collect();
            s[i] = c;
            s.into_iter().collect::<String>()
        };
        let other = if code.starts_with('2') { '3' } else { '2' };
        assert_eq!(referral_id(&with(0, other), K), None);
        let mut swapped: Vec<char> = code.chars().collect();
        if swapped[1] != swapped[2] {
            swapped.swap(1, 2);
            assert_eq!(referral_id(&swapped.into_iter().collect::<String>(), K), None);
        }
        assert_eq!(referral_id("2000 0001", K), None);
        assert_eq!(
            referral_id(&format!("{}-{}", &code[..3], &code[3..]), K),
            Some(4242)
        );
    }

    /// Another program's codes are not this one's members: of 20 000 codes of a ledger with
    /// another key, those that pass this ledger's check (about one in 31) name ids spread over
    /// the whole space, none of this shop's 20 000 customers.
    #[test]
    fn another_program_s_codes_do_not_name_this_program_s_members() {
        let other = CodeKey::parse("123456791:17").unwrap();
        let mut passed = 0;
        for id in 1..20_000 {
            let code = referral_code(id, other).unwrap();
            assert_eq!(referral_id(&code, other), Some(id));
            if let Some(here) = referral_id(&code, K) {
                passed += 1;
                assert!(here >= 20_000, "{code} of id {id} there is {here} here");
            }
        }
        assert!(passed < 20_000 / 20, "{passed} of 20 000 passed the check");
        assert_eq!(CodeKey::parse("31:0"), None, "not prime to the space");
        assert_eq!(CodeKey::parse("5:31"), None);
        assert_eq!(CodeKey::parse("x"), None);
    }
}

/// A birthday as people type it (`ДД.ММ.ГГГГ` or ISO `YYYY-MM-DD`): the customers file and an
/// AmoCRM text field read it alike, so `31.02.1991` is refused with the same words wherever
/// it was typed.
pub fn parse_birthday(text: &str) -> Result<NaiveDate, String> {
    let t = text.trim();
    let date = NaiveDate::parse_from_str(t, "%d.%m.%Y")
        .or_else(|_| NaiveDate::parse_from_str(t, "%Y-%m-%d"))
        .map_err(|_| format!("birthday {t:?} is not a date (ДД.ММ.ГГГГ or YYYY-MM-DD)"))?;
    if date.year() < 1900 {
        return Err(format!("birthday {t:?} is before 1900"));
    }
    Ok(date)
}

/// A consent flag as a spreadsheet or a CRM holds it (да/нет, 1/0, true/false): anything
/// else is refused rather than read as "no", since a wrong "yes" sends advertising unasked.
pub fn parse_consent(text: &str) -> Result<bool, String> {
    match text.trim().to_lowercase().as_str() {
        "1" | "yes" | "y" | "true" | "да" | "д" | "+" | "согласен" | "согласна" => {
            Ok(true)
        }
        "0" | "no" | "n" | "false" | "нет" | "н" | "-" | "отказ" => Ok(false),
        other => Err(format!("consent {other:?} is neither yes nor no (да/нет, 1/0)")),
    }
}
