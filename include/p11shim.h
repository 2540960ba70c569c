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

#endif /* P11SHIM_H */
