//! Stored keys as an operator sees them (`p11shim keys`): listed by token, group and label, and moved to
//! another group under the same rule as the module's C_SetAttributeValue(CKA_P11SHIM_GROUP): the logged-on
//! users need 00000002 for both groups, as a backup from one and a restore into the other would; audited.

use super::format::Sealer;
use super::work::{audit, describe, Authorizer, Work};
use crate::audit::Trail;
use crate::error::{Error, Result};
use crate::store::{BadRow, KeyRow, RowRead};

/// Which stored keys to list; None matches every value.
#[derive(Debug, Default)]
pub struct KeyFilter<'a> {
    pub token: Option<&'a str>,
    /// A regular expression matching whole group names.
    pub group: Option<&'a str>,
    /// The exact label.
    pub label: Option<&'a [u8]>,
}

/// The stored keys that match, ordered by (token, id), and the rows that cannot be read.
pub fn list(store: &dyn crate::store::KeyStore, filter: &KeyFilter) -> Result<(Vec<KeyRow>, Vec<BadRow>)> {
    let group = filter.group.map(super::work::group_filter).transpose()?;
    let (mut keys, mut bad) = (Vec::new(), Vec::new());
    store.scan_rows(&mut |read| {
        match read {
            RowRead::Row(row) => {
                let wanted = filter.token.is_none_or(|t| row.token == t)
                    && group.as_ref().is_none_or(|g| g.is_match(&row.group))
                    && filter.label.is_none_or(|l| row.label == l);
                if wanted {
                    keys.push(row);
                }
            }
            RowRead::Bad(b) => bad.push(b),
        }
        Ok(())
    })?;
    Ok((keys, bad))
}

/// A key moved (or already there: `from == to`).
#[derive(Debug)]
pub struct Moved {
    pub id: String,
    pub label: Vec<u8>,
    pub from: String,
    pub to: String,
}

/// Moves the stored key `id` of the work token to `group`: its row is re-sealed in the HSM with the new
/// group and written in one atomic update (refused if another process changed it meanwhile).
pub fn set_group(trail: &Trail, work: &Work, who: &dyn Authorizer, id: &str, group: &str) -> Result<Moved> {
    crate::attrs::check_group(group).map_err(Error::Other)?;
    let store = trail.store;
    let Some(row) = store.get(id)? else {
        return Err(Error::Missing(format!(
            "no stored key with id {id} in {} (`p11shim keys list` shows them; keys the HSM keeps itself are in \
             their token's group)",
            store.describe()
        )));
    };
    let token = &work.token.label;
    if &row.token != token {
        return Err(Error::Other(format!(
            "stored key {id} belongs to token {:?}, not {token:?}: give --token {}",
            row.token, row.token
        )));
    }
    let name = format!("stored key {}", describe(&row.label, &row.id, &row.group));
    if !work.row_intact(&row)? {
        return Err(Error::Damaged(format!(
            "{name}: its row MAC does not match: the row was changed outside p11shim; nothing was moved"
        )));
    }
    let moved = Moved { id: row.id.clone(), label: row.label.clone(), from: row.group.clone(), to: group.to_string() };
    if row.group == group {
        return Ok(moved);
    }
    let allowed = who.allow_group(&row.group).and_then(|()| who.allow_group(group));
    if let Err(why) = allowed {
        let reason = format!("moving {name} to group {group:?} denied: {why}");
        audit(trail, &who.who(), "refused: key group change", &row.group, 0, &reason)?;
        return Err(Error::Denied(reason));
    }
    let mut updated = KeyRow { group: group.to_string(), version: row.version + 1, ..row };
    updated.mac = work.sealer().seal(&crate::vault::mac_input(&updated))?;
    let written = store.update(&updated);
    let result = match &written {
        Ok(true) => format!("ok: stored key {id} moved to {group:?}"),
        Ok(false) => format!("failed: stored key {id} not moved to {group:?}: changed meanwhile"),
        Err(e) => format!("failed: stored key {id} not moved to {group:?}: {e}"),
    };
    audit(trail, &who.who(), "key group change", &moved.from, 1, &result)?;
    if !written? {
        return Err(Error::Other(format!(
            "{name} was changed by another process meanwhile; nothing was moved: try again"
        )));
    }
    Ok(moved)
}
