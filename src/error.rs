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

    /// Anything else the shim refuses or fails at, with a message for the log or the operator.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// The CK_RV this error becomes at the C boundary.
    pub fn rv(&self) -> CK_RV {
        match self {
            Error::Rv(rv) => *rv,
            Error::Config { .. } | Error::Backend { .. } | Error::Other(_) => CKR_GENERAL_ERROR,
            Error::Store(crate::store::StoreError::Unavailable { .. }) => cryptoki_sys::CKR_DEVICE_ERROR,
            Error::Store(_) => CKR_GENERAL_ERROR,
        }
    }
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

/// The spec's name of a return value, for log lines and messages.
pub fn rv_name(rv: CK_RV) -> String {
    use cryptoki_sys::*;
    let name = match rv {
        CKR_OK => "CKR_OK",
        CKR_CANCEL => "CKR_CANCEL",
        CKR_HOST_MEMORY => "CKR_HOST_MEMORY",
        CKR_SLOT_ID_INVALID => "CKR_SLOT_ID_INVALID",
        CKR_GENERAL_ERROR => "CKR_GENERAL_ERROR",
        CKR_FUNCTION_FAILED => "CKR_FUNCTION_FAILED",
        CKR_ARGUMENTS_BAD => "CKR_ARGUMENTS_BAD",
        CKR_CANT_LOCK => "CKR_CANT_LOCK",
        CKR_ATTRIBUTE_READ_ONLY => "CKR_ATTRIBUTE_READ_ONLY",
        CKR_ATTRIBUTE_SENSITIVE => "CKR_ATTRIBUTE_SENSITIVE",
        CKR_ATTRIBUTE_TYPE_INVALID => "CKR_ATTRIBUTE_TYPE_INVALID",
        CKR_ATTRIBUTE_VALUE_INVALID => "CKR_ATTRIBUTE_VALUE_INVALID",
        CKR_DEVICE_ERROR => "CKR_DEVICE_ERROR",
        CKR_DEVICE_REMOVED => "CKR_DEVICE_REMOVED",
        CKR_FUNCTION_NOT_SUPPORTED => "CKR_FUNCTION_NOT_SUPPORTED",
        CKR_KEY_HANDLE_INVALID => "CKR_KEY_HANDLE_INVALID",
        CKR_MECHANISM_INVALID => "CKR_MECHANISM_INVALID",
        CKR_OBJECT_HANDLE_INVALID => "CKR_OBJECT_HANDLE_INVALID",
        CKR_OPERATION_NOT_INITIALIZED => "CKR_OPERATION_NOT_INITIALIZED",
        CKR_PIN_INCORRECT => "CKR_PIN_INCORRECT",
        CKR_SESSION_HANDLE_INVALID => "CKR_SESSION_HANDLE_INVALID",
        CKR_TEMPLATE_INCOMPLETE => "CKR_TEMPLATE_INCOMPLETE",
        CKR_TEMPLATE_INCONSISTENT => "CKR_TEMPLATE_INCONSISTENT",
        CKR_TOKEN_NOT_PRESENT => "CKR_TOKEN_NOT_PRESENT",
        CKR_USER_NOT_LOGGED_IN => "CKR_USER_NOT_LOGGED_IN",
        CKR_BUFFER_TOO_SMALL => "CKR_BUFFER_TOO_SMALL",
        CKR_CRYPTOKI_NOT_INITIALIZED => "CKR_CRYPTOKI_NOT_INITIALIZED",
        CKR_CRYPTOKI_ALREADY_INITIALIZED => "CKR_CRYPTOKI_ALREADY_INITIALIZED",
        CKR_ACTION_PROHIBITED => "CKR_ACTION_PROHIBITED",
        CKR_DEVICE_MEMORY => "CKR_DEVICE_MEMORY",
        CKR_KEY_SIZE_RANGE => "CKR_KEY_SIZE_RANGE",
        CKR_KEY_TYPE_INCONSISTENT => "CKR_KEY_TYPE_INCONSISTENT",
        CKR_KEY_FUNCTION_NOT_PERMITTED => "CKR_KEY_FUNCTION_NOT_PERMITTED",
        CKR_KEY_NOT_WRAPPABLE => "CKR_KEY_NOT_WRAPPABLE",
        CKR_KEY_UNEXTRACTABLE => "CKR_KEY_UNEXTRACTABLE",
        CKR_MECHANISM_PARAM_INVALID => "CKR_MECHANISM_PARAM_INVALID",
        CKR_OPERATION_ACTIVE => "CKR_OPERATION_ACTIVE",
        CKR_PIN_LOCKED => "CKR_PIN_LOCKED",
        CKR_SESSION_CLOSED => "CKR_SESSION_CLOSED",
        CKR_SESSION_EXISTS => "CKR_SESSION_EXISTS",
        CKR_SESSION_READ_ONLY => "CKR_SESSION_READ_ONLY",
        CKR_SIGNATURE_INVALID => "CKR_SIGNATURE_INVALID",
        CKR_TOKEN_WRITE_PROTECTED => "CKR_TOKEN_WRITE_PROTECTED",
        CKR_UNWRAPPING_KEY_HANDLE_INVALID => "CKR_UNWRAPPING_KEY_HANDLE_INVALID",
        CKR_WRAPPED_KEY_INVALID => "CKR_WRAPPED_KEY_INVALID",
        CKR_WRAPPING_KEY_HANDLE_INVALID => "CKR_WRAPPING_KEY_HANDLE_INVALID",
        CKR_USER_TYPE_INVALID => "CKR_USER_TYPE_INVALID",
        _ => return format!("CK_RV 0x{rv:08X}"),
    };
    name.to_string()
}
