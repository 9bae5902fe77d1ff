//! Issue 20, the part on main: customer attributes from the shop's own list (a CSV as Excel
//! saves it, Russian headers), referral codes, and forgetting a customer (152-ФЗ). Each test
//! starts from the file or the document a shop has; no SQL edits.

mod common;

use chrono::Duration;
use common::{Env, returned, reversion, sale};
use kopilka::core::identity::{Email, Phone};
use kopilka::ledger::{AdjustRequest, DateRange};

const PROGRAM: &str = r#"
[program]
return_window_days = 14
[guard]
max_reward_share_of_margin = "1"
[[rules]]
id = "base"
percent = "5"
[birthday]
points = 300
days_before = 3
days_after = 7
[referral]
referrer_points = 300
referee_points = 200
[[closed_programs]]
id = "club"
invite_codes = ["CLUB2026"]
membership_products = ["CLUB-FEE"]
"#;

fn import(env: &mut Env, csv: &str) -> kopilka::ledger::CustomersReport {
    let rows = kopilka::migrate::read_customers_csv(csv.as_bytes()).unwrap();
    let rules = env.rules.clone();
    env.ledger
        .import_customers("csv:customers.csv", rows, &rules, env.now)
        .unwrap()
}

#[test]
fn a_birthday_from_the_customers_file_pays_the_birthday_bonus() {
    let mut env = Env::with_rules(PROGRAM);
    let today = env.now.date_naive();
    let csv = format!(
        "Карта;ФИО;Дата рождения;Согласие на рекламу\n2000 0001;Анна Иванова;{};да\n2000 0002;;31.02.1991;\n",
        today.format("%d.%m.1990")
    );
    let r = import(&mut env, &csv);
    assert_eq!(r.created, 1);
    assert_eq!(r.problems.len(), 1);
    assert!(r.problems[0].1.contains("31.02.1991"), "{:?}", r.problems);
    assert_eq!(env.run(|l, r, c| l.birthday_bonuses(r, c)).unwrap(), 1);
    assert_eq!(env.available("20000001"), 300);
    // the file's values are in history, with the file
    let changes = env.ledger.attribute_changes("20000001").unwrap();
    assert!(
        changes
            .iter()
            .any(|c| c.field == "birthday" && c.source == "csv:customers.csv"),
        "{changes:?}"
    );
    env.assert_verified();
}

#[test]
fn a_friend_code_pays_both_after_the_return_window_and_a_returned_purchase_pays_nobody() {
    let mut env = Env::with_rules(PROGRAM);
    // the referrer is a member with a code `balance` shows
    let mut s0 = sale("S0", Some("1001"), &[("A", 1, 1000)]);
    s0.occurred_at -= Duration::days(60);
    env.docs(vec![reversion(s0)]);
    let code = env
        .ledger
        .balance("1001", env.now, Duration::days(14))
        .unwrap()
        .referral_code
        .unwrap();
    assert_eq!(
        Some(code.clone()),
        env.ledger
            .referral_code(env.ledger.customer_ids().unwrap()[0])
            .unwrap()
    );

    // two friends come with the code (one typed it in lower case with a dash); one more
    // gives their own card's code: refused with the reason
    let r = import(
        &mut env,
        &format!(
            "card,referral_code\n2002,{code}\n2003,{}-{}\n1001,{code}\n2004,ZZZZZZZ\n",
            code[..3].to_lowercase(),
            code[3..].to_lowercase()
        ),
    );
    assert_eq!((r.created, r.updated), (3, 0), "{r:?}");
    assert_eq!(r.problems.len(), 2, "{r:?}");
    assert!(
        r.problems.iter().any(|(l, why)| *l == 4 && why.contains("own")),
        "{r:?}"
    );
    assert!(
        r.problems
            .iter()
            .any(|(l, why)| *l == 5 && why.contains("no member's of this program")),
        "{r:?}"
    );

    // friend 2002 buys and keeps it; friend 2003 buys and returns it all
    let mut s1 = sale("S1", Some("2002"), &[("A", 1, 1000)]);
    s1.occurred_at -= Duration::days(20);
    let mut s2 = sale("S2", Some("2003"), &[("A", 1, 1000)]);
    s2.occurred_at -= Duration::days(20);
    let s2 = reversion(s2);
    env.docs(vec![reversion(s1), s2.clone()]);
    env.docs(vec![returned("R2", &s2, &[("A", 1)])]);
    let before = env.available("1001");
    assert_eq!(env.run(|l, r, c| l.referral_bonuses(r, c)).unwrap(), 1);
    assert_eq!(
        env.available("1001"),
        before + 300,
        "paid once, for the purchase kept"
    );
    assert_eq!(env.available("2002"), 50 + 200);
    assert_eq!(env.available("2003"), 0, "a returned first purchase pays nobody");
    assert_eq!(env.run(|l, r, c| l.referral_bonuses(r, c)).unwrap(), 0, "once");
    env.assert_verified();
}

#[test]
fn an_invite_code_in_the_file_opens_the_closed_program() {
    let mut env = Env::with_rules(PROGRAM);
    let r = import(
        &mut env,
        "phone;invite_code\n+7 912 345-67-89;CLUB2026\n+7 912 000-00-00;NOPE\n",
    );
    assert_eq!(r.created, 2);
    assert_eq!(r.problems.len(), 1);
    assert!(r.problems[0].1.contains("opens no program"));
    let again = import(&mut env, "phone;invite_code\n+7 912 345-67-89;CLUB2026\n");
    assert_eq!((again.created, again.updated, again.unchanged), (0, 0, 1));
}

/// A friend code from another shop's kopilka names nobody here, though both shops have a
/// member with the same id: each ledger draws its own code key when it is made.
#[test]
fn a_friend_code_of_another_program_is_refused() {
    let mut here = Env::with_rules(PROGRAM);
    let mut there = Env::with_rules(PROGRAM);
    here.docs(vec![sale("S0", Some("1001"), &[("A", 1, 1000)])]);
    there.docs(vec![sale("S0", Some("3001"), &[("A", 1, 1000)])]);
    let ours = here.ledger.balance("1001", here.now, Duration::days(14)).unwrap();
    let theirs = there
        .ledger
        .balance("3001", there.now, Duration::days(14))
        .unwrap();
    assert_eq!(ours.customer.id, theirs.customer.id, "the same id in both shops");
    let code = theirs.referral_code.unwrap();
    assert_ne!(Some(code.clone()), ours.referral_code);
    let r = import(&mut here, &format!("card,referral_code\n2002,{code}\n"));
    assert_eq!(r.created, 1);
    assert_eq!(r.problems.len(), 1, "{r:?}");
    assert!(r.problems[0].1.contains("no member's of this program"), "{r:?}");
    let refused = here.ledger.attribute_changes("2002").unwrap();
    assert!(
        refused.iter().any(|c| c.field == "referred_by"
            && c.new.as_deref() == Some(code.as_str())
            && c.refused.is_some()),
        "{refused:?}"
    );
}

/// An invitation passed around past its `invite_limit` is refused on the customer who brought
/// it, with the reason in history — from the customers file and from a sale's customer alike —
/// and the sale still counts. A member reading their code again is no new use.
#[test]
fn an_invitation_past_its_limit_is_refused_and_the_sale_still_counts() {
    let mut env = Env::with_rules(&PROGRAM.replace(
        "invite_codes = [\"CLUB2026\"]",
        "invite_codes = [\"CLUB2026\"]\ninvite_limit = 2",
    ));
    let members = |env: &Env, who: &str| {
        env.ledger
            .balance(who, env.now, Duration::days(14))
            .unwrap()
            .memberships
            .into_iter()
            .map(|(p, _)| p)
            .collect::<Vec<_>>()
    };
    let r = import(
        &mut env,
        "phone;invite_code\n+7 912 345-67-81;CLUB2026\n+7 912 345-67-82;club2026\n+7 912 345-67-82;CLUB2026\n+7 912 345-67-83;CLUB2026\n",
    );
    let reasons: Vec<&str> = r.problems.iter().map(|p| p.1.as_str()).collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("opens no program"), "{reasons:?}");
    assert_eq!(
        reasons[1],
        "invite code \"CLUB2026\" has brought in its 2 members of \"club\" (invite_limit): not joined"
    );
    assert_eq!(members(&env, "+79123456781"), vec!["club".to_string()]);
    assert_eq!(members(&env, "+79123456782"), vec!["club".to_string()]);
    assert!(members(&env, "+79123456783").is_empty());
    let again = import(&mut env, "phone;invite_code\n+7 912 345-67-81;CLUB2026\n");
    assert_eq!((again.created, again.updated, again.unchanged), (0, 0, 1));

    // the same code on a sale's customer: refused there too, once however often 1C sends it
    let mut s = sale("S1", Some("7001"), &[("A", 1, 100)]);
    s.customer.invite_code = Some("CLUB2026".into());
    assert_eq!(env.docs(vec![s.clone()]).applied, 1);
    env.docs(vec![s]);
    assert!(members(&env, "7001").is_empty());
    let refused: Vec<String> = env
        .ledger
        .attribute_changes("7001")
        .unwrap()
        .into_iter()
        .filter(|c| c.field == "invite_code")
        .filter_map(|c| c.refused)
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].contains("invite_limit"), "{refused:?}");
    let b = env.ledger.balance("7001", env.now, Duration::days(14)).unwrap();
    assert_eq!(b.available + b.pending, 5, "5% of 100 ₽ earned all the same");
    env.assert_verified();
}

/// The acceptance of `customer forget`: the old phone and e-mail are nowhere in the ledger
/// file, `ledger verify` is clean, the sums are unchanged.
#[test]
fn a_forgotten_customer_leaves_no_phone_or_email_in_the_ledger_file() {
    let mut env = Env::with_rules(PROGRAM);
    let mut s1 = sale("S1", None, &[("A", 2, 1500)]);
    s1.customer.phone = Phone::parse("+7 (912) 345-67-89");
    s1.customer.email = Email::parse("Anna.Ivanova@example.ru");
    s1.customer.name = Some("Анна Иванова".into());
    s1.occurred_at -= Duration::days(20);
    env.docs(vec![reversion(s1)]);
    let csv = format!(
        "phone;name;birthday\n+79123456789;Анна Иванова;{}\n",
        env.now.date_naive().format("%d.%m.1990")
    );
    import(&mut env, &csv);
    // a person's typed reason names the customer: the explanation is stored packed
    // (deflated), so a scrub of the file's text alone would not reach it
    env.adjust(&AdjustRequest {
        customer: "+79123456789".into(),
        points: 7,
        reason: "call from +79123456789, anna.ivanova@example.ru".into(),
        key: None,
        by: "accountant".into(),
    })
    .unwrap();
    let before = env.ledger.summary(&DateRange::default(), env.now).unwrap();
    let points = env.available("+79123456789");
    assert!(points > 0);
    let (_, entries) = env.ledger.history("+79123456789").unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e.explanation.summary.contains("anna.ivanova@example.ru")),
        "{entries:#?}"
    );

    let f = env
        .ledger
        .forget_customer("+79123456789", "request of 01.12.2026", "test", env.now)
        .unwrap();
    assert_eq!(f.keys_removed, 2);
    let after = env.ledger.summary(&DateRange::default(), env.now).unwrap();
    assert_eq!(before, after, "the journal and its sums are unchanged");
    env.assert_verified();
    assert!(
        env.ledger
            .balance("+79123456789", env.now, Duration::days(14))
            .is_err()
    );

    let (_, entries) = env.ledger.history(&format!("id:{}", f.customer_id)).unwrap();
    let texts: Vec<&str> = entries.iter().map(|e| e.explanation.summary.as_str()).collect();
    assert!(
        texts.iter().any(|t| t.contains("[forgotten]"))
            && !texts
                .iter()
                .any(|t| t.contains("ivanova") || t.contains("9123456789")),
        "{texts:#?}"
    );

    let mut bytes = std::fs::read(&env.path).unwrap();
    if let Ok(wal) = std::fs::read(env.path.with_extension("db-wal")) {
        bytes.extend(wal);
    }
    for needle in [
        "9123456789",
        "anna.ivanova@example.ru",
        "Anna.Ivanova",
        "Анна Иванова",
        "1990",
    ] {
        let found = bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
        assert!(!found, "{needle:?} is still in the ledger file");
    }
    assert!(
        env.ledger.forget_customer("1", " ", "test", env.now).is_err(),
        "a reason is required"
    );
}

/// A real source format: 1C sends its buyer as a person with `ДатаРождения` (CommerceML
/// 2.10's `РеквизитыФизЛица`); the birthday bonus follows with no other step. A date that is
/// no date leaves the birthday out and the sale still counts.
#[test]
fn a_birthday_from_a_commerceml_counterparty_pays_the_birthday_bonus() {
    let mut env = Env::with_rules(PROGRAM);
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/onec/sale-person-birthday-2.10.xml"
    );
    let bytes = std::fs::read(path).unwrap();
    let opts = kopilka::onec::commerceml::Options::new("onec", chrono_tz::Europe::Moscow);
    let mut docs = Vec::new();
    kopilka::onec::commerceml::parse(std::io::Cursor::new(bytes), "birthday.xml", &opts, &mut |item| {
        if let kopilka::onec::commerceml::Item::Document(kopilka::core::document::Incoming::Document(d)) =
            item
        {
            docs.push(d);
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(docs.len(), 2);
    assert_eq!(
        docs[0].customer.birthday,
        chrono::NaiveDate::from_ymd_opt(1988, 3, 2)
    );
    assert_eq!(docs[1].customer.birthday, None);
    let r = env.docs(docs.clone());
    assert_eq!(r.applied, 2);
    // the date that is no date is said on its customer, once however often 1C sends it
    env.docs(docs.clone());
    let changes = env.ledger.attribute_changes("onec:buyer-2").unwrap();
    let refused: Vec<_> = changes
        .iter()
        .filter(|c| c.field == "birthday" && c.refused.is_some())
        .map(|c| (c.new.clone(), c.source.clone(), c.refused.clone().unwrap()))
        .collect();
    assert_eq!(
        refused,
        vec![(
            Some("1990-02-31".to_string()),
            "onec".to_string(),
            "ДатаРождения \"1990-02-31\" is not a date (the XSD's ДатаТип: YYYY-MM-DD)".to_string()
        )]
    );
    assert!(
        env.ledger
            .attribute_changes("onec:buyer-1")
            .unwrap()
            .iter()
            .all(|c| c.refused.is_none())
    );
    // env.now is 2026-04-01; the bonus window is 3 days before to 7 after: on 2026-03-02
    env.now = common::t0();
    assert_eq!(env.run(|l, r, c| l.birthday_bonuses(r, c)).unwrap(), 1);
    let b = env
        .ledger
        .balance("onec:buyer-1", env.now, Duration::days(14))
        .unwrap();
    assert_eq!(b.available + b.pending, 50 + 300);
}

/// A real source format: a site's order form asked for a friend code and a birthday, and the
/// site wrote them as document requisites (`[onec] referral_requisite`, `birthday_requisite`).
/// The friend pays both after the return window; a code that is nobody's and a date of 31.02
/// are refused on that customer with the reason, and the sale still counts.
#[test]
fn a_friend_code_and_a_birthday_in_a_document_s_requisites_reach_the_programs() {
    let mut env = Env::with_rules(PROGRAM);
    let mut s0 = sale("S0", Some("1001"), &[("A", 1, 1000)]);
    s0.occurred_at -= Duration::days(60);
    env.docs(vec![reversion(s0)]);
    let code = env
        .ledger
        .balance("1001", env.now, Duration::days(14))
        .unwrap()
        .referral_code
        .unwrap();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/onec/site-orders-friend-code.xml"
    );
    let xml = std::fs::read_to_string(path)
        .unwrap()
        .replace("FRIEND-CODE-HERE", &code);
    let mut opts = kopilka::onec::commerceml::Options::new("onec", chrono_tz::Europe::Moscow);
    opts.referral_requisite = Some("Код друга".into());
    opts.birthday_requisite = Some("Дата рождения".into());
    let mut docs = Vec::new();
    kopilka::onec::commerceml::parse(
        std::io::Cursor::new(xml.into_bytes()),
        "orders.xml",
        &opts,
        &mut |item| {
            if let kopilka::onec::commerceml::Item::Document(kopilka::core::document::Incoming::Document(d)) =
                item
            {
                docs.push(d);
            }
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(docs.len(), 2);
    assert_eq!(env.docs(docs.clone()).applied, 2, "both sales count");
    env.docs(docs);

    let friend = env
        .ledger
        .balance("onec:site-7", env.now, Duration::days(14))
        .unwrap();
    assert_eq!(friend.customer.birthday.as_deref(), Some("1991-03-07"));
    let set = env.ledger.attribute_changes("onec:site-7").unwrap();
    assert!(
        set.iter().any(|c| c.field == "referred_by"
            && c.new.as_deref() == Some(code.as_str())
            && c.refused.is_none()),
        "{set:?}"
    );
    let refused: Vec<(String, String)> = env
        .ledger
        .attribute_changes("onec:site-8")
        .unwrap()
        .into_iter()
        .filter_map(|c| c.refused.map(|r| (c.field, r)))
        .collect();
    assert_eq!(
        refused.len(),
        2,
        "once each, however often the file is read: {refused:?}"
    );
    assert!(
        refused
            .iter()
            .any(|(f, r)| f == "referred_by" && r.contains("no member's of this program"))
    );
    assert!(
        refused
            .iter()
            .any(|(f, r)| f == "birthday" && r.starts_with("requisite \"Дата рождения\"")),
        "{refused:?}"
    );

    // 2026-03-01 is past the 14-day window on 2026-04-01: both sides are paid, once
    let before = env.available("1001");
    assert_eq!(env.run(|l, r, c| l.referral_bonuses(r, c)).unwrap(), 1);
    assert_eq!(env.available("1001"), before + 300);
    env.assert_verified();
}

/// Memberships bought with a fee lapse after their term, are renewed by buying again (from
/// the end of the one in force), and end when the fee is returned.
#[test]
fn a_bought_membership_lapses_renews_and_ends_with_the_fee_returned() {
    let mut env = Env::with_rules(&PROGRAM.replace(
        "membership_products = [\"CLUB-FEE\"]",
        "membership_products = [\"CLUB-FEE\"]\nterm_days = 30",
    ));
    let member = |env: &Env| {
        env.ledger
            .balance("5001", env.now, Duration::days(14))
            .unwrap()
            .memberships
    };
    let mut s1 = sale("S1", Some("5001"), &[("CLUB-FEE", 1, 500)]);
    s1.occurred_at = env.now - Duration::days(50);
    env.docs(vec![reversion(s1)]);
    assert!(member(&env).is_empty(), "bought 50 days ago for 30: lapsed");

    let mut s2 = sale("S2", Some("5001"), &[("CLUB-FEE", 1, 500)]);
    s2.occurred_at = env.now - Duration::days(10);
    env.docs(vec![reversion(s2)]);
    assert_eq!(
        member(&env),
        vec![("club".to_string(), Some(env.now + Duration::days(20)))]
    );

    // renewed early: 30 more days from the end of the one in force
    let mut s3 = sale("S3", Some("5001"), &[("CLUB-FEE", 1, 500), ("A", 1, 100)]);
    s3.occurred_at = env.now - Duration::days(5);
    let s3 = reversion(s3);
    env.docs(vec![s3.clone()]);
    assert_eq!(
        member(&env),
        vec![("club".to_string(), Some(env.now + Duration::days(50)))]
    );

    // the renewal's fee returned: the membership ends
    env.docs(vec![returned("R3", &s3, &[("CLUB-FEE", 1)])]);
    assert!(member(&env).is_empty());
    env.assert_verified();
}

/// A free-item stamp reward is a voucher with a code and an end; a sale that gives the item
/// free uses it, once; unposting that sale gives it back; past its end it is expired.
#[test]
fn a_free_item_voucher_is_issued_used_once_and_expires() {
    let mut env = Env::with_rules(&format!(
        "{PROGRAM}\n[[stamp_cards]]\nid = \"coffee\"\nevery = 3\ninclude_products = [\"K\"]\n\
         reward_product = \"K-FREE\"\nreward_valid_days = 30\n"
    ));
    let vouchers = |env: &Env| {
        env.ledger
            .balance("6001", env.now, Duration::days(14))
            .unwrap()
            .vouchers
    };
    let mut s1 = sale("S1", Some("6001"), &[("K", 3, 200)]);
    s1.occurred_at = env.now - Duration::days(10);
    env.docs(vec![reversion(s1)]);
    let v = vouchers(&env);
    assert_eq!(v.len(), 1);
    let code = v[0].code.clone().unwrap();
    assert!(code.starts_with("V-") && code.len() == 9, "{code}");
    assert_eq!((v[0].product.as_str(), v[0].state.as_str()), ("K-FREE", "issued"));
    assert_eq!(v[0].expires_at, Some(env.now + Duration::days(20)));
    // a friend code it is not
    let key =
        kopilka::core::identity::CodeKey::parse(&env.ledger.meta_get("friend_code_key").unwrap().unwrap())
            .unwrap();
    assert_eq!(kopilka::core::identity::referral_id(&code, key), None);

    // the till gives the item free: the voucher is used; a second free one finds none
    let mut s2 = sale("S2", Some("6001"), &[("K-FREE", 2, 200), ("A", 1, 100)]);
    s2.lines[0].discount = s2.lines[0].net;
    s2.lines[0].net = kopilka::core::money::Money(0);
    s2.total = s2.lines.iter().map(|l| l.net).sum();
    s2.occurred_at = env.now - Duration::days(5);
    env.docs(vec![reversion(s2)]);
    assert_eq!(vouchers(&env)[0].state, "used");

    // unposted in 1C: the voucher is open again
    env.ingest(vec![kopilka::ledger::Item::Incoming(
        kopilka::core::document::Incoming::Void {
            source: kopilka::core::document::SourceRef {
                system: "onec".into(),
                doc_id: "S2".into(),
                version: "void".into(),
                stamp: None,
            },
            reason: kopilka::core::document::VoidReason::Unposted,
        },
    )]);
    assert_eq!(vouchers(&env)[0].state, "issued");
    // and past its end, expired
    env.now += Duration::days(21);
    assert_eq!(vouchers(&env)[0].state, "expired");
    env.assert_verified();
}
