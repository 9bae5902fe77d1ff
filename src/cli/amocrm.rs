//! `kopilka amocrm …`: authorise, list and create the card fields, list unmatched customers.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::{Cli, load_config};
use crate::amocrm::Connector;
use crate::amocrm::fields::{self, CardValue, Target};
use crate::amocrm::wire::CustomField;
use crate::clock::SystemClock;
use crate::ledger::{Ledger, SharedLedger};

#[derive(Args, Debug)]
pub struct AmocrmArgs {
    #[command(subcommand)]
    pub action: AmocrmAction,
}

#[derive(Subcommand, Debug)]
pub enum AmocrmAction {
    /// Exchange an OAuth authorisation code (valid 20 minutes, single use) for the token
    /// pair, stored sealed in the ledger.
    Auth {
        #[arg(long)]
        code: String,
    },
    /// List the account's contact fields and where each kopilka value goes; with
    /// --create, create the missing kopilka fields.
    Fields {
        #[arg(long)]
        create: bool,
    },
    /// Customers not linked to a contact: ambiguous matches (nothing is written for them)
    /// and customers without a contact.
    Unmatched {
        #[arg(long)]
        json: bool,
    },
}

fn connector(cli: &Cli) -> anyhow::Result<(tokio::runtime::Runtime, Connector)> {
    let cfg = load_config(cli)?;
    if cfg.amocrm.is_none() {
        anyhow::bail!("the configuration has no [amocrm] section (base_url and token_file, or client_id)");
    }
    let ledger = Ledger::open(&cfg.ledger_path, &cfg.ledger)
        .with_context(|| format!("opening {}", cfg.ledger_path.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let conn = Connector::new(
        Arc::new(cfg),
        SharedLedger::new(ledger),
        Arc::new(SystemClock),
        None,
    )?;
    Ok((rt, conn))
}

pub fn run(cli: &Cli, a: &AmocrmArgs) -> anyhow::Result<ExitCode> {
    match &a.action {
        AmocrmAction::Auth { code } => {
            let (rt, conn) = connector(cli)?;
            rt.block_on(conn.client.exchange_code(code.trim()))
                .context("exchanging the authorisation code")?;
            println!(
                "authorised: the token pair for {} is stored (sealed) in the ledger; AmoCRM sync can run",
                conn.client.base_url()
            );
            Ok(ExitCode::SUCCESS)
        }
        AmocrmAction::Fields { create } => {
            let (rt, conn) = connector(cli)?;
            rt.block_on(async {
                let mut list = fields::list(&conn.client).await?;
                let mut r = fields::resolve(&conn.map, &list);
                if *create && !r.missing.is_empty() {
                    let made = fields::create_missing(&conn.client, &r.missing).await?;
                    println!("created {} fields", made.len());
                    list = fields::list(&conn.client).await?;
                    r = fields::resolve(&conn.map, &list);
                }
                println!("{:<14} {:<24} {:>10}  state", "value", "field", "id");
                for (value, target) in &conn.map.0 {
                    let shown = match target {
                        Some(Target::Id(i)) => format!("id {i}"),
                        Some(Target::Code(c)) => c.clone(),
                        None => "(off)".into(),
                    };
                    let (id, state) = match r.id(*value) {
                        Some(id) => (id.to_string(), "ok"),
                        None if target.is_none() => ("-".into(), "not written"),
                        None => ("-".into(), "missing (kopilka amocrm fields --create)"),
                    };
                    println!("{:<14} {:<24} {:>10}  {state}", value.key(), shown, id);
                }
                let ours: Vec<&str> = CardValue::ALL.iter().map(|v| v.default_code()).collect();
                let others = list
                    .iter()
                    .filter(|f| !f.code.as_deref().is_some_and(|c| ours.contains(&c)))
                    .count();
                println!("({} other contact fields in the account)", others);
                let problems = print_sources(&conn, &list);
                anyhow::Ok(problems)
            })
            .map(|problems| {
                if problems == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            })
        }
        AmocrmAction::Unmatched { json } => {
            let cfg = load_config(cli)?;
            let ledger = Ledger::open(&cfg.ledger_path, &cfg.ledger)
                .with_context(|| format!("opening {}", cfg.ledger_path.display()))?;
            let list = ledger.amocrm_unmatched()?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("every customer tried so far is linked to an AmoCRM contact");
            } else {
                println!("{:>8}  {:<24} {:<40} candidates", "customer", "name", "reason");
                for u in &list {
                    println!(
                        "{:>8}  {:<24} {:<40} {}",
                        format!("id:{}", u.customer_id),
                        u.name.as_deref().unwrap_or("-"),
                        u.reason,
                        u.candidates
                            .iter()
                            .map(i64::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `kopilka check --probe`: AmoCRM answers with the configured token, and every field
/// `[sources]` names exists with a type kopilka can read (a missing one is named).
pub fn probe(cli: &Cli) -> anyhow::Result<bool> {
    let (rt, conn) = connector(cli)?;
    match rt.block_on(fields::list(&conn.client)) {
        Ok(list) => {
            println!(
                "  probe: amocrm {} answers ({} contact fields)",
                conn.client.base_url(),
                list.len()
            );
            Ok(print_sources(&conn, &list) == 0)
        }
        Err(e) => {
            println!("  probe: amocrm: {e}");
            Ok(false)
        }
    }
}

/// Lists the contact fields read as customer attributes (`[sources]`): each one's field, and
/// whether the account has it with a type kopilka can read. Returns the number of problems
/// (a missing field, a type that cannot hold the value), so the command fails on them.
fn print_sources(conn: &Connector, list: &[CustomField]) -> usize {
    if conn.sources.0.is_empty() {
        println!("no contact field is read as a customer attribute ([sources] names none)");
        return 0;
    }
    let (found, missing) = fields::resolve_sources(&conn.sources, list);
    println!("{:<16} {:<24} {:>10}  state", "reads", "field", "id");
    let mut problems = 0;
    for (value, target) in &conn.sources.0 {
        let shown = match target {
            Target::Id(i) => format!("id {i}"),
            Target::Code(c) => c.clone(),
        };
        let (id, state) = match found.iter().find(|f| f.value == *value) {
            Some(f) => {
                let kind = f.kind.as_deref().unwrap_or("?");
                if value.readable_types().contains(&kind) {
                    (f.id.to_string(), format!("ok ({kind})"))
                } else {
                    problems += 1;
                    (
                        f.id.to_string(),
                        format!(
                            "type {kind} cannot hold it (one of {})",
                            value.readable_types().join(", ")
                        ),
                    )
                }
            }
            None => {
                problems += 1;
                debug_assert!(missing.iter().any(|(v, _)| v == value));
                (
                    "-".into(),
                    "missing: the account has no such contact field".into(),
                )
            }
        };
        println!("{:<16} {:<24} {:>10}  {state}", value.key(), shown, id);
    }
    problems
}
