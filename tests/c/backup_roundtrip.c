/*
 * A C application using p11shim's vendor interface "P11SHIM Backup" 2.0 through include/p11shim.h: users of
 * the permission model log on to a PKCS#11 session (password; Ed25519 signature over the shim's challenge,
 * signed with OpenSSL), and exports, verifies, imports and group changes run with their permissions:
 * refused without a logon, refused for a user of another group, allowed for two stacked logons that reach
 * 00000002 together. Then the round trip: export a stored key's group, verify the file, destroy the key,
 * import the file, check that the restored key is the same key and that a second import skips it.
 *
 * usage: backup_roundtrip SHIM_SO TOKEN_LABEL USER_PIN BACKUP_FILE HALF2_KEY_PEM
 * Users (made by tests/c_api.rs): hrops (00000002, HR.*, password hrops-pass), half1 (00000001, CApi,
 * password half1-pass), half2 (00000001, CApi, Ed25519 key HALF2_KEY_PEM). The config sets [logon]
 * delay = "200ms".
 * Prints one line per step; exit status 0 only if every step passed.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <p11-kit/pkcs11.h>
#include "p11shim.h"

/* CK_INTERFACE of PKCS#11 3.0 (Debian 12's p11-kit pkcs11.h is 2.40). */
typedef struct {
    CK_UTF8CHAR *pInterfaceName;
    void *pFunctionList;
    CK_FLAGS flags;
} interface_t;

#define EXPECT(rv, want, what)                                                                              \
    do {                                                                                                    \
        CK_RV r_ = (rv);                                                                                    \
        if (r_ != (CK_RV)(want)) {                                                                          \
            fprintf(stderr, "FAIL %s: CK_RV 0x%lx, expected 0x%lx\n", what, (unsigned long)r_,             \
                    (unsigned long)(want));                                                                 \
            exit(1);                                                                                        \
        }                                                                                                   \
        printf("ok   %s\n", what);                                                                          \
    } while (0)
#define CHECK(rv, what) EXPECT(rv, CKR_OK, what)

static CK_FUNCTION_LIST_PTR p11;
static P11SHIM_BACKUP_FUNCTION_LIST *backup;

static CK_OBJECT_HANDLE find_key(CK_SESSION_HANDLE s, const char *label) {
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_LABEL, (void *)label, strlen(label)}};
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    CK_ULONG n = 0;
    CHECK(p11->C_FindObjectsInit(s, t, 2), "C_FindObjectsInit");
    CHECK(p11->C_FindObjects(s, &h, 1, &n), "C_FindObjects");
    CHECK(p11->C_FindObjectsFinal(s), "C_FindObjectsFinal");
    return n == 1 ? h : CK_INVALID_HANDLE;
}

static void encrypt_block(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key, CK_BYTE out[16]) {
    CK_MECHANISM ecb = {CKM_AES_ECB, NULL, 0};
    CK_BYTE block[16] = "p11shim C block";
    CK_ULONG len = 16;
    CHECK(p11->C_EncryptInit(s, &ecb, key), "C_EncryptInit");
    CHECK(p11->C_Encrypt(s, block, 16, out, &len), "C_Encrypt");
}

static CK_OBJECT_HANDLE stored_key(CK_SESSION_HANDLE s, const char *label, const char *group) {
    CK_MECHANISM gen = {CKM_AES_KEY_GEN, NULL, 0};
    CK_BBOOL yes = CK_TRUE;
    CK_ULONG len = 32;
    CK_ATTRIBUTE t[] = {{CKA_TOKEN, &yes, 1},
                        {CKA_ENCRYPT, &yes, 1},
                        {CKA_VALUE_LEN, &len, sizeof len},
                        {CKA_LABEL, (void *)label, strlen(label)},
                        {CKA_P11SHIM_GROUP, (void *)group, strlen(group)}};
    CK_OBJECT_HANDLE key;
    CHECK(p11->C_GenerateKey(s, &gen, t, 5, &key), "C_GenerateKey (stored)");
    return key;
}

static CK_RV set_group(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key, const char *group) {
    CK_ATTRIBUTE t[] = {{CKA_P11SHIM_GROUP, (void *)group, strlen(group)}};
    return p11->C_SetAttributeValue(s, key, t, 1);
}

static void expect_group(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key, const char *group) {
    char got[64] = {0};
    CK_ATTRIBUTE t[] = {{CKA_P11SHIM_GROUP, got, sizeof got - 1}};
    CHECK(p11->C_GetAttributeValue(s, key, t, 1), "C_GetAttributeValue(CKA_P11SHIM_GROUP)");
    if (t[0].ulValueLen != strlen(group) || memcmp(got, group, strlen(group)) != 0) {
        fprintf(stderr, "FAIL the key's group is %.*s, expected %s\n", (int)t[0].ulValueLen, got, group);
        exit(1);
    }
    printf("ok   the key's group is %s\n", group);
}

static CK_RV logon(CK_SESSION_HANDLE s, const char *user, const char *password) {
    return backup->P11SHIM_Logon(s, user, (const CK_BYTE *)password, strlen(password));
}

/* A signature logon: the shim's challenge, signed with the user's Ed25519 key by OpenSSL. The signature is
 * also returned, to try it again. */
static CK_RV logon_sign(CK_SESSION_HANDLE s, const char *user, const char *key_file, CK_BYTE sig[64]) {
    CK_ULONG len = 0;
    CHECK(backup->P11SHIM_GetChallenge(s, user, NULL, &len), "P11SHIM_GetChallenge (length)");
    CK_BYTE small[8];
    CK_ULONG small_len = sizeof small;
    EXPECT(backup->P11SHIM_GetChallenge(s, user, small, &small_len), CKR_BUFFER_TOO_SMALL,
           "P11SHIM_GetChallenge into a small buffer is CKR_BUFFER_TOO_SMALL");
    CK_BYTE *challenge = malloc(len);
    CHECK(backup->P11SHIM_GetChallenge(s, user, challenge, &len), "P11SHIM_GetChallenge");
    FILE *f = fopen(key_file, "r");
    EVP_PKEY *key = f ? PEM_read_PrivateKey(f, NULL, NULL, NULL) : NULL;
    if (f)
        fclose(f);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    size_t sig_len = 64;
    if (!key || !ctx || EVP_DigestSignInit(ctx, NULL, NULL, NULL, key) != 1 ||
        EVP_DigestSign(ctx, sig, &sig_len, challenge, len) != 1 || sig_len != 64) {
        fprintf(stderr, "FAIL signing the challenge with %s\n", key_file);
        exit(1);
    }
    EVP_MD_CTX_free(ctx);
    EVP_PKEY_free(key);
    free(challenge);
    return backup->P11SHIM_LogonSign(s, user, sig, 64);
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s SHIM_SO TOKEN_LABEL USER_PIN BACKUP_FILE HALF2_KEY_PEM\n", argv[0]);
        return 2;
    }
    const char *label = argv[2], *pin = argv[3], *file = argv[4], *half2_key = argv[5];
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "FAIL dlopen: %s\n", dlerror());
        return 1;
    }
    CK_RV (*get_list)(CK_FUNCTION_LIST_PTR_PTR) = (CK_RV(*)(CK_FUNCTION_LIST_PTR_PTR))dlsym(lib, "C_GetFunctionList");
    CK_RV (*get_iface)(CK_UTF8CHAR_PTR, CK_VERSION_PTR, interface_t **, CK_FLAGS) =
        (CK_RV(*)(CK_UTF8CHAR_PTR, CK_VERSION_PTR, interface_t **, CK_FLAGS))dlsym(lib, "C_GetInterface");
    if (!get_list || !get_iface) {
        fprintf(stderr, "FAIL dlsym\n");
        return 1;
    }
    CHECK(get_list(&p11), "C_GetFunctionList");
    interface_t *iface = NULL;
    CHECK(get_iface((CK_UTF8CHAR_PTR)P11SHIM_BACKUP_INTERFACE, NULL, &iface, 0), "C_GetInterface(P11SHIM Backup)");
    backup = (P11SHIM_BACKUP_FUNCTION_LIST *)iface->pFunctionList;
    if (backup->version.major != 2) {
        fprintf(stderr, "FAIL interface version %d.%d\n", backup->version.major, backup->version.minor);
        return 1;
    }
    printf("ok   interface version %d.%d\n", backup->version.major, backup->version.minor);

    CHECK(p11->C_Initialize(NULL), "C_Initialize");
    CK_SLOT_ID slots[16];
    CK_ULONG nslots = 16;
    CHECK(p11->C_GetSlotList(CK_TRUE, slots, &nslots), "C_GetSlotList");
    CK_SLOT_ID slot = (CK_SLOT_ID)-1;
    for (CK_ULONG i = 0; i < nslots; i++) {
        CK_TOKEN_INFO info;
        if (p11->C_GetTokenInfo(slots[i], &info) == CKR_OK && strncmp((char *)info.label, label, strlen(label)) == 0 &&
            (strlen(label) == 32 || info.label[strlen(label)] == ' '))
            slot = slots[i];
    }
    if (slot == (CK_SLOT_ID)-1) {
        fprintf(stderr, "FAIL no token %s\n", label);
        return 1;
    }
    CK_SESSION_HANDLE s;
    CHECK(p11->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s), "C_OpenSession");
    CHECK(p11->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin)), "C_Login");

    CK_OBJECT_HANDLE key = stored_key(s, "c-key", "CApi");
    CK_OBJECT_HANDLE hr_key = stored_key(s, "hr-key", "HR1");
    CK_BYTE before[16], after[16];
    encrypt_block(s, key, before);
    CK_ULONG exported = 0, records = 0, added = 0, skipped = 0;

    /* The token's user PIN is not a p11shim logon. */
    EXPECT(backup->P11SHIM_ExportGroup(s, ".*", file, &exported), CKR_USER_NOT_LOGGED_IN,
           "export without a p11shim logon is CKR_USER_NOT_LOGGED_IN");
    EXPECT(backup->P11SHIM_VerifyFile(s, file, &records), CKR_USER_NOT_LOGGED_IN,
           "verify without a logon is CKR_USER_NOT_LOGGED_IN");
    EXPECT(backup->P11SHIM_ImportFile(s, file, 0, &added, &skipped), CKR_USER_NOT_LOGGED_IN,
           "import without a logon is CKR_USER_NOT_LOGGED_IN");
    EXPECT(set_group(s, key, "HR1"), CKR_ACTION_PROHIBITED,
           "C_SetAttributeValue(CKA_P11SHIM_GROUP) without a logon is CKR_ACTION_PROHIBITED");
    expect_group(s, key, "CApi");

    /* A user of another group. */
    EXPECT(logon(s, "hrops", "wrong-password"), CKR_PIN_INCORRECT, "a wrong password is CKR_PIN_INCORRECT");
    EXPECT(logon(s, "nobody", "hrops-pass"), CKR_PIN_INCORRECT, "an unknown user is CKR_PIN_INCORRECT");
    EXPECT(logon(s, "hrops", "hrops-pass"), CKR_PIN_LOCKED,
           "right after a failed logon the user must wait: CKR_PIN_LOCKED");
    usleep(300 * 1000);
    CHECK(logon(s, "hrops", "hrops-pass"), "P11SHIM_Logon hrops (00000002, HR.*) after the wait");
    EXPECT(logon(s, "hrops", "hrops-pass"), CKR_USER_ALREADY_LOGGED_IN, "a second logon of hrops is refused");
    EXPECT(backup->P11SHIM_ExportGroup(s, ".*", file, &exported), CKR_ACTION_PROHIBITED,
           "hrops exporting every group (CApi among them) is CKR_ACTION_PROHIBITED");
    EXPECT(backup->P11SHIM_ExportGroup(s, "CApi", file, &exported), CKR_ACTION_PROHIBITED,
           "hrops exporting group CApi is CKR_ACTION_PROHIBITED");
    if (access(file, F_OK) == 0) {
        fprintf(stderr, "FAIL a refused export left %s\n", file);
        return 1;
    }
    EXPECT(set_group(s, key, "HR1"), CKR_ACTION_PROHIBITED, "hrops moving a CApi key into HR1 is refused");
    EXPECT(set_group(s, hr_key, "CApi"), CKR_ACTION_PROHIBITED, "hrops moving an HR1 key into CApi is refused");
    CHECK(set_group(s, hr_key, "HR2"), "hrops moves an HR1 key to HR2 (both match HR.*)");
    expect_group(s, hr_key, "HR2");
    CHECK(backup->P11SHIM_Logoff(s, "hrops"), "P11SHIM_Logoff hrops");
    EXPECT(backup->P11SHIM_Logoff(s, "hrops"), CKR_USER_NOT_LOGGED_IN, "a second logoff is CKR_USER_NOT_LOGGED_IN");

    /* Dual control: two users of group CApi with 00000001 each. */
    CHECK(logon(s, "half1", "half1-pass"), "P11SHIM_Logon half1 (00000001, CApi)");
    EXPECT(backup->P11SHIM_ExportGroup(s, "CApi", file, &exported), CKR_ACTION_PROHIBITED,
           "half1 alone cannot export CApi");
    EXPECT(logon(s, "half2", "half2-pass"), CKR_PIN_INCORRECT, "half2 logs on by signature, not by password");
    usleep(300 * 1000);
    CK_BYTE sig[64];
    EXPECT(backup->P11SHIM_LogonSign(s, "half2", sig, 64), CKR_OPERATION_NOT_INITIALIZED,
           "a signature logon without a challenge is CKR_OPERATION_NOT_INITIALIZED");
    CHECK(logon_sign(s, "half2", half2_key, sig), "P11SHIM_LogonSign half2 (00000001, CApi, Ed25519)");
    EXPECT(backup->P11SHIM_LogonSign(s, "half2", sig, 64), CKR_OPERATION_NOT_INITIALIZED,
           "a challenge is used once: replaying the signature is refused");
    CHECK(backup->P11SHIM_ExportGroup(s, "CApi", file, &exported), "P11SHIM_ExportGroup CApi by half1 + half2");
    if (exported != 1) {
        fprintf(stderr, "FAIL exported %lu keys, expected 1\n", (unsigned long)exported);
        return 1;
    }
    CHECK(backup->P11SHIM_VerifyFile(s, file, &records), "P11SHIM_VerifyFile");
    if (records != 1) {
        fprintf(stderr, "FAIL verify saw %lu records\n", (unsigned long)records);
        return 1;
    }
    CHECK(p11->C_DestroyObject(s, key), "C_DestroyObject");
    if (find_key(s, "c-key") != CK_INVALID_HANDLE) {
        fprintf(stderr, "FAIL key still there after destroy\n");
        return 1;
    }
    CHECK(backup->P11SHIM_ImportFile(s, file, 0, &added, &skipped), "P11SHIM_ImportFile");
    if (added != 1 || skipped != 0) {
        fprintf(stderr, "FAIL import added %lu skipped %lu\n", (unsigned long)added, (unsigned long)skipped);
        return 1;
    }
    key = find_key(s, "c-key");
    if (key == CK_INVALID_HANDLE) {
        fprintf(stderr, "FAIL restored key not found\n");
        return 1;
    }
    encrypt_block(s, key, after);
    if (memcmp(before, after, 16) != 0) {
        fprintf(stderr, "FAIL the restored key encrypts differently\n");
        return 1;
    }
    printf("ok   the restored key is the same key\n");
    CHECK(backup->P11SHIM_ImportFile(s, file, 0, &added, &skipped), "P11SHIM_ImportFile again");
    if (added != 0 || skipped != 1) {
        fprintf(stderr, "FAIL second import added %lu skipped %lu\n", (unsigned long)added, (unsigned long)skipped);
        return 1;
    }
    printf("ok   a second import skips the key already present\n");

    /* A group change needs the permission for both groups: CApi (half1 + half2) and HR1 (hrops). */
    EXPECT(set_group(s, key, "HR1"), CKR_ACTION_PROHIBITED, "half1 + half2 cannot move a CApi key into HR1");
    CHECK(logon(s, "hrops", "hrops-pass"), "P11SHIM_Logon hrops as well");
    CHECK(set_group(s, key, "HR1"), "half1 + half2 + hrops move the CApi key into HR1");
    expect_group(s, key, "HR1");

    CK_RV bad = backup->P11SHIM_ImportFile(s, NULL, 0, &added, &skipped);
    if (bad != CKR_ARGUMENTS_BAD) {
        fprintf(stderr, "FAIL NULL path gave 0x%lx\n", (unsigned long)bad);
        return 1;
    }
    printf("ok   NULL path is CKR_ARGUMENTS_BAD\n");
    CHECK(backup->P11SHIM_Logoff(s, NULL), "P11SHIM_Logoff of everyone");
    EXPECT(backup->P11SHIM_ExportGroup(s, "CApi", file, &exported), CKR_USER_NOT_LOGGED_IN,
           "after the logoff the export is CKR_USER_NOT_LOGGED_IN again");

    /* Logons belong to the session: another session of the same logged-in token has none. */
    CHECK(logon(s, "half1", "half1-pass"), "P11SHIM_Logon half1 again");
    CK_SESSION_HANDLE s2;
    CHECK(p11->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s2), "C_OpenSession (second)");
    EXPECT(backup->P11SHIM_ExportGroup(s2, "CApi", file, &exported), CKR_USER_NOT_LOGGED_IN,
           "another session has no p11shim logon");
    CHECK(p11->C_CloseSession(s), "C_CloseSession");
    CHECK(p11->C_CloseSession(s2), "C_CloseSession (second)");
    CHECK(p11->C_Finalize(NULL), "C_Finalize");
    printf("PASS\n");
    return 0;
}
