//! One error type that carries the CK_RV the application sees and the cause the log sees.

use cryptoki_sys::{CKR_GENERAL_ERROR, CK_RV};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A PKCS#11 return value to hand back as it is (from the backend or from the shim's own checks).
    #[error("{}", rv_name(*.0))]
    Rv(CK_RV),

    #[error("configuration file {path}: {cause}")]
    Config { path: PathBuf, cause: String },

    #[error("backend module {path}: {cause}")]
    Backend { path: PathBuf, cause: String },

    #[error(transparent)]
    Store(#[from] crate::store::StoreError),

    /// Refused for want of a logon, a permission or a PIN; the message says which (and the refusal is
    /// audited where the operation is).
    #[error("{0}")]
    Denied(String),

    /// What was named does not exist: a token, a key, a user, a token's MBK set.
    #[error("{0}")]
    Missing(String),

    /// Input that cannot be used: a damaged, edited or truncated file, one of an unknown version, data made
    /// under another MBK.
    #[error("{0}")]
    Damaged(String),

    /// Anything else the shim refuses or fails at, with a message for the log or the operator.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// The CK_RV this error becomes at the C boundary.
    pub fn rv(&self) -> CK_RV {
        match self {
            Error::Rv(rv) => *rv,
            Error::Config { .. } | Error::Backend { .. } | Error::Other(_) | Error::Missing(_) => CKR_GENERAL_ERROR,
            Error::Denied(_) => cryptoki_sys::CKR_ACTION_PROHIBITED,
            Error::Damaged(_) => cryptoki_sys::CKR_FUNCTION_FAILED,
            Error::Store(crate::store::StoreError::Unavailable { .. }) => cryptoki_sys::CKR_DEVICE_ERROR,
            Error::Store(crate::store::StoreError::Limit { .. }) => cryptoki_sys::CKR_DEVICE_MEMORY,
            Error::Store(_) => CKR_GENERAL_ERROR,
        }
    }

    /// What kind of failure this is, for callers that act on it (the command's exit status).
    pub fn kind(&self) -> ErrorKind {
        use cryptoki_sys::*;
        match self {
            Error::Denied(_) => ErrorKind::Denied,
            Error::Missing(_) => ErrorKind::NotFound,
            Error::Damaged(_) => ErrorKind::Damaged,
            Error::Backend { .. } => ErrorKind::Unavailable,
            Error::Store(e) => e.kind(),
            Error::Rv(rv) => match *rv {
                CKR_PIN_INCORRECT
                | CKR_PIN_LOCKED
                | CKR_PIN_EXPIRED
                | CKR_USER_NOT_LOGGED_IN
                | CKR_ACTION_PROHIBITED
                | CKR_USER_PIN_NOT_INITIALIZED
                | CKR_USER_ANOTHER_ALREADY_LOGGED_IN => ErrorKind::Denied,
                CKR_DEVICE_ERROR
                | CKR_DEVICE_REMOVED
                | CKR_DEVICE_MEMORY
                | CKR_TOKEN_NOT_PRESENT
                | CKR_TOKEN_NOT_RECOGNIZED
                | CKR_CRYPTOKI_NOT_INITIALIZED => ErrorKind::Unavailable,
                CKR_WRAPPED_KEY_INVALID | CKR_ENCRYPTED_DATA_INVALID | CKR_SIGNATURE_INVALID => ErrorKind::Damaged,
                _ => ErrorKind::Failed,
            },
            Error::Config { .. } | Error::Other(_) => ErrorKind::Failed,
        }
    }
}

/// What kind of failure an error is: what a caller can act on without reading the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Refused for want of a logon, a permission or a PIN.
    Denied,
    /// What was named does not exist (a token, a key, a user, an MBK set), or nothing matched.
    NotFound,
    /// Input that cannot be used: damaged, edited, truncated, of an unknown version.
    Damaged,
    /// Input made under another MBK than the target token's.
    WrongMbk,
    /// A file cannot be read, or an output cannot be written where asked (it exists, it is not a regular
    /// file, the disk is full).
    Io,
    /// The key store or the HSM cannot be reached or failed as a device.
    Unavailable,
    /// Anything else.
    Failed,
}

impl From<CK_RV> for Error {
    fn from(rv: CK_RV) -> Self {
        Error::Rv(rv)
    }
}

// Lets `?` turn an Error into the CK_RV at the C boundary.
impl From<Error> for CK_RV {
    fn from(e: Error) -> CK_RV {
        e.rv()
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Turns a CK_RV into `Result`, so a backend call reads `rv_ok(f(...))?`.
#[inline]
pub fn rv_ok(rv: CK_RV) -> Result<()> {
    if rv == cryptoki_sys::CKR_OK {
        Ok(())
    } else {
        Err(Error::Rv(rv))
    }
}

/// The spec's name of an attribute, for messages.
pub fn attr_name(ty: cryptoki_sys::CK_ATTRIBUTE_TYPE) -> &'static str {
    use cryptoki_sys::*;
    match ty {
        CKA_CLASS => "CKA_CLASS",
        CKA_TOKEN => "CKA_TOKEN",
        CKA_PRIVATE => "CKA_PRIVATE",
        CKA_LABEL => "CKA_LABEL",
        CKA_VALUE => "CKA_VALUE",
        CKA_TRUSTED => "CKA_TRUSTED",
        CKA_KEY_TYPE => "CKA_KEY_TYPE",
        CKA_ID => "CKA_ID",
        CKA_SENSITIVE => "CKA_SENSITIVE",
        CKA_ENCRYPT => "CKA_ENCRYPT",
        CKA_DECRYPT => "CKA_DECRYPT",
        CKA_WRAP => "CKA_WRAP",
        CKA_UNWRAP => "CKA_UNWRAP",
        CKA_SIGN => "CKA_SIGN",
        CKA_SIGN_RECOVER => "CKA_SIGN_RECOVER",
        CKA_VERIFY => "CKA_VERIFY",
        CKA_DERIVE => "CKA_DERIVE",
        CKA_EXTRACTABLE => "CKA_EXTRACTABLE",
        CKA_LOCAL => "CKA_LOCAL",
        CKA_NEVER_EXTRACTABLE => "CKA_NEVER_EXTRACTABLE",
        CKA_ALWAYS_SENSITIVE => "CKA_ALWAYS_SENSITIVE",
        CKA_MODIFIABLE => "CKA_MODIFIABLE",
        CKA_COPYABLE => "CKA_COPYABLE",
        CKA_DESTROYABLE => "CKA_DESTROYABLE",
        CKA_WRAP_WITH_TRUSTED => "CKA_WRAP_WITH_TRUSTED",
        CKA_ALWAYS_AUTHENTICATE => "CKA_ALWAYS_AUTHENTICATE",
        CKA_WRAP_TEMPLATE => "CKA_WRAP_TEMPLATE",
        CKA_UNWRAP_TEMPLATE => "CKA_UNWRAP_TEMPLATE",
        CKA_DERIVE_TEMPLATE => "CKA_DERIVE_TEMPLATE",
        CKA_ALLOWED_MECHANISMS => "CKA_ALLOWED_MECHANISMS",
        crate::attrs::CKA_P11SHIM_GROUP => "CKA_P11SHIM_GROUP",
        _ => "an attribute",
    }
}

/// The spec's name of a return value, for log lines and messages: "CKR_PIN_INCORRECT"; a vendor's own
/// value as "CKR_VENDOR_DEFINED+0x…", anything else as "CK_RV 0x…".
pub fn rv_name(rv: CK_RV) -> String {
    use cryptoki_sys::*;
    macro_rules! names {
        ($($name:ident),* $(,)?) => {
            match rv {
                $($name => return stringify!($name).to_string(),)*
                _ => {}
            }
        };
    }
    names!(
        CKR_ACTION_PROHIBITED,
        CKR_AEAD_DECRYPT_FAILED,
        CKR_ARGUMENTS_BAD,
        CKR_ATTRIBUTE_READ_ONLY,
        CKR_ATTRIBUTE_SENSITIVE,
        CKR_ATTRIBUTE_TYPE_INVALID,
        CKR_ATTRIBUTE_VALUE_INVALID,
        CKR_BUFFER_TOO_SMALL,
        CKR_CANCEL,
        CKR_CANT_LOCK,
        CKR_CRYPTOKI_ALREADY_INITIALIZED,
        CKR_CRYPTOKI_NOT_INITIALIZED,
        CKR_CURVE_NOT_SUPPORTED,
        CKR_DATA_INVALID,
        CKR_DATA_LEN_RANGE,
        CKR_DEVICE_ERROR,
        CKR_DEVICE_MEMORY,
        CKR_DEVICE_REMOVED,
        CKR_DOMAIN_PARAMS_INVALID,
        CKR_ENCRYPTED_DATA_INVALID,
        CKR_ENCRYPTED_DATA_LEN_RANGE,
        CKR_EXCEEDED_MAX_ITERATIONS,
        CKR_FIPS_SELF_TEST_FAILED,
        CKR_FUNCTION_CANCELED,
        CKR_FUNCTION_FAILED,
        CKR_FUNCTION_NOT_PARALLEL,
        CKR_FUNCTION_NOT_SUPPORTED,
        CKR_FUNCTION_REJECTED,
        CKR_GENERAL_ERROR,
        CKR_HOST_MEMORY,
        CKR_INFORMATION_SENSITIVE,
        CKR_KEY_CHANGED,
        CKR_KEY_EXHAUSTED,
        CKR_KEY_FUNCTION_NOT_PERMITTED,
        CKR_KEY_HANDLE_INVALID,
        CKR_KEY_INDIGESTIBLE,
        CKR_KEY_NEEDED,
        CKR_KEY_NOT_NEEDED,
        CKR_KEY_NOT_WRAPPABLE,
        CKR_KEY_SIZE_RANGE,
        CKR_KEY_TYPE_INCONSISTENT,
        CKR_KEY_UNEXTRACTABLE,
        CKR_LIBRARY_LOAD_FAILED,
        CKR_MECHANISM_INVALID,
        CKR_MECHANISM_PARAM_INVALID,
        CKR_MUTEX_BAD,
        CKR_MUTEX_NOT_LOCKED,
        CKR_NEED_TO_CREATE_THREADS,
        CKR_NEW_PIN_MODE,
        CKR_NEXT_OTP,
        CKR_NO_EVENT,
        CKR_OBJECT_HANDLE_INVALID,
        CKR_OK,
        CKR_OPERATION_ACTIVE,
        CKR_OPERATION_CANCEL_FAILED,
        CKR_OPERATION_NOT_INITIALIZED,
        CKR_OPERATION_NOT_VALIDATED,
        CKR_PARAMETER_SET_NOT_SUPPORTED,
        CKR_PENDING,
        CKR_PIN_EXPIRED,
        CKR_PIN_INCORRECT,
        CKR_PIN_INVALID,
        CKR_PIN_LEN_RANGE,
        CKR_PIN_LOCKED,
        CKR_PIN_TOO_WEAK,
        CKR_PUBLIC_KEY_INVALID,
        CKR_RANDOM_NO_RNG,
        CKR_RANDOM_SEED_NOT_SUPPORTED,
        CKR_SAVED_STATE_INVALID,
        CKR_SEED_RANDOM_REQUIRED,
        CKR_SESSION_ASYNC_NOT_SUPPORTED,
        CKR_SESSION_CLOSED,
        CKR_SESSION_COUNT,
        CKR_SESSION_EXISTS,
        CKR_SESSION_HANDLE_INVALID,
        CKR_SESSION_PARALLEL_NOT_SUPPORTED,
        CKR_SESSION_READ_ONLY,
        CKR_SESSION_READ_ONLY_EXISTS,
        CKR_SESSION_READ_WRITE_SO_EXISTS,
        CKR_SIGNATURE_INVALID,
        CKR_SIGNATURE_LEN_RANGE,
        CKR_SLOT_ID_INVALID,
        CKR_STATE_UNSAVEABLE,
        CKR_TEMPLATE_INCOMPLETE,
        CKR_TEMPLATE_INCONSISTENT,
        CKR_TOKEN_NOT_INITIALIZED,
        CKR_TOKEN_NOT_PRESENT,
        CKR_TOKEN_NOT_RECOGNIZED,
        CKR_TOKEN_RESOURCE_EXCEEDED,
        CKR_TOKEN_WRITE_PROTECTED,
        CKR_UNWRAPPING_KEY_HANDLE_INVALID,
        CKR_UNWRAPPING_KEY_SIZE_RANGE,
        CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT,
        CKR_USER_ALREADY_LOGGED_IN,
        CKR_USER_ANOTHER_ALREADY_LOGGED_IN,
        CKR_USER_NOT_LOGGED_IN,
        CKR_USER_PIN_NOT_INITIALIZED,
        CKR_USER_TOO_MANY_TYPES,
        CKR_USER_TYPE_INVALID,
        CKR_WRAPPED_KEY_INVALID,
        CKR_WRAPPED_KEY_LEN_RANGE,
        CKR_WRAPPING_KEY_HANDLE_INVALID,
        CKR_WRAPPING_KEY_SIZE_RANGE,
        CKR_WRAPPING_KEY_TYPE_INCONSISTENT,
    );
    if rv >= CKR_VENDOR_DEFINED {
        format!("CKR_VENDOR_DEFINED+0x{:X}", rv - CKR_VENDOR_DEFINED)
    } else {
        format!("CK_RV 0x{rv:08X}")
    }
}

/// The spec's name of an object class ("CKO_SECRET_KEY"), for listings and messages.
pub fn class_name(class: cryptoki_sys::CK_OBJECT_CLASS) -> String {
    use cryptoki_sys::*;
    let name = match class {
        CKO_DATA => "CKO_DATA",
        CKO_CERTIFICATE => "CKO_CERTIFICATE",
        CKO_PUBLIC_KEY => "CKO_PUBLIC_KEY",
        CKO_PRIVATE_KEY => "CKO_PRIVATE_KEY",
        CKO_SECRET_KEY => "CKO_SECRET_KEY",
        CKO_HW_FEATURE => "CKO_HW_FEATURE",
        CKO_DOMAIN_PARAMETERS => "CKO_DOMAIN_PARAMETERS",
        CKO_MECHANISM => "CKO_MECHANISM",
        CKO_OTP_KEY => "CKO_OTP_KEY",
        _ => return format!("CKO 0x{class:X}"),
    };
    name.to_string()
}

/// The spec's name of a key type ("CKK_AES"); "-" for objects that are not keys.
pub fn key_type_name(key_type: cryptoki_sys::CK_KEY_TYPE) -> String {
    use cryptoki_sys::*;
    let name = match key_type {
        CKK_RSA => "CKK_RSA",
        CKK_DSA => "CKK_DSA",
        CKK_DH => "CKK_DH",
        CKK_EC => "CKK_EC",
        CKK_GENERIC_SECRET => "CKK_GENERIC_SECRET",
        CKK_DES3 => "CKK_DES3",
        CKK_AES => "CKK_AES",
        CKK_EC_EDWARDS => "CKK_EC_EDWARDS",
        CKK_EC_MONTGOMERY => "CKK_EC_MONTGOMERY",
        CKK_SHA256_HMAC => "CKK_SHA256_HMAC",
        CK_UNAVAILABLE_INFORMATION => "-",
        _ => return format!("CKK 0x{key_type:X}"),
    };
    name.to_string()
}
