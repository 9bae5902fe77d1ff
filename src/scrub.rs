//! What an upstream said, made safe to keep.
//!
//! An OData base behind a misconfigured proxy, or an AmoCRM edge answering an error, may
//! echo the request back: its headers (`Authorization: Basic …` with 1C's user and
//! password, `Bearer …` with the AmoCRM token, cookies), its query string or a form body.
//! Whatever kopilka keeps of an upstream body — in logs, in error messages, in
//! `outbox.last_error`, on `/status` and `/healthz` — passes through [`upstream_excerpt`]:
//! at most a bounded prefix, on one line, with every credential-shaped value replaced by
//! `[removed]`. One function, so every connector removes the same things:
//!
//! - the credential after `Basic`, `Bearer`, `Digest`, `Negotiate`, `NTLM`, `OAuth`
//!   (case-insensitive), wherever it stands;
//! - the value of any field whose name says it is secret (`authorization`, `cookie`,
//!   `set-cookie`, `password`, `passwd`, `pwd`, `secret`, `token`, `api_key`, `apikey`,
//!   `session`, `code`, …) written as `name: value`, `name=value` or `"name": "value"`;
//! - the user name and password of a URL (`scheme://user:pass@host`);
//! - anything shaped like a JWT (AmoCRM's long-lived tokens are JWTs).
//!
//! It errs on removing too much: the excerpt is for a person to see what kind of answer
//! came, not to reconstruct it.

/// Characters of an upstream body shown or stored, at most.
pub const MAX_EXCERPT_CHARS: usize = 300;
/// Bytes of a body looked at; nothing past them can reach the excerpt.
const MAX_SCANNED_BYTES: usize = 64 << 10;
const REMOVED: &str = "[removed]";

/// Authentication schemes whose next word is a credential.
const SCHEMES: &[&str] = &["basic", "bearer", "digest", "negotiate", "ntlm", "oauth"];
/// Field names (lower case, `-` and `_` alike) whose value is a secret; a name containing
/// one of these counts (`x-api-key`, `refresh_token`, `client_secret`, `PHPSESSID`).
const SECRET_NAMES: &[&str] = &[
    "authorization",
    "cookie",
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "apikey",
    "api_key",
    "session",
    "sessid",
    "credential",
    "signature",
];
/// Field names that are secret only as a whole word (`code` of an OAuth exchange).
const SECRET_WORDS: &[&str] = &["code", "key", "auth", "pass"];

/// A bounded, scrubbed, one-line excerpt of an upstream body (see the module comment).
/// `max_chars` caps the characters kept (an ellipsis marks a cut).
pub fn upstream_excerpt(body: &str, max_chars: usize) -> String {
    let mut end = body.len().min(MAX_SCANNED_BYTES);
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    let clean = scrub(&body[..end]);
    let flat: String = clean
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut out: String = flat.chars().take(max_chars).collect();
    if flat.chars().count() > max_chars || end < body.len() {
        out.push('…');
    }
    out
}

/// `text` with every credential-shaped value replaced (see the module comment); the
/// length is not bounded here.
pub fn scrub(text: &str) -> String {
    let text = userinfo(text);
    let mut out = String::with_capacity(text.len());
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if is_word(c) && (i == 0 || !is_word(chars[i - 1])) {
            let start = i;
            while i < chars.len() && is_word(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            out.push_str(&word);
            if jwt_like(&word) {
                out.truncate(out.len() - word.len());
                out.push_str(REMOVED);
                continue;
            }
            let lower = word.to_lowercase().replace('-', "_");
            if SCHEMES.contains(&lower.as_str()) && chars.get(i) == Some(&' ') {
                // `Basic dXNlcjpwYXNz`: drop the credential that follows
                let mut j = i;
                while chars.get(j) == Some(&' ') {
                    j += 1;
                }
                let value_end = value_end(&chars, j, false);
                if value_end > j {
                    out.push(' ');
                    out.push_str(REMOVED);
                    i = value_end;
                }
                continue;
            }
            if secret_name(&lower) {
                // `name: value`, `name=value`, `"name": "value"`, `<td>name</td><td>value`
                let mut j = i;
                let mut quoted = false;
                if chars.get(j) == Some(&'"') || chars.get(j) == Some(&'\'') {
                    out.push(chars[j]);
                    j += 1;
                }
                while chars.get(j).is_some_and(|c| *c == ' ' || *c == '\t') {
                    out.push(chars[j]);
                    j += 1;
                }
                match chars.get(j) {
                    Some(':' | '=') => {
                        out.push(chars[j]);
                        j += 1;
                    }
                    _ => {
                        // an HTML table cell after the name: skip markup to the next text
                        if let Some(k) = next_cell(&chars, j) {
                            out.extend(&chars[j..k]);
                            j = k;
                        } else {
                            i = j;
                            continue;
                        }
                    }
                }
                while chars.get(j).is_some_and(|c| *c == ' ' || *c == '\t') {
                    out.push(chars[j]);
                    j += 1;
                }
                if chars.get(j) == Some(&'"') || chars.get(j) == Some(&'\'') {
                    out.push(chars[j]);
                    j += 1;
                    quoted = true;
                }
                let end = value_end(
                    &chars,
                    j,
                    quoted || lower.contains("cookie") || lower == "authorization",
                );
                if end > j {
                    out.push_str(REMOVED);
                }
                i = end;
                continue;
            }
            continue;
        }
        out.push(c);
        i += 1;
    }
    out
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '-' || c == '.'
}

fn secret_name(lower: &str) -> bool {
    let compact = lower.replace('_', "");
    SECRET_NAMES
        .iter()
        .any(|n| lower.contains(n) || compact.contains(&n.replace('_', "")))
        || SECRET_WORDS.contains(&lower)
}

/// Where a value starting at `from` ends: at a quote, `&`, `,`, `;`, `<`, a line end or
/// whitespace (`to_line`: spaces and `;` belong to it, as in `Cookie: a=1; b=2` and
/// `Authorization: Basic xyz`).
fn value_end(chars: &[char], from: usize, to_line: bool) -> usize {
    let mut j = from;
    while let Some(&c) = chars.get(j) {
        let stop = match c {
            '"' | '\'' | '&' | '<' | '\n' | '\r' | '}' | ']' => true,
            ',' => !to_line,
            ';' | ' ' | '\t' => !to_line,
            _ => false,
        };
        if stop {
            break;
        }
        j += 1;
    }
    j
}

/// After a table cell holding a secret name: the start of the next cell's text, if the
/// markup between is only tags and blanks.
fn next_cell(chars: &[char], from: usize) -> Option<usize> {
    let mut j = from;
    let mut saw_tag = false;
    loop {
        match chars.get(j) {
            Some('<') => {
                while chars.get(j).is_some_and(|c| *c != '>') {
                    j += 1;
                }
                j += 1;
                saw_tag = true;
            }
            Some(c) if c.is_whitespace() => j += 1,
            Some(_) if saw_tag => return Some(j),
            _ => return None,
        }
    }
}

/// Three base64url parts separated by dots, the first starting with `eyJ` (`{"`).
fn jwt_like(word: &str) -> bool {
    let parts: Vec<&str> = word.split('.').collect();
    parts.len() == 3
        && parts[0].starts_with("eyJ")
        && parts.iter().all(|p| {
            p.len() >= 4
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

/// `scheme://user:pass@host` → `scheme://[removed]@host`.
fn userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let auth_end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == '"' || c == '<')
            .unwrap_or(tail.len());
        match tail[..auth_end].rfind('@') {
            Some(a) => {
                out.push_str(REMOVED);
                rest = &tail[a..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, secrets: &[&str], kept: &[&str]) {
        let out = upstream_excerpt(input, 10_000);
        for s in secrets {
            assert!(!out.contains(s), "{s:?} survived in {out:?}");
        }
        for k in kept {
            assert!(out.contains(k), "{k:?} lost from {out:?}");
        }
    }

    #[test]
    fn header_echoes_lose_their_credentials() {
        check(
            "GET /odata HTTP/1.1\r\nAuthorization: Basic b2RhdGE6czNjcjN0\r\nCookie: ibsession=abc123; other=x\r\nHost: 1c\r\n",
            &["b2RhdGE6czNjcjN0", "abc123", "other=x"],
            &["Authorization", "Host: 1c", "GET /odata"],
        );
        check(
            r#"{"headers":{"authorization":"Bearer eyJhbGciOi.eyJzdWIiOjF9.c2lnbmF0dXJl","X-Api-Key":"k-42","Accept":"application/json"}}"#,
            &["eyJhbGciOi", "c2lnbmF0dXJl", "k-42"],
            &["Accept", "application/json"],
        );
        check(
            "<table><tr><td>Authorization</td><td>Basic dXNlcjpwYXNz</td></tr><tr><td>Set-Cookie</td><td>s=1</td></tr></table>",
            &["dXNlcjpwYXNz", "s=1"],
            &["Authorization"],
        );
        check(
            "grant_type=refresh_token&refresh_token=r3fr3sh&client_secret=cl13nt&code=0c0de&redirect_uri=https://x",
            &["r3fr3sh", "cl13nt", "0c0de"],
            &["grant_type", "redirect_uri"],
        );
        check(
            "proxy error for http://odata:hunter2@1c.local/base/odata",
            &["hunter2", "odata:"],
            &["1c.local/base/odata"],
        );
        check(
            "token eyJhbGciOiJIUzI1NiJ9.eyJpZCI6MX0.sig_nat-ure",
            &["sig_nat-ure"],
            &["token"],
        );
    }

    #[test]
    fn ordinary_errors_stay_readable_and_bounded() {
        check(
            r#"{"odata.error":{"code":"-1","message":{"lang":"ru","value":"Не удалось провести документ"}}}"#,
            &[],
            &["Не удалось провести документ", "odata.error"],
        );
        let long = "ошибка ".repeat(1000);
        let out = upstream_excerpt(&long, 50);
        assert_eq!(out.chars().count(), 51);
        assert!(out.ends_with('…'));
        assert_eq!(upstream_excerpt("a\nb\r\nc\0d", 100), "a b  c d");
    }
}
