//! Backup and restore of keys under the MBK (issue C), and the MBK itself.

pub mod mbk;
