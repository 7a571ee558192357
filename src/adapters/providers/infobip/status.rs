//! Infobip's status object, as its send answers and its delivery reports
//! both carry it (`{groupId, groupName, id, name, description}`,
//! [status codes]), and its group: the one reading of it that
//! [`super::send`] and [`super::callback`] share.
//!
//! The groups are those of the OpenAPI enum `MessageGeneralStatus`
//! (`ACCEPTED`, `PENDING`, `UNDELIVERABLE`, `DELIVERED`, `EXPIRED`,
//! `REJECTED`) with the group ids of the [status codes] page (0 to 5).
//!
//! [status codes]: https://www.infobip.com/docs/essentials/response-status-and-error-codes

use serde::Deserialize;

use super::super::http;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Status {
    pub(super) group_id: Option<i64>,
    pub(super) group_name: Option<String>,
    pub(super) id: Option<i64>,
    pub(super) name: Option<String>,
    pub(super) description: Option<String>,
}

/// A status group, by `groupName`, else by `groupId`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Group {
    Accepted,
    Pending,
    Undeliverable,
    Delivered,
    Expired,
    Rejected,
}

impl Status {
    /// The group, by its name, else its id; `None` for a name or an id
    /// not documented (an undocumented name wins over a documented id).
    pub(super) fn group(&self) -> Option<Group> {
        let by_name = match self.group_name.as_deref() {
            Some("ACCEPTED") => Some(Group::Accepted),
            Some("PENDING") => Some(Group::Pending),
            Some("UNDELIVERABLE") => Some(Group::Undeliverable),
            Some("DELIVERED") => Some(Group::Delivered),
            Some("EXPIRED") => Some(Group::Expired),
            Some("REJECTED") => Some(Group::Rejected),
            Some(_) => return None,
            None => None,
        };
        by_name.or(match self.group_id {
            Some(0) => Some(Group::Accepted),
            Some(1) => Some(Group::Pending),
            Some(2) => Some(Group::Undeliverable),
            Some(3) => Some(Group::Delivered),
            Some(4) => Some(Group::Expired),
            Some(5) => Some(Group::Rejected),
            _ => None,
        })
    }

    /// `REJECTED_DND (10): Destination on DND list`, masked and short.
    pub(super) fn describe(&self) -> String {
        let text = format!(
            "Infobip {} {} ({}): {}",
            self.group_name.as_deref().unwrap_or("?"),
            self.name.as_deref().unwrap_or("?"),
            self.id.map_or_else(|| "?".to_owned(), |id| id.to_string()),
            self.description.as_deref().unwrap_or(""),
        );
        http::snippet(text.trim_end_matches([' ', ':']).as_bytes())
    }
}
