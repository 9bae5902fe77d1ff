//! An AmoCRM API v4 simulator on loopback, written from `../shared/specs/amocrm.md` (not
//! from kopilka's client), for tests, benchmarks and `kopilka demo`.
//!
//! It speaks: OAuth with 20-minute single-use codes, 24-hour access tokens and single-use
//! refresh tokens on a controllable clock, plus long-lived tokens; contacts (fuzzy `query`,
//! create, patch with `request_id`, tags), contact custom fields, leads with pipelines and
//! statuses, events, notes; paging with `_links.next` and 204 when a page is empty;
//! problem+json errors with validation errors per `request_id`. Faults can be injected (a
//! status, an HTML status, a delay past the client's timeout, a truncated body, a block), and
//! the wire can be made to jitter. Every request is recorded so tests can assert what was
//! sent.
//!
//! The rate limit follows the spec's "Rate limits — the account can be blocked": "7
//! requests/second per integration", "Over the limit → 429. Repeated violations → the
//! account is blocked: every call answers 403, often with an HTML page", and "How the vendor
//! counts 'per second' is not documented (fixed or sliding window)". Where the source is
//! silent the simulator takes the strictest reading: the arrival of every request it
//! receives — every endpoint, the OAuth token endpoint and refused requests included — is
//! counted, and a request is answered 429 (every other time as an HTML page) when more than
//! the limit arrived in the 1-second window ending with it, measured here on arrival after
//! any jitter of the wire. The spec gives no number of violations before the block, so the
//! count never decays (stricter than any "N per minute"): after `block_after_violations`
//! 429s in the simulator's life every call answers 403 with HTML.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::core::clock::Clock;

/// Record of one request the simulator received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: String,
    pub status: u16,
    /// Arrival, from the simulator's start.
    pub at: Duration,
}

impl Recorded {
    /// Items in a JSON array body (contacts per PATCH).
    pub fn items(&self) -> usize {
        serde_json::from_str::<Value>(&self.body)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0)
    }
}

/// A fault the next request gets instead of its real answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// This status with a problem+json body.
    Status(u16),
    /// This status with an HTML gateway page.
    Html(u16),
    /// Answer after this long (past a client's timeout).
    Delay(Duration),
    /// The real answer with its body cut in half.
    Truncated,
    /// The account is blocked from now on (403 HTML to everything).
    Block,
    /// 429 with `Retry-After: N` seconds; every request arriving before then is counted as
    /// ignoring it (see [`AmoSim::retry_after_ignored`]) and refused the same way.
    RetryAfter(u64),
}

#[derive(Clone, Debug)]
struct SimField {
    id: i64,
    name: String,
    code: Option<String>,
    kind: String,
    is_api_only: bool,
}

#[derive(Clone, Debug, Default)]
struct SimContact {
    id: i64,
    name: String,
    /// field id → values as sent (`{"value":…, "enum_code":…}`)
    fields: BTreeMap<i64, Vec<Value>>,
    tags: BTreeSet<String>,
    updated_at: i64,
}

#[derive(Clone, Debug, Default)]
struct SimLead {
    id: i64,
    name: String,
    price: i64,
    status_id: i64,
    pipeline_id: i64,
    contacts: Vec<(i64, bool)>,
    /// (element id, catalog id, quantity, name)
    catalog: Vec<(i64, i64, i64, String)>,
    closed_at: Option<i64>,
    updated_at: i64,
}

#[derive(Clone, Debug)]
struct SimEvent {
    id: String,
    kind: String,
    entity_id: i64,
    entity_type: &'static str,
    created_at: i64,
    value_before: Value,
    value_after: Value,
}

#[derive(Clone, Debug)]
pub struct SimNote {
    pub entity_id: i64,
    pub note_type: String,
    pub text: String,
}

/// A Salesbot started on a contact, with what the bot's text could read at that moment: the
/// value of the message field kopilka writes (`KOPILKA_MESSAGE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimBotRun {
    pub bot_id: i64,
    pub entity_id: i64,
    pub entity_type: i64,
    pub message: Option<String>,
}

struct OAuthState {
    client_id: String,
    client_secret: String,
    redirect_uri: String,
    /// code → (expires at, used)
    codes: HashMap<String, (DateTime<Utc>, bool)>,
    /// refresh token → still valid
    refresh: HashMap<String, bool>,
    /// access token → expires at
    access: HashMap<String, DateTime<Utc>>,
    long_lived: HashMap<String, DateTime<Utc>>,
    refresh_calls: u64,
    code_calls: u64,
    refuse_refresh: bool,
}

struct State {
    clock: Arc<dyn Clock>,
    started: Instant,
    rps: usize,
    block_after_violations: u32,
    events_limit: usize,
    oauth: OAuthState,
    fields: Vec<SimField>,
    contacts: BTreeMap<i64, SimContact>,
    leads: BTreeMap<i64, SimLead>,
    pipelines: BTreeMap<i64, Vec<i64>>,
    events: Vec<SimEvent>,
    notes: Vec<SimNote>,
    /// Salesbots the account has (ids), and the runs started.
    bots: BTreeSet<i64>,
    bot_runs: Vec<SimBotRun>,
    requests: Vec<Recorded>,
    /// Arrivals within the last second, oldest first.
    window: VecDeque<Instant>,
    /// Each request waits up to this long on its way in and again on its way out.
    jitter: Option<(Duration, fastrand::Rng)>,
    /// Access tokens stop working once this many requests have arrived.
    expire_access_at_request: Option<usize>,
    violations: u32,
    limited: u64,
    blocked: bool,
    faults: VecDeque<Fault>,
    /// Set by a `Retry-After` answer: requests before this instant ignored it.
    retry_not_before: Option<Instant>,
    retry_after_ignored: u64,
    /// Events that arrive (about entities deleted since) just before the next request for
    /// a second or later page of events: the list is newest first, so they push what the
    /// client has read onto the following pages — the duplicate pages of real paging.
    events_burst: usize,
    next_id: i64,
    next_event: u64,
    token_seq: u64,
    base: String,
}

impl State {
    fn now(&self) -> i64 {
        self.clock.now().timestamp()
    }

    fn id(&mut self) -> i64 {
        self.next_id += 1;
        self.next_id
    }

    fn event(
        &mut self,
        kind: String,
        entity_id: i64,
        entity_type: &'static str,
        before: Value,
        after: Value,
    ) {
        self.next_event += 1;
        let id = format!("01SIM{:021}", self.next_event);
        let created_at = self.now();
        self.events.push(SimEvent {
            id,
            kind,
            entity_id,
            entity_type,
            created_at,
            value_before: before,
            value_after: after,
        });
    }

    fn field_by_code(&self, code: &str) -> Option<&SimField> {
        self.fields
            .iter()
            .find(|f| f.code.as_deref().is_some_and(|c| c.eq_ignore_ascii_case(code)))
    }

    fn token(&mut self, prefix: &str) -> String {
        self.token_seq += 1;
        format!("{prefix}-{}-{:016x}", self.token_seq, fastrand::u64(..))
    }

    fn issue_pair(&mut self) -> Value {
        let access = self.token("access");
        let refresh = self.token("refresh");
        let exp = self.clock.now() + chrono::Duration::hours(24);
        self.oauth.access.insert(access.clone(), exp);
        self.oauth.refresh.insert(refresh.clone(), true);
        json!({"token_type": "Bearer", "expires_in": 86_400, "access_token": access, "refresh_token": refresh})
    }

    fn contact_json(&self, c: &SimContact) -> Value {
        let cf: Vec<Value> = c
            .fields
            .iter()
            .filter_map(|(id, values)| {
                let f = self.fields.iter().find(|f| f.id == *id)?;
                Some(json!({
                    "field_id": f.id, "field_name": f.name, "field_code": f.code, "field_type": f.kind,
                    "values": values,
                }))
            })
            .collect();
        json!({
            "id": c.id,
            "name": c.name,
            "updated_at": c.updated_at,
            "custom_fields_values": if cf.is_empty() { Value::Null } else { Value::Array(cf) },
            "_embedded": {"tags": c.tags.iter().enumerate().map(|(i, t)| json!({"id": i + 1, "name": t})).collect::<Vec<_>>()},
        })
    }

    fn lead_json(&self, l: &SimLead, with: &str) -> Value {
        let mut embedded = json!({});
        if with.contains("contacts") {
            embedded["contacts"] = Value::Array(
                l.contacts
                    .iter()
                    .map(|(id, main)| json!({"id": id, "is_main": main}))
                    .collect(),
            );
        }
        if with.contains("catalog_elements") {
            embedded["catalog_elements"] = Value::Array(
                l.catalog
                    .iter()
                    .map(|(id, cat, q, name)| json!({"id": id, "name": name, "metadata": {"quantity": q, "catalog_id": cat}}))
                    .collect(),
            );
        }
        json!({
            "id": l.id, "name": l.name, "price": l.price, "status_id": l.status_id, "pipeline_id": l.pipeline_id,
            "closed_at": l.closed_at, "updated_at": l.updated_at, "_embedded": embedded,
        })
    }

    /// Text of every value of a contact, for the fuzzy search.
    fn searchable(&self, c: &SimContact) -> Vec<String> {
        let mut out = vec![c.name.to_lowercase()];
        for values in c.fields.values() {
            for v in values {
                match v.get("value") {
                    Some(Value::String(s)) => out.push(s.to_lowercase()),
                    Some(Value::Number(n)) => out.push(n.to_string()),
                    _ => {}
                }
            }
        }
        out
    }
}

fn digits(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

pub struct AmoSimBuilder {
    rps: usize,
    block_after_violations: u32,
    events_limit: usize,
    clock: Option<Arc<dyn Clock>>,
    client: (String, String, String),
    long_lived: Vec<(String, DateTime<Utc>)>,
    jitter: Option<(Duration, u64)>,
}

impl AmoSimBuilder {
    /// The wire delays each request by a random 0..`max` on its way in (before the rate
    /// limit sees it) and again on its way out, drawn from `seed`: requests sent evenly
    /// arrive unevenly, as across a real network.
    pub fn network_jitter(mut self, max: Duration, seed: u64) -> Self {
        self.jitter = Some((max, seed));
        self
    }

    /// Requests per second the account allows (any 1-second window).
    pub fn requests_per_second(mut self, n: usize) -> Self {
        self.rps = n.max(1);
        self
    }

    /// Limit violations after which the account is blocked.
    pub fn block_after_violations(mut self, n: u32) -> Self {
        self.block_after_violations = n.max(1);
        self
    }

    /// Events per page at most (100 on amocrm.ru).
    pub fn events_page_limit(mut self, n: usize) -> Self {
        self.events_limit = n.clamp(1, 250);
        self
    }

    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    pub fn oauth_client(mut self, id: &str, secret: &str, redirect_uri: &str) -> Self {
        self.client = (id.into(), secret.into(), redirect_uri.into());
        self
    }

    /// Accepts this long-lived token until `expires_at`.
    pub fn long_lived_token(mut self, token: &str, expires_at: DateTime<Utc>) -> Self {
        self.long_lived.push((token.into(), expires_at));
        self
    }

    pub async fn start(self) -> std::io::Result<AmoSim> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let base = format!("http://{addr}");
        let clock = self.clock.unwrap_or_else(|| Arc::new(crate::clock::SystemClock));
        let fields = vec![
            SimField {
                id: 1001,
                name: "Телефон".into(),
                code: Some("PHONE".into()),
                kind: "multitext".into(),
                is_api_only: false,
            },
            SimField {
                id: 1002,
                name: "Email".into(),
                code: Some("EMAIL".into()),
                kind: "multitext".into(),
                is_api_only: false,
            },
            SimField {
                id: 1003,
                name: "Должность".into(),
                code: Some("POSITION".into()),
                kind: "text".into(),
                is_api_only: false,
            },
        ];
        let state = State {
            clock,
            started: Instant::now(),
            rps: self.rps,
            block_after_violations: self.block_after_violations,
            events_limit: self.events_limit,
            oauth: OAuthState {
                client_id: self.client.0,
                client_secret: self.client.1,
                redirect_uri: self.client.2,
                codes: HashMap::new(),
                refresh: HashMap::new(),
                access: HashMap::new(),
                long_lived: self.long_lived.into_iter().collect(),
                refresh_calls: 0,
                code_calls: 0,
                refuse_refresh: false,
            },
            fields,
            contacts: BTreeMap::new(),
            leads: BTreeMap::new(),
            pipelines: BTreeMap::new(),
            events: Vec::new(),
            notes: Vec::new(),
            bots: BTreeSet::new(),
            bot_runs: Vec::new(),
            requests: Vec::new(),
            window: VecDeque::new(),
            jitter: self
                .jitter
                .map(|(max, seed)| (max, fastrand::Rng::with_seed(seed))),
            expire_access_at_request: None,
            violations: 0,
            limited: 0,
            blocked: false,
            faults: VecDeque::new(),
            retry_not_before: None,
            retry_after_ignored: 0,
            events_burst: 0,
            next_id: 5_000_000,
            next_event: 0,
            token_seq: 0,
            base: base.clone(),
        };
        let shared = Arc::new(Mutex::new(state));
        let app = Router::new().fallback({
            let shared = shared.clone();
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let shared = shared.clone();
                async move { handle(shared, method, uri, headers, body).await }
            }
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(AmoSim {
            base_url: base,
            state: shared,
            _stop: tx,
        })
    }
}

/// A running simulator; stops when dropped.
pub struct AmoSim {
    pub base_url: String,
    state: Arc<Mutex<State>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl AmoSim {
    pub fn builder() -> AmoSimBuilder {
        AmoSimBuilder {
            rps: 7,
            block_after_violations: 10,
            events_limit: 100,
            clock: None,
            client: (
                "kopilka-client".into(),
                "kopilka-secret".into(),
                "https://shop.example/oauth".into(),
            ),
            long_lived: Vec::new(),
            jitter: None,
        }
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh authorisation code (as the integration's redirect would deliver it).
    pub fn issue_code(&self) -> String {
        let mut s = self.st();
        let code = s.token("code");
        let exp = s.clock.now() + chrono::Duration::minutes(20);
        s.oauth.codes.insert(code.clone(), (exp, false));
        code
    }

    /// Every access token stops working (as after 24 h, or a revocation by an admin).
    pub fn expire_access_tokens(&self) {
        self.st().oauth.access.clear();
    }

    /// Every access token issued so far stops working when the `n`-th request (counted
    /// from the simulator's start) arrives: a revocation in the middle of a run.
    pub fn expire_access_tokens_at_request(&self, n: usize) {
        self.st().expire_access_at_request = Some(n);
    }

    /// Every refresh token is revoked, and refreshes are refused from now on.
    pub fn revoke_refresh_tokens(&self) {
        let mut s = self.st();
        for v in s.oauth.refresh.values_mut() {
            *v = false;
        }
        s.oauth.refuse_refresh = true;
    }

    pub fn refresh_calls(&self) -> u64 {
        self.st().oauth.refresh_calls
    }

    pub fn code_calls(&self) -> u64 {
        self.st().oauth.code_calls
    }

    pub fn inject(&self, fault: Fault, times: usize) {
        let mut s = self.st();
        for _ in 0..times {
            s.faults.push_back(fault.clone());
        }
    }

    /// Requests that arrived while a `Retry-After` was still running.
    pub fn retry_after_ignored(&self) -> u64 {
        self.st().retry_after_ignored
    }

    /// `n` events arrive just before the next request for page 2 or later of the events
    /// list, so the pages the client reads next repeat events it has already read.
    pub fn events_arrive_while_paging(&self, n: usize) {
        self.st().events_burst = n;
    }

    /// Events of [`AmoSim::events_arrive_while_paging`] that have not arrived yet.
    pub fn events_burst_pending(&self) -> usize {
        self.st().events_burst
    }

    pub fn is_blocked(&self) -> bool {
        self.st().blocked
    }

    /// Requests answered 429 by the rate limit (injected faults not counted).
    pub fn rate_limited(&self) -> u64 {
        self.st().limited
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.st().requests.clone()
    }

    pub fn clear_requests(&self) {
        self.st().requests.clear();
    }

    /// The most requests that arrived within any 1-second window.
    pub fn max_requests_in_any_second(&self) -> usize {
        let at: Vec<Duration> = self.st().requests.iter().map(|r| r.at).collect();
        let mut best = 0;
        let mut j = 0;
        for i in 0..at.len() {
            while at[i] - at[j] >= Duration::from_secs(1) {
                j += 1;
            }
            best = best.max(i - j + 1);
        }
        best
    }

    pub fn add_pipeline(&self, pipeline: i64, statuses: &[i64]) {
        let mut list = statuses.to_vec();
        for s in [142, 143] {
            if !list.contains(&s) {
                list.push(s);
            }
        }
        self.st().pipelines.insert(pipeline, list);
    }

    /// A contact as a manager typed it (phones and e-mails in any spelling).
    pub fn add_contact(&self, name: &str, phones: &[&str], emails: &[&str]) -> i64 {
        let mut s = self.st();
        let id = s.id();
        let mut c = SimContact {
            id,
            name: name.into(),
            updated_at: s.now(),
            ..Default::default()
        };
        if !phones.is_empty() {
            c.fields.insert(
                1001,
                phones
                    .iter()
                    .map(|p| json!({"value": p, "enum_code": "WORK"}))
                    .collect(),
            );
        }
        if !emails.is_empty() {
            c.fields.insert(
                1002,
                emails
                    .iter()
                    .map(|e| json!({"value": e, "enum_code": "WORK"}))
                    .collect(),
            );
        }
        s.contacts.insert(id, c);
        s.event(
            "contact_added".into(),
            id,
            "contact",
            json!([]),
            json!([{"contact": {"id": id}}]),
        );
        id
    }

    /// A manager sets a field (by code) on a contact: recorded as an event when it changes.
    pub fn set_contact_field(&self, contact: i64, code: &str, value: &str) -> bool {
        self.set_contact_value(contact, code, json!(value))
    }

    /// A field the shop created in AmoCRM's settings (not through the API): a `birthday`,
    /// a `checkbox`, a `text` field managers fill. Returns its id.
    pub fn add_field(&self, name: &str, code: &str, kind: &str) -> i64 {
        let mut s = self.st();
        let id = s.id();
        s.fields.push(SimField {
            id,
            name: name.into(),
            code: Some(code.into()),
            kind: kind.into(),
            is_api_only: false,
        });
        id
    }

    /// A manager sets a field (by code) to a value as the account stores it: Unix seconds
    /// for a `date` or `birthday` field (what the card's date picker stores), `true`/`false`
    /// for a checkbox, text otherwise. A value the field's type cannot hold is refused, as
    /// the card's form refuses it: returns false.
    pub fn set_contact_value(&self, contact: i64, code: &str, value: Value) -> bool {
        let mut s = self.st();
        let Some((f, kind)) = s.field_by_code(code).map(|f| (f.id, f.kind.clone())) else {
            return false;
        };
        if !value_fits(&kind, &value) {
            return false;
        }
        let now = s.now();
        let Some(c) = s.contacts.get_mut(&contact) else {
            return false;
        };
        let new = vec![json!({"value": value})];
        let old = c.fields.insert(f, new);
        c.updated_at = now;
        let before = old.and_then(|o| o.first().and_then(|v| v.get("value").cloned()));
        s.event(
            format!("custom_field_{f}_value_changed"),
            contact,
            "contact",
            json!([{"custom_field_value": {"field_id": f, "text": before}}]),
            json!([{"custom_field_value": {"field_id": f, "text": value}}]),
        );
        true
    }

    /// A lead, optionally with catalog items `(catalog id, quantity, name)`.
    pub fn add_lead(&self, name: &str, price: i64, pipeline: i64, status: i64, contact: Option<i64>) -> i64 {
        let mut s = self.st();
        let id = s.id();
        let now = s.now();
        s.leads.insert(
            id,
            SimLead {
                id,
                name: name.into(),
                price,
                status_id: status,
                pipeline_id: pipeline,
                contacts: contact.map(|c| vec![(c, true)]).unwrap_or_default(),
                catalog: Vec::new(),
                closed_at: matches!(status, 142 | 143).then_some(now),
                updated_at: now,
            },
        );
        s.event(
            "lead_added".into(),
            id,
            "lead",
            json!([]),
            json!([{"lead": {"id": id}}]),
        );
        id
    }

    pub fn add_lead_item(&self, lead: i64, catalog: i64, quantity: i64, name: &str) {
        let mut s = self.st();
        let id = s.id();
        if let Some(l) = s.leads.get_mut(&lead) {
            l.catalog.push((id, catalog, quantity, name.into()));
        }
    }

    /// Moves a lead to a status (in its pipeline), recording `lead_status_changed`.
    pub fn set_lead_status(&self, lead: i64, status: i64) {
        let mut s = self.st();
        let now = s.now();
        let Some(l) = s.leads.get_mut(&lead) else { return };
        let before = json!([{"lead_status": {"id": l.status_id, "pipeline_id": l.pipeline_id}}]);
        l.status_id = status;
        l.updated_at = now;
        l.closed_at = matches!(status, 142 | 143).then_some(now);
        let after = json!([{"lead_status": {"id": status, "pipeline_id": l.pipeline_id}}]);
        s.event("lead_status_changed".into(), lead, "lead", before, after);
    }

    pub fn set_lead_price(&self, lead: i64, price: i64) {
        let mut s = self.st();
        let now = s.now();
        let Some(l) = s.leads.get_mut(&lead) else { return };
        let before = json!([{"sale_field_value": {"sale": l.price}}]);
        l.price = price;
        l.updated_at = now;
        s.event(
            "sale_field_changed".into(),
            lead,
            "lead",
            before,
            json!([{"sale_field_value": {"sale": price}}]),
        );
    }

    /// The first value of a field (by code) on a contact.
    pub fn field_value(&self, contact: i64, code: &str) -> Option<String> {
        let s = self.st();
        let f = s.field_by_code(code)?.id;
        let v = s
            .contacts
            .get(&contact)?
            .fields
            .get(&f)?
            .first()?
            .get("value")?
            .clone();
        match v {
            Value::String(t) => Some(t),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }

    /// A contact deleted in the CRM (a later PATCH of it fails validation).
    pub fn delete_contact(&self, contact: i64) {
        self.st().contacts.remove(&contact);
    }

    pub fn contact_tags(&self, contact: i64) -> Vec<String> {
        self.st()
            .contacts
            .get(&contact)
            .map(|c| c.tags.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn contact_ids(&self) -> Vec<i64> {
        self.st().contacts.keys().copied().collect()
    }

    pub fn field_codes(&self) -> Vec<String> {
        self.st().fields.iter().filter_map(|f| f.code.clone()).collect()
    }

    pub fn notes(&self) -> Vec<SimNote> {
        self.st().notes.clone()
    }

    /// A Salesbot the shop built (AmoCRM → Salesbot); its id is what kopilka is configured with.
    pub fn add_bot(&self, id: i64) {
        self.st().bots.insert(id);
    }

    pub fn bot_runs(&self) -> Vec<SimBotRun> {
        self.st().bot_runs.clone()
    }

    /// A contact's phones as stored.
    pub fn phones(&self, contact: i64) -> Vec<String> {
        let s = self.st();
        s.contacts
            .get(&contact)
            .and_then(|c| c.fields.get(&1001))
            .map(|v| {
                v.iter()
                    .filter_map(|x| x.get("value").and_then(Value::as_str).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn respond(status: u16, content_type: &str, body: String, request_id: &str) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, content_type)
        .header("x-request-id", request_id)
        .body(Body::from(body))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

fn problem(status: u16, title: &str, detail: &str) -> (u16, String, String) {
    (
        status,
        "application/problem+json".into(),
        json!({"title": title, "type": "https://httpstatus.es/".to_string() + &status.to_string(), "status": status, "detail": detail})
            .to_string(),
    )
}

fn html(status: u16) -> (u16, String, String) {
    (
        status,
        "text/html; charset=utf-8".into(),
        format!(
            "<html><head><title>{status}</title></head><body><h1>{status}</h1><p>nginx</p></body></html>"
        ),
    )
}

fn ok(v: Value) -> (u16, String, String) {
    (200, "application/hal+json".into(), v.to_string())
}

fn no_content() -> (u16, String, String) {
    (204, String::new(), String::new())
}

fn validation(errors: Vec<(String, String, String)>) -> (u16, String, String) {
    let list: Vec<Value> = errors
        .into_iter()
        .map(|(rid, code, path)| {
            json!({"request_id": rid, "errors": [{"code": code, "path": path, "detail": "This value is not valid"}]})
        })
        .collect();
    (
        400,
        "application/problem+json".into(),
        json!({"title": "Bad Request", "type": "https://httpstatus.es/400", "status": 400, "detail": "Request validation failed", "validation-errors": list}).to_string(),
    )
}

async fn handle(
    shared: Arc<Mutex<State>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let inbound = jitter(&shared);
    if !inbound.is_zero() {
        tokio::time::sleep(inbound).await;
    }
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or("").to_string();
    let mut retry_after: Option<u64> = None;
    let (answer, fault, request_id) = {
        let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
        // taken under the lock, so the window holds arrivals in order
        let arrived = Instant::now();
        let at = arrived.saturating_duration_since(s.started);
        let request_id = format!("sim-{:08x}", s.requests.len() + 1);
        // the rate limit counts every arrival in the last second
        while s
            .window
            .front()
            .is_some_and(|t| arrived.saturating_duration_since(*t) >= Duration::from_secs(1))
        {
            s.window.pop_front();
        }
        s.window.push_back(arrived);
        if s.expire_access_at_request == Some(s.requests.len() + 1) {
            s.oauth.access.clear();
        }
        let waiting = s.retry_not_before.filter(|t| arrived < *t);
        let fault = if waiting.is_some() {
            None
        } else {
            s.faults.pop_front()
        };
        let answer = if s.blocked {
            html(403)
        } else if let Some(t) = waiting {
            s.retry_after_ignored += 1;
            let left = t.saturating_duration_since(arrived).as_secs().max(1);
            retry_after = Some(left);
            problem(429, "Too Many Requests", "Retry-After has not passed")
        } else if let Some(Fault::RetryAfter(secs)) = &fault {
            s.retry_not_before = Some(arrived + Duration::from_secs(*secs));
            retry_after = Some(*secs);
            problem(429, "Too Many Requests", "Too many requests, retry later")
        } else if s.window.len() > s.rps {
            s.violations += 1;
            s.limited += 1;
            if s.violations >= s.block_after_violations {
                s.blocked = true;
            }
            if s.violations.is_multiple_of(2) {
                html(429)
            } else {
                problem(429, "Too Many Requests", "Too many requests per second")
            }
        } else {
            match &fault {
                Some(Fault::Block) => {
                    s.blocked = true;
                    html(403)
                }
                Some(Fault::Status(code)) => problem(*code, "Injected", "an injected failure"),
                Some(Fault::Html(code)) => html(*code),
                _ => route(&mut s, &method, &path, &query, &headers, &body),
            }
        };
        s.requests.push(Recorded {
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
            body: String::from_utf8_lossy(&body).into_owned(),
            status: answer.0,
            at,
        });
        (answer, fault, request_id)
    };
    let (status, ctype, mut text) = answer;
    let outbound = jitter(&shared);
    if !outbound.is_zero() {
        tokio::time::sleep(outbound).await;
    }
    match fault {
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::Truncated) => {
            let mut cut = text.len() / 2;
            while cut > 0 && !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        _ => {}
    }
    let mut r = respond(status, &ctype, text, &request_id);
    if let Some(secs) = retry_after
        && let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string())
    {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// One draw of the wire's delay (zero without jitter).
fn jitter(shared: &Mutex<State>) -> Duration {
    let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
    match &mut s.jitter {
        Some((max, rng)) if !max.is_zero() => {
            Duration::from_micros(rng.u64(..max.as_micros().min(u128::from(u64::MAX)) as u64))
        }
        _ => Duration::ZERO,
    }
}

fn params(query: &str) -> Vec<(String, String)> {
    serde_urlencoded_pairs(query)
}

/// `a=1&b[c]=2` → pairs, percent-decoded.
fn serde_urlencoded_pairs(query: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = bytes
                        .get(i + 1..i + 3)
                        .and_then(|h| std::str::from_utf8(h).ok())
                        .and_then(|h| u8::from_str_radix(h, 16).ok());
                    match hex {
                        Some(b) => {
                            out.push(b);
                            i += 2;
                        }
                        None => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

fn param<'a>(p: &'a [(String, String)], key: &str) -> Option<&'a str> {
    p.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// One page of `items` under `_embedded.<key>`, with `_links.next` when the page is full.
fn page(
    s: &State,
    path: &str,
    p: &[(String, String)],
    key: &str,
    items: Vec<Value>,
    max_limit: usize,
) -> (u16, String, String) {
    let limit = param(p, "limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(50)
        .clamp(1, max_limit);
    let page_no = param(p, "page")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let start = (page_no - 1).saturating_mul(limit);
    let slice: Vec<Value> = items.into_iter().skip(start).take(limit).collect();
    if slice.is_empty() {
        return no_content();
    }
    let mut rest: Vec<(String, String)> = p.iter().filter(|(k, _)| k != "page").cloned().collect();
    let self_q = encode(&rest, page_no);
    let mut links = json!({"self": {"href": format!("{}{path}?{self_q}", s.base)}});
    if slice.len() == limit {
        rest.retain(|(k, _)| k != "page");
        links["next"] = json!({"href": format!("{}{path}?{}", s.base, encode(&rest, page_no + 1))});
    }
    ok(json!({"_page": page_no, "_links": links, "_embedded": {key: slice}}))
}

fn encode(p: &[(String, String)], page_no: usize) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'[' | b']' | b',' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    let mut parts: Vec<String> = p.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect();
    parts.push(format!("page={page_no}"));
    parts.join("&")
}

fn route(
    s: &mut State,
    method: &Method,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> (u16, String, String) {
    let p = params(query);
    if path == "/oauth2/access_token" && method == Method::POST {
        return token_endpoint(s, body);
    }
    let salesbot = path == "/api/v2/salesbot/run";
    if !path.starts_with("/api/v4/") && !salesbot {
        return problem(404, "Not Found", "unknown path");
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let now = s.clock.now();
    let valid = s.oauth.access.get(bearer).is_some_and(|exp| *exp > now)
        || s.oauth.long_lived.get(bearer).is_some_and(|exp| *exp > now);
    if !valid {
        return problem(401, "Unauthorized", "Token is invalid or expired");
    }
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(3).collect();
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(_) => return problem(400, "Bad Request", "the body is not JSON"),
        }
    };
    if salesbot {
        return if method == Method::POST {
            run_bots(s, &body)
        } else {
            problem(405, "Method Not Allowed", "POST a list of tasks")
        };
    }
    match (method.as_str(), parts.as_slice()) {
        ("GET", ["account"]) => ok(json!({"id": 31_000_000, "name": "Simulated shop", "subdomain": "sim"})),
        ("GET", ["contacts", "custom_fields"]) => {
            let items = s
                .fields
                .iter()
                .map(|f| json!({"id": f.id, "name": f.name, "code": f.code, "type": f.kind, "is_api_only": f.is_api_only, "entity_type": "contacts"}))
                .collect();
            page(s, path, &p, "custom_fields", items, 250)
        }
        ("POST", ["contacts", "custom_fields"]) => create_fields(s, &body),
        ("GET", ["contacts"]) => {
            let q = param(&p, "query").map(str::to_lowercase);
            let ids: Vec<i64> = p
                .iter()
                .filter(|(k, _)| k == "filter[id][]" || k.starts_with("filter[id]["))
                .filter_map(|(_, v)| v.parse().ok())
                .collect();
            let items = s
                .contacts
                .values()
                .filter(|c| ids.is_empty() || ids.contains(&c.id))
                .filter(|c| match &q {
                    None => true,
                    Some(q) => {
                        let qd = digits(q);
                        s.searchable(c).iter().any(|v| {
                            v.contains(q.as_str())
                                || (qd.len() >= 5 && qd.len() * 2 >= q.len() && digits(v).contains(&qd))
                        })
                    }
                })
                .map(|c| s.contact_json(c))
                .collect();
            page(s, path, &p, "contacts", items, 250)
        }
        ("GET", ["contacts", id]) => match id.parse::<i64>().ok().and_then(|i| s.contacts.get(&i)) {
            Some(c) => ok(s.contact_json(c)),
            None => no_content(),
        },
        ("POST", ["contacts"]) => create_contacts(s, &body),
        ("PATCH", ["contacts"]) => patch_contacts(s, &body),
        ("POST", ["contacts", "notes"]) => add_notes(s, &body),
        ("GET", ["leads"]) => {
            let with = param(&p, "with").unwrap_or("").to_string();
            let ids: Vec<i64> = p
                .iter()
                .filter(|(k, _)| k.starts_with("filter[id]"))
                .filter_map(|(_, v)| v.parse().ok())
                .collect();
            let items = s
                .leads
                .values()
                .filter(|l| ids.is_empty() || ids.contains(&l.id))
                .map(|l| s.lead_json(l, &with))
                .collect();
            page(s, path, &p, "leads", items, 250)
        }
        ("GET", ["leads", id]) => {
            let with = param(&p, "with").unwrap_or("");
            match id.parse::<i64>().ok().and_then(|i| s.leads.get(&i)) {
                Some(l) => ok(s.lead_json(l, with)),
                None => no_content(),
            }
        }
        ("GET", ["events"]) => {
            let types: Vec<String> = param(&p, "filter[type]")
                .map(|t| t.split(',').map(|x| x.trim().to_string()).collect())
                .unwrap_or_default();
            let from = param(&p, "filter[created_at][from]").and_then(|v| v.parse::<i64>().ok());
            let page_no = param(&p, "page")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(1);
            if page_no >= 2 && s.events_burst > 0 {
                let kind = types.first().cloned().unwrap_or_else(|| "contact_added".into());
                for _ in 0..std::mem::take(&mut s.events_burst) {
                    // about a contact deleted since: nothing to apply, but it takes a place
                    s.event(kind.clone(), 999_999_999, "contact", Value::Null, Value::Null);
                }
            }
            let items = s
                .events
                .iter()
                .rev()
                .filter(|e| types.is_empty() || types.contains(&e.kind))
                .filter(|e| from.is_none_or(|f| e.created_at >= f))
                .map(|e| {
                    json!({
                        "id": e.id, "type": e.kind, "entity_id": e.entity_id, "entity_type": e.entity_type,
                        "created_by": 0, "created_at": e.created_at, "value_before": e.value_before,
                        "value_after": e.value_after, "account_id": 31_000_000,
                    })
                })
                .collect();
            let limit = s.events_limit;
            page(s, path, &p, "events", items, limit)
        }
        _ => problem(404, "Not Found", "unknown method or path"),
    }
}

fn token_endpoint(s: &mut State, body: &[u8]) -> (u16, String, String) {
    let Ok(b) = serde_json::from_slice::<Value>(body) else {
        return problem(400, "Bad Request", "the body is not JSON");
    };
    let get = |k: &str| b.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    if get("client_id") != s.oauth.client_id || get("client_secret") != s.oauth.client_secret {
        return problem(401, "Unauthorized", "Client authentication failed");
    }
    if get("redirect_uri") != s.oauth.redirect_uri {
        return problem(400, "Bad Request", "redirect_uri does not match");
    }
    let hint = |h: &str| {
        (
            400,
            "application/problem+json".to_string(),
            json!({"title": "Bad Request", "status": 400, "detail": "invalid_grant", "hint": h}).to_string(),
        )
    };
    match get("grant_type").as_str() {
        "authorization_code" => {
            s.oauth.code_calls += 1;
            let now = s.clock.now();
            match s.oauth.codes.get_mut(&get("code")) {
                Some((exp, used)) if !*used && *exp > now => {
                    *used = true;
                    s.oauth.refuse_refresh = false;
                    ok(s.issue_pair())
                }
                Some((_, true)) => hint("Authorization code has been revoked"),
                Some(_) => hint("Authorization code has expired"),
                None => hint("Authorization code is invalid"),
            }
        }
        "refresh_token" => {
            s.oauth.refresh_calls += 1;
            let token = get("refresh_token");
            if s.oauth.refuse_refresh {
                return hint("Token has been revoked");
            }
            match s.oauth.refresh.get_mut(&token) {
                Some(valid) if *valid => {
                    *valid = false;
                    ok(s.issue_pair())
                }
                Some(_) => hint("Token has been revoked"),
                None => hint("Invalid refresh token"),
            }
        }
        other => problem(400, "Bad Request", &format!("unsupported grant_type {other:?}")),
    }
}

/// Contact field types: the spec's ("Custom fields": `numeric`, `text`, `select`, `date`
/// in Unix seconds, `checkbox`, `url`), the `textarea` and `multitext` of PHONE and EMAIL,
/// and `birthday` and `date_time`, which the official PHP library (amocrm/amocrm-api-php,
/// `BirthdayCustomFieldValueModel extends DateCustomFieldValueModel`) reads like `date`.
const FIELD_TYPES: [&str; 10] = [
    "numeric",
    "text",
    "select",
    "date",
    "birthday",
    "date_time",
    "checkbox",
    "url",
    "textarea",
    "multitext",
];

/// Whether a value can be stored in a field of this type. The spec gives dates as Unix
/// seconds and is silent on anything else, so a date-like field takes an integer only, and a
/// checkbox a boolean only: stricter than the client needs.
fn value_fits(kind: &str, v: &Value) -> bool {
    match kind {
        "date" | "birthday" | "date_time" => v.is_i64(),
        "checkbox" => v.is_boolean(),
        "numeric" => v.is_number() || v.as_str().is_some_and(|t| t.trim().parse::<f64>().is_ok()),
        _ => true,
    }
}

fn items_of(body: &Value) -> Option<&Vec<Value>> {
    body.as_array()
}

fn request_id(item: &Value, i: usize) -> String {
    match item.get("request_id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => i.to_string(),
    }
}

/// Resolves a custom_fields_values entry to a field id, or the error path.
fn field_of(s: &State, cf: &Value) -> Option<i64> {
    if let Some(id) = cf.get("field_id").and_then(Value::as_i64) {
        return s.fields.iter().find(|f| f.id == id).map(|f| f.id);
    }
    let code = cf.get("field_code").and_then(Value::as_str)?;
    s.field_by_code(code).map(|f| f.id)
}

fn check_fields(s: &State, item: &Value, rid: &str, errors: &mut Vec<(String, String, String)>) {
    if let Some(list) = item.get("custom_fields_values") {
        let Some(list) = list.as_array() else {
            errors.push((rid.into(), "InvalidType".into(), "custom_fields_values".into()));
            return;
        };
        for (j, cf) in list.iter().enumerate() {
            if field_of(s, cf).is_none() {
                errors.push((
                    rid.into(),
                    "NotSupportedChoice".into(),
                    format!("custom_fields_values.{j}.field_id"),
                ));
            }
            match cf.get("values") {
                Some(Value::Null) => {}
                Some(Value::Array(values)) => {
                    let kind = field_of(s, cf)
                        .and_then(|id| s.fields.iter().find(|f| f.id == id))
                        .map(|f| f.kind.as_str())
                        .unwrap_or("text");
                    for (k, v) in values.iter().enumerate() {
                        if !v.get("value").is_some_and(|x| value_fits(kind, x)) {
                            errors.push((
                                rid.into(),
                                "InvalidType".into(),
                                format!("custom_fields_values.{j}.values.{k}.value"),
                            ));
                        }
                    }
                }
                _ => errors.push((
                    rid.into(),
                    "InvalidType".into(),
                    format!("custom_fields_values.{j}.values"),
                )),
            }
        }
    }
}

fn apply_fields(s: &mut State, contact: i64, item: &Value) {
    let Some(list) = item.get("custom_fields_values").and_then(Value::as_array) else {
        return;
    };
    let mut changes = Vec::new();
    for cf in list {
        let Some(f) = field_of(s, cf) else { continue };
        let values = match cf.get("values") {
            Some(Value::Array(v)) => Some(
                v.iter()
                    .map(|x| {
                        let mut o = json!({"value": x.get("value").cloned().unwrap_or(Value::Null)});
                        if let Some(e) = x.get("enum_code") {
                            o["enum_code"] = e.clone();
                        }
                        o
                    })
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        };
        changes.push((f, values));
    }
    let now = s.now();
    let mut events = Vec::new();
    if let Some(c) = s.contacts.get_mut(&contact) {
        for (f, values) in changes {
            let before = c.fields.get(&f).cloned();
            match values {
                Some(v) if !v.is_empty() => {
                    c.fields.insert(f, v.clone());
                }
                _ => {
                    c.fields.remove(&f);
                }
            }
            let after = c.fields.get(&f).cloned();
            if before != after {
                events.push((f, after));
            }
        }
        c.updated_at = now;
    }
    for (f, after) in events {
        let text = after
            .and_then(|v| v.first().and_then(|x| x.get("value").cloned()))
            .unwrap_or(Value::Null);
        s.event(
            format!("custom_field_{f}_value_changed"),
            contact,
            "contact",
            json!([]),
            json!([{"custom_field_value": {"field_id": f, "text": text}}]),
        );
    }
}

fn create_contacts(s: &mut State, body: &Value) -> (u16, String, String) {
    let Some(items) = items_of(body) else {
        return problem(400, "Bad Request", "a JSON array of contacts is expected");
    };
    if items.len() > 250 {
        return problem(400, "Bad Request", "at most 250 contacts per request");
    }
    let mut errors = Vec::new();
    for (i, item) in items.iter().enumerate() {
        check_fields(s, item, &request_id(item, i), &mut errors);
    }
    if !errors.is_empty() {
        return validation(errors);
    }
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let id = s.id();
        let now = s.now();
        let name = item.get("name").and_then(Value::as_str).unwrap_or("").to_string();
        s.contacts.insert(
            id,
            SimContact {
                id,
                name,
                updated_at: now,
                ..Default::default()
            },
        );
        // fields of a new contact are part of its creation, not separate edits
        let mut fields = BTreeMap::new();
        if let Some(list) = item.get("custom_fields_values").and_then(Value::as_array) {
            for cf in list {
                if let (Some(f), Some(Value::Array(v))) = (field_of(s, cf), cf.get("values")) {
                    fields.insert(f, v.clone());
                }
            }
        }
        if let Some(c) = s.contacts.get_mut(&id) {
            c.fields = fields;
        }
        s.event(
            "contact_added".into(),
            id,
            "contact",
            json!([]),
            json!([{"contact": {"id": id}}]),
        );
        out.push(json!({"id": id, "request_id": request_id(item, i), "_links": {"self": {"href": format!("{}/api/v4/contacts/{id}", s.base)}}}));
    }
    ok(
        json!({"_links": {"self": {"href": format!("{}/api/v4/contacts", s.base)}}, "_embedded": {"contacts": out}}),
    )
}

fn patch_contacts(s: &mut State, body: &Value) -> (u16, String, String) {
    let Some(items) = items_of(body) else {
        return problem(400, "Bad Request", "a JSON array of contacts is expected");
    };
    if items.len() > 250 {
        return problem(400, "Bad Request", "at most 250 contacts per request");
    }
    let mut errors = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let rid = request_id(item, i);
        match item.get("id").and_then(Value::as_i64) {
            Some(id) if s.contacts.contains_key(&id) => {}
            _ => errors.push((rid.clone(), "NotFound".into(), "id".into())),
        }
        check_fields(s, item, &rid, &mut errors);
    }
    if !errors.is_empty() {
        return validation(errors);
    }
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Some(id) = item.get("id").and_then(Value::as_i64) else {
            continue;
        };
        apply_fields(s, id, item);
        let names = |k: &str| -> Vec<String> {
            item.get(k)
                .and_then(Value::as_array)
                .map(|l| {
                    l.iter()
                        .filter_map(|t| t.get("name").and_then(Value::as_str).map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let (add, del) = (names("tags_to_add"), names("tags_to_delete"));
        if let Some(c) = s.contacts.get_mut(&id) {
            for t in del {
                c.tags.remove(&t);
            }
            c.tags.extend(add);
        }
        out.push(json!({"id": id, "request_id": request_id(item, i)}));
    }
    ok(json!({"_embedded": {"contacts": out}}))
}

fn create_fields(s: &mut State, body: &Value) -> (u16, String, String) {
    let Some(items) = items_of(body) else {
        return problem(400, "Bad Request", "a JSON array of fields is expected");
    };
    let mut errors = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let rid = request_id(item, i);
        let kind = item.get("type").and_then(Value::as_str).unwrap_or("");
        if !FIELD_TYPES.contains(&kind) {
            errors.push((rid.clone(), "NotSupportedChoice".into(), "type".into()));
        }
        if item.get("name").and_then(Value::as_str).is_none_or(str::is_empty) {
            errors.push((rid.clone(), "NotBlank".into(), "name".into()));
        }
        if let Some(code) = item.get("code").and_then(Value::as_str)
            && s.field_by_code(code).is_some()
        {
            errors.push((rid, "NotUnique".into(), "code".into()));
        }
    }
    if !errors.is_empty() {
        return validation(errors);
    }
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let id = s.id();
        let f = SimField {
            id,
            name: item.get("name").and_then(Value::as_str).unwrap_or("").into(),
            code: item.get("code").and_then(Value::as_str).map(str::to_string),
            kind: item.get("type").and_then(Value::as_str).unwrap_or("text").into(),
            is_api_only: item.get("is_api_only").and_then(Value::as_bool).unwrap_or(false),
        };
        out.push(json!({"id": id, "name": f.name, "code": f.code, "type": f.kind, "is_api_only": f.is_api_only, "request_id": request_id(item, i)}));
        s.fields.push(f);
    }
    ok(json!({"_embedded": {"custom_fields": out}}))
}

/// `POST /api/v2/salesbot/run` as `../shared/specs/amocrm.md` ("Salesbot") reports it: a
/// JSON array of tasks `{bot_id, entity_id, entity_type}` (1 contact, 2 lead), at most 100;
/// an unknown bot answers the plain text «Бот не найден» — with a 200, the strictest reading
/// of a source that gives the text and not the status (a client that trusts the status alone
/// would think the bot ran). A task for a contact that does not exist is refused with 400.
fn run_bots(s: &mut State, body: &Value) -> (u16, String, String) {
    let Some(items) = body.as_array() else {
        return problem(400, "Bad Request", "a JSON array of tasks is expected");
    };
    if items.is_empty() || items.len() > 100 {
        return problem(400, "Bad Request", "between 1 and 100 tasks per request");
    }
    let mut runs = Vec::new();
    for t in items {
        let (Some(bot), Some(entity), Some(kind)) = (
            t.get("bot_id").and_then(Value::as_i64),
            t.get("entity_id").and_then(Value::as_i64),
            t.get("entity_type").and_then(Value::as_i64),
        ) else {
            return problem(
                400,
                "Bad Request",
                "each task needs bot_id, entity_id and entity_type as numbers",
            );
        };
        if !s.bots.contains(&bot) {
            return (200, "text/html; charset=utf-8".into(), "Бот не найден".into());
        }
        if kind != 1 && kind != 2 {
            return problem(400, "Bad Request", "entity_type is 1 (contact) or 2 (lead)");
        }
        if kind == 1 && !s.contacts.contains_key(&entity) {
            return problem(400, "Bad Request", &format!("contact {entity} not found"));
        }
        let message = s.field_by_code("KOPILKA_MESSAGE").map(|f| f.id).and_then(|f| {
            s.contacts
                .get(&entity)?
                .fields
                .get(&f)?
                .first()?
                .get("value")?
                .as_str()
                .map(str::to_string)
        });
        runs.push(SimBotRun {
            bot_id: bot,
            entity_id: entity,
            entity_type: kind,
            message,
        });
    }
    s.bot_runs.extend(runs);
    ok(json!({"success": true}))
}

fn add_notes(s: &mut State, body: &Value) -> (u16, String, String) {
    let Some(items) = items_of(body) else {
        return problem(400, "Bad Request", "a JSON array of notes is expected");
    };
    let mut errors = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let rid = request_id(item, i);
        if !item
            .get("entity_id")
            .and_then(Value::as_i64)
            .is_some_and(|id| s.contacts.contains_key(&id))
        {
            errors.push((rid.clone(), "NotFound".into(), "entity_id".into()));
        }
        if !matches!(
            item.get("note_type").and_then(Value::as_str),
            Some("common" | "service_message")
        ) {
            errors.push((rid, "NotSupportedChoice".into(), "note_type".into()));
        }
    }
    if !errors.is_empty() {
        return validation(errors);
    }
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let note = SimNote {
            entity_id: item.get("entity_id").and_then(Value::as_i64).unwrap_or(0),
            note_type: item.get("note_type").and_then(Value::as_str).unwrap_or("").into(),
            text: item
                .get("params")
                .and_then(|p| p.get("text"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .into(),
        };
        let id = s.id();
        out.push(json!({"id": id, "entity_id": note.entity_id, "request_id": request_id(item, i)}));
        s.notes.push(note);
    }
    ok(json!({"_embedded": {"notes": out}}))
}
