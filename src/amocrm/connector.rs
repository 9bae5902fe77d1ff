//! One AmoCRM account as the jobs see it: the configuration, the client (its limiter, token
//! and halt state are shared by every job of the process), and the resolved field map.

use std::sync::Arc;

use super::AmoError;
use super::client::{Client, ClientOptions};
use super::fields::{self, FieldMap, Resolved, Sources};
use crate::clock::Clock;
use crate::config::{AmocrmConfig, Config};
use crate::ledger::{IngestContext, Ledger, SharedLedger};

pub struct Connector {
    pub cfg: Arc<Config>,
    pub client: Client,
    pub map: FieldMap,
    /// The contact fields read as customer attributes (`[sources]`).
    pub sources: Sources,
    resolved: tokio::sync::Mutex<Option<Resolved>>,
}

impl Connector {
    /// Builds the connector of `cfg.amocrm`; `opts` overrides the client options taken from
    /// the configuration (tests use short back-offs).
    pub fn new(
        cfg: Arc<Config>,
        ledger: SharedLedger,
        clock: Arc<dyn Clock>,
        opts: Option<ClientOptions>,
    ) -> Result<Connector, AmoError> {
        let amo = cfg
            .amocrm
            .as_ref()
            .ok_or_else(|| AmoError::Setup("the configuration has no [amocrm] section".into()))?;
        let (mut map, sources) = fields::load_mapping(amo.mapping.as_deref()).map_err(AmoError::Setup)?;
        if cfg.notify.salesbot.is_none() {
            // no bot reads it: the cards stay without the message field
            for (value, target) in &mut map.0 {
                if *value == fields::CardValue::Message {
                    *target = None;
                }
            }
        }
        let opts = opts.unwrap_or_else(|| ClientOptions::from_config(amo));
        let client = Client::new(amo, opts, ledger, clock)?;
        Ok(Connector {
            cfg,
            client,
            map,
            sources,
            resolved: tokio::sync::Mutex::new(None),
        })
    }

    pub fn amo(&self) -> &AmocrmConfig {
        // `new` refused a configuration without the section
        self.cfg
            .amocrm
            .as_ref()
            .unwrap_or_else(|| unreachable!("checked in Connector::new"))
    }

    pub fn ledger(&self) -> &SharedLedger {
        self.client.ledger()
    }

    /// Runs `f` on the ledger with an ingest context built from the configuration.
    pub async fn with_ledger<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Ledger, &IngestContext<'_>) -> R + Send + 'static,
    ) -> R {
        let cfg = self.cfg.clone();
        let now = self.client.now();
        self.ledger()
            .run(move |l| {
                let dest = cfg.destinations();
                let ctx = IngestContext {
                    rules: &cfg.program,
                    limits: &cfg.limits,
                    destinations: &dest,
                    now,
                    warn_before: cfg.warn_before,
                };
                f(l, &ctx)
            })
            .await
    }

    /// The field ids to write, read once per process. Missing kopilka fields named by code
    /// are created: a configuration with only `base_url` and `token_file` must be enough to
    /// fill the cards.
    pub async fn fields(&self) -> Result<Resolved, AmoError> {
        let mut guard = self.resolved.lock().await;
        if let Some(r) = guard.as_ref() {
            return Ok(r.clone());
        }
        let mut list = fields::list(&self.client).await?;
        let mut r = fields::resolve(&self.map, &list);
        if !r.missing.is_empty() {
            let created = fields::create_missing(&self.client, &r.missing).await?;
            tracing::info!(
                created = created.len(),
                "created the missing kopilka fields in AmoCRM"
            );
            list = fields::list(&self.client).await?;
            r = fields::resolve(&self.map, &list);
            for (v, t) in &r.missing {
                tracing::warn!(value = v.key(), target = ?t, "an AmoCRM field in the field map does not exist; the value is not written");
            }
        }
        (r.sources, r.missing_sources) = fields::resolve_sources(&self.sources, &list);
        for (v, t) in &r.missing_sources {
            tracing::error!(attribute = v.key(), target = ?t, "A contact field named in [sources] of the AmoCRM field map does not exist; the attribute is not read until the map or the account is fixed.");
        }
        *guard = Some(r.clone());
        Ok(r)
    }

    /// Forgets the resolved fields (after `fields --create`, or a validation error naming a
    /// field that was deleted).
    pub async fn forget_fields(&self) {
        *self.resolved.lock().await = None;
    }
}
