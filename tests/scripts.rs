//! The shim under real tools (pkcs11-tool, the OpenSSL pkcs11 engine), against SoftHSM2. The cases are in
//! tests/scripts_cases; tests/scripts_cssim.rs runs them against the simulator. Here: the output
//! normalization itself, which needs no backend.

mod common;
mod scripts_cases;

use scripts_cases::normalize;

#[test]
fn normalize_masks_only_what_varies() {
    assert_eq!(
        normalize(
            "Slot 0 (0x10da1238): SoftHSM slot ID 0x10da1238\nSlot 1 (0x1): x\n  serial num         : 87ef357790da1238"
        ),
        "Slot 0 (0x<id>): SoftHSM slot ID 0x<id>\nSlot 1 (0x1): x\n  serial num <serial>"
    );
    assert_eq!(normalize("  EC_PARAMS:  06082a8648ce3d030107"), "  EC_PARAMS:  06082a8648ce3d030107");
    assert_eq!(normalize("  EC_POINT:   0441047eb612278c3d72a7067d7befd5ad990dcba873882c40"), "  EC_POINT:   <hex>");
    assert_ne!(normalize("RSA-PKCS: OK"), normalize("RSA-PKCS: FAILED"));
}
