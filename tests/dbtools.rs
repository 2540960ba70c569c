//! Third-party tools (Java's SunPKCS11 with keytool and jarsigner, pkcs11-tool, p11tool, PyKCS11) in a
//! database slot compared with a pass-through slot, through the shim, against SoftHSM2. The cases are in
//! tests/dbtools_cases; tests/dbtools_cssim.rs runs them against the simulator.
mod common;
mod dbtools_cases;

dbtools_cases!(
    java_keytool_and_jarsigner,
    aes32_keygen,
    aes16_sensitive_keygen,
    aes_extractable_keygen,
    ec_p256_keypairgen,
    ec_extractable_keypairgen,
    rsa2048_keypairgen,
    ed25519_keypairgen,
    ec_allowed_mechanisms_keypairgen,
    certificate_write_object,
    data_write_object,
);

#[test]
fn diff_shows_changed_lines_under_their_block() {
    let pass =
        "Secret Key Object; AES length 32\n  label: a\n  Access: never extractable, local\nData object\n  label: d";
    let db = "Data object\n  label: d\nSecret Key Object; AES length 32\n  label: a\n  Access: extractable, local";
    let sorted = |t: &str| dbtools_cases::sorted_blocks(t, |l| !l.starts_with(' '));
    assert_eq!(sorted(pass).lines().next(), Some("Data object"), "blocks are sorted");
    let d = dbtools_cases::diff(&sorted(pass), &sorted(db));
    assert!(d.contains("@@ Secret Key Object; AES length 32\n"), "{d}");
    assert!(d.contains("-   Access: never extractable, local\n+   Access: extractable, local\n"), "{d}");
    assert_eq!(dbtools_cases::diff(&sorted(pass), &sorted(pass)), "");
    assert_eq!(
        dbtools_cases::mask_hex("  EC_POINT:   04410443f1e0a9d2c6b5a4f3e2d1c0b9a8f7e6d5c4b3"),
        "  EC_POINT:   <hex>"
    );
}
