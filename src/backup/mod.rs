//! Backup and restore of keys under the MBK, and the MBK itself.

pub mod clone;
pub mod db;
pub mod error;
pub mod export;
pub mod format;
pub mod import;
pub mod journal;
pub mod keys;
pub mod mbk;
pub mod shamir;
pub mod verify;
pub mod work;
