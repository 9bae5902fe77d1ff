//! Schema migrations, tracked with `PRAGMA user_version` and applied in one transaction.
//!
//! Append a new entry to [`MIGRATIONS`] for every change; never edit a released one.

use rusqlite::{Connection, OptionalExtension};

use super::LedgerError;

pub const MIGRATIONS: &[&str] = &[
    // 1: the ledger foundation
    r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE customers (
    id         INTEGER PRIMARY KEY,
    created_at INTEGER NOT NULL,
    name       TEXT,
    -- points owed by the customer that no lot covered (cached; `ledger verify` recomputes)
    debt       INTEGER NOT NULL DEFAULT 0 CHECK (debt >= 0)
);

CREATE TABLE customer_keys (
    kind        TEXT NOT NULL CHECK (kind IN ('card','onec','amocrm','phone','email')),
    value       TEXT NOT NULL,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    PRIMARY KEY (kind, value)
) WITHOUT ROWID;
CREATE INDEX customer_keys_customer ON customer_keys(customer_id);

-- Current content of every document seen (a projection; the journal is the history).
CREATE TABLE documents (
    id              INTEGER PRIMARY KEY,
    source          TEXT NOT NULL,
    doc_id          TEXT NOT NULL,
    version         TEXT NOT NULL,
    -- the source's own time of the current version, when it has one (orders versions)
    stamp           INTEGER,
    kind            TEXT CHECK (kind IN ('sale','return')),
    state           TEXT NOT NULL CHECK (state IN ('active','void')),
    void_reason     TEXT,
    epoch           INTEGER NOT NULL DEFAULT 0,
    -- 1 while the current epoch's effects are in the journal; 0 while a dependent return is
    -- being re-linked inside one transaction, or for a void document
    applied         INTEGER NOT NULL DEFAULT 0,
    number          TEXT,
    occurred_at     INTEGER,
    customer_id     INTEGER REFERENCES customers(id),
    currency        TEXT,
    total           INTEGER NOT NULL DEFAULT 0,
    points_redeemed INTEGER NOT NULL DEFAULT 0,
    original_ref    TEXT,
    original_id     INTEGER REFERENCES documents(id),
    store           TEXT,
    partner         TEXT,
    first_seen_at   INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    UNIQUE (source, doc_id)
);
CREATE INDEX documents_number ON documents(source, number) WHERE number IS NOT NULL;
CREATE INDEX documents_original ON documents(original_id) WHERE original_id IS NOT NULL;
CREATE INDEX documents_unlinked ON documents(source, original_ref)
    WHERE kind = 'return' AND original_id IS NULL AND original_ref IS NOT NULL;
CREATE INDEX documents_occurred ON documents(occurred_at);
CREATE INDEX documents_customer ON documents(customer_id);

-- Every version of every document ever applied, so a replayed old version is recognised.
CREATE TABLE document_versions (
    document_id INTEGER NOT NULL REFERENCES documents(id),
    version     TEXT NOT NULL,
    seen_at     INTEGER NOT NULL,
    action      TEXT NOT NULL,
    PRIMARY KEY (document_id, version)
) WITHOUT ROWID;

CREATE TABLE document_lines (
    document_id INTEGER NOT NULL REFERENCES documents(id),
    line_no     INTEGER NOT NULL,
    product_id  TEXT NOT NULL,
    name        TEXT,
    category    TEXT,
    quantity    TEXT NOT NULL,
    unit_price  INTEGER NOT NULL,
    discount    INTEGER NOT NULL,
    net         INTEGER NOT NULL,
    unit_cost   INTEGER,
    service     INTEGER NOT NULL,
    -- points earned (sale) or taken back (return) by this line in the current epoch
    points      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (document_id, line_no)
) WITHOUT ROWID;

-- Append-only journal: one row per transaction, postings below sum to zero.
CREATE TABLE journal (
    id           INTEGER PRIMARY KEY,
    kind         TEXT NOT NULL CHECK (kind IN
                   ('accrual','redemption','reversal','expiry','adjustment','opening','bonus','writeoff')),
    -- 'effect': what a document (or person) caused; 'cancel': undoing an effect because its
    -- document changed, was unposted or deleted
    role         TEXT NOT NULL CHECK (role IN ('effect','cancel')),
    customer_id  INTEGER NOT NULL REFERENCES customers(id),
    document_id  INTEGER REFERENCES documents(id),
    epoch        INTEGER,
    reverses     INTEGER REFERENCES journal(id),
    amount       INTEGER NOT NULL,
    effective_at INTEGER NOT NULL,
    recorded_at  INTEGER NOT NULL,
    explanation  TEXT NOT NULL,
    actor        TEXT,
    idem_key     TEXT UNIQUE,
    partner      TEXT
);
CREATE INDEX journal_document ON journal(document_id, epoch) WHERE document_id IS NOT NULL;
CREATE INDEX journal_customer ON journal(customer_id);
CREATE INDEX journal_reverses ON journal(reverses) WHERE reverses IS NOT NULL;
CREATE INDEX journal_effective ON journal(effective_at);

CREATE TABLE lots (
    id           INTEGER PRIMARY KEY,
    customer_id  INTEGER NOT NULL REFERENCES customers(id),
    origin_tx    INTEGER NOT NULL REFERENCES journal(id),
    earned_at    INTEGER NOT NULL,
    available_at INTEGER NOT NULL,
    expires_at   INTEGER,
    amount       INTEGER NOT NULL CHECK (amount > 0),
    remaining    INTEGER NOT NULL CHECK (remaining >= 0 AND remaining <= amount)
);
CREATE INDEX lots_open ON lots(customer_id) WHERE remaining > 0;
CREATE INDEX lots_expiring ON lots(expires_at) WHERE remaining > 0 AND expires_at IS NOT NULL;
CREATE INDEX lots_origin ON lots(origin_tx);

CREATE TABLE postings (
    id          INTEGER PRIMARY KEY,
    tx_id       INTEGER NOT NULL REFERENCES journal(id),
    account     TEXT NOT NULL,
    customer_id INTEGER REFERENCES customers(id),
    lot_id      INTEGER REFERENCES lots(id),
    amount      INTEGER NOT NULL
);
CREATE INDEX postings_tx ON postings(tx_id);
CREATE INDEX postings_lot ON postings(lot_id) WHERE lot_id IS NOT NULL;

CREATE TABLE checkpoints (
    source     TEXT PRIMARY KEY,
    cursor     TEXT NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE quarantine (
    id            INTEGER PRIMARY KEY,
    source        TEXT NOT NULL,
    doc_ref       TEXT NOT NULL,
    version       TEXT,
    reason        TEXT NOT NULL,
    location      TEXT,
    excerpt       TEXT,
    first_seen_at INTEGER NOT NULL,
    last_seen_at  INTEGER NOT NULL,
    seen_count    INTEGER NOT NULL DEFAULT 1,
    resolved_at   INTEGER,
    UNIQUE (source, doc_ref)
);
CREATE INDEX quarantine_open ON quarantine(source) WHERE resolved_at IS NULL;

CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY,
    destination     TEXT NOT NULL,
    idem_key        TEXT NOT NULL UNIQUE,
    coalesce_key    TEXT,
    payload         TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN
                      ('pending','delivered','dead','superseded','dropped')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    delivered_at    INTEGER,
    superseded_by   INTEGER REFERENCES outbox(id),
    note            TEXT
);
CREATE INDEX outbox_due ON outbox(destination, next_attempt_at, id) WHERE state = 'pending';
CREATE INDEX outbox_coalesce ON outbox(destination, coalesce_key)
    WHERE state = 'pending' AND coalesce_key IS NOT NULL;
CREATE INDEX outbox_state ON outbox(state, id);
"#,
    // 2: the rules engine's state
    r#"
ALTER TABLE customers ADD COLUMN tier TEXT;
ALTER TABLE customers ADD COLUMN tier_since INTEGER;
ALTER TABLE customers ADD COLUMN birthday TEXT;
ALTER TABLE customers ADD COLUMN referred_by TEXT;

-- the rule that granted a bonus (stamp card, threshold, welcome, birthday, referral)
ALTER TABLE journal ADD COLUMN rule TEXT;
CREATE INDEX journal_bonus ON journal(customer_id, rule) WHERE rule IS NOT NULL;

-- what a sale contributed when it was applied (budget bookkeeping, reports)
ALTER TABLE documents ADD COLUMN margin INTEGER;
ALTER TABLE documents ADD COLUMN reward_value INTEGER;
ALTER TABLE documents ADD COLUMN budget_period TEXT;
ALTER TABLE documents ADD COLUMN loss INTEGER NOT NULL DEFAULT 0;
ALTER TABLE documents ADD COLUMN flags TEXT;
CREATE INDEX documents_customer_time ON documents(customer_id, occurred_at) WHERE kind = 'sale';
CREATE INDEX documents_loss ON documents(occurred_at) WHERE loss > 0;

-- a sale's contribution to stamp cards and spend thresholds (counted while it is applied)
CREATE TABLE document_counters (
    document_id INTEGER NOT NULL REFERENCES documents(id),
    counter     TEXT NOT NULL,
    amount      INTEGER NOT NULL,
    PRIMARY KEY (document_id, counter)
) WITHOUT ROWID;

-- tier changes are events with their reason
CREATE TABLE tier_events (
    id          INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    from_tier   TEXT,
    to_tier     TEXT,
    at          INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    document_id INTEGER REFERENCES documents(id)
);
CREATE INDEX tier_events_customer ON tier_events(customer_id, id);

CREATE TABLE memberships (
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    program     TEXT NOT NULL,
    since       INTEGER NOT NULL,
    how         TEXT NOT NULL,
    PRIMARY KEY (customer_id, program)
) WITHOUT ROWID;

CREATE TABLE vouchers (
    id          INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    document_id INTEGER NOT NULL REFERENCES documents(id),
    epoch       INTEGER NOT NULL,
    card        TEXT NOT NULL,
    product     TEXT NOT NULL,
    issued_at   INTEGER NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('issued','cancelled','used'))
);
CREATE INDEX vouchers_customer ON vouchers(customer_id);
CREATE INDEX vouchers_document ON vouchers(document_id);

-- program budget per period: gross margin of the sales in force and value of points issued
CREATE TABLE period_totals (
    period       TEXT PRIMARY KEY,
    margin       INTEGER NOT NULL,
    issued_value INTEGER NOT NULL
) WITHOUT ROWID;
"#,
    // 3: offers and segments
    r#"
ALTER TABLE customers ADD COLUMN segment TEXT;
ALTER TABLE customers ADD COLUMN offer TEXT;

-- one basket per sale in force, as counted in the statistics below (so it can be taken out)
CREATE TABLE offer_baskets (
    document_id INTEGER PRIMARY KEY REFERENCES documents(id),
    customer_id INTEGER,
    occurred_at INTEGER NOT NULL,
    items       TEXT NOT NULL
);
CREATE INDEX offer_baskets_customer ON offer_baskets(customer_id, occurred_at);

CREATE TABLE offer_items (
    item         TEXT PRIMARY KEY,
    baskets      INTEGER NOT NULL,
    margin_units INTEGER NOT NULL,
    margin       INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE offer_pairs (
    a        TEXT NOT NULL,
    b        TEXT NOT NULL,
    together INTEGER NOT NULL,
    PRIMARY KEY (a, b)
) WITHOUT ROWID;

CREATE INDEX documents_updated ON documents(updated_at);
"#,
    // 4: expiry warnings, produced once per lot ahead of its expiry
    r#"
CREATE TABLE expiry_warnings (
    lot_id      INTEGER PRIMARY KEY REFERENCES lots(id),
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    points      INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    warned_at   INTEGER NOT NULL
);
CREATE INDEX expiry_warnings_customer ON expiry_warnings(customer_id, warned_at);
"#,
    // 5: the product catalog with cost history, and the AmoCRM connector's state
    r#"
CREATE TABLE catalog_groups (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    parent     TEXT,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE catalog_products (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    article    TEXT,
    group_id   TEXT,
    service    INTEGER NOT NULL DEFAULT 0,
    deleted    INTEGER NOT NULL DEFAULT 0,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE catalog_price_types (
    id       TEXT PRIMARY KEY,
    name     TEXT NOT NULL,
    currency TEXT
) WITHOUT ROWID;

-- prices by date: a sale uses the price valid on its date
CREATE TABLE catalog_prices (
    product_id TEXT NOT NULL,
    price_type TEXT NOT NULL,
    valid_from INTEGER NOT NULL,
    unit_price INTEGER NOT NULL,
    PRIMARY KEY (product_id, price_type, valid_from)
) WITHOUT ROWID;

-- the OAuth token pair, sealed with a key derived from the client secret (never stored)
CREATE TABLE amocrm_tokens (
    account            TEXT PRIMARY KEY,
    sealed             BLOB NOT NULL,
    access_expires_at  INTEGER NOT NULL,
    refresh_expires_at INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL
) WITHOUT ROWID;

-- customers that matched several contacts (nothing is written for them) or none
CREATE TABLE amocrm_unmatched (
    customer_id INTEGER PRIMARY KEY REFERENCES customers(id),
    reason      TEXT NOT NULL,
    candidates  TEXT,
    seen_at     INTEGER NOT NULL
);

-- what was last written to each contact, so an unchanged contact is not sent again
CREATE TABLE amocrm_pushed (
    customer_id INTEGER PRIMARY KEY REFERENCES customers(id),
    contact_id  INTEGER NOT NULL,
    values_hash TEXT NOT NULL,
    pushed_at   INTEGER NOT NULL
);

-- events already applied (the events API is polled with an overlap)
CREATE TABLE amocrm_seen_events (
    event_id   TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX amocrm_seen_events_time ON amocrm_seen_events(created_at);
"#,
    // 6: accounting postings per legal entity and business day (first posting, then
    // adjusting ones for late corrections; a delivered posting is never edited)
    r#"
CREATE TABLE accounting_postings (
    id         INTEGER PRIMARY KEY,
    entity     TEXT NOT NULL,
    day        TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    movements  TEXT NOT NULL,
    outbox_id  INTEGER REFERENCES outbox(id),
    created_at INTEGER NOT NULL,
    UNIQUE (entity, day, seq)
);
"#,
    // 7: what each source said about each document, as last seen (reconciliation compares
    // it with what the ledger holds)
    r#"
CREATE TABLE source_log (
    source      TEXT NOT NULL,
    doc_id      TEXT NOT NULL,
    version     TEXT NOT NULL,
    kind        TEXT,
    occurred_at INTEGER,
    total       INTEGER,
    in_force    INTEGER NOT NULL,
    seen_at     INTEGER NOT NULL,
    PRIMARY KEY (source, doc_id)
) WITHOUT ROWID;
CREATE INDEX source_log_day ON source_log(occurred_at);
"#,
    // 8: a customer's dead AmoCRM card rows, found by key: the re-queue of stale cards asks
    // for each linked customer, and `outbox_state` made that a scan of every dead row
    // (30 s for 25,000 customers and 5,000 dead rows)
    r#"
CREATE INDEX outbox_dead_coalesce ON outbox(destination, coalesce_key, updated_at)
    WHERE state = 'dead' AND coalesce_key IS NOT NULL;
-- what went back to 1C on a day, for reconcile and the status page (which runs it for
-- yesterday and today on every load): without it, a scan of the whole outbox
CREATE INDEX outbox_onec_created ON outbox(created_at) WHERE destination LIKE 'onec:%';
"#,
    // 9 (issue 22): a random id of this ledger, made once. It goes into the keys of the
    // documents kopilka writes to 1C from now on, so a rebuilt ledger, a second instance or a
    // test copy never gives 1C another ledger's document id for different movements. Rows
    // queued before keep their keys, and so the ids 1C already holds.
    r#"
INSERT OR IGNORE INTO meta (key, value) VALUES ('ledger_uid', lower(hex(randomblob(6))));
"#,
    // 10 (issue 23): holds.
    r#"
-- issue 23: holds — points reserved for one basket by a till or the site until committed,
-- cancelled or expired (see ARCHITECTURE.md, "Holds")
CREATE TABLE holds (
    id                 INTEGER PRIMARY KEY,
    idem_key           TEXT NOT NULL UNIQUE,
    -- the request as the caller sent it (canonical JSON without the key): the same key
    -- with another body is refused
    request            TEXT NOT NULL,
    customer_id        INTEGER NOT NULL REFERENCES customers(id),
    points             INTEGER NOT NULL CHECK (points > 0),
    -- the quote as answered (JSON), so a repeat answers the same
    quote              TEXT NOT NULL,
    created_at         INTEGER NOT NULL,
    expires_at         INTEGER NOT NULL,
    state              TEXT NOT NULL CHECK (state IN ('held','committed','cancelled','expired')),
    closed_at          INTEGER,
    commit_request     TEXT,
    committed_points   INTEGER,
    -- the commit's answer (allocation over the final basket), JSON
    commit_answer      TEXT,
    -- the `api` document the commit recorded
    document_id        INTEGER REFERENCES documents(id),
    -- the 1C receipt later recognised as the one that used this hold: 'reference' (its
    -- number is the hold's key) or 'card_points_time' (also the same customer and points
    -- with its time in [match_from, match_until]) — the policy in force at the commit
    match_by           TEXT CHECK (match_by IN ('reference','card_points_time')),
    match_from         INTEGER,
    match_until        INTEGER,
    matched_document   INTEGER REFERENCES documents(id),
    CHECK ((state = 'committed') = (document_id IS NOT NULL))
);
-- what is held now, per customer (every quote and hold reads it)
CREATE INDEX holds_live ON holds(customer_id, expires_at) WHERE state = 'held';
CREATE INDEX holds_unmatched ON holds(customer_id, committed_points)
    WHERE state = 'committed' AND matched_document IS NULL;
CREATE INDEX holds_matched ON holds(matched_document) WHERE matched_document IS NOT NULL;
"#,
    // 11 (issue 17): postings over day ranges, quarantine rows with kind, number and date.
    r#"
-- issue 17: a posting covers a range of business days: a day's posting covers its day, a
-- history posting every day before the posting window (the opening posting of the history,
-- later corrections of old days), a settlement posting a partner's period
ALTER TABLE accounting_postings ADD COLUMN kind TEXT NOT NULL DEFAULT 'day'
    CHECK (kind IN ('day','history','settlement'));
ALTER TABLE accounting_postings ADD COLUMN first_day TEXT;
ALTER TABLE accounting_postings ADD COLUMN last_day TEXT;
UPDATE accounting_postings SET first_day = day, last_day = day;
CREATE INDEX accounting_postings_days ON accounting_postings(last_day, first_day);

-- a quarantined document's kind, number and date, as far as they could be read: how a
-- person finds it in 1C, and the business day reconcile reports it on
ALTER TABLE quarantine ADD COLUMN doc_kind TEXT;
ALTER TABLE quarantine ADD COLUMN number TEXT;
ALTER TABLE quarantine ADD COLUMN occurred_at INTEGER;
CREATE INDEX quarantine_open_day ON quarantine(occurred_at) WHERE resolved_at IS NULL;
"#,
    // 12 (issue 17): the coalition partner a settlement posting is for.
    r#"
ALTER TABLE accounting_postings ADD COLUMN partner TEXT;
CREATE INDEX accounting_postings_settlement ON accounting_postings(partner, first_day, last_day)
    WHERE kind = 'settlement';
"#,
    // 13 (issue 16): tier grace counts from the dip, not from when the tier was reached.
    r#"
-- when the nightly re-evaluation first found the spend below the current tier's threshold;
-- NULL while it meets it, cleared when the spend recovers or the tier changes
ALTER TABLE customers ADD COLUMN tier_below_since INTEGER;
"#,
    // 14 (issue 16): the points paid at the till, per line, as the guard spread them; what
    // each counter held when a sale added to it.
    r#"
-- kopecks of the points paid on the sale that fall on this line (NULL: none were paid), by
-- the same function the quote offers with: the program's share of a line's loss below cost
-- is computed from it, apart from the loss the line's price made on its own
ALTER TABLE document_lines ADD COLUMN redeemed INTEGER;
-- the counter as the sale found it (stamps on the card, spend in the threshold's window):
-- a return takes back a stamp or threshold reward by what is left of its own sale on top
-- of it (NULL for sales recorded before issue 16: taken as 0)
ALTER TABLE document_counters ADD COLUMN prior INTEGER;
"#,
    // 15 (issue 20): consent, attribute changes by source, forgetting a customer.
    r#"
-- consent to service messages and to advertising (38-ФЗ), 1/0, NULL when no source said
ALTER TABLE customers ADD COLUMN consent_service INTEGER;
ALTER TABLE customers ADD COLUMN consent_ads INTEGER;
-- every attribute value a customers file changed, with the value before it (history shows it)
CREATE TABLE customer_changes (
    id          INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    at          INTEGER NOT NULL,
    field       TEXT NOT NULL,
    old         TEXT,
    new         TEXT,
    source      TEXT NOT NULL
);
CREATE INDEX customer_changes_customer ON customer_changes(customer_id);
-- personal data forgotten on request (152-ФЗ): who, when, why
CREATE TABLE forgotten (
    id          INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    at          INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    requested_by TEXT NOT NULL
);
"#,
    // 16 (issue 20): bought memberships lapse after their term and end when the fee is returned.
    r#"
-- the end of a bought membership (NULL: for good), the sale that bought or last renewed it and
-- the membership product on it: returning that product ends the membership
ALTER TABLE memberships ADD COLUMN until INTEGER;
ALTER TABLE memberships ADD COLUMN document_id INTEGER;
ALTER TABLE memberships ADD COLUMN product TEXT;
"#,
    // 17 (issue 20): vouchers have a code, an expiry and the sale that used them.
    r#"
-- a free-item voucher's code (V-…, what the customer shows at the till), its end, and the sale
-- that gave the item (the voucher is 'used' while that sale is in force); 'expired' is an
-- issued voucher past its end, not a stored state
ALTER TABLE vouchers ADD COLUMN code TEXT;
ALTER TABLE vouchers ADD COLUMN expires_at INTEGER;
ALTER TABLE vouchers ADD COLUMN used_document INTEGER;
ALTER TABLE vouchers ADD COLUMN used_at INTEGER;
CREATE UNIQUE INDEX vouchers_code ON vouchers(code) WHERE code IS NOT NULL;
CREATE INDEX vouchers_used ON vouchers(used_document) WHERE used_document IS NOT NULL;
CREATE INDEX vouchers_open ON vouchers(customer_id, product) WHERE state = 'issued';
"#,
    // 18 (issue 21): members' messages — who unsubscribed where, what was sent, Telegram links.
    r#"
-- a member's "no more messages on this channel", honoured at once: via names the path
-- (the e-mail link, the bot's /stop, a person with `kopilka notify unsubscribe`)
CREATE TABLE unsubscribes (
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    channel     TEXT NOT NULL,
    at          INTEGER NOT NULL,
    via         TEXT NOT NULL,
    PRIMARY KEY (customer_id, channel)
) WITHOUT ROWID;
-- each message a channel confirmed, written before the outbox row is marked: a crash between
-- the two finds it here and does not send it again; the caps count these
CREATE TABLE notify_sent (
    outbox_id   INTEGER PRIMARY KEY REFERENCES outbox(id),
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    channel     TEXT NOT NULL,
    kind        TEXT NOT NULL,
    sent_at     INTEGER NOT NULL
);
CREATE INDEX notify_sent_customer ON notify_sent(customer_id, sent_at);
-- a Telegram chat linked to a member by a one-time code; stopped_at when the member said
-- /stop or blocked the bot
CREATE TABLE telegram_chats (
    chat_id     INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    linked_at   INTEGER NOT NULL,
    stopped_at  INTEGER
);
CREATE INDEX telegram_chats_customer ON telegram_chats(customer_id);
-- one-time codes that link a chat to a member (shown by `balance`, on the AmoCRM card, in
-- e-mails); used_at once a chat used it
CREATE TABLE link_codes (
    code        TEXT PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    issued_at   INTEGER NOT NULL,
    used_at     INTEGER,
    chat_id     INTEGER
);
CREATE INDEX link_codes_customer ON link_codes(customer_id) WHERE used_at IS NULL;
"#,
    // 19 (issue 21): what the message cursors look up at the end of every write transaction,
    // by index rather than by scanning every lot and warning.
    r#"
-- lots that become usable after a waiting period, by when (the "available" message)
CREATE INDEX lots_available ON lots(available_at) WHERE available_at > earned_at;
-- the newest expiry warning (the message and note cursors)
CREATE INDEX expiry_warnings_at ON expiry_warnings(warned_at);
"#,
    // 20 (issue 20): attributes read from AmoCRM contacts; a value refused stays in history.
    r#"
-- why a source's value was not applied (an unknown or own friend code, a date that is not
-- one, a value another source owns); NULL on the rows that changed the customer. `new` holds
-- the value as the source had it, `old` what the customer kept
ALTER TABLE customer_changes ADD COLUMN refused TEXT;
"#,
    // 21 (issue 20): this program's friend-code key. A ledger that has customers keeps the key
    // its codes were made with (they are on AmoCRM cards and in members' hands); a new one
    // draws its own, so another kopilka's codes do not name its members. The spread is
    // q·31 + r, r in 1..=30: prime to 31⁶.
    r#"
INSERT OR IGNORE INTO meta (key, value)
SELECT 'friend_code_key',
       CASE WHEN EXISTS (SELECT 1 FROM customers) THEN '387420489:0'
            ELSE ((abs(random() % 28629151) * 31) + 1 + abs(random() % 30)) || ':' || abs(random() % 31)
       END;
"#,
    // 22 (issue 20): a voucher the till used by its code (Розница's discount server) names the
    // till's receipt, so the receipt arriving later counts that voucher, not another one.
    r#"
ALTER TABLE vouchers ADD COLUMN used_by TEXT;
-- every sale looks its receipt up here: an index lookup, not a scan of every voucher
CREATE INDEX vouchers_used_by ON vouchers(used_by) WHERE used_by IS NOT NULL;
"#,
    // 23 (issue 19): `document_versions` keeps the versions a document has left; its current
    // version is in `documents` alone. The rows repeating the current version go.
    r#"
DELETE FROM document_versions WHERE EXISTS
    (SELECT 1 FROM documents d WHERE d.id = document_versions.document_id AND d.version = document_versions.version);
-- `source_log` keeps what a source said of a document the ledger could not take as it came;
-- `documents` holds the rest, so a row repeating its document goes
DELETE FROM source_log WHERE EXISTS
    (SELECT 1 FROM documents d WHERE d.source = source_log.source AND d.doc_id = source_log.doc_id
       AND d.version = source_log.version);
"#,
    // 24 (issue 19): a line names its product by an integer key. The product's id, name and
    // category as lines named them are stored once, in `line_products`, not on every line
    // (a 1C product id is a 36-character GUID; with its name and group that was most of a
    // line). `document_lines` stays, as a view, for every query that reads lines.
    r#"
CREATE TABLE line_products (
    id         INTEGER PRIMARY KEY,
    product_id TEXT NOT NULL,
    name       TEXT,
    category   TEXT
);
-- a line's product is found by what the line said (`IS`: a missing name or group matches
-- only a missing one)
CREATE INDEX line_products_said ON line_products(product_id, name, category);
INSERT INTO line_products (product_id, name, category)
    SELECT DISTINCT product_id, name, category FROM document_lines ORDER BY product_id;
CREATE TABLE document_line_rows (
    document_id INTEGER NOT NULL REFERENCES documents(id),
    line_no     INTEGER NOT NULL,
    product     INTEGER NOT NULL REFERENCES line_products(id),
    quantity    TEXT NOT NULL,
    unit_price  INTEGER NOT NULL,
    discount    INTEGER NOT NULL,
    net         INTEGER NOT NULL,
    unit_cost   INTEGER,
    service     INTEGER NOT NULL,
    -- points earned (sale) or taken back (return) by this line in the current epoch
    points      INTEGER NOT NULL DEFAULT 0,
    redeemed    INTEGER,
    PRIMARY KEY (document_id, line_no)
) WITHOUT ROWID;
INSERT INTO document_line_rows
    SELECT l.document_id, l.line_no, p.id, l.quantity, l.unit_price, l.discount, l.net, l.unit_cost,
           l.service, l.points, l.redeemed
    FROM document_lines l JOIN line_products p
      ON p.product_id = l.product_id AND p.name IS l.name AND p.category IS l.category;
DROP TABLE document_lines;
CREATE VIEW document_lines AS
    SELECT l.document_id, l.line_no, p.product_id, p.name, p.category, l.quantity, l.unit_price,
           l.discount, l.net, l.unit_cost, l.service, l.points, l.redeemed
    FROM document_line_rows l JOIN line_products p ON p.id = l.product;
"#,
    // 25 (issue 19): a coalesced state never attempted is replaced, not kept as a bodiless
    // `superseded` row; a row that pointed at it is pointed at its successor, found here
    r#"
CREATE INDEX outbox_successor ON outbox(superseded_by) WHERE superseded_by IS NOT NULL;
-- `outbox_state` indexed every row by its state, for two queries: `ledger verify` (which
-- reads every table whole anyway) and "retry every dead row" — the dead rows alone will do
DROP INDEX outbox_state;
CREATE INDEX outbox_dead ON outbox(id) WHERE state = 'dead';
"#,
    // 26 (issue 19): postings are found by their transaction, so they are stored by it —
    // (transaction, leg) is their key and the separate index over `tx_id` goes. A lot's
    // origin is found through its transaction's postings (which name the lot), so
    // `lots_origin` goes too. A counter's name is stored once, in `counter_names`;
    // `document_counters` stays, as a view, for every query that reads counters by name.
    // The 1C rows the reconciliation lists by the day they were made are those with no
    // journal transaction or posting behind them: the bonus documents (one per movement,
    // most of the outbox) leave that index.
    r#"
CREATE TABLE postings_by_tx (
    tx_id       INTEGER NOT NULL REFERENCES journal(id),
    -- the posting's place in its transaction, from 1, in the order they were written
    leg         INTEGER NOT NULL,
    account     TEXT NOT NULL,
    customer_id INTEGER REFERENCES customers(id),
    lot_id      INTEGER REFERENCES lots(id),
    amount      INTEGER NOT NULL,
    PRIMARY KEY (tx_id, leg)
) WITHOUT ROWID;
INSERT INTO postings_by_tx (tx_id, leg, account, customer_id, lot_id, amount)
    SELECT tx_id, row_number() OVER (PARTITION BY tx_id ORDER BY id), account, customer_id, lot_id, amount
    FROM postings ORDER BY tx_id, id;
DROP TABLE postings;
ALTER TABLE postings_by_tx RENAME TO postings;
CREATE INDEX postings_lot ON postings(lot_id) WHERE lot_id IS NOT NULL;
DROP INDEX lots_origin;
CREATE TABLE counter_names (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
INSERT INTO counter_names (name) SELECT DISTINCT counter FROM document_counters ORDER BY counter;
CREATE TABLE document_counter_rows (
    document_id INTEGER NOT NULL REFERENCES documents(id),
    counter     INTEGER NOT NULL REFERENCES counter_names(id),
    amount      INTEGER NOT NULL,
    -- what the counter held when the sale added to it (issue 16)
    prior       INTEGER,
    PRIMARY KEY (document_id, counter)
) WITHOUT ROWID;
INSERT INTO document_counter_rows (document_id, counter, amount, prior)
    SELECT c.document_id, n.id, c.amount, c.prior
    FROM document_counters c JOIN counter_names n ON n.name = c.counter;
DROP TABLE document_counters;
CREATE VIEW document_counters AS
    SELECT c.document_id, n.name AS counter, c.amount, c.prior
    FROM document_counter_rows c JOIN counter_names n ON n.id = c.counter;
DROP INDEX outbox_onec_created;
CREATE INDEX outbox_onec_created ON outbox(created_at)
    WHERE destination LIKE 'onec:%' AND destination != 'onec:bonus';
-- a customer's documents and entries each had two indexes, one a prefix of the other's
-- column list (partial); one full index serves both kinds of query
DROP INDEX documents_customer;
DROP INDEX documents_customer_time;
CREATE INDEX documents_customer ON documents(customer_id, occurred_at);
DROP INDEX journal_customer;
DROP INDEX journal_bonus;
CREATE INDEX journal_customer ON journal(customer_id, rule);
"#,
    // 27 (issue 19): totals kept as rows are written, so `/metrics`, `/status` and the
    // all-time summary read a few rows instead of every document, entry and outbox row under
    // the ledger's lock (1M sales: 2 s and 99 MiB per scrape). Triggers keep them, so every
    // writer (the ledger, a migration, raw SQL in a test) keeps them alike; `ledger verify`
    // recounts them. A key's last part may hold ':' (destinations do); the parts before it
    // never do.
    r#"
CREATE TABLE totals (
    -- 'documents:<state>:<kind>', 'journal:<kind>', 'outbox:<state>:<destination>' (every
    -- state but pending),
    -- 'holds:<state>', 'customers', 'lots:undelayed_earned'
    name   TEXT PRIMARY KEY,
    n      INTEGER NOT NULL,
    -- documents: their totals; journal: its amounts; lots:undelayed_earned: the latest
    -- time a lot available as soon as earned was earned (until then one is pending)
    amount INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO totals
    SELECT 'documents:' || state || ':' || COALESCE(kind, ''), COUNT(*), SUM(total) FROM documents GROUP BY 1;
INSERT INTO totals SELECT 'journal:' || kind, COUNT(*), SUM(amount) FROM journal GROUP BY 1;
INSERT INTO totals SELECT 'outbox:' || state || ':' || destination, COUNT(*), 0 FROM outbox
    WHERE state != 'pending' GROUP BY 1;
INSERT INTO totals SELECT 'holds:' || state, COUNT(*), 0 FROM holds GROUP BY 1;
INSERT INTO totals SELECT 'customers', COUNT(*), 0 FROM customers;
INSERT INTO totals SELECT 'lots:undelayed_earned', 0, COALESCE(MAX(earned_at), 0) FROM lots
    WHERE available_at <= earned_at;

CREATE TRIGGER totals_documents_insert AFTER INSERT ON documents BEGIN
    INSERT INTO totals VALUES ('documents:' || NEW.state || ':' || COALESCE(NEW.kind, ''), 1, NEW.total)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n, amount = amount + excluded.amount;
END;
CREATE TRIGGER totals_documents_update AFTER UPDATE OF kind, state, total ON documents
WHEN OLD.kind IS NOT NEW.kind OR OLD.state IS NOT NEW.state OR OLD.total IS NOT NEW.total BEGIN
    INSERT INTO totals VALUES ('documents:' || OLD.state || ':' || COALESCE(OLD.kind, ''), -1, -OLD.total)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n, amount = amount + excluded.amount;
    INSERT INTO totals VALUES ('documents:' || NEW.state || ':' || COALESCE(NEW.kind, ''), 1, NEW.total)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n, amount = amount + excluded.amount;
END;
CREATE TRIGGER totals_documents_delete AFTER DELETE ON documents BEGIN
    INSERT INTO totals VALUES ('documents:' || OLD.state || ':' || COALESCE(OLD.kind, ''), -1, -OLD.total)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n, amount = amount + excluded.amount;
END;

CREATE TRIGGER totals_journal_insert AFTER INSERT ON journal BEGIN
    INSERT INTO totals VALUES ('journal:' || NEW.kind, 1, NEW.amount)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n, amount = amount + excluded.amount;
END;
CREATE TRIGGER totals_journal_update AFTER UPDATE OF kind, amount ON journal
WHEN OLD.kind IS NOT NEW.kind OR OLD.amount IS NOT NEW.amount BEGIN
    INSERT INTO totals VALUES ('journal:' || OLD.kind, -1, -OLD.amount)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n, amount = amount + excluded.amount;
    INSERT INTO totals VALUES ('journal:' || NEW.kind, 1, NEW.amount)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n, amount = amount + excluded.amount;
END;
CREATE TRIGGER totals_journal_delete AFTER DELETE ON journal BEGIN
    INSERT INTO totals VALUES ('journal:' || OLD.kind, -1, -OLD.amount)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n, amount = amount + excluded.amount;
END;

-- pending rows are not kept: `outbox_due` holds exactly them (a sale queues two or three
-- and replaces one; counting them here cost the import 3 % more)
CREATE TRIGGER totals_outbox_insert AFTER INSERT ON outbox WHEN NEW.state != 'pending' BEGIN
    INSERT INTO totals VALUES ('outbox:' || NEW.state || ':' || NEW.destination, 1, 0)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n;
END;
CREATE TRIGGER totals_outbox_update AFTER UPDATE OF state, destination ON outbox
WHEN OLD.state IS NOT NEW.state OR OLD.destination IS NOT NEW.destination BEGIN
    INSERT INTO totals SELECT 'outbox:' || OLD.state || ':' || OLD.destination, -1, 0 WHERE OLD.state != 'pending'
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n;
    INSERT INTO totals SELECT 'outbox:' || NEW.state || ':' || NEW.destination, 1, 0 WHERE NEW.state != 'pending'
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n;
END;
CREATE TRIGGER totals_outbox_delete AFTER DELETE ON outbox WHEN OLD.state != 'pending' BEGIN
    INSERT INTO totals VALUES ('outbox:' || OLD.state || ':' || OLD.destination, -1, 0)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n;
END;

CREATE TRIGGER totals_holds_insert AFTER INSERT ON holds BEGIN
    INSERT INTO totals VALUES ('holds:' || NEW.state, 1, 0)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n;
END;
CREATE TRIGGER totals_holds_update AFTER UPDATE OF state ON holds WHEN OLD.state IS NOT NEW.state BEGIN
    INSERT INTO totals VALUES ('holds:' || OLD.state, -1, 0)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n;
    INSERT INTO totals VALUES ('holds:' || NEW.state, 1, 0)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n;
END;
CREATE TRIGGER totals_holds_delete AFTER DELETE ON holds BEGIN
    INSERT INTO totals VALUES ('holds:' || OLD.state, -1, 0)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n;
END;

CREATE TRIGGER totals_customers_insert AFTER INSERT ON customers BEGIN
    UPDATE totals SET n = n + 1 WHERE name = 'customers';
END;
CREATE TRIGGER totals_customers_delete AFTER DELETE ON customers BEGIN
    UPDATE totals SET n = n - 1 WHERE name = 'customers';
END;

-- a lot available later than it was earned is found by `lots_available` while it waits;
-- one available when earned waits only if earned ahead of the clock, which this dates
CREATE TRIGGER totals_lots_insert AFTER INSERT ON lots WHEN NEW.available_at <= NEW.earned_at BEGIN
    UPDATE totals SET amount = MAX(amount, NEW.earned_at) WHERE name = 'lots:undelayed_earned';
END;
CREATE TRIGGER totals_lots_update AFTER UPDATE OF earned_at, available_at ON lots
WHEN NEW.available_at <= NEW.earned_at BEGIN
    UPDATE totals SET amount = MAX(amount, NEW.earned_at) WHERE name = 'lots:undelayed_earned';
END;

-- what the debt of all customers adds up to, read through the customers who owe (few)
CREATE INDEX customers_debt ON customers(debt) WHERE debt > 0;
-- the members' messages not yet sent, by channel, for the notification status (sent ones
-- are counted in `totals`)
CREATE INDEX outbox_notify_open ON outbox(destination, state)
    WHERE destination LIKE 'notify:%' AND state != 'delivered';
"#,
    // 28 (issue 19): the rule behind a bonus is stored once, in `rule_names`, and named by
    // its key in the journal and in `journal_customer` (a rule id such as
    // `threshold:spend-10k-month` was ≈ 20 bytes twice on every bonus entry, and most
    // sales earn one). `outbox_due` no longer lists `id`: an index entry ends with the row's
    // id anyway, so it was stored twice, and the due order (time, then id) is the index's own.
    r#"
CREATE TABLE rule_names (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
INSERT INTO rule_names (name) SELECT DISTINCT rule FROM journal WHERE rule IS NOT NULL ORDER BY rule;
ALTER TABLE journal ADD COLUMN rule_id INTEGER REFERENCES rule_names(id);
DROP INDEX journal_customer;
UPDATE journal SET rule_id = (SELECT n.id FROM rule_names n WHERE n.name = journal.rule) WHERE rule IS NOT NULL;
ALTER TABLE journal DROP COLUMN rule;
CREATE INDEX journal_customer ON journal(customer_id, rule_id);
DROP INDEX outbox_due;
CREATE INDEX outbox_due ON outbox(destination, next_attempt_at) WHERE state = 'pending';
"#,
    // 29 (issue 19): a posting names its account by a code fixed forever (0 customer,
    // 1 expense, 2 redemption, 3 breakage, 4 adjustment, 5 opening) instead of the word: the
    // two commonest take no byte at all in a record, and every movement writes two or three
    // postings (≈ 8 bytes each). `postings` is now a view spelling the word out, which every
    // query reads; the ledger writes `posting_rows` (`ledger::account_code`).
    r#"
CREATE TABLE posting_rows (
    tx_id       INTEGER NOT NULL REFERENCES journal(id),
    -- the posting's place in its transaction, from 1, in the order they were written
    leg         INTEGER NOT NULL,
    account     INTEGER NOT NULL CHECK (account BETWEEN 0 AND 5),
    customer_id INTEGER REFERENCES customers(id),
    lot_id      INTEGER REFERENCES lots(id),
    amount      INTEGER NOT NULL,
    PRIMARY KEY (tx_id, leg)
) WITHOUT ROWID;
INSERT INTO posting_rows (tx_id, leg, account, customer_id, lot_id, amount)
    SELECT tx_id, leg,
        CASE account WHEN 'customer' THEN 0 WHEN 'expense' THEN 1 WHEN 'redemption' THEN 2
            WHEN 'breakage' THEN 3 WHEN 'adjustment' THEN 4 WHEN 'opening' THEN 5 END,
        customer_id, lot_id, amount
    FROM postings ORDER BY tx_id, leg;
DROP TABLE postings;
CREATE INDEX postings_lot ON posting_rows(lot_id) WHERE lot_id IS NOT NULL;
CREATE VIEW postings AS
    SELECT tx_id, leg,
        CASE account WHEN 0 THEN 'customer' WHEN 1 THEN 'expense' WHEN 2 THEN 'redemption'
            WHEN 3 THEN 'breakage' WHEN 4 THEN 'adjustment' WHEN 5 THEN 'opening' END AS account,
        customer_id, lot_id, amount
    FROM posting_rows;
"#,
    // 30 (issue 19): a line's net is stored only where it is not its quantity times its
    // unit price less its discount with the quantity a whole number (`NULL` then; nearly
    // every line of goods sold by the piece); `document_lines`, which every query reads,
    // works it out. The sum is exact: whole kopecks and a whole quantity.
    r#"
CREATE TABLE line_rows_30 (
    document_id INTEGER NOT NULL REFERENCES documents(id),
    line_no     INTEGER NOT NULL,
    product     INTEGER NOT NULL REFERENCES line_products(id),
    quantity    TEXT NOT NULL,
    unit_price  INTEGER NOT NULL,
    discount    INTEGER NOT NULL,
    -- NULL: quantity (digits only) × unit_price − discount, as `document_lines` reads it
    net         INTEGER CHECK (net IS NOT NULL OR (quantity != '' AND quantity NOT GLOB '*[^0-9]*')),
    unit_cost   INTEGER,
    service     INTEGER NOT NULL,
    -- points earned (sale) or taken back (return) by this line in the current epoch
    points      INTEGER NOT NULL DEFAULT 0,
    redeemed    INTEGER,
    PRIMARY KEY (document_id, line_no)
) WITHOUT ROWID;
INSERT INTO line_rows_30
    SELECT document_id, line_no, product, quantity, unit_price, discount,
           CASE WHEN quantity != '' AND quantity NOT GLOB '*[^0-9]*' AND length(quantity) <= 15
                 AND net = CAST(quantity AS INTEGER) * unit_price - discount THEN NULL ELSE net END,
           unit_cost, service, points, redeemed
    FROM document_line_rows ORDER BY document_id, line_no;
DROP VIEW document_lines;
DROP TABLE document_line_rows;
ALTER TABLE line_rows_30 RENAME TO document_line_rows;
CREATE VIEW document_lines AS
    SELECT l.document_id, l.line_no, p.product_id, p.name, p.category, l.quantity, l.unit_price,
           l.discount, COALESCE(l.net, CAST(l.quantity AS INTEGER) * l.unit_price - l.discount) AS net,
           l.unit_cost, l.service, l.points, l.redeemed
    FROM document_line_rows l JOIN line_products p ON p.id = l.product;
"#,
    // 31 (issue 19): a content hash version (`sha256:` and 32 lowercase hex digits) is stored
    // as its 16 bytes, in every table that keeps a document's version (`ledger::version_column`
    // writes them so, `ledger::version_at` spells them out again); other versions stay text.
    r#"
UPDATE documents SET version = unhex(substr(version, 8))
    WHERE typeof(version) = 'text' AND length(version) = 39 AND substr(version, 1, 7) = 'sha256:'
      AND substr(version, 8) NOT GLOB '*[^0-9a-f]*';
UPDATE document_versions SET version = unhex(substr(version, 8))
    WHERE typeof(version) = 'text' AND length(version) = 39 AND substr(version, 1, 7) = 'sha256:'
      AND substr(version, 8) NOT GLOB '*[^0-9a-f]*';
UPDATE source_log SET version = unhex(substr(version, 8))
    WHERE typeof(version) = 'text' AND length(version) = 39 AND substr(version, 1, 7) = 'sha256:'
      AND substr(version, 8) NOT GLOB '*[^0-9a-f]*';
"#,
    // 32 (issue 19): an entry's kind and role, a document's kind and state and an outbox
    // row's state are stored as codes fixed forever (`ledger::kind_code` and its neighbours;
    // the commonest is 0, which takes no byte in a record) instead of a word on every row. The
    // words stay columns of the same name, generated from the codes and stored nowhere, so
    // every query, index and kept total reads them as before; only the writers set the codes.
    r#"
DROP TRIGGER totals_outbox_insert;
DROP TRIGGER totals_outbox_update;
DROP TRIGGER totals_outbox_delete;
DROP INDEX outbox_due;
DROP INDEX outbox_coalesce;
DROP INDEX outbox_dead_coalesce;
DROP INDEX outbox_dead;
DROP INDEX outbox_notify_open;
ALTER TABLE outbox ADD COLUMN state_code INTEGER NOT NULL DEFAULT 0 CHECK (state_code BETWEEN 0 AND 4);
UPDATE outbox SET state_code = CASE state WHEN 'pending' THEN 0 WHEN 'delivered' THEN 1 WHEN 'dead' THEN 2
    WHEN 'superseded' THEN 3 WHEN 'dropped' THEN 4 END
    WHERE state != 'pending';
ALTER TABLE outbox DROP COLUMN state;
ALTER TABLE outbox ADD COLUMN state TEXT GENERATED ALWAYS AS (CASE state_code WHEN 0 THEN 'pending'
    WHEN 1 THEN 'delivered' WHEN 2 THEN 'dead' WHEN 3 THEN 'superseded' WHEN 4 THEN 'dropped' END) VIRTUAL;
CREATE INDEX outbox_due ON outbox(destination, next_attempt_at) WHERE state = 'pending';
CREATE INDEX outbox_coalesce ON outbox(destination, coalesce_key)
    WHERE state = 'pending' AND coalesce_key IS NOT NULL;
CREATE INDEX outbox_dead_coalesce ON outbox(destination, coalesce_key, updated_at)
    WHERE state = 'dead' AND coalesce_key IS NOT NULL;
CREATE INDEX outbox_dead ON outbox(id) WHERE state = 'dead';
CREATE INDEX outbox_notify_open ON outbox(destination, state)
    WHERE destination LIKE 'notify:%' AND state != 'delivered';
CREATE TRIGGER totals_outbox_insert AFTER INSERT ON outbox WHEN NEW.state != 'pending' BEGIN
    INSERT INTO totals VALUES ('outbox:' || NEW.state || ':' || NEW.destination, 1, 0)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n;
END;
CREATE TRIGGER totals_outbox_update AFTER UPDATE OF state_code, destination ON outbox
WHEN OLD.state IS NOT NEW.state OR OLD.destination IS NOT NEW.destination BEGIN
    INSERT INTO totals SELECT 'outbox:' || OLD.state || ':' || OLD.destination, -1, 0 WHERE OLD.state != 'pending'
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n;
    INSERT INTO totals SELECT 'outbox:' || NEW.state || ':' || NEW.destination, 1, 0 WHERE NEW.state != 'pending'
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n;
END;
CREATE TRIGGER totals_outbox_delete AFTER DELETE ON outbox WHEN OLD.state != 'pending' BEGIN
    INSERT INTO totals VALUES ('outbox:' || OLD.state || ':' || OLD.destination, -1, 0)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n;
END;

DROP TRIGGER totals_journal_insert;
DROP TRIGGER totals_journal_update;
DROP TRIGGER totals_journal_delete;
DROP TRIGGER totals_documents_insert;
DROP TRIGGER totals_documents_update;
DROP TRIGGER totals_documents_delete;
DROP INDEX documents_unlinked;

-- the journal is rebuilt (SQLite's procedure for what ALTER TABLE cannot do, foreign keys off
-- while it runs: see `REBUILDS`): its codes, and `idem_key` unique where given — a partial
-- index instead of the column's own, which held an entry for every entry without a key
CREATE TABLE journal_32 (
    id           INTEGER PRIMARY KEY,
    kind_code    INTEGER NOT NULL DEFAULT 0 CHECK (kind_code BETWEEN 0 AND 7),
    role_code    INTEGER NOT NULL DEFAULT 0 CHECK (role_code IN (0, 1)),
    customer_id  INTEGER NOT NULL REFERENCES customers(id),
    document_id  INTEGER REFERENCES documents(id),
    epoch        INTEGER,
    reverses     INTEGER REFERENCES journal(id),
    amount       INTEGER NOT NULL,
    effective_at INTEGER NOT NULL,
    recorded_at  INTEGER NOT NULL,
    explanation  TEXT NOT NULL,
    actor        TEXT,
    idem_key     TEXT,
    partner      TEXT,
    rule_id      INTEGER REFERENCES rule_names(id),
    kind         TEXT GENERATED ALWAYS AS (CASE kind_code WHEN 0 THEN 'accrual' WHEN 1 THEN 'bonus'
                     WHEN 2 THEN 'redemption' WHEN 3 THEN 'reversal' WHEN 4 THEN 'expiry'
                     WHEN 5 THEN 'adjustment' WHEN 6 THEN 'opening' WHEN 7 THEN 'writeoff' END) VIRTUAL,
    -- 'effect': what a document (or person) caused; 'cancel': undoing an effect because its
    -- document changed, was unposted or deleted
    role         TEXT GENERATED ALWAYS AS (CASE role_code WHEN 0 THEN 'effect' WHEN 1 THEN 'cancel' END) VIRTUAL
);
INSERT INTO journal_32 (id, kind_code, role_code, customer_id, document_id, epoch, reverses, amount,
                        effective_at, recorded_at, explanation, actor, idem_key, partner, rule_id)
    SELECT id,
           CASE kind WHEN 'accrual' THEN 0 WHEN 'bonus' THEN 1 WHEN 'redemption' THEN 2
               WHEN 'reversal' THEN 3 WHEN 'expiry' THEN 4 WHEN 'adjustment' THEN 5 WHEN 'opening' THEN 6
               WHEN 'writeoff' THEN 7 END,
           CASE role WHEN 'effect' THEN 0 WHEN 'cancel' THEN 1 END,
           customer_id, document_id, epoch, reverses, amount, effective_at, recorded_at, explanation,
           actor, idem_key, partner, rule_id
    FROM journal ORDER BY id;
DROP TABLE journal;
ALTER TABLE journal_32 RENAME TO journal;
CREATE INDEX journal_document ON journal(document_id, epoch) WHERE document_id IS NOT NULL;
CREATE INDEX journal_reverses ON journal(reverses) WHERE reverses IS NOT NULL;
CREATE INDEX journal_effective ON journal(effective_at);
CREATE INDEX journal_customer ON journal(customer_id, rule_id);
CREATE UNIQUE INDEX journal_idem ON journal(idem_key) WHERE idem_key IS NOT NULL;

-- a document's kind is NULL for a void document never seen whole, and for a till's hold
ALTER TABLE documents ADD COLUMN kind_code INTEGER CHECK (kind_code IN (0, 1));
ALTER TABLE documents ADD COLUMN state_code INTEGER NOT NULL DEFAULT 0 CHECK (state_code IN (0, 1));
UPDATE documents SET
    kind_code = CASE kind WHEN 'sale' THEN 0 WHEN 'return' THEN 1 END,
    state_code = CASE state WHEN 'active' THEN 0 WHEN 'void' THEN 1 END;
ALTER TABLE documents DROP COLUMN kind;
ALTER TABLE documents DROP COLUMN state;
ALTER TABLE documents ADD COLUMN kind TEXT GENERATED ALWAYS AS
    (CASE kind_code WHEN 0 THEN 'sale' WHEN 1 THEN 'return' END) VIRTUAL;
ALTER TABLE documents ADD COLUMN state TEXT GENERATED ALWAYS AS
    (CASE state_code WHEN 0 THEN 'active' WHEN 1 THEN 'void' END) VIRTUAL;

CREATE INDEX documents_unlinked ON documents(source, original_ref)
    WHERE kind = 'return' AND original_id IS NULL AND original_ref IS NOT NULL;
CREATE TRIGGER totals_journal_insert AFTER INSERT ON journal BEGIN
    INSERT INTO totals VALUES ('journal:' || NEW.kind, 1, NEW.amount)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n, amount = amount + excluded.amount;
END;
CREATE TRIGGER totals_journal_update AFTER UPDATE OF kind_code, amount ON journal
WHEN OLD.kind IS NOT NEW.kind OR OLD.amount IS NOT NEW.amount BEGIN
    INSERT INTO totals VALUES ('journal:' || OLD.kind, -1, -OLD.amount)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n, amount = amount + excluded.amount;
    INSERT INTO totals VALUES ('journal:' || NEW.kind, 1, NEW.amount)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n, amount = amount + excluded.amount;
END;
CREATE TRIGGER totals_journal_delete AFTER DELETE ON journal BEGIN
    INSERT INTO totals VALUES ('journal:' || OLD.kind, -1, -OLD.amount)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n, amount = amount + excluded.amount;
END;
CREATE TRIGGER totals_documents_insert AFTER INSERT ON documents BEGIN
    INSERT INTO totals VALUES ('documents:' || NEW.state || ':' || COALESCE(NEW.kind, ''), 1, NEW.total)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n, amount = amount + excluded.amount;
END;
CREATE TRIGGER totals_documents_update AFTER UPDATE OF kind_code, state_code, total ON documents
WHEN OLD.kind IS NOT NEW.kind OR OLD.state IS NOT NEW.state OR OLD.total IS NOT NEW.total BEGIN
    INSERT INTO totals VALUES ('documents:' || OLD.state || ':' || COALESCE(OLD.kind, ''), -1, -OLD.total)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n, amount = amount + excluded.amount;
    INSERT INTO totals VALUES ('documents:' || NEW.state || ':' || COALESCE(NEW.kind, ''), 1, NEW.total)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n, amount = amount + excluded.amount;
END;
CREATE TRIGGER totals_documents_delete AFTER DELETE ON documents BEGIN
    INSERT INTO totals VALUES ('documents:' || OLD.state || ':' || COALESCE(OLD.kind, ''), -1, -OLD.total)
        ON CONFLICT (name) DO UPDATE SET n = n + excluded.n, amount = amount + excluded.amount;
END;
"#,
    // 33 (issue 19): the bonus documents for 1C — one pending row per movement, ≈ 1.5 a sale
    // after a backfill — wait in an index of their own keyed by time alone, so their
    // destination's name is not repeated in each entry (`outbox::pending_of` names the index
    // a query may use). A return finds its sale's number among the source's documents by the
    // number alone: the source was repeated in every entry, and a number is nearly always
    // one source's. The offers' refresh finds the documents written since it last ran by id
    // and only those changed after they were first seen by time (`refresh_offers`), so only
    // those are indexed by time.
    r#"
DROP INDEX outbox_due;
CREATE INDEX outbox_due ON outbox(destination, next_attempt_at)
    WHERE state = 'pending' AND destination != 'onec:bonus';
CREATE INDEX outbox_due_bonus ON outbox(next_attempt_at)
    WHERE state = 'pending' AND destination = 'onec:bonus';
DROP INDEX documents_number;
CREATE INDEX documents_number ON documents(number) WHERE number IS NOT NULL;
DROP INDEX documents_updated;
CREATE INDEX documents_changed ON documents(updated_at) WHERE updated_at > first_seen_at;
"#,
    // 34 (issue 19): a sale reads its customer's history three times — the sales before it,
    // the spend in the tier window, the counters' windows (`state::customer_state`). Keyed
    // by customer and time only, each read fetched every earlier document's row; a
    // customer's documents lie all over a large ledger, so at a million sales that was a page
    // read from the disk cache per document and query (on the 1M ledger, ≈ 290 µs for the
    // three over a customer's 20 documents, against ≈ 460 µs for a whole sale). The index
    // now holds what those reads filter and sum (kind, applied, total: 5–7 bytes a
    // document), so they never leave it.
    r#"
DROP INDEX documents_customer;
CREATE INDEX documents_customer ON documents(customer_id, occurred_at, kind_code, applied, total);
"#,
    // 35 (issue 19): a sale reads its customer's open lots (`query::holdings`); keyed by
    // customer alone, that fetched every open lot's row — after a year of sales ≈ 30 a
    // customer, each on a page of its own, ≈ 14 % of a sale's time at a million sales. The
    // index now holds what the read needs (when each lot becomes usable and burns, what is
    // left), so it never leaves the index. The nightly expiry and its warnings, the only
    // readers of the index by expiry date, scan this one instead (every open lot, once a
    // night); dropping that index leaves the ledger smaller than before (at 1M sales 41.1 →
    // 36.6 MB for the two).
    r#"
DROP INDEX lots_expiring;
DROP INDEX lots_open;
CREATE INDEX lots_open ON lots(customer_id, available_at, expires_at, remaining) WHERE remaining > 0;
"#,
    // 36 (issue 19): a sale sums its customer's earlier shares of each counter; kept in
    // `document_counter_rows`, keyed by document, that read fetched a row per earlier
    // document, each on a page of its own at a million sales (15 % of a sale's time). The
    // shares move into the document row, packed (`ledger::counters`: the amounts in
    // `counters`, which the customer's index now carries, what each counter held before in
    // `counter_priors`), so the sum never leaves the index; `document_counters` stays as a
    // view for the reads by document.
    r#"
ALTER TABLE documents ADD COLUMN counters BLOB;
ALTER TABLE documents ADD COLUMN counter_priors BLOB;
UPDATE documents SET counters = counter_pack(g.list, 0), counter_priors = counter_pack(g.list, 1)
    FROM (SELECT document_id, group_concat(counter || ':' || amount || ':' || COALESCE(prior, ''), ',') AS list
          FROM document_counter_rows GROUP BY document_id) AS g
    WHERE documents.id = g.document_id;
DROP VIEW document_counters;
DROP TABLE document_counter_rows;
CREATE VIEW document_counters AS
    SELECT d.id AS document_id, n.name AS counter, counter_amount(d.counters, n.id) AS amount,
           counter_prior(d.counters, d.counter_priors, n.id) AS prior
    FROM documents d JOIN counter_names n ON counter_has(d.counters, n.id)
    WHERE d.counters IS NOT NULL;
DROP INDEX documents_customer;
CREATE INDEX documents_customer ON documents(customer_id, occurred_at, kind_code, applied, total, counters);
"#,
];

/// The migrations that rebuild a table other tables point at — a new table, the rows copied,
/// the old one dropped, the new one renamed: SQLite's procedure for a change ALTER TABLE
/// cannot make — and the tables whose rows point at it. The procedure needs foreign keys off
/// while it runs (dropping the old table would otherwise fail them), so a run that includes
/// one turns them off and, before it commits, checks every row of those tables
/// (`PRAGMA foreign_key_check`) instead.
const REBUILDS: &[(i64, &[&str])] = &[(32, &["journal", "lots", "posting_rows"])];

/// Brings the database to the newest schema. Refuses a database written by a newer kopilka
/// rather than guessing what its tables mean.
pub fn migrate(conn: &mut Connection) -> Result<(), LedgerError> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let target = MIGRATIONS.len() as i64;
    if current > target {
        return Err(LedgerError::TooNew {
            found: current,
            known: target,
        });
    }
    if current == target {
        return Ok(());
    }
    // migration 36 packs counters with a function of the ledger's own (a connection that
    // `Ledger::open` made has them already; a test's own connection does not)
    super::counters::register(conn)?;
    let rebuilds: Vec<(i64, &str)> = REBUILDS
        .iter()
        .filter(|(n, _)| *n > current)
        .flat_map(|(n, tables)| tables.iter().map(move |t| (*n, *t)))
        .collect();
    if rebuilds.is_empty() {
        return apply(conn, current, target, &rebuilds);
    }
    // not inside a transaction: SQLite ignores the pragma there
    conn.execute_batch("PRAGMA foreign_keys = OFF")?;
    let applied = apply(conn, current, target, &rebuilds);
    conn.execute_batch("PRAGMA foreign_keys = ON")?;
    applied
}

/// Runs the migrations after `current` in one transaction, checking the rows that point at
/// a rebuilt table before it commits.
fn apply(
    conn: &mut Connection,
    current: i64,
    target: i64,
    rebuilds: &[(i64, &str)],
) -> Result<(), LedgerError> {
    let tx = conn.transaction()?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.execute_batch(sql)
            .map_err(|e| LedgerError::Migration(i as i64 + 1, e))?;
    }
    for (n, table) in rebuilds {
        // a table without rowid reports none
        let broken: Option<(Option<i64>, String)> = tx
            .query_row(
                "SELECT rowid, parent FROM pragma_foreign_key_check(?1) LIMIT 1",
                [table],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((row, parent)) = broken {
            let row = row.map_or_else(|| "a row".to_string(), |r| format!("row {r}"));
            return Err(LedgerError::Corrupt(format!(
                "after migration {n}, {row} of {table} points at no row of {parent}; nothing was migrated"
            )));
        }
    }
    tx.execute_batch(&format!("PRAGMA user_version = {target}"))?;
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A migration that rebuilds the journal runs with foreign keys off, so it checks the rows
    /// that point at the journal itself: a posting naming no entry stops it with the row
    /// named, nothing migrated, and foreign keys are on again.
    #[test]
    fn a_rebuild_that_would_leave_a_row_pointing_nowhere_migrates_nothing() {
        let mut conn = Connection::open_in_memory().expect("open");
        for sql in &MIGRATIONS[..31] {
            conn.execute_batch(sql).expect("an old migration");
        }
        conn.execute_batch(
            "PRAGMA user_version = 31;
             INSERT INTO customers (id, created_at) VALUES (1, 0);
             INSERT INTO journal (id, kind, role, customer_id, amount, effective_at, recorded_at, explanation)
               VALUES (1, 'adjustment', 'effect', 1, 5, 0, 0, '');
             INSERT INTO posting_rows (tx_id, leg, account, customer_id, amount) VALUES (1, 1, 0, 1, 5);
             PRAGMA foreign_keys = OFF;
             INSERT INTO posting_rows (tx_id, leg, account, amount) VALUES (7, 1, 4, -5);
             PRAGMA foreign_keys = ON;",
        )
        .expect("rows");
        let err = migrate(&mut conn).expect_err("a broken row");
        assert!(
            matches!(&err, LedgerError::Corrupt(m) if m.contains("posting_rows") && m.contains("journal")),
            "{err}"
        );
        let (version, kind, fk): (i64, String, i64) = conn
            .query_row(
                "SELECT (SELECT user_version FROM pragma_user_version), (SELECT kind FROM journal), \
                 (SELECT foreign_keys FROM pragma_foreign_keys)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .expect("state");
        assert_eq!((version, kind.as_str(), fk), (31, "adjustment", 1));
        conn.execute("DELETE FROM posting_rows WHERE tx_id = 7", [])
            .expect("mend");
        migrate(&mut conn).expect("migrates once mended");
        let (kind, code): (String, i64) = conn
            .query_row("SELECT kind, kind_code FROM journal", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .expect("the entry");
        assert_eq!((kind.as_str(), code), ("adjustment", 5));
    }

    /// A ledger written by the schema before this round's migrations (12: issue 17) is
    /// migrated in place, its rows keep their meaning, and the new columns start empty:
    /// a sale recorded before issue 16 has no redemption spread, no counter prior; a
    /// membership no end; a voucher no code.
    #[test]
    fn a_ledger_of_schema_12_is_migrated_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("old.db");
        let mut conn = Connection::open(&path).expect("open");
        for sql in &MIGRATIONS[..12] {
            conn.execute_batch(sql).expect("an old migration");
        }
        conn.execute_batch(
            "PRAGMA user_version = 12;
             INSERT INTO customers (id, created_at, name) VALUES (1, 0, 'Анна');
             INSERT INTO documents (id, source, doc_id, version, kind, state, epoch, applied, total,
                                    first_seen_at, updated_at)
               VALUES (1, 'onec', 'S1', 'v1', 'sale', 'active', 1, 1, 100000, 0, 0);
             INSERT INTO document_lines (document_id, line_no, product_id, quantity, unit_price, discount, net, service)
               VALUES (1, 1, 'K', '3', 33333, 0, 100000, 0);
             INSERT INTO document_counters (document_id, counter, amount) VALUES (1, 'stamp:coffee', 3);
             INSERT INTO memberships (customer_id, program, since, how) VALUES (1, 'club', 0, 'invite code X');
             INSERT INTO vouchers (customer_id, document_id, epoch, card, product, issued_at, state)
               VALUES (1, 1, 1, 'coffee', 'K-FREE', 0, 'issued');",
        )
        .expect("old rows");
        migrate(&mut conn).expect("migrated");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, MIGRATIONS.len() as i64);
        // every column this round added is NULL on the old rows
        let set: i64 = conn
            .query_row(
                "SELECT (l.redeemed IS NOT NULL) + (c.prior IS NOT NULL) + (m.until IS NOT NULL) \
                   + (v.code IS NOT NULL) + (x.tier_below_since IS NOT NULL) \
                 FROM document_lines l, document_counters c, memberships m, vouchers v, customers x",
                [],
                |r| r.get(0),
            )
            .expect("new columns");
        assert_eq!(set, 0);
        let tables: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_schema WHERE name IN ('customer_changes', 'forgotten')",
                [],
                |r| r.get(0),
            )
            .expect("tables");
        assert_eq!(tables, 2);
        // and a second run changes nothing
        migrate(&mut conn).expect("idempotent");
        drop(conn);
        // the ledger opens on it and its invariants hold
        let ledger =
            crate::ledger::Ledger::open(&path, &crate::ledger::OpenOptions::default()).expect("opens");
        let balance = ledger
            .balance("id:1", chrono::Utc::now(), chrono::Duration::days(14))
            .expect("balance");
        assert_eq!(
            balance.memberships.len(),
            1,
            "an invite membership stays, for good"
        );
        assert_eq!(balance.vouchers.len(), 1);
        // its friend codes are the ones published before: the shipped key
        assert_eq!(
            balance.referral_code,
            crate::core::identity::referral_code(1, crate::core::identity::CodeKey::SHIPPED)
        );
    }

    /// A new ledger draws a key of its own, a valid one, and keeps it.
    #[test]
    fn a_new_ledger_draws_its_own_friend_code_key() {
        let keys: Vec<String> = (0..5)
            .map(|_| {
                let mut conn = Connection::open_in_memory().expect("open");
                migrate(&mut conn).expect("migrated");
                let key: String = conn
                    .query_row("SELECT value FROM meta WHERE key = 'friend_code_key'", [], |r| {
                        r.get(0)
                    })
                    .expect("a key");
                assert!(crate::core::identity::CodeKey::parse(&key).is_some(), "{key}");
                migrate(&mut conn).expect("idempotent");
                let again: String = conn
                    .query_row("SELECT value FROM meta WHERE key = 'friend_code_key'", [], |r| {
                        r.get(0)
                    })
                    .expect("a key");
                assert_eq!(again, key);
                key
            })
            .collect();
        let distinct: std::collections::BTreeSet<_> = keys.iter().collect();
        assert_eq!(distinct.len(), 5, "{keys:?}");
    }
}
