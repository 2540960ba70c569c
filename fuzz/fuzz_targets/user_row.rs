//! A users row as read from the store (src/auth): the fields `name\nperm\ngroup_regex\nauth\ngroup\nfailed\n
//! last_failed\n` then the secret (the rest). `check_name`, `Perm::parse` (and its written form),
//! `group_regex`; the row, sealed as the HSM seals it, in an in-memory store, then the library's own
//! signature logons against it (`Logons::logon_sign_with` with the key the seed rows hold, and
//! `Logons::logon_signed` with signature bytes from the input): the seal, the throttling by the failed-logon
//! count and time, the stored Ed25519 public key, the row's mask and regex as a logged-on user, `require`, the
//! audit entries of failures, `list_users`. For a password row, the stored PHC string as argon2 reads it
//! before hashing (`PasswordHash::new` and its parameters), without the hashing itself.
#![no_main]

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use p11shim::audit::Trail;
use p11shim::auth::{self, Logons, Need, Perm, AUTH_PASSWORD, AUTH_SIGN};
use p11shim::config::{LogonPolicy, Mode};
use p11shim::store::UserRow;
use p11shim_fuzz::{hmac_sealer, MemStore};
use std::sync::OnceLock;

/// The key the seed corpus's "sign" rows hold the public half of (examples/make_corpus.rs).
fn signing_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::from_bytes(&[7; 32]))
}

fn require_all(logons: &Logons, group: &str) {
    for need in [Need::Group(group.to_string()), Need::KeyStore, Need::UsersTable, Need::UserAdmin] {
        if let Err(denied) = logons.require(need) {
            let _ = denied.to_string();
        }
    }
    let _ = logons.who();
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(8, |&b| b == b'\n');
    let mut field = || String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let (name, perm, group_regex, auth, group) = (field(), field(), field(), field(), field());
    let (failed, last_failed) = (field().trim().parse().unwrap_or(0), field().trim().parse().unwrap_or(0));
    let secret = parts.next().unwrap_or_default().to_vec();

    let _ = auth::check_name(&name);
    if let Ok(parsed) = Perm::parse(&perm) {
        let written = parsed.to_string();
        assert!(written.eq_ignore_ascii_case(&perm), "{written} is {perm}");
        assert_eq!(Perm::parse(&written), Ok(parsed));
    }
    if let Ok(regex) = auth::group_regex(&group_regex) {
        let _ = regex.is_match(&group);
    }

    let mut row = UserRow {
        name: name.clone(),
        perm,
        group_regex,
        auth,
        secret,
        version: 1,
        failed,
        last_failed,
        mac: Vec::new(),
    };
    if row.auth == AUTH_PASSWORD {
        if let Ok(phc) = std::str::from_utf8(&row.secret) {
            if let Ok(hash) = argon2::PasswordHash::new(phc) {
                let _ = argon2::Params::try_from(&hash);
                let _ = hash.to_string();
            }
        }
        return;
    }
    let sealer = hmac_sealer();
    auth::seal_restored(&sealer, &mut row).expect("a software seal");
    let store = MemStore::with(Vec::new(), vec![row.clone()]);
    let trail = Trail { store: &store, sealer: Some(&sealer), also: Vec::new(), head: None, mode: Mode::Standard };
    let policy = LogonPolicy { lockout_after: 3, ..LogonPolicy::default() };
    let _ = auth::list_users(&trail, &policy);

    let mut logons = Logons::new();
    let result = logons.logon_sign_with(&trail, &policy, &name, signing_key());
    let stored_key = row.auth == AUTH_SIGN && row.secret == signing_key().verifying_key().to_bytes();
    if result.is_ok() {
        assert!(stored_key, "a logon succeeds only with the stored key");
        assert!(logons.is_logged_on(&name) && row.failed < 3);
        assert!(Perm::parse(&row.perm).is_ok() && auth::group_regex(&row.group_regex).is_ok());
    } else {
        assert!(logons.is_empty());
    }
    require_all(&logons, &group);

    // The signature as a client would send it: bytes from the input (the end of the secret).
    let mut others = Logons::new();
    if let Ok(message) = auth::challenge(&name) {
        let signature = &row.secret[row.secret.len().saturating_sub(64)..];
        if others.logon_signed(&trail, &policy, &name, &message, signature).is_ok() {
            assert!(row.auth == AUTH_SIGN);
        }
    }
    require_all(&others, &group);
    let _ = auth::list_users(&trail, &policy);
});
