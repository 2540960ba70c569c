//! TLS to PostgreSQL with libpq's settings and meanings, on the system's OpenSSL (the library the host
//! process most likely has loaded already, updated by the distribution).
//!
//! The postgres crate knows `sslmode` disable, prefer and require and nothing of certificates, so the URL's
//! TLS parameters are taken out of its query here and the rest is left to the crate:
//!
//! - `sslmode`: `disable` (plaintext), `prefer` (the default: TLS if the server offers it, unverified),
//!   `require` (TLS, unverified — verified as for verify-ca when a root certificate is given or found),
//!   `verify-ca` (the server's certificate chains to `sslrootcert`), `verify-full` (and names the host
//!   connected to, by DNS name or IP address).
//! - `sslrootcert`: a PEM file of trusted CA certificates, or `system` for OpenSSL's default store; default
//!   `~/.postgresql/root.crt` of the effective user, when it exists.
//! - `sslcert`, `sslkey`: the client certificate (chain) and its unencrypted PEM key; default
//!   `~/.postgresql/postgresql.crt` and `.key` when they exist. The key must be private to its owner (0600
//!   or less; 0640 or less when root owns it), as libpq requires.

use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;
use std::path::{Path, PathBuf};

/// What `sslmode` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    fn parse(text: &str) -> Result<Mode, String> {
        Ok(match text {
            "disable" => Mode::Disable,
            "prefer" => Mode::Prefer,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            "allow" => {
                return Err("sslmode=allow (plaintext first) is not supported: use prefer, require, verify-ca or \
                            verify-full"
                    .into())
            }
            other => {
                return Err(format!("sslmode={other:?} is not one of disable, prefer, require, verify-ca, verify-full"))
            }
        })
    }
}

/// Where the trusted CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    File(PathBuf),
    System,
}

/// The TLS parameters of a store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsParams {
    pub mode: Mode,
    pub root: Option<Roots>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Takes libpq's TLS parameters out of `url`'s query: the URL for the postgres crate (with `sslmode` as it
/// understands it), and the parameters. The query starts at the first `?` after the credentials, as in the
/// crate's own parser.
pub fn split(url: &str) -> Result<(String, TlsParams), String> {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let after_credentials = url[after_scheme..].find('@').map_or(after_scheme, |i| after_scheme + i + 1);
    let (head, query) = match url[after_credentials..].find('?') {
        Some(i) => (&url[..after_credentials + i], Some(&url[after_credentials + i + 1..])),
        None => (url, None),
    };
    let mut given = (None, None, None, None);
    let mut kept = Vec::new();
    for param in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        let slot = match key {
            "sslmode" => &mut given.0,
            "sslrootcert" => &mut given.1,
            "sslcert" => &mut given.2,
            "sslkey" => &mut given.3,
            "sslpassword" => return Err("sslpassword: encrypted client keys are not supported; give an unencrypted key file readable only by its owner".into()),
            _ => {
                kept.push(param);
                continue;
            }
        };
        *slot = Some(decode(value).map_err(|e| format!("{key}: {e}"))?);
    }
    let mode = given.0.as_deref().map_or(Ok(Mode::Prefer), Mode::parse)?;
    let home = || home_dir().map(|h| h.join(".postgresql"));
    let existing = |name: &str| home().map(|d| d.join(name)).filter(|p| p.exists());
    let root = match given.1.as_deref() {
        Some("system") => Some(Roots::System),
        Some(path) => Some(Roots::File(PathBuf::from(path))),
        None => existing("root.crt").map(Roots::File),
    };
    let cert = given.2.map(PathBuf::from).or_else(|| existing("postgresql.crt"));
    let key = given.3.map(PathBuf::from).or_else(|| cert.as_ref().and_then(|_| existing("postgresql.key")));
    if root.is_none() && matches!(mode, Mode::VerifyCa | Mode::VerifyFull) {
        let default = home().map_or("~/.postgresql/root.crt".into(), |d| d.join("root.crt").display().to_string());
        return Err(format!(
            "sslmode=verify-{} needs the CA certificates to trust: no sslrootcert given and {default:?} does not \
             exist (give sslrootcert=PATH, or sslrootcert=system for the system's trusted roots)",
            if mode == Mode::VerifyCa { "ca" } else { "full" }
        ));
    }
    if cert.is_some() != key.is_some() {
        return Err("sslcert and sslkey go together: give both (the client certificate and its key)".into());
    }
    // The postgres crate's own sslmode: whether to use TLS at all; the rest is the connector's.
    kept.push(match mode {
        Mode::Disable => "sslmode=disable",
        Mode::Prefer => "sslmode=prefer",
        _ => "sslmode=require",
    });
    Ok((format!("{head}?{}", kept.join("&")), TlsParams { mode, root, cert, key }))
}

/// Percent-decoding of a query value (paths may hold `%20` and the like).
fn decode(value: &str) -> Result<String, String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(hex.ok_or_else(|| format!("bad percent-encoding in {value:?}"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{value:?} is not UTF-8 once decoded"))
}

/// The effective user's home directory from the password database, as libpq finds it (not $HOME, which a
/// setuid program's caller controls).
fn home_dir() -> Option<PathBuf> {
    use std::ffi::CStr;
    use std::os::unix::ffi::OsStrExt;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes into `pwd` and `buf` (of the length given) only; `result` is null or `&pwd`.
    let rc = unsafe { libc::getpwuid_r(libc::geteuid(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() || pwd.pw_dir.is_null() {
        return None;
    }
    // SAFETY: pw_dir points into `buf`, NUL-terminated by getpwuid_r.
    let dir = unsafe { CStr::from_ptr(pwd.pw_dir) };
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes())))
}

/// libpq's rule for a client key file: private to its owner (0600 or less), or readable by the group too
/// when root owns it (0640 or less).
fn check_key_file(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("sslkey {:?}: {e}", path.display().to_string()))?;
    let mode = meta.mode() & 0o777;
    let private = if meta.uid() == 0 { mode & 0o037 == 0 } else { mode & 0o077 == 0 };
    if !private {
        return Err(format!(
            "sslkey {:?} has group or world access ({mode:04o}): it must be 0600 or less (0640 or less when owned \
             by root)",
            path.display().to_string()
        ));
    }
    Ok(())
}

/// How the store connects: plaintext, or through this connector.
#[derive(Clone)]
pub enum Tls {
    None,
    OpenSsl(MakeTlsConnector),
}

impl TlsParams {
    /// Whether the server's certificate is checked against the roots.
    fn verifies(&self) -> bool {
        match self.mode {
            Mode::VerifyCa | Mode::VerifyFull => true,
            // libpq: "if a root CA file exists, the behavior of sslmode=require will be the same as that of
            // verify-ca".
            Mode::Require => self.root.is_some(),
            Mode::Disable | Mode::Prefer => false,
        }
    }

    /// The connector for these parameters; an error names the file at fault.
    pub fn connector(&self) -> Result<Tls, String> {
        if self.mode == Mode::Disable {
            return Ok(Tls::None);
        }
        let ssl = |what: String| move |e: openssl::error::ErrorStack| format!("{what}: {e}");
        let mut builder = SslConnector::builder(SslMethod::tls_client()).map_err(ssl("TLS set-up".into()))?;
        if self.verifies() {
            match &self.root {
                Some(Roots::File(path)) => {
                    let shown = format!("sslrootcert {:?}", path.display().to_string());
                    if !path.is_file() {
                        return Err(format!("{shown}: no such file"));
                    }
                    builder.set_ca_file(path).map_err(ssl(format!("{shown}: not PEM CA certificates")))?;
                }
                Some(Roots::System) => {
                    builder.set_default_verify_paths().map_err(ssl("sslrootcert=system".into()))?;
                }
                None => {}
            }
            builder.set_verify(SslVerifyMode::PEER);
        } else {
            builder.set_verify(SslVerifyMode::NONE);
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            let shown = format!("sslcert {:?}", cert.display().to_string());
            builder
                .set_certificate_chain_file(cert)
                .map_err(ssl(format!("{shown}: cannot be read as a PEM certificate")))?;
            check_key_file(key)?;
            let shown = format!("sslkey {:?}", key.display().to_string());
            builder
                .set_private_key_file(key, SslFiletype::PEM)
                .map_err(ssl(format!("{shown}: cannot be read as an unencrypted PEM key")))?;
            builder.check_private_key().map_err(ssl(format!("{shown}: does not match the sslcert")))?;
        }
        let mut connector = MakeTlsConnector::new(builder.build());
        if self.mode != Mode::VerifyFull {
            connector.set_callback(|config, _| {
                config.set_verify_hostname(false);
                Ok(())
            });
        }
        Ok(Tls::OpenSsl(connector))
    }
}

impl Tls {
    /// Runs `f`, which uses connections of this TLS, with the thread's OpenSSL error queue empty before and
    /// after. Before: OpenSSL tells a TLS read that must wait from a failed one by that queue, and other
    /// users of OpenSSL on the thread (the HSM's library, the application) leave errors in it — a stale one
    /// makes the next wait look like a failure. After: errors of ours must not mislead them in turn.
    pub fn clean<T>(&self, f: impl FnOnce() -> T) -> T {
        if let Tls::None = self {
            return f();
        }
        drop(openssl::error::ErrorStack::get());
        let result = f();
        drop(openssl::error::ErrorStack::get());
        result
    }

    /// Connects with `config` over this TLS (or none).
    pub fn connect(&self, config: &postgres::Config) -> Result<postgres::Client, postgres::Error> {
        match self {
            Tls::None => config.connect(postgres::NoTls),
            Tls::OpenSsl(connector) => self.clean(|| config.connect(connector.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_leave_the_query_and_the_rest_stays() {
        let (url, tls) = split(
            "postgres://u:p?w@h1:5432,h2:5433/db?sslmode=verify-full&sslrootcert=/ca%20dir/ca.pem&application_name=x&target_session_attrs=read-write",
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://u:p?w@h1:5432,h2:5433/db?application_name=x&target_session_attrs=read-write&sslmode=require"
        );
        assert_eq!(tls.mode, Mode::VerifyFull);
        assert_eq!(tls.root, Some(Roots::File("/ca dir/ca.pem".into())));
        let (url, tls) = split("postgres://u@h/db?sslmode=disable").unwrap();
        assert_eq!((url.as_str(), tls.mode), ("postgres://u@h/db?sslmode=disable", Mode::Disable));
        let (_, tls) = split("postgres://u@h/db?sslrootcert=system&sslmode=require").unwrap();
        assert_eq!(tls.root, Some(Roots::System));
        assert!(tls.verifies(), "require with a root certificate verifies as verify-ca does");
    }

    #[test]
    fn bad_tls_parameters_are_refused_by_name() {
        for (url, says) in [
            ("postgres://u@h/db?sslmode=allow", "sslmode=allow"),
            ("postgres://u@h/db?sslmode=verify", "sslmode=\"verify\""),
            ("postgres://u@h/db?sslpassword=x", "sslpassword"),
            ("postgres://u@h/db?sslcert=/c.pem&sslkey=/nonexistent/k&sslrootcert=%zz", "sslrootcert: bad percent"),
        ] {
            let e = split(url).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
        }
        let e = TlsParams {
            mode: Mode::VerifyFull,
            root: Some(Roots::File("/nonexistent/ca.pem".into())),
            cert: None,
            key: None,
        }
        .connector()
        .err()
        .unwrap();
        assert!(e.contains("sslrootcert \"/nonexistent/ca.pem\": no such file"), "{e}");
    }

    #[test]
    fn a_client_key_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        std::fs::write(&key, "x").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = check_key_file(&key).unwrap_err();
        assert!(e.contains("group or world access (0644)"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        check_key_file(&key).unwrap();
    }
}
