//! Device authentication and authorisation: the users file (argon2id password hashes),
//! and `[[auth.acl]]` topic permissions with `{username}`, `{client_id}` and `{cn}`
//! placeholders.
//!
//! Decided once per connection at CONNECT ([`Security::authenticate`] and
//! [`Security::grants`]); each PUBLISH and SUBSCRIBE is then checked against the
//! connection's [`Grants`] by the device connection (`connection.rs`).

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use anyhow::Context;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use parking_lot::Mutex;
use ring::hmac;

use crate::topic::TopicFilter;

/// Who a device is, as far as the gateway can tell at CONNECT.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The MQTT username, once its password was verified (or any username when no users
    /// file is configured).
    pub username: Option<String>,
    pub client_id: String,
    /// The verified client certificate's CN, or its first SAN without a CN.
    pub cn: Option<String>,
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Wrong or unknown username/password (CONNACK "bad user name or password").
    BadCredentials,
    /// No credentials where the listener requires them (CONNACK "not authorized").
    Anonymous,
}

/// A digest of a users file's text, to tell whether the file changed since it was read.
pub fn text_digest(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// The users file: `username = "$argon2id$…"` per line (TOML).
pub struct Users {
    hashes: HashMap<String, String>,
    /// Passwords verified since start, as an HMAC under a key made at start: a device
    /// that reconnects does not pay for argon2 again. Never holds a password.
    verified: Mutex<HashMap<String, hmac::Tag>>,
    cache_key: hmac::Key,
    /// A digest of the text it was read from: tells a changed file from the same one.
    digest: u64,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hashes are secrets too: only the user names.
        let mut names: Vec<&String> = self.hashes.keys().collect();
        names.sort();
        f.debug_struct("Users").field("names", &names).finish()
    }
}

impl Users {
    /// Parses the users file's text; errors name the user at fault.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        // toml's own error quotes the line, which holds a hash: only where and what.
        let table: BTreeMap<String, String> = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .and_then(|span| text.get(..span.start))
                .map_or(1, |before| before.matches('\n').count() + 1);
            anyhow::anyhow!(
                "line {line}: {} (want a TOML table of username = \"$argon2id$…\")",
                e.message()
            )
        })?;
        let mut hashes = HashMap::new();
        for (user, hash) in table {
            let parsed = PasswordHash::new(&hash)
                .map_err(|e| anyhow::anyhow!("user {user:?}: not a password hash ({e})"))?;
            if parsed.algorithm.as_str() != "argon2id" {
                anyhow::bail!(
                    "user {user:?}: hash algorithm {} (only argon2id is accepted)",
                    parsed.algorithm
                );
            }
            hashes.insert(user, hash);
        }
        let rng = ring::rand::SystemRandom::new();
        let cache_key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map_err(|_| anyhow::anyhow!("no system randomness for the password cache key"))?;
        Ok(Self {
            hashes,
            verified: Mutex::new(HashMap::new()),
            cache_key,
            digest: text_digest(text),
        })
    }

    /// The digest of the text these users were read from (see `text_digest`).
    pub fn digest(&self) -> u64 {
        self.digest
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Checks `password` for `user`. The argon2 work (tens of milliseconds) is done only
    /// for a password not verified before.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        let Some(hash) = self.hashes.get(user) else {
            return false;
        };
        let cached = self.verified.lock().get(user).cloned();
        if cached
            .is_some_and(|known| hmac::verify(&self.cache_key, password, known.as_ref()).is_ok())
        {
            return true;
        }
        let ok = PasswordHash::new(hash)
            .map(|parsed| Argon2::default().verify_password(password, &parsed).is_ok())
            .unwrap_or(false);
        if ok {
            let tag = hmac::sign(&self.cache_key, password);
            self.verified.lock().insert(user.to_string(), tag);
        }
        ok
    }
}

/// Hashes `password` with argon2id and a random salt (PHC string).
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))
}

/// `edgebridge passwd FILE USER PASSWORD`: adds or replaces `user` in the users file,
/// creating it (mode 0600) when missing. The file is replaced atomically.
pub fn set_password(path: &Path, user: &str, password: &str) -> anyhow::Result<bool> {
    if user.is_empty() || user.contains(['\0', '\n']) {
        anyhow::bail!("a user name must be non-empty and on one line");
    }
    if password.is_empty() {
        anyhow::bail!("the password must not be empty");
    }
    let mut table: BTreeMap<String, String> = match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text)
            .with_context(|| format!("{} is not a users file", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let existed = table
        .insert(user.to_string(), hash_password(password)?)
        .is_some();
    let text = toml::to_string(&table).context("cannot encode the users file")?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "users".into())
    ));
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(
            b"# edgebridge device users: name = argon2id hash. Edit with `edgebridge passwd`.\n",
        )?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(existed)
}

/// A `*` glob over a whole string (`*` matches any run of characters, `/` included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn new(pattern: &str) -> Self {
        Self(pattern.to_string())
    }

    pub fn pattern(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, text: &str) -> bool {
        let mut parts = self.0.split('*');
        let first = parts.next().unwrap_or("");
        let Some(mut rest) = text.strip_prefix(first) else {
            return false;
        };
        let parts: Vec<&str> = parts.collect();
        let Some((last, middle)) = parts.split_last() else {
            return rest.is_empty(); // no `*` at all: the prefix was the whole pattern
        };
        for part in middle {
            match rest.find(part) {
                Some(i) => rest = &rest[i + part.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last)
    }
}

/// One `[[auth.acl]]` entry: applies to devices matching every selector given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclEntry {
    pub user: Option<Glob>,
    pub cn: Option<Glob>,
    pub client_id: Option<Glob>,
    /// Filter patterns, placeholders not yet filled in.
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

impl AclEntry {
    fn applies_to(&self, who: &Identity) -> bool {
        let ok = |glob: &Option<Glob>, value: Option<&str>| match (glob, value) {
            (None, _) => true,
            (Some(g), Some(v)) => g.matches(v),
            (Some(_), None) => false,
        };
        ok(&self.user, who.username.as_deref())
            && ok(&self.cn, who.cn.as_deref())
            && ok(&self.client_id, Some(&who.client_id))
    }
}

/// The placeholders an ACL pattern may use.
pub const PLACEHOLDERS: [&str; 3] = ["{username}", "{client_id}", "{cn}"];

/// Fills in `pattern`'s placeholders. `None` when one of them has no value for this
/// device, or a value that would widen the filter (`+ # /`) or is empty.
fn fill(pattern: &str, who: &Identity) -> Option<String> {
    let mut out = pattern.to_string();
    for (name, value) in [
        ("{username}", who.username.as_deref()),
        ("{client_id}", Some(who.client_id.as_str())),
        ("{cn}", who.cn.as_deref()),
    ] {
        if out.contains(name) {
            let v = value.filter(|v| !v.is_empty() && !v.contains(['+', '#', '/', '\0']))?;
            out = out.replace(name, v);
        }
    }
    Some(out)
}

/// Checks an ACL pattern at load: placeholders filled with a sample value, it must be a
/// valid topic filter.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    let sample = Identity {
        username: Some("u".into()),
        client_id: "c".into(),
        cn: Some("n".into()),
    };
    let filled = fill(pattern, &sample).unwrap_or_default();
    if let Some(open) = filled.find('{') {
        let name: String = filled[open..].chars().take_while(|c| *c != '}').collect();
        return Err(format!(
            "unknown placeholder {name}}} (use {})",
            PLACEHOLDERS.join(", ")
        ));
    }
    TopicFilter::parse(&filled)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Users and ACLs in force.
#[derive(Debug, Default)]
pub struct Security {
    pub users: Option<Users>,
    /// Where `users` was read from; read again while running when it changes.
    pub users_file: Option<PathBuf>,
    pub acl: Vec<AclEntry>,
}

/// What one connection may do.
#[derive(Debug, Clone)]
pub enum Grants {
    /// No ACL is configured: everything.
    All,
    /// Only these (everything else is denied).
    Only {
        publish: Vec<TopicFilter>,
        subscribe: Vec<TopicFilter>,
    },
}

impl Security {
    /// Checks a CONNECT's credentials. `anonymous_ok` is the listener's
    /// `allow_anonymous`; a verified client certificate counts as credentials. Returns
    /// the username to use in ACLs.
    pub fn authenticate(
        &self,
        login: Option<(&str, &[u8])>,
        has_certificate: bool,
        anonymous_ok: bool,
    ) -> Result<Option<String>, Refusal> {
        match (login, &self.users) {
            // A username with no users file to check it against: accepted as given
            // (config validation forbids ACLs that trust usernames in that case).
            (Some((user, _)), None) => Ok(Some(user.to_string())),
            (Some((user, password)), Some(users)) => {
                if users.verify(user, password) {
                    Ok(Some(user.to_string()))
                } else {
                    Err(Refusal::BadCredentials)
                }
            }
            (None, _) if has_certificate || anonymous_ok => Ok(None),
            (None, _) => Err(Refusal::Anonymous),
        }
    }

    /// The permissions of a device once authenticated.
    pub fn grants(&self, who: &Identity) -> Grants {
        if self.acl.is_empty() {
            return Grants::All;
        }
        let mut publish = Vec::new();
        let mut subscribe = Vec::new();
        for entry in self.acl.iter().filter(|e| e.applies_to(who)) {
            let filters = |patterns: &[String], into: &mut Vec<TopicFilter>| {
                for p in patterns {
                    if let Some(f) = fill(p, who).and_then(|s| TopicFilter::parse(&s).ok()) {
                        into.push(f);
                    }
                }
            };
            filters(&entry.publish, &mut publish);
            filters(&entry.subscribe, &mut subscribe);
        }
        Grants::Only { publish, subscribe }
    }
}

impl Grants {
    pub fn may_publish(&self, topic: &str) -> bool {
        match self {
            Grants::All => true,
            Grants::Only { publish, .. } => publish.iter().any(|f| f.matches(topic)),
        }
    }

    /// A subscription is allowed when one granted filter covers every topic it matches.
    /// `$share/{group}/` is looked through.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        match self {
            Grants::All => true,
            Grants::Only { subscribe, .. } => {
                let filter = shared_subscription_filter(filter);
                match TopicFilter::parse(filter) {
                    Ok(requested) => subscribe.iter().any(|g| g.covers(&requested)),
                    Err(_) => false,
                }
            }
        }
    }
}

/// The topic filter of a possibly shared subscription (`$share/group/a/b` → `a/b`).
fn shared_subscription_filter(filter: &str) -> &str {
    filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .map_or(filter, |(_, f)| f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(user: Option<&str>, client_id: &str, cn: Option<&str>) -> Identity {
        Identity {
            username: user.map(Into::into),
            client_id: client_id.into(),
            cn: cn.map(Into::into),
        }
    }

    #[test]
    fn globs() {
        for (pattern, text, expected) in [
            ("plc-*", "plc-7", true),
            ("plc-*", "plc-", true),
            ("plc-*", "pl", false),
            ("*-line2", "press-line2", true),
            ("*-line2", "press-line3", false),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "acb", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("*", "", true),
            ("a*a", "a", false),
        ] {
            assert_eq!(
                Glob::new(pattern).matches(text),
                expected,
                "{pattern} {text}"
            );
        }
    }

    #[test]
    fn password_hashes_verify_and_the_cache_never_accepts_a_wrong_password() {
        let hash = hash_password("s3cret").expect("hash");
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        let users = Users::parse(&format!("plc-7 = {hash:?}\n")).expect("parse");
        assert!(users.verify("plc-7", b"s3cret"));
        // Now cached: still exact.
        assert!(users.verify("plc-7", b"s3cret"));
        assert!(!users.verify("plc-7", b"s3cret "));
        assert!(!users.verify("plc-7", b""));
        assert!(!users.verify("plc-8", b"s3cret"));
    }

    #[test]
    fn users_file_errors_name_the_user_and_refuse_other_algorithms() {
        let e = Users::parse("a = \"plain-text\"").expect_err("not a hash");
        assert!(e.to_string().contains("user \"a\""), "{e}");
        let pbkdf = "$pbkdf2-sha256$i=1000$c2FsdHNhbHQ$ZGlnZXN0ZGlnZXN0ZGlnZXN0";
        let e = Users::parse(&format!("a = {pbkdf:?}")).expect_err("algorithm");
        assert!(e.to_string().contains("only argon2id"), "{e}");
        assert!(Users::parse("not toml").is_err());
        // A syntax error names the line, never quotes it (it holds a hash).
        let hash = hash_password("pw").expect("hash");
        let e = Users::parse(&format!("a = {hash:?}\nb = \"{}", &hash[..20])).expect_err("toml");
        let shown = format!("{e:#}");
        assert!(shown.contains("line 2"), "{shown}");
        assert!(!shown.contains(&hash[..20]), "{shown}");
    }

    #[test]
    fn set_password_adds_and_replaces_users_in_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("users.toml");
        assert!(!set_password(&path, "a", "one").expect("add"));
        assert!(!set_password(&path, "b", "two").expect("add"));
        assert!(set_password(&path, "a", "three").expect("replace"));
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(!text.contains("three") && !text.contains("two"), "{text}");
        let users = Users::load(&path).expect("load");
        assert_eq!(users.len(), 2);
        assert!(users.verify("a", b"three"));
        assert!(!users.verify("a", b"one"));
        assert!(users.verify("b", b"two"));
        assert!(set_password(&path, "", "x").is_err());
        assert!(set_password(&path, "c", "").is_err());
    }

    #[test]
    fn authentication_table() {
        let hash = hash_password("pw").expect("hash");
        let with_users = Security {
            users: Some(Users::parse(&format!("u = {hash:?}")).expect("users")),
            users_file: None,
            acl: Vec::new(),
        };
        let open = Security::default();
        let login = |u: &'static str, p: &'static str| Some((u, p.as_bytes()));
        // (security, login, certificate, allow_anonymous, expected)
        type Row<'a> = (
            &'a Security,
            Option<(&'a str, &'a [u8])>,
            bool,
            bool,
            Result<Option<String>, Refusal>,
        );
        let table: [Row; 9] = [
            (
                &with_users,
                login("u", "pw"),
                false,
                false,
                Ok(Some("u".into())),
            ),
            (
                &with_users,
                login("u", "nope"),
                false,
                true,
                Err(Refusal::BadCredentials),
            ),
            (
                &with_users,
                login("x", "pw"),
                false,
                true,
                Err(Refusal::BadCredentials),
            ),
            (&with_users, None, false, false, Err(Refusal::Anonymous)),
            (&with_users, None, false, true, Ok(None)),
            (&with_users, None, true, false, Ok(None)),
            (
                &with_users,
                login("u", "nope"),
                true,
                false,
                Err(Refusal::BadCredentials),
            ),
            (&open, None, false, true, Ok(None)),
            (
                &open,
                login("any", "thing"),
                false,
                false,
                Ok(Some("any".into())),
            ),
        ];
        for (i, (security, login, cert, anonymous, expected)) in table.into_iter().enumerate() {
            assert_eq!(
                security.authenticate(login, cert, anonymous),
                expected,
                "row {i}"
            );
        }
    }

    fn entry(user: Option<&str>, publish: &[&str], subscribe: &[&str]) -> AclEntry {
        AclEntry {
            user: user.map(Glob::new),
            cn: None,
            client_id: None,
            publish: publish.iter().map(|s| s.to_string()).collect(),
            subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn acl_placeholders_and_default_deny() {
        let security = Security {
            users: None,
            users_file: None,
            acl: vec![
                entry(None, &["plant/{username}/#"], &["cmd/{client_id}/#"]),
                AclEntry {
                    cn: Some(Glob::new("press-*")),
                    ..entry(None, &["press/{cn}/+"], &[])
                },
                entry(Some("admin"), &["#"], &["#"]),
            ],
        };
        let plc = security.grants(&who(Some("plc7"), "dev-1", None));
        assert!(plc.may_publish("plant/plc7/temp"));
        assert!(plc.may_publish("plant/plc7"));
        assert!(!plc.may_publish("plant/plc8/temp"));
        assert!(!plc.may_publish("other"));
        assert!(plc.may_subscribe("cmd/dev-1/#"));
        assert!(plc.may_subscribe("cmd/dev-1/reset"));
        assert!(plc.may_subscribe("cmd/dev-1/+/x"));
        assert!(!plc.may_subscribe("cmd/dev-2/#"));
        assert!(!plc.may_subscribe("cmd/+/#"));
        assert!(!plc.may_subscribe("#"));
        assert!(plc.may_subscribe("$share/g/cmd/dev-1/x"));
        assert!(!plc.may_subscribe("$share/g/cmd/dev-2/x"));

        // No username: the `{username}` pattern grants nothing.
        let anon = security.grants(&who(None, "dev-2", None));
        assert!(!anon.may_publish("plant//temp"));
        assert!(anon.may_subscribe("cmd/dev-2/x"));

        // A username with wildcard characters never widens a pattern.
        let sneaky = security.grants(&who(Some("#"), "dev-3", None));
        assert!(!sneaky.may_publish("plant/x/y"));
        // Nor a client id with them (the seam refuses such ids anyway).
        let sneaky = security.grants(&who(None, "+", None));
        assert!(!sneaky.may_subscribe("cmd/x/y"));

        let press = security.grants(&who(None, "p", Some("press-4")));
        assert!(press.may_publish("press/press-4/load"));
        assert!(!press.may_publish("press/press-5/load"));
        assert!(!press.may_publish("press/press-4/load/x"));

        let admin = security.grants(&who(Some("admin"), "a", None));
        assert!(admin.may_publish("anything/at/all"));
        assert!(admin.may_subscribe("#"));
        // `#` does not cover `$` topics (MQTT spec).
        assert!(!admin.may_subscribe("$SYS/#"));

        assert!(matches!(
            Security::default().grants(&plc_identity()),
            Grants::All
        ));
    }

    fn plc_identity() -> Identity {
        who(Some("plc7"), "dev-1", None)
    }

    #[test]
    fn patterns_are_checked_at_load() {
        assert!(check_pattern("plant/{username}/#").is_ok());
        assert!(check_pattern("a/{cn}/{client_id}").is_ok());
        let e = check_pattern("a/{user}/b").expect_err("unknown placeholder");
        assert!(e.contains("{user}"), "{e}");
        assert!(check_pattern("a/#/b").is_err());
        assert!(check_pattern("").is_err());
    }
}
