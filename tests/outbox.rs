//! The outbox against scripted sinks: retries, dead letters, crashes between send and
//! mark, coalescing, halts. The sink plays the destination: it applies each idempotency key
//! once, however often it is sent, as the 1C and AmoCRM connectors must.

mod common;

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use chrono::Duration;
use common::{Env, sale};
use kopilka::clock::FakeClock;
use kopilka::ledger::{
    DeliveryError, DeliveryPolicy, Ledger, OpenOptions, OutboxFilter, OutboxRow, OutboxState, SharedLedger,
    Sink, deliver_due,
};

/// A destination with a script of answers per row key; it records every send and applies
/// each idempotency key once.
#[derive(Default)]
struct Scripted {
    script: Mutex<HashMap<String, VecDeque<Result<(), DeliveryError>>>>,
    sends: Mutex<Vec<String>>,
    applied: Mutex<HashMap<String, usize>>,
}

impl Scripted {
    fn answer(&self, key: &str, answers: Vec<Result<(), DeliveryError>>) {
        self.script
            .lock()
            .unwrap()
            .insert(key.to_string(), answers.into());
    }
    fn sends_of(&self, key: &str) -> usize {
        self.sends.lock().unwrap().iter().filter(|k| *k == key).count()
    }
    fn effects_of(&self, key: &str) -> usize {
        self.applied.lock().unwrap().get(key).map_or(0, |_| 1)
    }
}

impl Sink for Scripted {
    fn destination(&self) -> &str {
        "test"
    }
    fn max_batch(&self) -> usize {
        3
    }
    async fn deliver(&self, rows: &[OutboxRow]) -> Vec<Result<(), DeliveryError>> {
        rows.iter()
            .map(|r| {
                self.sends.lock().unwrap().push(r.idem_key.clone());
                let answer = self
                    .script
                    .lock()
                    .unwrap()
                    .get_mut(&r.idem_key)
                    .and_then(VecDeque::pop_front)
                    .unwrap_or(Ok(()));
                if answer.is_ok() {
                    *self
                        .applied
                        .lock()
                        .unwrap()
                        .entry(r.idem_key.clone())
                        .or_default() += 1;
                }
                answer
            })
            .collect()
    }
}

fn setup() -> (tempfile::TempDir, std::path::PathBuf, SharedLedger, FakeClock) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let ledger = Ledger::open(&path, &OpenOptions::default()).unwrap();
    let clock = FakeClock::new(common::t0());
    (dir, path, SharedLedger::new(ledger), clock)
}

fn policy() -> DeliveryPolicy {
    DeliveryPolicy {
        max_attempts: 4,
        backoff_initial: std::time::Duration::from_secs(10),
        backoff_max: std::time::Duration::from_secs(60),
        max_rows_per_run: 100,
    }
}

fn enqueue(l: &SharedLedger, key: &str, coalesce: Option<&str>, clock: &FakeClock) -> Option<i64> {
    use kopilka::clock::Clock;
    l.lock()
        .outbox_enqueue(
            "test",
            key,
            coalesce,
            &format!("{{\"key\":\"{key}\"}}"),
            clock.now(),
        )
        .unwrap()
}

fn state(l: &SharedLedger, id: i64) -> OutboxState {
    l.lock().outbox_show(id).unwrap().state
}

#[tokio::test]
async fn fails_twice_then_succeeds_and_is_delivered_once() {
    let (_d, _p, l, clock) = setup();
    let sink = Scripted::default();
    let id = enqueue(&l, "k1", None, &clock).unwrap();
    sink.answer(
        "k1",
        vec![
            Err(DeliveryError::Retriable("503".into())),
            Err(DeliveryError::Retriable("timeout".into())),
        ],
    );
    let r = deliver_due(&l, &sink, &policy(), &clock).await.unwrap();
    assert_eq!((r.delivered, r.retried), (0, 1));
    // backing off: nothing is due until the delay has passed
    let r = deliver_due(&l, &sink, &policy(), &clock).await.unwrap();
    assert_eq!(r.retried + r.delivered, 0);
    clock.advance(Duration::seconds(11));
    deliver_due(&l, &sink, &policy(), &clock).await.unwrap();
    clock.advance(Duration::seconds(21));
    let r = deliver_due(&l, &sink, &policy(), &clock).await.unwrap();
    assert_eq!(r.delivered, 1);
    assert_eq!(state(&l, id), OutboxState::Delivered);
    assert_eq!((sink.sends_of("k1"), sink.effects_of("k1")), (3, 1));
    assert_eq!(l.lock().outbox_show(id).unwrap().attempts, 3);
}

#[tokio::test]
async fn a_permanent_failure_is_a_dead_letter_until_retried_by_hand() {
    let (_d, _p, l, clock) = setup();
    let sink = Scripted::default();
    let id = enqueue(&l, "k1", None, &clock).unwrap();
    let other = enqueue(&l, "k2", None, &clock).unwrap();
    sink.answer(
        "k1",
        vec![Err(DeliveryError::Permanent(
            "422 field 123 does not exist".into(),
        ))],
    );
    let r = deliver_due(&l, &sink, &policy(), &clock).await.unwrap();
    assert_eq!((r.delivered, r.dead), (1, 1));
    let row = l.lock().outbox_show(id).unwrap();
    assert_eq!(row.state, OutboxState::Dead);
    assert!(row.last_error.unwrap().contains("422"));
    assert_eq!(state(&l, other), OutboxState::Delivered);
    // nothing more happens by itself
    clock.advance(Duration::days(1));
    assert_eq!(
        deliver_due(&l, &sink, &policy(), &clock).await.unwrap().delivered,
        0
    );
    // fixed at the destination, retried by a person
    use kopilka::clock::Clock;
    l.lock().outbox_retry(id, clock.now()).unwrap();
    let r = deliver_due(&l, &sink, &policy(), &clock).await.unwrap();
    assert_eq!(r.delivered, 1);
    assert_eq!(state(&l, id), OutboxState::Delivered);
    assert_eq!(sink.effects_of("k1"), 1);
}

#[tokio::test]
async fn retriable_failures_past_the_attempt_limit_become_dead() {
    let (_d, _p, l, clock) = setup();
    let sink = Scripted::default();
    let id = enqueue(&l, "k1", None, &clock).unwrap();
    sink.answer(
        "k1",
        (0..10)
            .map(|_| Err(DeliveryError::Retriable("500".into())))
            .collect(),
    );
    for _ in 0..10 {
        deliver_due(&l, &sink, &policy(), &clock).await.unwrap();
        clock.advance(Duration::minutes(5));
    }
    let row = l.lock().outbox_show(id).unwrap();
    assert_eq!((row.state, row.attempts), (OutboxState::Dead, 4));
    assert!(row.last_error.unwrap().contains("gave up after 4 attempts"));
    assert_eq!(sink.sends_of("k1"), 4);
}

#[tokio::test]
async fn a_crash_between_send_and_mark_resends_with_the_same_key() {
    let (_d, path, l, clock) = setup();
    let sink = Scripted::default();
    enqueue(&l, "k1", None, &clock).unwrap();
    // the process sends, then dies before marking the row delivered
    {
        use kopilka::clock::Clock;
        let rows = l.lock().outbox_due("test", 10, clock.now()).unwrap();
        let results = sink.deliver(&rows).await;
        assert!(results.iter().all(Result::is_ok));
    }
    drop(l);
    let l = SharedLedger::new(Ledger::open(&path, &OpenOptions::default()).unwrap());
    let r = deliver_due(&l, &sink, &policy(), &clock).await.unwrap();
    assert_eq!(r.delivered, 1);
    assert_eq!(sink.sends_of("k1"), 2, "sent again after the crash");
    assert_eq!(sink.effects_of("k1"), 1, "applied once: the key is the same");
}

#[tokio::test]
async fn coalescing_keeps_only_the_newest_row_per_key() {
    let (_d, _p, l, clock) = setup();
    let sink = Scripted::default();
    let a1 = enqueue(&l, "contact-1-v1", Some("contact:1"), &clock).unwrap();
    let b1 = enqueue(&l, "contact-2-v1", Some("contact:2"), &clock).unwrap();
    {
        use kopilka::clock::Clock;
        let now = clock.now();
        // the first state was tried once and failed: it has a history worth keeping
        l.lock().outbox_mark_failed(a1, "503", Some(now), now).unwrap();
    }
    let a2 = enqueue(&l, "contact-1-v2", Some("contact:1"), &clock).unwrap();
    assert_eq!(state(&l, a1), OutboxState::Superseded);
    assert_eq!(l.lock().outbox_show(a1).unwrap().superseded_by, Some(a2));
    let a3 = enqueue(&l, "contact-1-v3", Some("contact:1"), &clock).unwrap();
    assert_eq!(
        enqueue(&l, "contact-1-v3", Some("contact:1"), &clock),
        None,
        "same key twice is one row"
    );
    // the second state was never attempted: no one has it and nothing can send it now
    assert!(
        l.lock().outbox_show(a2).is_err(),
        "a state never attempted is replaced"
    );
    let a1_row = l.lock().outbox_show(a1).unwrap();
    assert_eq!(
        (
            a1_row.superseded_by,
            a1_row.last_error.as_deref(),
            a1_row.payload.is_empty()
        ),
        (Some(a3), Some("503"), false),
        "the attempted one stays, with its body and error, pointing at the newest"
    );
    let r = deliver_due(&l, &sink, &policy(), &clock).await.unwrap();
    assert_eq!(r.delivered, 2);
    assert_eq!(sink.sends_of("contact-1-v1") + sink.sends_of("contact-1-v2"), 0);
    assert_eq!(sink.sends_of("contact-1-v3"), 1);
    assert_eq!(
        (state(&l, a3), state(&l, b1)),
        (OutboxState::Delivered, OutboxState::Delivered)
    );
    let superseded = l
        .lock()
        .outbox_list(&OutboxFilter {
            state: Some(OutboxState::Superseded),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        superseded.iter().map(|r| r.id).collect::<Vec<_>>(),
        [a1],
        "what was attempted is kept"
    );
    assert!(l.lock().verify().unwrap().is_empty());
}

/// A pusher that read a state just before a newer one replaced it: its mark finds no row
/// (a no-op), and the newer state is sent on the next turn — at least once, the newest.
#[tokio::test]
async fn a_state_replaced_while_being_sent_is_followed_by_the_newer_one() {
    let (_d, _p, l, clock) = setup();
    let sink = Scripted::default();
    let a1 = enqueue(&l, "contact-1-v1", Some("contact:1"), &clock).unwrap();
    let rows = {
        use kopilka::clock::Clock;
        l.lock().outbox_due("test", 10, clock.now()).unwrap()
    };
    assert_eq!(rows.len(), 1);
    let a2 = enqueue(&l, "contact-1-v2", Some("contact:1"), &clock).unwrap();
    {
        use kopilka::clock::Clock;
        assert!(sink.deliver(&rows).await.iter().all(Result::is_ok));
        l.lock().outbox_mark_delivered(&[a1], clock.now()).unwrap();
    }
    assert!(l.lock().outbox_show(a1).is_err());
    assert_eq!(state(&l, a2), OutboxState::Pending, "the newer state still goes");
    let r = deliver_due(&l, &sink, &policy(), &clock).await.unwrap();
    assert_eq!(r.delivered, 1);
    assert_eq!(
        (sink.sends_of("contact-1-v1"), sink.sends_of("contact-1-v2")),
        (1, 1)
    );
    assert!(l.lock().verify().unwrap().is_empty());
}

#[tokio::test]
async fn a_halt_stops_the_run_at_once_and_keeps_the_row() {
    let (_d, _p, l, clock) = setup();
    let sink = Scripted::default();
    let ids: Vec<i64> = (0..7)
        .map(|i| enqueue(&l, &format!("k{i}"), None, &clock).unwrap())
        .collect();
    sink.answer("k1", vec![Err(DeliveryError::Halt("403 account blocked".into()))]);
    let r = deliver_due(&l, &sink, &policy(), &clock).await.unwrap();
    assert_eq!(r.halted.as_deref(), Some("403 account blocked"));
    assert_eq!(
        sink.sends.lock().unwrap().len(),
        3,
        "only the first batch was sent"
    );
    assert_eq!(state(&l, ids[1]), OutboxState::Pending);
    assert_eq!(l.lock().outbox_show(ids[1]).unwrap().attempts, 0);
}

#[tokio::test]
async fn ingest_queues_contact_states_in_the_same_transaction() {
    let mut env = Env::new();
    env.docs(vec![
        sale("S1", Some("C1"), &[("P1", 1, 1000)]),
        sale("S2", Some("C1"), &[("P2", 1, 1000)]),
    ]);
    env.docs(vec![sale("S3", Some("C2"), &[("P1", 1, 1000)])]);
    let pending = env
        .ledger
        .outbox_list(&OutboxFilter {
            state: Some(OutboxState::Pending),
            destination: Some("amocrm".into()),
            limit: None,
        })
        .unwrap();
    assert_eq!(pending.len(), 2, "one row per customer: {pending:#?}");
    let c1: serde_json::Value = serde_json::from_str(&pending[1].payload).unwrap();
    assert_eq!(
        c1["pending"].as_i64().unwrap() + c1["available"].as_i64().unwrap(),
        100
    );
    // a replay changes nothing and queues nothing
    let r = env.docs(vec![sale("S1", Some("C1"), &[("P1", 1, 1000)])]);
    assert_eq!(r.outbox_rows, 0);
}

/// The watchdog's and `/healthz`'s count, through the two partial indexes, says exactly what
/// the full count says of pending and dead rows, per destination — and nothing of the rows
/// delivered, superseded or dropped, which it never reads.
#[test]
fn the_open_counts_are_the_full_counts_of_pending_and_dead_rows() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = Ledger::open(&dir.path().join("ledger.db"), &OpenOptions::default()).unwrap();
    let now = chrono::Utc::now();
    let mut ids = Vec::new();
    for (dest, key) in [
        ("amocrm", "a1"),
        ("amocrm", "a2"),
        ("amocrm", "a3"),
        ("onec:bonus", "b:1"),
        ("onec:bonus", "b:2"),
        ("onec:bonus", "b:3"),
        ("onec:bonus", "b:4"),
    ] {
        ids.push(l.outbox_enqueue(dest, key, None, "{}", now).unwrap().unwrap());
    }
    l.outbox_mark_delivered(&[ids[0], ids[3]], now).unwrap();
    l.outbox_mark_failed(ids[1], "410 Gone", None, now).unwrap();
    l.outbox_mark_failed(ids[4], "500", None, now).unwrap();
    l.outbox_mark_failed(ids[5], "500", None, now).unwrap();
    l.outbox_drop(ids[6], "by hand", now).unwrap();
    let full = l.outbox_counts().unwrap();
    let want: Vec<_> = full
        .iter()
        .filter(|(_, s, _)| matches!(s, OutboxState::Pending | OutboxState::Dead))
        .cloned()
        .collect();
    assert_eq!(
        want,
        vec![
            ("amocrm".to_string(), OutboxState::Dead, 1),
            ("amocrm".to_string(), OutboxState::Pending, 1),
            ("onec:bonus".to_string(), OutboxState::Dead, 2),
        ],
        "{full:?}"
    );
    assert_eq!(l.outbox_open_counts().unwrap(), want);
}
