//! An SMTP server on loopback, for tests and `kopilka demo`: it receives what kopilka's
//! e-mail channel sends and keeps it for reading back.
//!
//! Written from RFC 5321 (the commands and replies of §4.1 and §4.2: `220` greeting, `EHLO`
//! with extension lines `250-…`/`250 …`, `MAIL FROM`, `RCPT TO`, `DATA` → `354`, the body
//! ended by `<CRLF>.<CRLF>` with leading dots doubled by the client (§4.5.2), `RSET`, `NOOP`,
//! `QUIT` → `221`), not from kopilka's client. It does not speak TLS: the channel's
//! STARTTLS and TLS modes are lettre's, tested by lettre; a relay on the shop's own machine is
//! the `tls = "none"` setup this stands in for. A recipient can be set to be refused with a
//! permanent `550` (§4.2.3), and the next transaction with a transient `451`.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// One message as the server received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub from: String,
    pub to: Vec<String>,
    /// The message (headers and body) after undoing the dot-stuffing.
    pub data: String,
}

impl Received {
    /// A header's value (first occurrence, unfolded), case-insensitive name.
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.data.split("\r\n\r\n").next()?;
        let mut value: Option<String> = None;
        for line in head.split("\r\n") {
            if let Some(v) = value.as_mut()
                && (line.starts_with(' ') || line.starts_with('\t'))
            {
                v.push(' ');
                v.push_str(line.trim());
                continue;
            }
            if value.is_some() {
                break;
            }
            if let Some((n, v)) = line.split_once(':')
                && n.eq_ignore_ascii_case(name)
            {
                value = Some(v.trim().to_string());
            }
        }
        value
    }

    /// The text/plain part, decoded from quoted-printable or base64 as lettre may write it.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for part in self.data.split("Content-Type: ").skip(1) {
            if !part.starts_with("text/plain") {
                continue;
            }
            let (head, body) = part.split_once("\r\n\r\n").unwrap_or((part, ""));
            let body = body.split("\r\n--").next().unwrap_or("");
            let head_lower = head.to_ascii_lowercase();
            out = if head_lower.contains("content-transfer-encoding: base64") {
                use base64::Engine as _;
                let joined: String = body.split_whitespace().collect();
                base64::engine::general_purpose::STANDARD
                    .decode(joined)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .unwrap_or_default()
            } else if head_lower.contains("quoted-printable") {
                decode_qp(body)
            } else {
                body.to_string()
            };
        }
        out.replace("\r\n", "\n")
    }
}

fn decode_qp(s: &str) -> String {
    let mut bytes = Vec::new();
    let raw = s.replace("=\r\n", "");
    let b = raw.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'='
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            bytes.push(v);
            i += 3;
            continue;
        }
        bytes.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    refuse: Vec<String>,
    fail_next: usize,
}

/// The running server; dropping it stops accepting.
pub struct SmtpSim {
    pub port: u16,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SmtpSim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SmtpSim {
    pub async fn start() -> std::io::Result<SmtpSim> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(Mutex::new(State::default()));
        let s = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = session(sock, s).await;
                });
            }
        });
        Ok(SmtpSim { port, state, task })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every transmission, repeats included.
    pub fn received(&self) -> Vec<Received> {
        self.lock().received.clone()
    }

    /// The mailboxes as a mail client shows them: one message per Message-ID (RFC 5322
    /// §3.6.4: the same id is the same message).
    pub fn mailbox(&self) -> Vec<Received> {
        let mut seen = std::collections::BTreeSet::new();
        self.received()
            .into_iter()
            .filter(|m| seen.insert(m.header("Message-ID").unwrap_or_else(|| m.data.clone())))
            .collect()
    }

    /// Refuse this recipient with `550` from now on.
    pub fn refuse(&self, address: &str) {
        self.lock().refuse.push(address.to_ascii_lowercase());
    }

    /// Answer the next `n` `MAIL FROM` with a transient `451`.
    pub fn fail_next(&self, n: usize) {
        self.lock().fail_next = n;
    }
}

fn address(arg: &str) -> String {
    let a = arg.trim();
    let inner = a
        .find('<')
        .and_then(|s| a[s + 1..].find('>').map(|e| &a[s + 1..s + 1 + e]))
        .unwrap_or(a);
    inner.to_ascii_lowercase()
}

async fn session(sock: tokio::net::TcpStream, state: Arc<Mutex<State>>) -> std::io::Result<()> {
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"220 kopilka-smtp-sim ESMTP ready\r\n").await?;
    let mut from: Option<String> = None;
    let mut to: Vec<String> = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end_matches(['\r', '\n']);
        let upper = cmd.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") {
            "250-kopilka-smtp-sim\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 10485760\r\n".into()
        } else if upper.starts_with("HELO") {
            "250 kopilka-smtp-sim\r\n".into()
        } else if upper.starts_with("MAIL FROM:") {
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            if st.fail_next > 0 {
                st.fail_next -= 1;
                "451 4.3.0 try again later\r\n".into()
            } else {
                from = Some(address(&cmd[10..]));
                to.clear();
                "250 2.1.0 OK\r\n".into()
            }
        } else if upper.starts_with("RCPT TO:") {
            let a = address(&cmd[8..]);
            let refused = state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .refuse
                .contains(&a);
            if from.is_none() {
                "503 5.5.1 MAIL first\r\n".into()
            } else if refused {
                format!("550 5.1.1 <{a}>: mailbox unavailable\r\n")
            } else {
                to.push(a);
                "250 2.1.5 OK\r\n".into()
            }
        } else if upper == "DATA" {
            if from.is_none() || to.is_empty() {
                "503 5.5.1 need MAIL and RCPT first\r\n".into()
            } else {
                w.write_all(b"354 end data with <CR><LF>.<CR><LF>\r\n").await?;
                let mut data = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line).await? == 0 {
                        return Ok(());
                    }
                    if line == ".\r\n" || line == ".\n" {
                        break;
                    }
                    let l = line.strip_prefix('.').unwrap_or(&line);
                    data.push_str(l);
                }
                let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                st.received.push(Received {
                    from: from.take().unwrap_or_default(),
                    to: std::mem::take(&mut to),
                    data,
                });
                format!("250 2.0.0 OK queued as {}\r\n", st.received.len())
            }
        } else if upper == "RSET" {
            from = None;
            to.clear();
            "250 2.0.0 OK\r\n".into()
        } else if upper == "NOOP" {
            "250 2.0.0 OK\r\n".into()
        } else if upper == "QUIT" {
            w.write_all(b"221 2.0.0 bye\r\n").await?;
            return Ok(());
        } else {
            "502 5.5.2 command not implemented\r\n".into()
        };
        w.write_all(reply.as_bytes()).await?;
    }
}
