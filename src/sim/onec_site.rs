//! 1C's side of «Обмен с сайтом», for tests and the demo: drives a site-exchange server the
//! way 1C does (spec section B), so kopilka's endpoint is checked against the protocol and
//! not against itself.
//!
//! A session is `checkauth` (HTTP Basic) → `init` (read `zip=` and `file_limit=`) → `file`
//! uploads in chunks no larger than `file_limit` (one `.zip` when the server asked for
//! zip) → `import` per file, repeated while the server answers `progress`; for sales also
//! `query` → `success`.

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
    /// Send `sessid=` on every call after `checkauth`, as newer 1C releases do.
    pub send_sessid: bool,
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
        }
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
        if self.send_sessid
            && mode != "checkauth"
            && let Some(s) = &self.sessid
        {
            query.push(("sessid", s.clone()));
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

    pub async fn query(&mut self) -> Result<Vec<u8>, SiteError> {
        let req = self.request(reqwest::Method::GET, "sale", "query", None);
        Ok(req.send().await?.bytes().await?.to_vec())
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
}
