//! Third-party tools (Java's SunPKCS11 with keytool and jarsigner, pkcs11-tool, p11tool, PyKCS11) in a
//! database slot compared with a pass-through slot, through the shim, against the CryptoServer simulator.
//! The cases are in tests/dbtools_cases; tests/dbtools.rs runs them against SoftHSM2.
mod common;
mod dbtools_cases;

// Not ed25519_keypairgen: the simulator has no EdDSA (no CKM_EC_EDWARDS_KEY_PAIR_GEN).
dbtools_cases!(
    java_keytool_and_jarsigner,
    aes32_keygen,
    aes16_sensitive_keygen,
    aes_extractable_keygen,
    ec_p256_keypairgen,
    ec_extractable_keypairgen,
    rsa2048_keypairgen,
    ec_allowed_mechanisms_keypairgen,
    certificate_write_object,
    data_write_object,
);
