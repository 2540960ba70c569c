use super::*;

#[test]
fn redact_hides_the_password_only() {
    assert_eq!(redact("postgres://app:s3cret@db.example:5432/keys"), "postgres://app:***@db.example:5432/keys");
    assert_eq!(redact("postgresql://app@db/keys"), "postgresql://app@db/keys");
    assert_eq!(redact("postgres://db/keys"), "postgres://db/keys");
    assert_eq!(redact("sqlite:/var/lib/p11shim/keys.db"), "sqlite:/var/lib/p11shim/keys.db");
}

#[test]
fn redact_hides_passwords_with_awkward_characters() {
    // The postgres crate ends the credentials at the first '@': whatever follows the ':' up to it is hidden.
    let redacted = redact("postgres://app:pa/ss?w#rd@db/keys");
    assert_eq!(redacted, "postgres://app:***@db/keys");
    assert!(!redact("postgres://app:a:b:c@db/keys").contains("a:b:c"));
}

#[test]
fn redact_hides_a_password_parameter() {
    assert_eq!(
        redact("postgres://app@db/keys?sslmode=disable&password=s3cret&connect_timeout=3"),
        "postgres://app@db/keys?sslmode=disable&password=***&connect_timeout=3"
    );
    assert_eq!(redact("postgres://app:x@db/keys?PASSWORD=y"), "postgres://app:***@db/keys?PASSWORD=***");
}

#[test]
fn unknown_scheme_is_a_url_error_without_the_password() {
    let err = open("mysql://root:hunter2@db/keys").err().expect("unknown scheme");
    assert!(matches!(err, StoreError::Url { .. }), "{err:?}");
    let message = err.to_string();
    assert!(!message.contains("hunter2"), "{message}");
    assert!(message.contains("sqlite:PATH") && message.contains("postgres://"), "says what works: {message}");
}

#[test]
fn empty_sqlite_path_is_a_url_error() {
    assert!(matches!(open("sqlite:"), Err(StoreError::Url { .. })));
}

#[test]
fn bad_postgres_url_is_a_url_error_without_the_password() {
    let err = open("postgres://app:hunter2@db:notaport/keys").err().expect("bad port");
    assert!(matches!(err, StoreError::Url { .. }), "{err:?}");
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[test]
fn unreachable_postgres_server_is_unavailable_naming_it_without_the_password() {
    // Port 1 on loopback: refused at once.
    let err = open("postgres://app:hunter2@127.0.0.1:1/keys").err().expect("nobody listens on port 1");
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("postgres://app:***@127.0.0.1:1/keys"), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
}

#[test]
fn find_sql_uses_only_the_given_fields() {
    let query = KeyQuery { token: "t".into(), label: Some(b"l".to_vec()), class: Some(4), ..Default::default() };
    let (sql, params) = find_sql(&query, |n| format!("${n}"), "id");
    assert!(sql.ends_with("WHERE token = $1 AND class = $2 AND label = $3 ORDER BY id"), "{sql}");
    assert_eq!(params.len(), 3);
}

#[test]
fn numbers_above_i64_max_round_trip() {
    for n in [0, 1, i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX] {
        assert_eq!(from_db(to_db(n)), n);
    }
}

/// A find by label uses the (token, label) index, not a scan in id order (a regression once: SQLite chose
/// the (token, id) index to avoid sorting).
#[test]
fn sqlite_find_by_label_uses_the_label_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    drop(super::sqlite::SqliteStore::open(&path).unwrap());
    let query = KeyQuery { token: "t".into(), label: Some(b"k".to_vec()), ..Default::default() };
    let (sql, _) = find_sql(&query, |n| format!("?{n}"), "+id");
    let conn = rusqlite::Connection::open(&path).unwrap();
    let plan: Vec<String> = conn
        .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
        .unwrap()
        .query_map(["t".to_string(), "k".to_string()], |r| r.get::<_, String>(3))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(plan.iter().any(|p| p.contains("keys_token_label")), "plan: {plan:?}");
}
