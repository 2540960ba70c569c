/*
 * A C application using p11shim's vendor interface "P11SHIM Backup" through include/p11shim.h:
 * make a stored key, export its group, verify the file, destroy the key, import the file, and check that
 * the restored key is the same key (same ciphertext), then that a second import skips it.
 *
 * usage: backup_roundtrip SHIM_SO TOKEN_LABEL USER_PIN BACKUP_FILE
 * Prints one line per step; exit status 0 only if every step passed.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <p11-kit/pkcs11.h>
#include "p11shim.h"

/* CK_INTERFACE of PKCS#11 3.0 (Debian 12's p11-kit pkcs11.h is 2.40). */
typedef struct {
    CK_UTF8CHAR *pInterfaceName;
    void *pFunctionList;
    CK_FLAGS flags;
} interface_t;

#define CHECK(rv, what)                                                                  \
    do {                                                                                 \
        CK_RV r_ = (rv);                                                                 \
        if (r_ != CKR_OK) {                                                              \
            fprintf(stderr, "FAIL %s: CK_RV 0x%lx\n", what, (unsigned long)r_);          \
            exit(1);                                                                     \
        }                                                                                \
        printf("ok   %s\n", what);                                                   \
    } while (0)

static CK_FUNCTION_LIST_PTR p11;

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

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s SHIM_SO TOKEN_LABEL USER_PIN BACKUP_FILE\n", argv[0]);
        return 2;
    }
    const char *label = argv[2], *pin = argv[3], *file = argv[4];
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
    P11SHIM_BACKUP_FUNCTION_LIST *backup = (P11SHIM_BACKUP_FUNCTION_LIST *)iface->pFunctionList;
    if (backup->version.major != 1) {
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

    /* A stored AES key in group "CApi". */
    CK_MECHANISM gen = {CKM_AES_KEY_GEN, NULL, 0};
    CK_BBOOL yes = CK_TRUE;
    CK_ULONG len = 32;
    const char *group = "CApi";
    CK_ATTRIBUTE t[] = {{CKA_TOKEN, &yes, 1},        {CKA_ENCRYPT, &yes, 1},
                        {CKA_VALUE_LEN, &len, sizeof len}, {CKA_LABEL, "c-key", 5},
                        {CKA_P11SHIM_GROUP, (void *)group, strlen(group)}};
    CK_OBJECT_HANDLE key;
    CHECK(p11->C_GenerateKey(s, &gen, t, 5, &key), "C_GenerateKey (stored, group CApi)");
    CK_BYTE before[16], after[16];
    encrypt_block(s, key, before);

    CK_ULONG exported = 0, records = 0, added = 0, skipped = 0;
    CHECK(backup->P11SHIM_ExportGroup(s, "CApi", file, &exported), "P11SHIM_ExportGroup");
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
    CK_RV bad = backup->P11SHIM_ImportFile(s, NULL, 0, &added, &skipped);
    if (bad != CKR_ARGUMENTS_BAD) {
        fprintf(stderr, "FAIL NULL path gave 0x%lx\n", (unsigned long)bad);
        return 1;
    }
    printf("ok   NULL path is CKR_ARGUMENTS_BAD\n");
    CHECK(p11->C_Logout(s), "C_Logout");
    CHECK(p11->C_CloseSession(s), "C_CloseSession");
    CHECK(p11->C_Finalize(NULL), "C_Finalize");
    printf("PASS\n");
    return 0;
}
