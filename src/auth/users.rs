//! The users file: who may log in to the proxy and with which secret. Format in
//! docs/USERS_FILE.md. Errors name the line and the problem but never the secret.

use super::md5::is_md5_hash;
use super::verifier::ScramVerifier;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// A stored credential.
#[derive(Clone)]
pub enum Secret {
    /// Cleartext password: serves every method and lets the proxy log in upstream as the user.
    Plain(String),
    /// PostgreSQL MD5 form: "md5" + hex(md5(password + user)).
    Md5(String),
    Scram(ScramVerifier),
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Secret::Plain(_) => "Plain(..)",
            Secret::Md5(_) => "Md5(..)",
            Secret::Scram(_) => "Scram(..)",
        })
    }
}

impl Secret {
    /// Classifies a secret the way PostgreSQL classifies `pg_authid.rolpassword`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if ScramVerifier::looks_like(s) {
            return ScramVerifier::parse(s).map(Secret::Scram);
        }
        let lower = s.to_ascii_lowercase();
        if is_md5_hash(&lower) && s.starts_with("md5") {
            return Ok(Secret::Md5(lower));
        }
        if s.is_empty() {
            return Err("empty password".into());
        }
        if s.contains('\0') {
            return Err("password contains a NUL byte".into());
        }
        Ok(Secret::Plain(s.to_owned()))
    }
}

#[derive(Clone, Debug)]
pub struct UserEntry {
    pub name: String,
    pub secret: Secret,
    /// For Plain secrets: a verifier derived once at load, so a login costs no PBKDF2.
    derived_scram: Option<ScramVerifier>,
}

impl UserEntry {
    /// Builds an entry; for a cleartext password this derives its SCRAM verifier (4096
    /// iterations, random salt), which takes a few milliseconds.
    pub fn new(name: impl Into<String>, secret: Secret) -> Self {
        let derived_scram = match &secret {
            Secret::Plain(p) => Some(ScramVerifier::generate(p)),
            _ => None,
        };
        UserEntry {
            name: name.into(),
            secret,
            derived_scram,
        }
    }

    /// The cleartext password, needed to log in upstream as this user.
    pub fn plain_password(&self) -> Option<&str> {
        match &self.secret {
            Secret::Plain(p) => Some(p),
            _ => None,
        }
    }

    /// The verifier for a SCRAM-SHA-256 login, stored or derived.
    pub fn scram_verifier(&self) -> Option<&ScramVerifier> {
        match &self.secret {
            Secret::Scram(v) => Some(v),
            _ => self.derived_scram.as_ref(),
        }
    }

    /// The "md5..." hash for an MD5 login, stored or computed from the cleartext.
    pub fn md5_hash(&self) -> Option<String> {
        match &self.secret {
            Secret::Plain(p) => Some(super::md5::md5_stored(p, &self.name)),
            Secret::Md5(h) => Some(h.clone()),
            Secret::Scram(_) => None,
        }
    }
}

/// Users allowed to log in to the proxy. Cheap to clone (shared, immutable).
#[derive(Clone, Debug, Default)]
pub struct UserStore {
    users: Arc<HashMap<String, UserEntry>>,
}

impl UserStore {
    pub fn empty() -> Self {
        Self::default()
    }

    /// Reads and parses a users file. The error is one line: file, line number, problem.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("users file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("users file {}, {e}", path.display()))
    }

    /// Parses users-file text; errors read "line N: problem".
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut users: HashMap<String, UserEntry> = HashMap::new();
        let mut first_seen: HashMap<String, usize> = HashMap::new();
        for (idx, raw) in text.lines().enumerate() {
            let lineno = idx + 1;
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let (name, secret) =
                parse_line(line).map_err(|problem| format!("line {lineno}: {problem}"))?;
            validate_name(&name).map_err(|problem| format!("line {lineno}: {problem}"))?;
            let secret = Secret::parse(&secret)
                .map_err(|problem| format!("line {lineno}: user \"{name}\": {problem}"))?;
            if let Some(prev) = first_seen.get(&name) {
                return Err(format!(
                    "line {lineno}: user \"{name}\" is already defined on line {prev}"
                ));
            }
            first_seen.insert(name.clone(), lineno);
            users.insert(name.clone(), UserEntry::new(name, secret));
        }
        Ok(UserStore {
            users: Arc::new(users),
        })
    }

    pub fn get(&self, user: &str) -> Option<&UserEntry> {
        self.users.get(user)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// User names, sorted (for diagnostics; never secrets).
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.users.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }
}

fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty user name".into());
    }
    if name.chars().any(char::is_control) {
        return Err("user name contains a control character".into());
    }
    // PostgreSQL truncates identifiers to 63 bytes; a longer name could never log in.
    if name.len() > 63 {
        return Err("user name is longer than 63 bytes".into());
    }
    Ok(())
}

/// One non-comment line: `name:secret` or `"name" "secret"`.
fn parse_line(line: &str) -> Result<(String, String), String> {
    let trimmed = line.trim_start();
    if trimmed.starts_with('"') {
        let (name, rest) = take_quoted(trimmed).map_err(|p| format!("user name: {p}"))?;
        let rest = rest.trim_start();
        if rest.is_empty() {
            return Err(format!(
                "user \"{name}\": missing secret after the user name"
            ));
        }
        let (secret, rest) =
            take_quoted(rest).map_err(|p| format!("user \"{name}\": secret: {p}"))?;
        if !rest.trim().is_empty() {
            return Err(format!(
                "user \"{name}\": unexpected text after the quoted secret"
            ));
        }
        return Ok((name, secret));
    }
    let (name, secret) = line.split_once(':').ok_or(
        "expected `name:secret` or `\"name\" \"secret\"` (no ':' found after the user name)",
    )?;
    Ok((name.trim().to_owned(), secret.to_owned()))
}

/// Reads a double-quoted field at the start of `s`; `""` stands for one `"`.
fn take_quoted(s: &str) -> Result<(String, &str), String> {
    let body = s
        .strip_prefix('"')
        .ok_or("expected a double-quoted field")?;
    let mut out = String::new();
    let mut chars = body.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '"' {
            if let Some(&(_, '"')) = chars.peek() {
                chars.next();
                out.push('"');
                continue;
            }
            return Ok((out, &body[i + 1..]));
        }
        out.push(c);
    }
    Err("missing closing double quote".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAM: &str = "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0$\
        AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    #[test]
    fn auth_users_file_good_lines() {
        let text = format!(
            "# comment\n\n   \n  # indented comment\nalice:s3cret:with:colons\n\
             bob:md5{md5}\r\n\"carol\" \"{SCRAM}\"\n\"da\"\"ve\"   \"pa ss\"\"w\"  \n\
             erin: leading space\nfrank:MD5{upper}\n",
            md5 = "0123456789abcdef0123456789abcdef",
            upper = "0123456789ABCDEF0123456789ABCDEF",
        );
        let s = UserStore::parse(&text).unwrap();
        assert_eq!(s.len(), 6);
        assert_eq!(
            s.get("alice").unwrap().plain_password(),
            Some("s3cret:with:colons")
        );
        assert!(s.get("alice").unwrap().scram_verifier().is_some());
        assert!(matches!(&s.get("bob").unwrap().secret, Secret::Md5(h) if h.len() == 35));
        assert!(s.get("bob").unwrap().plain_password().is_none());
        assert!(matches!(s.get("carol").unwrap().secret, Secret::Scram(_)));
        assert_eq!(s.get("da\"ve").unwrap().plain_password(), Some("pa ss\"w"));
        assert_eq!(
            s.get("erin").unwrap().plain_password(),
            Some(" leading space")
        );
        // "MD5" upper-case prefix is not PostgreSQL's hash form: it stays a password.
        assert!(s.get("frank").unwrap().plain_password().is_some());
        assert!(s.get("nobody").is_none());
        assert!(UserStore::empty().is_empty());
    }

    #[test]
    fn auth_users_file_bad_lines_name_line_and_hide_secret() {
        let cases: &[(&str, &str)] = &[
            ("ok:pw\nnocolonhere\n", "line 2: expected"),
            ("ok:pw\n:topsecret\n", "line 2: empty user name"),
            ("alice:\n", "line 1: user \"alice\": empty password"),
            (
                "a:x\n\n# c\na:topsecret\n",
                "line 4: user \"a\" is already defined on line 1",
            ),
            (
                "\"alice\" \"topsecret\n",
                "line 1: user \"alice\": secret: missing closing",
            ),
            ("\"alice topsecret\n", "line 1: user name: missing closing"),
            ("\"alice\"\n", "line 1: user \"alice\": missing secret"),
            (
                "\"alice\" \"topsecret\" extra\n",
                "line 1: user \"alice\": unexpected text",
            ),
            (
                "\"alice\" topsecret\n",
                "line 1: user \"alice\": secret: expected a double-quoted",
            ),
            (
                "x:SCRAM-SHA-256$4096:topsecret\n",
                "line 1: user \"x\": SCRAM verifier lacks",
            ),
            (
                "bell\u{7}:topsecret\n",
                "line 1: user name contains a control",
            ),
        ];
        for (text, want) in cases {
            let err = UserStore::parse(text).unwrap_err();
            assert!(err.starts_with(want), "{text:?}: {err}");
            assert!(!err.contains("topsecret"), "secret leaked: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
        let long = format!("{}:pw", "u".repeat(64));
        assert!(UserStore::parse(&long).unwrap_err().contains("63 bytes"));
    }

    #[test]
    fn auth_users_file_load_names_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.txt");
        std::fs::write(&path, "a:pw\nb\n").unwrap();
        let err = UserStore::load(&path).unwrap_err();
        assert!(err.contains("users.txt") && err.contains("line 2"), "{err}");
        std::fs::write(&path, "a:pw\nb:pw2\n").unwrap();
        assert_eq!(UserStore::load(&path).unwrap().names(), vec!["a", "b"]);
        let missing = UserStore::load(&dir.path().join("nope")).unwrap_err();
        assert!(missing.contains("nope"), "{missing}");
    }

    #[test]
    fn auth_md5_entry_from_plain_matches_postgres() {
        let s = UserStore::parse("alice:secret").unwrap();
        assert_eq!(
            s.get("alice").unwrap().md5_hash().unwrap(),
            super::super::md5::md5_stored("secret", "alice")
        );
    }
}
