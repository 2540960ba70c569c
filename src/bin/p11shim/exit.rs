//! What a command ends with: the exit statuses scripts can rely on, the failure that carries one, and how a
//! failure is printed (one line on stderr; with --json also a JSON error object on stdout).

use p11shim::audit::AuditError;
use p11shim::auth::AuthError;
use p11shim::error::{Error, ErrorKind};
use p11shim::store::StoreError;

/// The exit statuses of `p11shim`, the same for every command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Done.
    Ok = 0,
    /// Failed for another reason than those below (a configuration error, an output that cannot be written, a
    /// backend error); nothing was changed unless the message says so.
    Failed = 1,
    /// The command line is wrong (unknown option, missing argument, invalid value).
    Usage = 2,
    /// Done, but something needs an operator: keys that could not be backed up, an operation that could not
    /// be audited, users not sealed, problems `status` found.
    Partial = 3,
    /// Nothing matched or what was named does not exist: a backup whose group regex matched no key, an unknown
    /// key id, user or token, a token without an MBK set.
    NothingMatched = 4,
    /// Refused: a logon failed or is throttled, the logged-on users lack a permission, a PIN is wrong, the
    /// security mode forbids it.
    Denied = 5,
    /// The input cannot be used: a backup, share or clone file that is damaged, edited, truncated, of an
    /// unknown version, or made under another MBK. Nothing was changed.
    Damaged = 6,
    /// The key store or the HSM cannot be reached, or the backend module cannot be loaded.
    Unavailable = 7,
}

impl Exit {
    pub const ALL: [Exit; 8] = [
        Exit::Ok,
        Exit::Failed,
        Exit::Usage,
        Exit::Partial,
        Exit::NothingMatched,
        Exit::Denied,
        Exit::Damaged,
        Exit::Unavailable,
    ];

    pub fn code(self) -> u8 {
        self as u8
    }

    /// The name scripts see in a JSON error object.
    pub fn name(self) -> &'static str {
        match self {
            Exit::Ok => "ok",
            Exit::Failed => "failed",
            Exit::Usage => "usage",
            Exit::Partial => "partial",
            Exit::NothingMatched => "not-found",
            Exit::Denied => "denied",
            Exit::Damaged => "damaged-input",
            Exit::Unavailable => "unavailable",
        }
    }

    /// One line per status, for `--help`.
    pub fn table() -> String {
        let text = |e: Exit| match e {
            Exit::Ok => "done",
            Exit::Failed => "failed (configuration, output not writable, backend error; see the message)",
            Exit::Usage => "usage error (unknown option, missing or invalid argument)",
            Exit::Partial => "done, but needs attention (keys not exported, not audited, problems found)",
            Exit::NothingMatched => "nothing matched, or what was named does not exist",
            Exit::Denied => "denied (logon failed or throttled, permission missing, wrong PIN, security mode)",
            Exit::Damaged => "damaged input (bad MAC, truncated, edited, unknown version, another MBK)",
            Exit::Unavailable => "key store or HSM unavailable",
        };
        Exit::ALL
            .iter()
            .map(|e| format!("  {}  {:<14} {}", e.code(), e.name(), text(*e)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl From<ErrorKind> for Exit {
    fn from(kind: ErrorKind) -> Exit {
        match kind {
            ErrorKind::Denied => Exit::Denied,
            ErrorKind::NotFound => Exit::NothingMatched,
            ErrorKind::Damaged | ErrorKind::WrongMbk => Exit::Damaged,
            ErrorKind::Io => Exit::Failed,
            ErrorKind::Unavailable => Exit::Unavailable,
            ErrorKind::Failed => Exit::Failed,
        }
    }
}

/// A command that did not succeed: its exit status and the message for the operator.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
    /// The command printed its own JSON document about it already (`status`): no error object then.
    pub reported: bool,
}

impl Failure {
    pub fn new(exit: Exit, message: impl Into<String>) -> Failure {
        Failure { exit, message: message.into(), reported: false }
    }

    /// A failure the command's own output describes already (with --json, its document is the only one).
    pub fn reported(exit: Exit, message: impl Into<String>) -> Failure {
        Failure { reported: true, ..Failure::new(exit, message) }
    }

    pub fn usage(message: impl Into<String>) -> Failure {
        Failure::new(Exit::Usage, message)
    }

    pub fn denied(message: impl Into<String>) -> Failure {
        Failure::new(Exit::Denied, message)
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure::new(Exit::Failed, message)
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Failure {
        Failure::new(Exit::Failed, message)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::new(e.kind().into(), e.to_string())
    }
}

impl From<p11shim::backup::error::BackupError> for Failure {
    fn from(e: p11shim::backup::error::BackupError) -> Failure {
        Failure::new(e.kind().into(), e.to_string())
    }
}

impl From<AuthError> for Failure {
    fn from(e: AuthError) -> Failure {
        Failure::new(e.kind().into(), e.to_string())
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        Failure::new(e.kind().into(), e.to_string())
    }
}

impl From<AuditError> for Failure {
    fn from(e: AuditError) -> Failure {
        Failure::new(e.cause.kind().into(), e.to_string())
    }
}

/// What a command ends with when it does not fail: done, or done with something that needs attention.
pub enum Outcome {
    Done,
    Attention(String),
}

pub type CliResult = Result<Outcome, Failure>;

/// Prints the end of a command and returns its status: nothing more for success; the attention or failure
/// message on stderr ("p11shim: …"); with `json`, a failure also as `{"error": {...}}` on stdout, so that a
/// script reading stdout always gets one JSON document.
pub fn finish(result: CliResult, json: bool) -> std::process::ExitCode {
    let exit = match result {
        Ok(Outcome::Done) => Exit::Ok,
        Ok(Outcome::Attention(message)) => {
            eprintln!("p11shim: {message}");
            Exit::Partial
        }
        Err(failure) => {
            eprintln!("p11shim: {}", failure.message);
            if json && !failure.reported {
                let error = serde_json::json!({"error": {
                    "exit": failure.exit.code(), "kind": failure.exit.name(), "message": failure.message,
                }});
                println!("{error}");
            }
            failure.exit
        }
    };
    std::process::ExitCode::from(exit.code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_is_distinct_and_listed() {
        let codes: std::collections::BTreeSet<u8> = Exit::ALL.iter().map(|e| e.code()).collect();
        assert_eq!(codes.len(), Exit::ALL.len());
        let names: std::collections::BTreeSet<&str> = Exit::ALL.iter().map(|e| e.name()).collect();
        assert_eq!(names.len(), Exit::ALL.len());
        let table = Exit::table();
        for e in Exit::ALL {
            assert!(table.contains(&format!("  {}  {}", e.code(), e.name())), "{table}");
        }
    }

    #[test]
    fn library_errors_map_to_their_status() {
        use cryptoki_sys::*;
        assert_eq!(Failure::from(Error::Rv(CKR_PIN_INCORRECT)).exit, Exit::Denied);
        assert_eq!(Failure::from(Error::Rv(CKR_DEVICE_ERROR)).exit, Exit::Unavailable);
        assert_eq!(Failure::from(Error::Missing("x".into())).exit, Exit::NothingMatched);
        assert_eq!(Failure::from(Error::Damaged("x".into())).exit, Exit::Damaged);
        let unavailable = StoreError::Unavailable { store: "s".into(), cause: "c".into() };
        assert_eq!(Failure::from(Error::Store(unavailable)).exit, Exit::Unavailable);
        assert_eq!(Failure::from(AuthError::Throttled("t".into())).exit, Exit::Denied);
        let f = Failure::from(Error::Rv(CKR_ACTION_PROHIBITED));
        assert_eq!(f.message, "CKR_ACTION_PROHIBITED");
    }
}
