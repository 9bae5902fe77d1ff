//! Members' messages on their way out (issue 21): one [`NotifySink`] per channel decides, at
//! send time and through [`crate::core::notify::decide`], whether each queued message may go
//! (consent, unsubscribe, address, quiet hours, caps) and hands the ones that may to the
//! channel's [`Transport`]. A confirmed message is recorded (`notify_sent`) before its outbox
//! row is marked, so a crash between the two never sends it twice.

pub mod email;
pub mod salesbot;
pub mod telegram;

use std::future::Future;
use std::sync::Arc;

use crate::core::clock::Clock;
use crate::core::notify::{Channel, Decision, Message, Plan, decide};
use crate::ledger::{Address, DeliveryError, OutboxRow, SharedLedger, Sink};

/// One message a transport is asked to send.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub address: Address,
    /// The member's name on file, for a greeting or the e-mail's To.
    pub name: Option<String>,
    pub message: Message,
    /// The outbox row's idempotency key: what the receiving side sees to recognise a repeat
    /// (the e-mail's Message-ID).
    pub key: String,
    pub customer_id: i64,
}

/// A channel's wire: sends messages that were already allowed.
pub trait Transport: Send + Sync {
    fn channel(&self) -> Channel;
    /// Messages one call takes at most.
    fn max_batch(&self) -> usize {
        1
    }
    /// One result per message, in order.
    fn send(&self, batch: &[Outgoing]) -> impl Future<Output = Vec<Result<(), DeliveryError>>> + Send;
}

pub struct NotifySink<T: Transport> {
    pub ledger: SharedLedger,
    pub plan: Arc<Plan>,
    pub clock: Arc<dyn Clock>,
    pub transport: T,
}

impl<T: Transport> Sink for NotifySink<T> {
    fn destination(&self) -> &str {
        self.transport.channel().destination()
    }

    fn max_batch(&self) -> usize {
        self.transport.max_batch()
    }

    async fn deliver(&self, rows: &[OutboxRow]) -> Vec<Result<(), DeliveryError>> {
        let channel = self.transport.channel();
        let now = self.clock.now();
        let mut results: Vec<Result<(), DeliveryError>> = vec![Ok(()); rows.len()];
        let mut go: Vec<(usize, Outgoing)> = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let m: Message = match serde_json::from_str(&row.payload) {
                Ok(m) => m,
                Err(e) => {
                    results[i] = Err(DeliveryError::Permanent(format!("unreadable message: {e}")));
                    continue;
                }
            };
            let id = row.id;
            let customer = m.customer_id;
            let looked = self
                .ledger
                .run(move |l| -> crate::ledger::Result<_> {
                    if l.notify_was_sent(id)? {
                        return Ok(None);
                    }
                    Ok(Some(l.notify_reach(customer, channel, now)?))
                })
                .await;
            let reach = match looked {
                Ok(None) => continue, // confirmed before a crash: only the mark was missing
                Ok(Some(r)) => r,
                Err(e) => {
                    results[i] = Err(DeliveryError::Retriable(format!("reading the ledger: {e}")));
                    continue;
                }
            };
            // one message per member per batch: the caps count what this batch sends too
            if go.iter().any(|(_, o)| o.customer_id == customer) {
                results[i] = Err(DeliveryError::Hold {
                    until: now,
                    reason: "another message to the member in the same batch".into(),
                });
                continue;
            }
            match decide(&self.plan.policy, &m, &reach.recipient, now, self.plan.timezone) {
                Decision::Send => {
                    let Some(address) = reach.address else {
                        results[i] = Err(DeliveryError::Retriable("the address vanished".into()));
                        continue;
                    };
                    go.push((
                        i,
                        Outgoing {
                            address,
                            name: reach.name,
                            message: m,
                            key: row.idem_key.clone(),
                            customer_id: customer,
                        },
                    ));
                }
                Decision::Hold { until, reason } => results[i] = Err(DeliveryError::Hold { until, reason }),
                Decision::Refuse { reason } => results[i] = Err(DeliveryError::Refused(reason)),
            }
        }
        if go.is_empty() {
            return results;
        }
        let batch: Vec<Outgoing> = go.iter().map(|(_, o)| o.clone()).collect();
        let sent = self.transport.send(&batch).await;
        let mut confirmed = Vec::new();
        for (n, (i, o)) in go.into_iter().enumerate() {
            match sent
                .get(n)
                .cloned()
                .unwrap_or_else(|| Err(DeliveryError::Retriable("no result".into())))
            {
                Ok(()) => confirmed.push((rows[i].id, o.message)),
                Err(e) => results[i] = Err(e),
            }
        }
        let sent_at = self.clock.now();
        let recorded = self
            .ledger
            .run(move |l| -> crate::ledger::Result<()> {
                for (id, m) in &confirmed {
                    l.notify_record_sent(*id, m, sent_at)?;
                }
                Ok(())
            })
            .await;
        if let Err(e) = recorded {
            // the outbox row stays pending; the message may be repeated, with the same key
            tracing::error!(error = %e, "recording sent messages failed");
        }
        results
    }
}
