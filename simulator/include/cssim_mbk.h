/*
 * cssim_mbk.h: the vendor interface "CSSIM MBK" 1.0 of the CryptoServer simulator (libcssim.so).
 *
 * The simulated device holds a master backup key (MBK, AES-256) outside every token, loaded by an
 * administrator with `cssim-admin mbk import` or generated with `cssim-admin mbk generate`. These functions
 * back a key object up as a blob encrypted and authenticated under it, and restore such a blob, as
 * `cxitool BackupKey` / `RestoreKey` do on a real CryptoServer; they work in every firmware mode.
 *
 * Obtain the function list with C_GetInterface:
 *
 *     CK_INTERFACE_PTR iface;
 *     CK_VERSION v = {1, 0};
 *     rv = C_GetInterface((CK_UTF8CHAR_PTR)CSSIM_MBK_INTERFACE_NAME, &v, &iface, 0);
 *     CSSIM_MBK_FUNCTION_LIST *mbk = (CSSIM_MBK_FUNCTION_LIST *)iface->pFunctionList;
 *
 * The interface is offered only when the configuration does not say `device_mbk = false`. Every function
 * needs C_Initialize first (else CKR_CRYPTOKI_NOT_INITIALIZED).
 *
 * The includer provides the PKCS#11 types (pkcs11.h / pkcs11t.h, CK_INTERFACE from PKCS#11 3.0).
 */
#ifndef CSSIM_MBK_H
#define CSSIM_MBK_H

#ifdef __cplusplus
extern "C" {
#endif

#define CSSIM_MBK_INTERFACE_NAME "CSSIM MBK"
/* vendor return values */
#define CKR_CSSIM_NO_MBK       (CKR_VENDOR_DEFINED + 0x43530001UL) /* the device holds no MBK */
#define CKR_CSSIM_WRONG_MBK    (CKR_VENDOR_DEFINED + 0x43530002UL) /* blob made under another MBK */
#define CKR_CSSIM_BLOB_MAC     (CKR_VENDOR_DEFINED + 0x43530003UL) /* blob MAC does not verify: altered or damaged */
#define CKR_CSSIM_BLOB_FORMAT  (CKR_VENDOR_DEFINED + 0x43530004UL) /* not a blob, truncated, or an unknown blob version */

typedef struct CSSIM_MBK_INFO {
    CK_BBOOL loaded;            /* CK_TRUE when the device holds an MBK */
    CK_BYTE  fingerprint[16];   /* its fingerprint; all zero when none */
} CSSIM_MBK_INFO;

typedef struct CSSIM_MBK_FUNCTION_LIST {
    CK_VERSION version;         /* {1, 0} */

    /* The MBK of the device behind `slot` (any valid slot id; else CKR_SLOT_ID_INVALID). No MBK: CKR_OK with
     * loaded CK_FALSE and a zero fingerprint. NULL info: CKR_ARGUMENTS_BAD. */
    CK_RV (*CSSIM_GetMbkInfo)(CK_SLOT_ID slot, CSSIM_MBK_INFO *info);

    /* The blob of a key object (secret, private or public key; else CKR_KEY_HANDLE_INVALID) the session can
     * see, with all its attributes, whatever CKA_SENSITIVE and CKA_EXTRACTABLE say. Buffer convention of
     * PKCS#11: NULL blob gives the length; too small a buffer CKR_BUFFER_TOO_SMALL with the length needed.
     * No MBK: CKR_CSSIM_NO_MBK. */
    CK_RV (*CSSIM_BackupKey)(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE key,
                             CK_BYTE_PTR blob, CK_ULONG_PTR blob_len);

    /* Creates the key a blob holds, with exactly its attributes: a session object of `session`, or a token
     * object when the template holds CKA_TOKEN = CK_TRUE (the only attribute it may hold; else
     * CKR_ATTRIBUTE_TYPE_INVALID). Token objects need a R/W session, private ones the user logged in, as in
     * C_CreateObject. Refusals create nothing: CKR_CSSIM_NO_MBK, CKR_CSSIM_WRONG_MBK (decided by the blob's
     * header, before its MAC), CKR_CSSIM_BLOB_MAC, CKR_CSSIM_BLOB_FORMAT. */
    CK_RV (*CSSIM_RestoreKey)(CK_SESSION_HANDLE session, CK_BYTE_PTR blob, CK_ULONG blob_len,
                              CK_ATTRIBUTE_PTR templ, CK_ULONG count, CK_OBJECT_HANDLE_PTR key);
} CSSIM_MBK_FUNCTION_LIST;

#ifdef __cplusplus
}
#endif

#endif /* CSSIM_MBK_H */
