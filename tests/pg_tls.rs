//! TLS to PostgreSQL: a throwaway cluster that accepts only TLS (`hostssl` in pg_hba.conf), with a test CA
//! made here by the openssl command. verify-full works (by IP address and by name), and a wrong CA, a wrong
//! host name, a plaintext server, a plaintext client and a client without its certificate are refused with
//! one line naming the store and never its password; the same through the shim, end to end
//! (`p11shim mbk create`, a key made by pkcs11-tool in a database slot, `p11shim status`).

mod common;

use common::pg::PgCluster;
use common::pgtls::Pki;
use p11shim::store::{self, KeyQuery, StoreError};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// The password every URL carries (trust authentication ignores it): no message may show it.
const PASSWORD: &str = "pw-never-shown-9f2";

/// A cluster that speaks only TLS, with the PKI's server certificate, and the PKI itself.
struct TlsServer {
    /// Kept for its lifetime: the server stops when the test binary exits.
    _cluster: PgCluster,
    pki: Pki,
    port: String,
}

fn server() -> &'static TlsServer {
    static SERVER: OnceLock<TlsServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let pki = Pki::make();
        let cluster = PgCluster::start();
        let port = common::pgtls::port(cluster.url());
        common::pgtls::tls_only(&cluster, &pki);
        TlsServer { _cluster: cluster, pki, port }
    })
}

impl TlsServer {
    /// A URL to the TLS server as `user` at `host` with query `query`, carrying the password.
    fn url(&self, user: &str, host: &str, query: &str) -> String {
        format!("postgres://{user}:{PASSWORD}@{host}:{}/p11shim?{query}", self.port)
    }

    /// A client of the test's own (not the store's) over TLS, the server's certificate unchecked.
    fn admin(&self) -> postgres::Client {
        let mut builder = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls_client()).unwrap();
        builder.set_verify(openssl::ssl::SslVerifyMode::NONE);
        postgres::Client::connect(
            &format!("host=127.0.0.1 port={} user=postgres dbname=p11shim sslmode=require", self.port),
            postgres_openssl::MakeTlsConnector::new(builder.build()),
        )
        .unwrap()
    }

    fn ca(&self) -> String {
        self.pki.path("ca.pem").display().to_string()
    }
}

/// Opens `url` and reads from it; the error's message when that fails.
fn refused(url: &str) -> String {
    let e = match store::open(url) {
        Ok(s) => s.find(&KeyQuery { token: "t".into(), ..Default::default() }).expect_err("must be refused"),
        Err(e) => e,
    };
    let message = e.to_string();
    assert!(!message.contains(PASSWORD), "the password is shown: {message}");
    assert!(!message.contains('\n'), "one line: {message}");
    assert!(message.contains("key store"), "names the store: {message}");
    assert!(matches!(e, StoreError::Unavailable { .. } | StoreError::Url { .. }), "{e:?}");
    message
}

fn works(url: &str) {
    let s = store::open(url).unwrap_or_else(|e| panic!("{url}: {e}"));
    s.find(&KeyQuery { token: "t".into(), ..Default::default() }).unwrap();
}

#[test]
fn verify_full_works_by_address_and_by_name() {
    let s = server();
    let ca = s.ca();
    works(&s.url("postgres", "127.0.0.1", &format!("sslmode=verify-full&sslrootcert={ca}")));
    works(&s.url("postgres", "localhost", &format!("sslmode=verify-full&sslrootcert={ca}")));
    // The connection really is TLS: the server says so for this session.
    let mut client = s.admin();
    let tls: bool = client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).unwrap().get(0);
    assert!(tls);
}

#[test]
fn a_wrong_ca_is_refused() {
    let s = server();
    let other = s.pki.path("other-ca.pem").display().to_string();
    for mode in ["verify-full", "verify-ca", "require"] {
        let e = refused(&s.url("postgres", "127.0.0.1", &format!("sslmode={mode}&sslrootcert={other}")));
        assert!(e.contains("certificate verify failed"), "{mode}: {e}");
    }
    // Without a root certificate, require encrypts but trusts any server (as libpq does).
    works(&s.url("postgres", "127.0.0.1", "sslmode=require"));
}

#[test]
fn a_wrong_host_name_is_refused_by_verify_full_only() {
    let s = server();
    let ca = s.ca();
    // hostaddr connects to the server; the name checked against its certificate is the host's.
    let url = |mode: &str| {
        format!(
            "postgres://postgres:{PASSWORD}@wrong.example:{}/p11shim?hostaddr=127.0.0.1&sslmode={mode}&sslrootcert={ca}",
            s.port
        )
    };
    let e = refused(&url("verify-full"));
    assert!(e.contains("certificate verify failed") && e.to_lowercase().contains("hostname mismatch"), "{e}");
    works(&url("verify-ca"));
}

#[test]
fn a_plaintext_server_or_client_is_refused() {
    let s = server();
    let plain = PgCluster::start();
    let port = common::pgtls::port(plain.url());
    let ca = s.ca();
    for mode in ["require", "verify-ca", "verify-full"] {
        let url = format!("postgres://postgres:{PASSWORD}@127.0.0.1:{port}/p11shim?sslmode={mode}&sslrootcert={ca}");
        let e = refused(&url);
        assert!(e.contains("does not support TLS"), "{mode}: {e}");
    }
    // The TLS-only server refuses a client that will not encrypt.
    let e = refused(&s.url("postgres", "127.0.0.1", "sslmode=disable"));
    assert!(e.contains("no encryption"), "{e}");
}

#[test]
fn client_certificates_authenticate_and_their_keys_must_be_private() {
    let s = server();
    let ca = s.ca();
    let (cert, key) = (s.pki.path("client.pem").display().to_string(), s.pki.path("client.key"));
    let with_cert = |key: &Path| {
        s.url(
            "certuser",
            "127.0.0.1",
            &format!("sslmode=verify-full&sslrootcert={ca}&sslcert={cert}&sslkey={}", key.display()),
        )
    };
    works(&with_cert(&key));
    let e = refused(&s.url("certuser", "127.0.0.1", &format!("sslmode=verify-full&sslrootcert={ca}")));
    assert!(e.contains("certificate"), "without its certificate: {e}");
    let readable = s.pki.path("client-readable.key");
    std::fs::copy(&key, &readable).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = refused(&with_cert(&readable));
    assert!(e.contains("group or world access"), "{e}");
}

#[test]
fn bad_tls_settings_name_the_file_or_setting() {
    let s = server();
    let e = refused(&s.url("postgres", "127.0.0.1", "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"));
    assert!(e.contains("sslrootcert \"/nonexistent/ca.pem\": no such file"), "{e}");
    let e = refused(&s.url("postgres", "127.0.0.1", "sslmode=verify-everything"));
    assert!(e.contains("sslmode=\"verify-everything\""), "{e}");
    let not_pem = s.pki.path("server.ext").display().to_string();
    let e = refused(&s.url("postgres", "127.0.0.1", &format!("sslmode=verify-full&sslrootcert={not_pem}")));
    assert!(e.contains("not PEM CA certificates"), "{e}");
}

/// The shim over verify-full, end to end: the command makes the MBK, pkcs11-tool makes a key in a database
/// slot through the module, the row is in the TLS store, and `p11shim status` reports the store; with the
/// wrong CA, status fails with one line naming the store.
#[test]
fn the_shim_uses_a_verify_full_store() {
    let s = server();
    let dir = tempfile::tempdir().unwrap();
    let hsm = dir.path().join("hsm");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("softhsm-config/setup-token.sh");
    let out = Command::new("bash")
        .arg(script)
        .args([hsm.to_str().unwrap(), "tls", "so-pin-5678", "user-pin-5678"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "setup-token.sh: {}", String::from_utf8_lossy(&out.stderr));
    let softhsm_conf = hsm.join("softhsm2.conf");
    // A database of its own on the TLS server.
    let db = format!("tls_shim_{}", std::process::id());
    let mut admin = s.admin();
    admin.batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
    let url = |ca: &str| {
        format!("postgres://postgres:{PASSWORD}@localhost:{}/{db}?sslmode=verify-full&sslrootcert={ca}", s.port)
    };
    let config = |ca: &str| {
        let path = dir.path().join("p11shim.toml");
        std::fs::write(
            &path,
            format!(
                "module = \"{}\"\n[store]\nurl = \"{}\"\n[[slot]]\ntoken = \"tls\"\nstorage = \"database\"\n",
                common::SOFTHSM,
                url(ca)
            ),
        )
        .unwrap();
        path
    };
    let run = |program: &str, args: &[&str], config: &Path| -> Output {
        Command::new(program)
            .args(args)
            .env("P11SHIM_CONFIG", config)
            .env("SOFTHSM2_CONF", &softhsm_conf)
            .env("P11SHIM_SO_PIN", "so-pin-5678")
            .env("P11SHIM_USER_PIN", "user-pin-5678")
            .env_remove("P11SHIM_MODULE")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let cli = env!("CARGO_BIN_EXE_p11shim");
    let good = config(&s.ca());
    let out = run(cli, &["mbk", "create", "--token", "tls"], &good);
    assert!(out.status.success(), "mbk create: {}", String::from_utf8_lossy(&out.stderr));
    let shim = common::shim_path();
    let out = run(
        "pkcs11-tool",
        &[
            "--module",
            shim.to_str().unwrap(),
            "--token-label",
            "tls",
            "--login",
            "--pin",
            "user-pin-5678",
            "--keygen",
            "--key-type",
            "AES:32",
            "--label",
            "over-tls",
        ],
        &good,
    );
    assert!(out.status.success(), "pkcs11-tool --keygen: {}", String::from_utf8_lossy(&out.stderr));
    let store = store::open(&url(&s.ca())).unwrap();
    let rows =
        store.find(&KeyQuery { token: "tls".into(), label: Some(b"over-tls".to_vec()), ..Default::default() }).unwrap();
    assert_eq!(rows.len(), 1, "the key is a row of the TLS store");
    let out = run(cli, &["status"], &good);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("sslmode=verify-full"), "status: {text}");

    let bad = config(&s.pki.path("other-ca.pem").display().to_string());
    let out = run(cli, &["status"], &bad);
    // status prints what it found (the store's line among them), then a summary line on stderr.
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(7), "status with the wrong CA: {said}");
    let line = said.lines().find(|l| l.contains("certificate verify failed")).unwrap_or_else(|| panic!("{said}"));
    assert!(line.contains(&format!("localhost:{}", s.port)), "the line names the store: {line}");
    assert!(!said.contains(PASSWORD), "{said}");
}
