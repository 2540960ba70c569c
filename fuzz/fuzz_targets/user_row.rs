//! A users row as read from the store (src/auth): the fields `name\nperm\ngroup_regex\nauth\ngroup\n`
//! then the secret (the rest). `check_name`, `Perm::parse` (and its written form), `group_regex`; a
//! signature logon with the library's own `Logons::logon_sign_with` against the row in an in-memory store
//! (the stored Ed25519 public key, then the row's mask and regex as a logged-on user, then `require`); for a
//! password row, the stored PHC string as argon2 reads it before hashing (`PasswordHash::new` and its
//! parameters), without the hashing itself.
#![no_main]

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use p11shim::auth::{self, Logons, Need, Perm, AUTH_PASSWORD, AUTH_SIGN};
use p11shim::store::UserRow;
use p11shim_fuzz::MemStore;
use std::sync::OnceLock;

/// The key the seed corpus's "sign" rows hold the public half of (examples/make_corpus.rs).
fn signing_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::from_bytes(&[7; 32]))
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(6, |&b| b == b'\n');
    let mut field = || String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let (name, perm, group_regex, auth, group) = (field(), field(), field(), field(), field());
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

    let row = UserRow { name: name.clone(), perm, group_regex, auth, secret, version: 1 };
    let _ = auth::UserInfo::from(&row);
    if row.auth == AUTH_PASSWORD {
        if let Ok(phc) = std::str::from_utf8(&row.secret) {
            if let Ok(hash) = argon2::PasswordHash::new(phc) {
                let _ = argon2::Params::try_from(&hash);
                let _ = hash.to_string();
            }
        }
        return;
    }
    let store = MemStore::with(Vec::new(), vec![row.clone()]);
    let mut logons = Logons::new();
    let result = logons.logon_sign_with(&store, &name, signing_key());
    let stored_key = row.auth == AUTH_SIGN && row.secret == signing_key().verifying_key().to_bytes();
    if result.is_ok() {
        assert!(stored_key, "a logon succeeds only with the stored key");
        assert!(logons.is_logged_on(&name));
        assert!(Perm::parse(&row.perm).is_ok() && auth::group_regex(&row.group_regex).is_ok());
    } else {
        assert!(logons.is_empty());
        assert!(!store.audit.lock().unwrap().is_empty() || stored_key, "a failed logon is audited");
    }
    for need in [Need::Group(group), Need::KeyStore, Need::UsersTable, Need::UserAdmin] {
        if let Err(denied) = logons.require(need) {
            let _ = denied.to_string();
        }
    }
    let _ = logons.who();
});
