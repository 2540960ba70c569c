//! The HSM cache of loaded stored keys (`[store] hsm_cache`, [`HSM_CACHE`] in these binaries): at most that
//! many copies in the HSM, least recently used evicted, every key still usable, and no operation losing its
//! key halfway, whatever other sessions and threads load meanwhile.

use super::{db_token, new_aes, HSM_CACHE};
use crate::common::{pkcs11, user_session, USER_PIN};
use crate::vault_cases::custody::Raw;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use cryptoki_sys::{CKA_CLASS, CKA_TOKEN, CKO_SECRET_KEY};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The session objects holding secret keys in the backend's slot of `session` (asked of the backend
/// itself): the shim's loaded copies, as the tests make no other.
fn copies_in_hsm(session: &Session) -> usize {
    copy_handles(session).len()
}

const IV: [u8; 16] = [3; 16];

fn encrypt(s: &Session, key: ObjectHandle) -> Vec<u8> {
    s.encrypt(&Mechanism::AesCbcPad(IV), key, b"the cache keeps every key usable").expect("C_Encrypt with a stored key")
}

/// `n` stored AES keys, each used once.
fn used_keys(s: &Session, prefix: &str, n: usize) -> (Vec<ObjectHandle>, Vec<Vec<u8>>) {
    let keys: Vec<ObjectHandle> = (0..n).map(|i| new_aes(s, &format!("{prefix}{i:03}"))).collect();
    let sealed = keys.iter().map(|&k| encrypt(s, k)).collect();
    (keys, sealed)
}

pub fn the_hsm_holds_at_most_hsm_cache_copies() {
    let (_slot, s) = db_token("db14");
    let n = 4 * HSM_CACHE;
    let (keys, sealed) = used_keys(&s, "c", n);
    let held = copies_in_hsm(&s);
    assert!((1..=HSM_CACHE).contains(&held), "{n} keys used, {held} copies in the HSM (hsm_cache = {HSM_CACHE})");
    // Every key still works after evictions, with its own value: used again in another order (evicted
    // ones are loaded again), each gives what it gave the first time.
    for round in 0..2 {
        for i in (0..n).rev().step_by(1 + round) {
            assert_eq!(encrypt(&s, keys[i]), sealed[i], "key c{i:03} in round {round}");
        }
        let held = copies_in_hsm(&s);
        assert!(held <= HSM_CACHE, "round {round}: {held} copies in the HSM");
    }
    // A hot key stays loaded while others come and go, and the others go: of the copies there were, only
    // one is left after three cache-fulls of other keys were loaded, used between each of them.
    let hot = keys[0];
    encrypt(&s, hot);
    let before = copy_handles(&s);
    for &k in &keys[n / 4..] {
        encrypt(&s, hot);
        encrypt(&s, k);
    }
    let after = copy_handles(&s);
    let kept: Vec<&u64> = before.iter().filter(|h| after.contains(h)).collect();
    assert_eq!(kept.len(), 1, "copies before {before:?}, after {after:?}: the hot key's alone stays");
    // Logging out drops every copy; the keys load again after the next login.
    s.logout().expect("C_Logout");
    s.login(UserType::User, Some(&AuthPin::new(USER_PIN.into()))).expect("C_Login");
    assert_eq!(copies_in_hsm(&s), 0, "no copy is left in the HSM after C_Logout");
    assert_eq!(encrypt(&s, keys[n - 1]), sealed[n - 1]);
    // The cache counts copies, not keys it once held: as many keys as it may hold stay loaded, those it held
    // before the logout among them.
    for i in 0..HSM_CACHE - 1 {
        assert_eq!(encrypt(&s, keys[i]), sealed[i]);
    }
    assert_eq!(copies_in_hsm(&s), HSM_CACHE, "{HSM_CACHE} keys used since the login, all loaded");
}

/// The backend handles of the copies (see [`copies_in_hsm`]).
fn copy_handles(s: &Session) -> Vec<u64> {
    let items = [(CKA_TOKEN, vec![0u8]), (CKA_CLASS, CKO_SECRET_KEY.to_ne_bytes().to_vec())];
    Raw::backend().find(s.handle(), &items).expect("C_FindObjects on the backend")
}

pub fn an_operation_keeps_its_key_through_evictions() {
    let (slot, s) = db_token("db15");
    let (keys, _) = used_keys(&s, "o", 3 * HSM_CACHE);
    let other = user_session(slot);
    // A multi-part encryption with key 0 and a multi-part MAC with key 1, in two sessions; meanwhile every
    // other key is used in a third session, which evicts whatever may be evicted.
    let busy = pkcs11().open_rw_session(slot).expect("C_OpenSession");
    let hmac = super::hmac_key(&s, "mac");
    let part = [0x5au8; 64];
    busy.encrypt_init(&Mechanism::AesCbcPad(IV), keys[0]).expect("C_EncryptInit");
    other.sign_init(&Mechanism::Sha256Hmac, hmac).expect("C_SignInit");
    let mut ciphertext = busy.encrypt_update(&part).expect("C_EncryptUpdate");
    other.sign_update(&part).expect("C_SignUpdate");
    for round in 0..2 {
        for &k in &keys[1..] {
            encrypt(&s, k);
        }
        ciphertext
            .extend(busy.encrypt_update(&part).unwrap_or_else(|e| panic!("C_EncryptUpdate after round {round}: {e}")));
        other.sign_update(&part).unwrap_or_else(|e| panic!("C_SignUpdate after round {round}: {e}"));
    }
    ciphertext.extend(busy.encrypt_final().expect("C_EncryptFinal after evictions"));
    let tag = other.sign_final().expect("C_SignFinal after evictions");
    let plain: Vec<u8> = part.repeat(3);
    assert_eq!(s.decrypt(&Mechanism::AesCbcPad(IV), keys[0], &ciphertext).expect("decrypt"), plain);
    s.verify(&Mechanism::Sha256Hmac, hmac, &plain, &tag).expect("the MAC made across evictions verifies");
    // Pinned keys may hold the cache over its size while their operations last; once their sessions end, the
    // next load brings it back.
    let sessions: Vec<Session> = (0..2 * HSM_CACHE).map(|_| pkcs11().open_rw_session(slot).unwrap()).collect();
    for (i, session) in sessions.iter().enumerate() {
        session.encrypt_init(&Mechanism::AesCbcPad(IV), keys[i]).expect("C_EncryptInit");
    }
    let pinned = copies_in_hsm(&s);
    assert!(pinned >= 2 * HSM_CACHE, "{} operations under way, {pinned} copies", 2 * HSM_CACHE);
    for (i, session) in sessions.iter().enumerate() {
        let mut ct = session.encrypt_update(&part).expect("C_EncryptUpdate");
        ct.extend(session.encrypt_final().expect("C_EncryptFinal"));
        assert_eq!(s.decrypt(&Mechanism::AesCbcPad(IV), keys[i], &ct).unwrap(), part, "operation {i}");
    }
    drop(sessions);
    drop(busy);
    drop(other);
    let fresh = new_aes(&s, "fresh");
    encrypt(&s, fresh);
    let held = copies_in_hsm(&s);
    assert!(held <= HSM_CACHE, "sessions closed: {held} copies in the HSM");
}

pub fn threads_share_the_cache_without_losing_a_call() {
    let (slot, s) = db_token("db16");
    let n = 3 * HSM_CACHE;
    let (keys, sealed) = used_keys(&s, "t", n);
    let failures = AtomicUsize::new(0);
    let calls = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(3);
    std::thread::scope(|scope| {
        for t in 0..4 {
            let (keys, sealed, failures, calls, stop) = (&keys, &sealed, &failures, &calls, &stop);
            scope.spawn(move || {
                let session = user_session(slot);
                let mut i = t * 7;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    i = (i * 31 + 17) % n;
                    match session.encrypt(&Mechanism::AesCbcPad(IV), keys[i], b"the cache keeps every key usable") {
                        Ok(ct) if ct == sealed[i] => {}
                        Ok(_) => {
                            failures.fetch_add(1, Ordering::Relaxed);
                            stop.store(true, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("thread {t}, key t{i:03}: {e}");
                            failures.fetch_add(1, Ordering::Relaxed);
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let calls = calls.into_inner();
    assert_eq!(failures.into_inner(), 0, "calls that failed or gave another key's result, of {calls}");
    assert!(calls > 100, "only {calls} calls in 3 s");
    // The threads' sessions are closed: the next load brings the cache back to its size.
    let fresh = new_aes(&s, "fresh");
    encrypt(&s, fresh);
    let held = copies_in_hsm(&s);
    assert!(held <= HSM_CACHE, "{held} copies once the threads stopped");
}
