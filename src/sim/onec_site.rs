//! 1C's side of «Обмен с сайтом», for tests and the demo: drives a site-exchange server the
//! way the configurations' own code does, so kopilka's endpoint is checked against 1C and not
//! against itself. Source: `../shared/specs/onec-stock-channels.md` §3, read from
//! `CommonModules/ОбменССайтом` of УТ 11.5 (`evlahov-igor/UT11@302d05cb4370`), Розница 2.2
//! (`DeZargo/1c_retail_apple@896da2e19289`) and УНФ 3.0 (`AlexanderYekat/unf@39143e434496`).
//!
//! A scheduled run ([`SiteClient::scheduled_run`]) is what those modules do every few minutes:
//! a test `checkauth` with `type=catalog` (UT `OSS:117-134`, RT `OSS:116`); then the download
//! `checkauth → query → success` with no `init` (UT `OS:3869-3965`), `success` only when the
//! reply loaded; then the upload `checkauth → init → file… → import…` (UT `OS:6009-6269`),
//! each `checkauth` a fresh connection and nobody ever logging out. УТ sends `&sessid=` on
//! every call after `checkauth` (empty after a three-line reply), Розница 2.2 never does; УНФ
//! (not in Bitrix mode) sends `file` and no `import`. With `zip=yes` the whole upload goes as
//! one archive under a temporary name and `import` names the XML inside (UT `OS:6083`,
//! `6198`, `6344-6368`). `init` must answer exactly two lines (UT `OS:6053-6081`); a `query`
//! reply must start with `<?xml` (no BOM) or `PK` (UT `OS:3911-3932`) and an empty one fails.

use std::io::Write;

#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    #[error("server said failure to mode={mode}: {reason}")]
    Failure { mode: String, reason: String },
    #[error("unexpected reply to mode={mode}: {reply:?}")]
    Protocol { mode: String, reply: String },
    #[error("zip: {0}")]
    Zip(String),
}

/// What 1C keeps between calls.
pub struct SiteClient {
    url: String,
    user: String,
    password: String,
    http: reqwest::Client,
    cookie: Option<(String, String)>,
    sessid: Option<String>,
    pub zip: bool,
    pub file_limit: usize,
    /// How many `import` calls answered `progress` (for tests).
    pub progress_replies: usize,
    /// Send `sessid=` on every call after `checkauth`, as УТ does.
    pub send_sessid: bool,
    pub edition: Edition,
}

/// Whose exchange code the client plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edition {
    /// УТ 11.5: `sessid` on every call, `import` after `file`.
    Ut,
    /// Розница 2.2: no `sessid`, `import` after `file`.
    Roznica,
    /// УНФ 3.0 (not Bitrix): no `sessid`, `file` only.
    Unf,
}

/// Where a scheduled run stops early, as when 1C is closed or the connection drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kill {
    AfterQuery,
    AfterFirstChunk,
}

fn first_line(text: &str) -> (&str, String) {
    let mut lines = text.lines();
    let status = lines.next().unwrap_or("").trim();
    (status, lines.collect::<Vec<_>>().join("\n"))
}

impl SiteClient {
    /// `url` is the exchange URL as typed into 1C, e.g. `http://127.0.0.1:8088/1c_exchange.php`.
    pub fn new(url: &str, user: &str, password: &str) -> SiteClient {
        SiteClient {
            url: url.to_string(),
            user: user.to_string(),
            password: password.to_string(),
            http: reqwest::Client::new(),
            cookie: None,
            sessid: None,
            zip: false,
            file_limit: 0,
            progress_replies: 0,
            send_sessid: true,
            edition: Edition::Ut,
        }
    }

    /// The `Cookie` header 1C sends after `checkauth`.
    pub fn cookie_header(&self) -> Option<String> {
        self.cookie.as_ref().map(|(n, v)| format!("{n}={v}"))
    }

    pub fn edition(mut self, e: Edition) -> SiteClient {
        self.edition = e;
        self.send_sessid = e == Edition::Ut;
        self
    }

    fn request(
        &self,
        method: reqwest::Method,
        kind: &str,
        mode: &str,
        filename: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let mut query: Vec<(&str, String)> = vec![("type", kind.to_string()), ("mode", mode.to_string())];
        if let Some(f) = filename {
            query.push(("filename", f.to_string()));
        }
        if self.send_sessid && mode != "checkauth" {
            // УТ: `СтрЗаменить(line4, "sessid=", "")`, empty when there was no fourth line
            query.push(("sessid", self.sessid.clone().unwrap_or_default()));
        }
        let mut req = self.http.request(method, &self.url).query(&query);
        if let Some((name, value)) = &self.cookie {
            req = req.header(reqwest::header::COOKIE, format!("{name}={value}"));
        }
        req
    }

    async fn call(&self, req: reqwest::RequestBuilder, mode: &str) -> Result<String, SiteError> {
        let reply = req.send().await?.text().await?;
        let (status, rest) = first_line(&reply);
        match status {
            "success" | "progress" => Ok(reply),
            "failure" => Err(SiteError::Failure {
                mode: mode.to_string(),
                reason: rest,
            }),
            _ if mode == "init" || mode == "query" => Ok(reply),
            _ => Err(SiteError::Protocol {
                mode: mode.to_string(),
                reply,
            }),
        }
    }

    pub async fn checkauth(&mut self, kind: &str) -> Result<(), SiteError> {
        let req = self
            .request(reqwest::Method::GET, kind, "checkauth", None)
            .basic_auth(&self.user, Some(&self.password));
        let reply = self.call(req, "checkauth").await?;
        let lines: Vec<&str> = reply.lines().collect();
        match lines.as_slice() {
            ["success", name, value, rest @ ..] => {
                self.cookie = Some((name.to_string(), value.to_string()));
                self.sessid = rest
                    .iter()
                    .find_map(|l| l.strip_prefix("sessid="))
                    .map(str::to_string);
                Ok(())
            }
            _ => Err(SiteError::Protocol {
                mode: "checkauth".into(),
                reply,
            }),
        }
    }

    pub async fn init(&mut self, kind: &str) -> Result<(), SiteError> {
        let reply = self
            .call(self.request(reqwest::Method::GET, kind, "init", None), "init")
            .await?;
        // `СтрЧислоСтрок(ОтветСервера) <> 2` → «Параметры обмена не получены»
        if reply.trim_end_matches('\n').split('\n').count() != 2 {
            return Err(SiteError::Protocol {
                mode: "init".into(),
                reply,
            });
        }
        for line in reply.lines() {
            if let Some(v) = line.strip_prefix("zip=") {
                self.zip = v.trim() == "yes";
            }
            if let Some(v) = line.strip_prefix("file_limit=") {
                self.file_limit = v.trim().parse().unwrap_or(0);
            }
        }
        if self.file_limit == 0 {
            return Err(SiteError::Protocol {
                mode: "init".into(),
                reply,
            });
        }
        Ok(())
    }

    /// Uploads one file in chunks of at most `file_limit` bytes.
    pub async fn upload(&mut self, kind: &str, filename: &str, bytes: &[u8]) -> Result<(), SiteError> {
        for chunk in bytes.chunks(self.file_limit.max(1)) {
            let req = self
                .request(reqwest::Method::POST, kind, "file", Some(filename))
                .body(chunk.to_vec());
            self.call(req, "file").await?;
        }
        Ok(())
    }

    /// Asks the server to import a file, repeating the call while it answers `progress`.
    pub async fn import(&mut self, kind: &str, filename: &str) -> Result<String, SiteError> {
        loop {
            let req = self.request(reqwest::Method::GET, kind, "import", Some(filename));
            let reply = self.call(req, "import").await?;
            if reply.starts_with("progress") {
                self.progress_replies += 1;
                continue;
            }
            return Ok(reply);
        }
    }

    /// The `query` reply as 1C reads it: an empty body fails the step (UT `OS:6495-6499`),
    /// and it must start with `PK` or literally with `<?xml` (UT `OS:3911-3932`).
    pub async fn query(&mut self) -> Result<Vec<u8>, SiteError> {
        let req = self.request(reqwest::Method::GET, "sale", "query", None);
        let body = req.send().await?.bytes().await?.to_vec();
        if body.is_empty() || !(body.starts_with(b"PK") || body.starts_with(b"<?xml")) {
            return Err(SiteError::Protocol {
                mode: "query".into(),
                reply: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            });
        }
        Ok(body)
    }

    pub async fn success(&mut self) -> Result<(), SiteError> {
        self.call(
            self.request(reqwest::Method::GET, "sale", "success", None),
            "success",
        )
        .await?;
        Ok(())
    }

    /// A whole exchange of `files` as 1C runs it: auth, init, upload (zipped into one
    /// archive when the server asks for zip), then import of each file.
    pub async fn exchange(
        &mut self,
        kind: &str,
        files: &[(&str, Vec<u8>)],
    ) -> Result<Vec<String>, SiteError> {
        self.checkauth(kind).await?;
        self.init(kind).await?;
        if kind == "sale" {
            let _ = self.query().await?;
            self.success().await?;
        }
        if self.zip {
            let mut buf = std::io::Cursor::new(Vec::new());
            {
                let mut zip = zip::ZipWriter::new(&mut buf);
                for (name, bytes) in files {
                    zip.start_file(*name, zip::write::SimpleFileOptions::default())
                        .map_err(|e| SiteError::Zip(e.to_string()))?;
                    zip.write_all(bytes).map_err(|e| SiteError::Zip(e.to_string()))?;
                }
                zip.finish().map_err(|e| SiteError::Zip(e.to_string()))?;
            }
            self.upload(kind, "exchange.zip", buf.get_ref()).await?;
        } else {
            for (name, bytes) in files {
                self.upload(kind, name, bytes).await?;
            }
        }
        let mut replies = Vec::new();
        for (name, _) in files {
            replies.push(self.import(kind, name).await?);
        }
        Ok(replies)
    }

    /// One scheduled run of the 1C exchange (module doc): the test `checkauth`, the download
    /// (`query`, then `success` when 1C could load the reply: it loads only «Заказ товара»),
    /// and the upload of `file` when there is one. `kill` stops the run early. Returns the
    /// `query` reply.
    pub async fn scheduled_run(
        &mut self,
        file: Option<(&str, &[u8])>,
        kill: Option<Kill>,
    ) -> Result<Vec<u8>, SiteError> {
        // the node's connection test, with type=catalog even for an orders-only node
        self.checkauth("catalog").await?;
        self.checkauth("sale").await?;
        let reply = self.query().await?;
        if !only_orders(&reply) {
            // «Ошибка в значении узла <Документ>.<ХозОперация>»: no success
            return Err(SiteError::Protocol {
                mode: "query".into(),
                reply: "a document that is not «Заказ товара»: 1C's order load aborts".into(),
            });
        }
        self.success().await?;
        if kill == Some(Kill::AfterQuery) {
            return Ok(reply);
        }
        let Some((name, bytes)) = file else {
            return Ok(reply);
        };
        self.checkauth("sale").await?;
        self.init("sale").await?;
        let (upload_name, payload) = if self.zip {
            let mut buf = std::io::Cursor::new(Vec::new());
            {
                let mut zip = zip::ZipWriter::new(&mut buf);
                zip.start_file(name, zip::write::SimpleFileOptions::default())
                    .map_err(|e| SiteError::Zip(e.to_string()))?;
                zip.write_all(bytes).map_err(|e| SiteError::Zip(e.to_string()))?;
                zip.finish().map_err(|e| SiteError::Zip(e.to_string()))?;
            }
            ("v8_8F3A_1c.zip".to_string(), buf.into_inner())
        } else {
            (name.to_string(), bytes.to_vec())
        };
        if kill == Some(Kill::AfterFirstChunk) {
            let cut = (payload.len() / 2).max(1).min(self.file_limit.max(1));
            let first = &payload[..cut.min(payload.len())];
            let req = self
                .request(reqwest::Method::POST, "sale", "file", Some(&upload_name))
                .body(first.to_vec());
            self.call(req, "file").await?;
            return Ok(reply);
        }
        self.upload("sale", &upload_name, &payload).await?;
        if self.edition != Edition::Unf {
            self.import("sale", name).await?;
        }
        Ok(reply)
    }
}

/// Whether every `Документ` of a `query` reply is «Заказ товара», the only kind 1C loads
/// (UT `OS:4205-4217`). A reply with no documents is fine (`:4020-4024`).
pub fn only_orders(reply: &[u8]) -> bool {
    let text = String::from_utf8_lossy(reply);
    let documents = text.matches("<Документ>").count();
    let orders = text.matches("<ХозОперация>Заказ товара</ХозОперация>").count();
    documents == orders
}
