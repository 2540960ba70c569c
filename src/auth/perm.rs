//! Permission masks and what a command needs: the CryptoServer model. A mask is 8 hex digits, one level per
//! user-group slot, slot 0 the rightmost digit; the levels of all logged-on users add up per slot.

use std::fmt;

/// A permission mask: `levels[slot]`, slot 0 being the rightmost hex digit of the written form.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Perm {
    levels: [u8; 8],
}

impl Perm {
    /// Parses exactly 8 hex digits ("00000002", "12000000"); the error says what a mask is.
    pub fn parse(text: &str) -> Result<Perm, String> {
        if text.len() != 8 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "permission mask {text:?}: must be exactly 8 hex digits, one level per user-group slot with slot 0 \
                 the rightmost (e.g. 00000002 for a key user, 02000000 for a key store admin, 10000000 for a \
                 user admin)"
            ));
        }
        let mut levels = [0u8; 8];
        for (slot, digit) in text.bytes().rev().enumerate() {
            levels[slot] = (digit as char).to_digit(16).unwrap_or(0) as u8;
        }
        Ok(Perm { levels })
    }

    /// The level of `slot` (0..=7).
    pub fn level(&self, slot: usize) -> u8 {
        self.levels[slot]
    }

    /// A mask with `level` in `slot` and 0 elsewhere.
    pub const fn slot(slot: usize, level: u8) -> Perm {
        let mut levels = [0u8; 8];
        levels[slot] = level;
        Perm { levels }
    }

    fn with(mut self, slot: usize, level: u8) -> Perm {
        self.levels[slot] = level;
        self
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for level in self.levels.iter().rev() {
            write!(f, "{level:X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Perm({self})")
    }
}

impl std::str::FromStr for Perm {
    type Err = String;
    fn from_str(s: &str) -> Result<Perm, String> {
        Perm::parse(s)
    }
}

/// What an operation needs from the logged-on users.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Need {
    /// Backing up or restoring the keys of group G: 00000002 (slot 0 ≥ 2), counting only users whose group
    /// regex matches G.
    Group(String),
    /// The whole key store (the BackupDatabase analog): 02000000 (slot 6 ≥ 2).
    KeyStore,
    /// The users table (user.db): 12000000, slot 7 ≥ 1 and slot 6 ≥ 2 (typically two administrators).
    UsersTable,
    /// Adding, deleting users or changing another user's credential: 10000000 (slot 7 ≥ 1).
    UserAdmin,
}

impl Need {
    /// The levels needed, per slot.
    pub fn mask(&self) -> Perm {
        match self {
            Need::Group(_) => Perm::slot(0, 2),
            Need::KeyStore => Perm::slot(6, 2),
            Need::UsersTable => Perm::slot(7, 1).with(6, 2),
            Need::UserAdmin => Perm::slot(7, 1),
        }
    }

    /// The group whose matching users alone count, if any.
    pub fn group(&self) -> Option<&str> {
        match self {
            Need::Group(group) => Some(group),
            _ => None,
        }
    }

    /// "backup of group G", "backup of the key store", … for `action` ("backup", "restore").
    pub fn describe(&self, action: &str) -> String {
        match self {
            Need::Group(group) => format!("{action} of group {group}"),
            Need::KeyStore => format!("{action} of the whole key store"),
            Need::UsersTable => format!("{action} of the users table"),
            Need::UserAdmin => action.to_string(),
        }
    }

    fn default_description(&self) -> String {
        match self {
            Need::Group(_) => self.describe("backup or restore"),
            Need::KeyStore | Need::UsersTable => self.describe("access"),
            Need::UserAdmin => "user administration".into(),
        }
    }
}

/// A refused operation: what was needed and what the logged-on users have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    pub need: Need,
    /// What was attempted ("backup of group ProdKey", "user administration").
    pub what: String,
    /// The logged-on users with their masks and group regexes ("alice 00000002 (ExmpKey), …"), or "nobody".
    pub have: String,
}

impl Denied {
    pub(crate) fn new(need: Need, have: String) -> Denied {
        Denied { what: need.default_description(), need, have }
    }

    /// The same refusal naming the operation: `denied.doing("backup")` → "backup of group ProdKey needs …".
    pub fn doing(mut self, action: &str) -> Denied {
        self.what = self.need.describe(action);
        self
    }
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} needs {}", self.what, self.need.mask())?;
        if let Some(group) = self.need.group() {
            write!(f, " from users whose group matches {group}")?;
        } else {
            write!(f, " from the logged-on users together")?;
        }
        write!(f, "; logged on: {}", self.have)
    }
}

impl std::error::Error for Denied {}

/// Whether `sum` (levels added up per slot) reaches `need` in every slot.
pub(crate) fn reaches(sum: &[u32; 8], need: Perm) -> bool {
    (0..8).all(|slot| sum[slot] >= u32::from(need.level(slot)))
}

pub(crate) fn add(sum: &mut [u32; 8], perm: Perm) {
    for (slot, total) in sum.iter_mut().enumerate() {
        *total += u32::from(perm.level(slot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_0_is_the_rightmost_digit() {
        let p = Perm::parse("1200000a").unwrap();
        assert_eq!((p.level(0), p.level(6), p.level(7), p.level(3)), (10, 2, 1, 0));
        assert_eq!(p.to_string(), "1200000A");
    }

    #[test]
    fn masks_of_the_needs() {
        assert_eq!(Need::Group("g".into()).mask().to_string(), "00000002");
        assert_eq!(Need::KeyStore.mask().to_string(), "02000000");
        assert_eq!(Need::UsersTable.mask().to_string(), "12000000");
        assert_eq!(Need::UserAdmin.mask().to_string(), "10000000");
    }

    #[test]
    fn malformed_masks_are_refused() {
        for bad in ["", "2", "0000002", "000000002", "0000000g", " 0000002", "0x000002"] {
            let err = Perm::parse(bad).unwrap_err();
            assert!(err.contains("8 hex digits") && err.contains(&format!("{bad:?}")), "{err}");
        }
    }
}
