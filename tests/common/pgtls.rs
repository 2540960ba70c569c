//! A PostgreSQL cluster that accepts only TLS, for tests and benches: a test PKI made with the openssl
//! command (a CA, a server certificate for DNS localhost and IP 127.0.0.1, a client certificate for role
//! `certuser`, and another CA that signed none of them), installed in a [`PgCluster`].

use super::pg::PgCluster;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Runs the openssl command in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).stdin(Stdio::null()).output().expect("openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The test PKI: a CA, the server's certificate (DNS localhost and IP 127.0.0.1), a client certificate for
/// role `certuser`, and another CA that signed none of them.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn make() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for name in ["ca", "other-ca"] {
            openssl(
                d,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=p11shim test {name}"),
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.pem"),
                ],
            );
        }
        let issue = |name: &str, subject: &str, ext: &str| {
            openssl(
                d,
                &[
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-subj",
                    subject,
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                ],
            );
            std::fs::write(d.join(format!("{name}.ext")), ext).unwrap();
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    &format!("{name}.ext"),
                    "-out",
                    &format!("{name}.pem"),
                ],
            );
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(d.join(format!("{name}.key")), std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        issue("server", "/CN=localhost", "subjectAltName = DNS:localhost, IP:127.0.0.1\n");
        issue("client", "/CN=certuser", "extendedKeyUsage = clientAuth\n");
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// The uid and gid of the postgres system user when we are root (the server runs as it), else None.
fn postgres_owner() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let id = |flag: &str| {
        let out = Command::new("id").args([flag, "postgres"]).output().unwrap();
        String::from_utf8(out.stdout).unwrap().trim().parse::<u32>().unwrap()
    };
    Some((id("-u"), id("-g")))
}

/// The port of a `postgres://user@host:PORT/db` URL.
pub fn port(url: &str) -> String {
    url.rsplit(':').next().unwrap().split('/').next().unwrap().to_string()
}

/// Turns `cluster` into one that speaks only TLS with `pki`'s server certificate (restarting it), with role
/// `certuser`, which must show a client certificate the CA signed.
pub fn tls_only(cluster: &PgCluster, pki: &Pki) {
    let psql = |sql: &str| {
        let out = Command::new("psql")
            .args([cluster.url(), "-v", "ON_ERROR_STOP=1", "-qc", sql])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
    };
    psql("CREATE ROLE certuser LOGIN SUPERUSER");
    cluster.pause();
    let data = cluster.dir().join("data");
    for (from, to) in [("server.pem", "server.crt"), ("server.key", "server.key"), ("ca.pem", "root.crt")] {
        std::fs::copy(pki.path(from), data.join(to)).unwrap();
        if let Some((uid, gid)) = postgres_owner() {
            std::os::unix::fs::chown(data.join(to), Some(uid), Some(gid)).unwrap();
        }
    }
    let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
    conf.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'root.crt'\n");
    std::fs::write(data.join("postgresql.conf"), conf).unwrap();
    // TLS only over TCP; certuser must show a certificate the CA signed for it.
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\nhostssl all certuser 127.0.0.1/32 cert\nhostssl all all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    cluster.resume();
}
