//! Device state shared between processes: token objects made by one process are seen by another (here:
//! this test process and `pkcs11-tool` children) without re-initializing, destroyed ones go away, concurrent
//! writers lose nothing, tokens survive C_Finalize, and PINs are stored hashed.

mod common;

use common::*;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use std::process::Command;

fn labels(s: &cryptoki::session::Session) -> Vec<String> {
    let mut v: Vec<String> = s
        .find_objects(&[])
        .unwrap()
        .into_iter()
        .map(|o| match s.get_attributes(o, &[cryptoki::object::AttributeType::Label]).unwrap().pop() {
            Some(Attribute::Label(l)) => String::from_utf8(l).unwrap(),
            other => panic!("{other:?}"),
        })
        .collect();
    v.sort();
    v
}

#[test]
fn processes_see_each_others_token_objects() {
    let dir = test_dir("shared");
    let config = write_config(&dir, &two_slots("standard"));
    let module = module_path();
    let tool_args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> =
            ["--token-label", "test", "--login", "--pin", USER_PIN].iter().map(|s| s.to_string()).collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let p11tool_owned = |extra: &[&str]| {
        let args = tool_args(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        p11tool(&module, &config, &args)
    };
    let m = load(&config, None);
    let s = user_session(m.p11());
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[Attribute::ValueLen(16.into()), Attribute::Token(true), Attribute::Label(b"from-test".to_vec())],
    )
    .unwrap();
    s.create_object(&[Attribute::Class(ObjectClass::DATA), Attribute::Label(b"session-only".to_vec())]).unwrap();
    // The child sees the token object, not the session object.
    let listed = p11tool_owned(&["--list-objects"]).ok();
    assert!(listed.stdout.contains("from-test"), "{}", listed.stdout);
    assert!(!listed.stdout.contains("session-only"));
    // The child makes one; this process sees it without C_Finalize.
    p11tool_owned(&["--keygen", "--key-type", "AES:32", "--label", "from-child"]).ok();
    assert_eq!(labels(&s), ["from-child", "from-test", "session-only"]);
    // Concurrent writers: four children at once, nothing lost (the state file is locked for writes).
    let children: Vec<_> = (0..4)
        .map(|i| {
            let mut cmd = Command::new(tool("pkcs11-tool", "opensc"));
            cmd.arg("--module").arg(&module).args(tool_args(&[
                "--keygen",
                "--key-type",
                "AES:16",
                "--label",
                &format!("c{i}"),
            ]));
            cmd.env("CSSIM_CONFIG", &config).env_remove("CSSIM_FAULTS");
            cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
            cmd.spawn().unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    assert_eq!(labels(&s), ["c0", "c1", "c2", "c3", "from-child", "from-test", "session-only"]);
    // The child destroys one; it disappears here, and its handle is invalid.
    let handle = s.find_objects(&[Attribute::Label(b"c2".to_vec())]).unwrap()[0];
    p11tool_owned(&["--delete-object", "--type", "secrkey", "--label", "c2"]).ok();
    assert_eq!(labels(&s).len(), 6);
    assert_eq!(
        rv(s.get_attributes(handle, &[cryptoki::object::AttributeType::Label])),
        cryptoki_sys::CKR_OBJECT_HANDLE_INVALID
    );
    // Everything on the token survives C_Finalize and C_Initialize; session objects do not.
    drop(s);
    m.finalize();
    let m = load(&config, None);
    let s = user_session(m.p11());
    assert_eq!(labels(&s), ["c0", "c1", "c3", "from-child", "from-test"]);
    // PINs are stored hashed.
    let state = std::fs::read_to_string(dir.join("state.json")).unwrap();
    assert!(!state.contains(USER_PIN) && !state.contains(SO_PIN) && !state.contains(&hex::encode(USER_PIN)));
    // A token initialized by another process is seen too.
    let init =
        p11tool(&module, &config, &["--init-token", "--slot-index", "1", "--label", "late", "--so-pin", SO_PIN]).ok();
    assert!(init.stdout.contains("Token successfully initialized"), "{init:?}");
    assert_eq!(m.p11().get_token_info(slot(m.p11(), 1)).unwrap().label(), "late");
}
