//! E-mail over SMTP (lettre): plain text and HTML, STARTTLS or TLS, a password from a
//! credential file. The Message-ID is built from the outbox row's idempotency key, so a
//! message repeated after a crash is the same message to every mail client; every message
//! carries `List-Unsubscribe` (RFC 2369, and RFC 8058's one-click when a public URL is set).

use lettre::message::header::{self, ContentType};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use super::{Outgoing, Transport};
use crate::config::{EmailConfig, SmtpTls};
use crate::core::notify::Channel;
use crate::ledger::{Address, DeliveryError};

pub struct Email {
    cfg: EmailConfig,
    mailer: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    /// The member's own unsubscribe link, by customer id (`None`: the mailto form).
    unsubscribe: Box<dyn Fn(i64) -> Option<String> + Send + Sync>,
}

impl Email {
    pub fn new(
        cfg: &EmailConfig,
        unsubscribe: Box<dyn Fn(i64) -> Option<String> + Send + Sync>,
    ) -> anyhow::Result<Email> {
        let from: Mailbox = cfg
            .from
            .parse()
            .map_err(|e| anyhow::anyhow!("notify.email.from {:?}: {e}", cfg.from))?;
        let builder = match cfg.tls {
            SmtpTls::StartTls => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&cfg.host)
                .tls(Tls::Required(TlsParameters::new(cfg.host.clone())?)),
            SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&cfg.host)
                .tls(Tls::Wrapper(TlsParameters::new(cfg.host.clone())?)),
            SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&cfg.host),
        };
        let mut builder = builder.port(cfg.port).timeout(Some(cfg.timeout));
        if let Some((user, secret)) = &cfg.credentials {
            builder = builder.credentials(Credentials::new(user.clone(), secret.expose().to_string()));
        }
        Ok(Email {
            cfg: cfg.clone(),
            mailer: builder.build(),
            from,
            unsubscribe,
        })
    }

    /// The message as it goes on the wire (tests read it back from the SMTP stand-in).
    pub fn build(&self, o: &Outgoing) -> Result<lettre::Message, DeliveryError> {
        let Address::Email(addr) = &o.address else {
            return Err(DeliveryError::Permanent("not an e-mail address".into()));
        };
        let to = Mailbox::new(
            o.name.clone(),
            addr.parse()
                .map_err(|e| DeliveryError::Refused(format!("{addr:?} is not an e-mail address: {e}")))?,
        );
        let domain = self.from.email.domain().to_string();
        let message_id = format!("<{}@{domain}>", message_id_part(&o.key));
        let link = (self.unsubscribe)(o.customer_id);
        let reply = self
            .cfg
            .reply_to
            .clone()
            .unwrap_or_else(|| self.from.email.to_string());
        let list_unsubscribe = match &link {
            Some(url) => format!("<{url}>, <mailto:{reply}?subject=unsubscribe>"),
            None => format!("<mailto:{reply}?subject=unsubscribe>"),
        };
        let footer_text = match &link {
            Some(url) => format!("Отписаться от писем: {url}"),
            None => {
                format!("Чтобы отписаться от писем, ответьте на это письмо словом «Отписаться» ({reply}).")
            }
        };
        let text = format!("{}\n\n--\n{footer_text}\n", o.message.text);
        let html = format!(
            "<!doctype html><html><body><p>{}</p><hr><p style=\"font-size:small;color:#666\">{}</p></body></html>",
            escape(&o.message.text),
            match &link {
                Some(url) => format!("<a href=\"{}\">Отписаться от писем</a>", escape(url)),
                None => escape(&footer_text),
            }
        );
        let mut b = lettre::Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(o.message.subject.clone())
            .message_id(Some(message_id))
            .header(ListUnsubscribe(list_unsubscribe));
        if link.is_some() {
            b = b.header(ListUnsubscribePost("List-Unsubscribe=One-Click".into()));
        }
        if let Some(r) = &self.cfg.reply_to
            && let Ok(m) = r.parse::<Mailbox>()
        {
            b = b.reply_to(m);
        }
        b.multipart(
            MultiPart::alternative()
                .singlepart(SinglePart::builder().header(ContentType::TEXT_PLAIN).body(text))
                .singlepart(SinglePart::builder().header(ContentType::TEXT_HTML).body(html)),
        )
        .map_err(|e| DeliveryError::Permanent(format!("building the e-mail: {e}")))
    }
}

/// `notify:email:journal:12` → `notify.email.journal.12`: a Message-ID's left part allows
/// letters, digits and a few signs (RFC 5322 dot-atom).
fn message_id_part(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '.'
            }
        })
        .collect::<String>()
        .trim_matches('.')
        .to_string()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[derive(Clone)]
struct ListUnsubscribe(String);

impl header::Header for ListUnsubscribe {
    fn name() -> header::HeaderName {
        header::HeaderName::new_from_ascii_str("List-Unsubscribe")
    }
    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(ListUnsubscribe(s.to_string()))
    }
    fn display(&self) -> header::HeaderValue {
        header::HeaderValue::new(Self::name(), self.0.clone())
    }
}

#[derive(Clone)]
struct ListUnsubscribePost(String);

impl header::Header for ListUnsubscribePost {
    fn name() -> header::HeaderName {
        header::HeaderName::new_from_ascii_str("List-Unsubscribe-Post")
    }
    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(ListUnsubscribePost(s.to_string()))
    }
    fn display(&self) -> header::HeaderValue {
        header::HeaderValue::new(Self::name(), self.0.clone())
    }
}

impl Transport for Email {
    fn channel(&self) -> Channel {
        Channel::Email
    }

    async fn send(&self, batch: &[Outgoing]) -> Vec<Result<(), DeliveryError>> {
        let mut out = Vec::with_capacity(batch.len());
        for o in batch {
            let r = match self.build(o) {
                Err(e) => Err(e),
                Ok(m) => self.mailer.send(m).await.map(|_| ()).map_err(|e| {
                    if e.is_permanent() {
                        DeliveryError::Permanent(format!("the SMTP server refused: {e}"))
                    } else {
                        DeliveryError::Retriable(format!("SMTP: {e}"))
                    }
                }),
            };
            out.push(r);
        }
        out
    }
}
