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
 * C_GetAttributeValue; use it in C_FindObjectsInit templates; change it with C_SetAttributeValue (only by a
 * session whose p11shim logons may back up both groups: see below; else CKR_ACTION_PROHIBITED). Backend
 * objects have no group: asking for it answers CKR_ATTRIBUTE_TYPE_INVALID, and giving it when creating
 * anything but a stored key is refused with CKR_ATTRIBUTE_TYPE_INVALID. It is never sent to the backend.
 * (Bit 30, CKF_ARRAY_ATTRIBUTE, is clear: it is a plain attribute.)
 */
#define CKA_P11SHIM_GROUP (CKA_VENDOR_DEFINED | 0x00534801UL)

/*
 * The vendor interface "P11SHIM Backup", version 2.0: the permission model's users log on to a PKCS#11 session,
 * and per-group export and import of keys under the token's master backup key (MBK), and complete
 * verification of a backup file, run with their permissions. Get it with
 *
 *     CK_INTERFACE_PTR iface;
 *     rv = C_GetInterface((CK_UTF8CHAR_PTR)P11SHIM_BACKUP_INTERFACE, NULL, &iface, 0);
 *     P11SHIM_BACKUP_FUNCTION_LIST *backup = (P11SHIM_BACKUP_FUNCTION_LIST *)iface->pFunctionList;
 *
 * (C_GetInterface is exported by libp11shim.so; the interface is returned by name and not listed by
 * C_GetInterfaceList, so that applications enumerating interfaces see only "PKCS 11".)
 *
 * Authorization is the `p11shim` command's, by the same code: users (`p11shim user add`) log on to the session
 * with P11SHIM_Logon (password) or P11SHIM_GetChallenge + P11SHIM_LogonSign (Ed25519 signature); several
 * users may be logged on at once and their permission levels add up per slot. Exporting, importing or
 * verifying the keys of group G needs 00000002 from logged-on users whose group regex matches G. Without a
 * logon these calls answer CKR_USER_NOT_LOGGED_IN; with logons that lack the permission,
 * CKR_ACTION_PROHIBITED. The session must also be logged in as the token's user (C_Login with CKU_USER): the
 * HSM work needs it; CKR_USER_NOT_LOGGED_IN otherwise. Logons end with P11SHIM_Logoff or when the session is
 * closed (C_CloseSession, C_CloseAllSessions, C_Finalize). Every call, refusals and failed logons included,
 * is recorded in p11shim's audit log, and the config's mode applies (CC refuses overwrite).
 *
 * The same logons govern a change of a stored key's group on the session: C_SetAttributeValue of
 * CKA_P11SHIM_GROUP, or C_CopyObject into another group, needs 00000002 for both the old and the new group,
 * else CKR_ACTION_PROHIBITED (audited either way). Choosing the group of a new key needs no logon.
 *
 * Failed logons are counted per user: after each one the user must wait longer before the next attempt
 * (CKR_PIN_LOCKED until then), and the config may lock the user after N failures in a row (CKR_PIN_LOCKED
 * until a user administrator runs `p11shim user unlock`). Paths are UTF-8, NUL-terminated. Files are the same
 * as `p11shim backup/restore/verify` read and write.
 */
#define P11SHIM_BACKUP_INTERFACE "P11SHIM Backup"
#define P11SHIM_IMPORT_OVERWRITE 0x1UL /* replace keys already present (refused in CC mode) */
#define P11SHIM_IMPORT_DRY_RUN 0x2UL   /* check and count, change nothing */

typedef struct P11SHIM_BACKUP_FUNCTION_LIST {
    CK_VERSION version; /* 2.0 */
    /* Exports every key of the session's token (and of the key store) whose group matches the regular
     * expression groupRegex (matched against the whole group name) into the new file path. CKR_OK, or
     * CKR_KEY_UNEXTRACTABLE when some keys could not be exported (listed in the log; the file holds the
     * others); *pulExported (may be NULL) gets the number exported. Needs the permission for every group
     * that matches. */
    CK_RV (*P11SHIM_ExportGroup)(CK_SESSION_HANDLE hSession, const char *groupRegex, const char *path,
                                 CK_ULONG *pulExported);
    /* Restores the backup file into the session's token, all or nothing: a wrong MBK, a bad MAC, a truncated
     * file or a group the logons may not restore changes nothing (CKR_FUNCTION_FAILED or
     * CKR_ACTION_PROHIBITED, the reason in the log). */
    CK_RV (*P11SHIM_ImportFile)(CK_SESSION_HANDLE hSession, const char *path, CK_FLAGS flags,
                                CK_ULONG *pulAdded, CK_ULONG *pulSkipped);
    /* Checks the file completely (format, every MAC, the MBK, and that every secret unwraps in this HSM)
     * without changing anything. Needs the permission for every group in the file. */
    CK_RV (*P11SHIM_VerifyFile)(CK_SESSION_HANDLE hSession, const char *path, CK_ULONG *pulRecords);
    /* Logs the user on to the session with a password. CKR_PIN_INCORRECT when the logon fails (unknown user,
     * wrong password, a user who logs on by signature: one answer for all, the audit log says which),
     * CKR_PIN_LOCKED while the user is locked or must wait after failed logons, CKR_USER_ALREADY_LOGGED_IN
     * for a user logged on already. */
    CK_RV (*P11SHIM_Logon)(CK_SESSION_HANDLE hSession, const char *user, const CK_BYTE *pPassword,
                           CK_ULONG ulPasswordLen);
    /* A fresh challenge for a signature logon of the user on this session (output buffer as in PKCS#11:
     * pChallenge NULL gives the length in *pulChallengeLen; too small gives CKR_BUFFER_TOO_SMALL). The user's
     * Ed25519 private key signs exactly these bytes (pure Ed25519, RFC 8032). Usable once, for 60 seconds. */
    CK_RV (*P11SHIM_GetChallenge)(CK_SESSION_HANDLE hSession, const char *user, CK_BYTE *pChallenge,
                                  CK_ULONG *pulChallengeLen);
    /* Logs the user on with the 64-byte Ed25519 signature of the challenge P11SHIM_GetChallenge last gave
     * for that user on this session (CKR_OPERATION_NOT_INITIALIZED without one). Answers as P11SHIM_Logon. */
    CK_RV (*P11SHIM_LogonSign)(CK_SESSION_HANDLE hSession, const char *user, const CK_BYTE *pSignature,
                               CK_ULONG ulSignatureLen);
    /* Logs the user off the session (NULL: every user). CKR_USER_NOT_LOGGED_IN if that user is not. */
    CK_RV (*P11SHIM_Logoff)(CK_SESSION_HANDLE hSession, const char *user);
} P11SHIM_BACKUP_FUNCTION_LIST;

#endif /* P11SHIM_H */
