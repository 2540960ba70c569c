/*
 * p11shim.h: what p11shim adds to the PKCS#11 API, for C applications.
 *
 * Include it after your PKCS#11 header (pkcs11.h / cryptoki.h). The shim exports only C_GetFunctionList,
 * C_GetInterfaceList and C_GetInterface; everything else is reached through the function tables.
 */
#ifndef P11SHIM_H
#define P11SHIM_H

/* The shim's version, as C_GetInfo reports it in libraryVersion. */
#define P11SHIM_VERSION_MAJOR 0
#define P11SHIM_VERSION_MINOR 1

/* The manufacturerID C_GetInfo reports (blank-padded to 32 bytes there). The libraryDescription is
 * "p11shim/<backend manufacturerID>". */
#define P11SHIM_MANUFACTURER "p11shim"

/*
 * Object handles with this bit set belong to the shim: keys it keeps outside the HSM (key store), and
 * aliases for backend handles that happen to use this bit, so that the two ranges never collide. Handles
 * of ordinary backend objects are passed through unchanged. Applications need not care: every handle the
 * shim returns is valid in every call that takes an object handle.
 */
#define P11SHIM_HANDLE_BIT (((CK_ULONG)1) << (sizeof(CK_ULONG) * 8 - 1))

/*
 * CKA_P11SHIM_GROUP: the group of a key kept in the key store (a slot with storage = "database"). A UTF-8
 * string (not NUL-terminated), non-empty, without control characters. Give it in the template of a token
 * object to choose the group (else the slot's default_group, else the token label); read it with
 * C_GetAttributeValue; use it in C_FindObjectsInit templates; change it with C_SetAttributeValue. Backend
 * objects have no group: asking for it answers CKR_ATTRIBUTE_TYPE_INVALID, and giving it when creating
 * anything but a stored key is refused with CKR_ATTRIBUTE_TYPE_INVALID. It is never sent to the backend.
 * (Bit 30, CKF_ARRAY_ATTRIBUTE, is clear: it is a plain attribute.)
 */
#define CKA_P11SHIM_GROUP (CKA_VENDOR_DEFINED | 0x00534801UL)

/*
 * The vendor interface "P11SHIM Backup": per-group export and import of keys under the token's master backup
 * key (MBK), and complete verification of a backup file, on an application's logged-in session. Get it with
 *
 *     CK_INTERFACE_PTR iface;
 *     rv = C_GetInterface((CK_UTF8CHAR_PTR)P11SHIM_BACKUP_INTERFACE, NULL, &iface, 0);
 *     P11SHIM_BACKUP_FUNCTION_LIST *backup = (P11SHIM_BACKUP_FUNCTION_LIST *)iface->pFunctionList;
 *
 * (C_GetInterface is exported by libp11shim.so; the interface is returned by name and not listed by
 * C_GetInterfaceList, so that applications enumerating interfaces see only "PKCS 11".)
 * The session's login (CKU_USER) is the authorization; every call is recorded in p11shim's audit log.
 * Paths are UTF-8, NUL-terminated. Files are the same as `p11shim backup/restore/verify` read and write.
 */
#define P11SHIM_BACKUP_INTERFACE "P11SHIM Backup"
#define P11SHIM_IMPORT_OVERWRITE 0x1UL /* replace keys already present (refused in CC mode) */
#define P11SHIM_IMPORT_DRY_RUN 0x2UL   /* check and count, change nothing */

typedef struct P11SHIM_BACKUP_FUNCTION_LIST {
    CK_VERSION version; /* 1.0 */
    /* Exports every key of the session's token (and of the key store) whose group matches the regular
     * expression groupRegex (matched against the whole group name) into the new file path. CKR_OK, or
     * CKR_KEY_UNEXTRACTABLE when some keys could not be exported (listed in the log; the file holds the
     * others); *pulExported (may be NULL) gets the number exported. */
    CK_RV (*P11SHIM_ExportGroup)(CK_SESSION_HANDLE hSession, const char *groupRegex, const char *path,
                                 CK_ULONG *pulExported);
    /* Restores the backup file into the session's token, all or nothing: a wrong MBK, a bad MAC or a
     * truncated file changes nothing (CKR_FUNCTION_FAILED, the reason in the log). */
    CK_RV (*P11SHIM_ImportFile)(CK_SESSION_HANDLE hSession, const char *path, CK_FLAGS flags,
                                CK_ULONG *pulAdded, CK_ULONG *pulSkipped);
    /* Checks the file completely (format, every MAC, the MBK, and that every secret unwraps in this HSM)
     * without changing anything. */
    CK_RV (*P11SHIM_VerifyFile)(CK_SESSION_HANDLE hSession, const char *path, CK_ULONG *pulRecords);
} P11SHIM_BACKUP_FUNCTION_LIST;

#endif /* P11SHIM_H */
