//! Types every stage of the road shares: the identities Tencent hands us, each built only by
//! parsing, so a later stage that holds one knows it was checked.

use std::borrow::Cow;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Longest user id or message key we accept. Tencent documents 32-byte user ids and 50-char
/// message keys, but real ids are UUIDs, bot ids (`@RBT#…`) and longer; the spec asks for a
/// generous bound, not the documented one
/// (https://www.tencentcloud.com/document/product/1047/34365).
pub const MAX_ID_BYTES: usize = 256;

/// The Tencent IM application id (`SdkAppid` in the query), a decimal integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct SdkAppId(u64);

impl SdkAppId {
    /// Digits only: no sign, no spaces, no hex, and it must fit in a u64.
    pub fn parse(s: &str) -> Option<Self> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok().map(SdkAppId)
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl From<u64> for SdkAppId {
    fn from(id: u64) -> Self {
        SdkAppId(id)
    }
}

impl SdkAppId {
    /// Appends the decimal id to `out` (what `Display` writes, without the formatting
    /// machinery: three ids per record were a twentieth of `normalize`).
    pub fn push_to(self, out: &mut String) {
        out.push_str(itoa::Buffer::new().format(self.0));
    }
}

impl fmt::Display for SdkAppId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What a callback is about. One app has one callback URL, so every enabled command arrives
/// here; the ones we do not relay are acknowledged and counted, never failed
/// (https://www.tencentcloud.com/document/product/1047/34354).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallbackCommand {
    Relayed(Relayed),
    Other(String),
}

/// The one-to-one after-event callbacks im-relay relays: a message's whole life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Relayed {
    /// https://www.tencentcloud.com/document/product/1047/34365
    AfterSendMsg,
    /// https://www.tencentcloud.com/document/product/1047/43466
    AfterMsgWithDraw,
    /// https://cloud.tencent.com/document/product/269/128224
    AfterModifyMsg,
    /// https://www.tencentcloud.com/document/product/1047/43465
    AfterMsgReport,
    /// https://cloud.tencent.com/document/product/269/128223
    AfterMsgReadReceipt,
    /// A reader cleared every unread message (one-to-one and group; the group part is not
    /// relayed).
    AfterMsgReadAll,
}

impl Relayed {
    pub const ALL: [Relayed; 6] = [
        Relayed::AfterSendMsg,
        Relayed::AfterMsgWithDraw,
        Relayed::AfterModifyMsg,
        Relayed::AfterMsgReport,
        Relayed::AfterMsgReadReceipt,
        Relayed::AfterMsgReadAll,
    ];

    /// Tencent's spelling (note `AfterModifyMsg`, not `AfterMsgModify`).
    pub fn as_str(self) -> &'static str {
        match self {
            Relayed::AfterSendMsg => "C2C.CallbackAfterSendMsg",
            Relayed::AfterMsgWithDraw => "C2C.CallbackAfterMsgWithDraw",
            Relayed::AfterModifyMsg => "C2C.CallbackAfterModifyMsg",
            Relayed::AfterMsgReport => "C2C.CallbackAfterMsgReport",
            Relayed::AfterMsgReadReceipt => "C2C.CallbackAfterMsgReadReceipt",
            Relayed::AfterMsgReadAll => "C2C.CallbackAfterMsgReadAll",
        }
    }

    pub fn parse(s: &str) -> Option<Relayed> {
        Relayed::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Relayed::AfterSendMsg => "c2c_after_send_msg",
            Relayed::AfterMsgWithDraw => "c2c_after_msg_withdraw",
            Relayed::AfterModifyMsg => "c2c_after_modify_msg",
            Relayed::AfterMsgReport => "c2c_after_msg_report",
            Relayed::AfterMsgReadReceipt => "c2c_after_msg_read_receipt",
            Relayed::AfterMsgReadAll => "c2c_after_msg_read_all",
        }
    }
}

impl CallbackCommand {
    pub fn parse(s: &str) -> Self {
        match Relayed::parse(s) {
            Some(r) => CallbackCommand::Relayed(r),
            None => CallbackCommand::Other(s.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            CallbackCommand::Relayed(r) => r.as_str(),
            CallbackCommand::Other(s) => s,
        }
    }

    /// A metric label from a fixed set: commands are chosen by whoever calls us, so the raw
    /// text never becomes a label.
    pub fn label(&self) -> &'static str {
        match self {
            CallbackCommand::Relayed(r) => r.label(),
            CallbackCommand::Other(s) => match s.as_str() {
                "C2C.CallbackBeforeSendMsg" => "c2c_before_send_msg",
                "C2C.CallbackAfterC2CMsgExtension" => "c2c_after_msg_extension",
                "Group.CallbackAfterSendMsg" => "group_after_send_msg",
                "Group.CallbackBeforeSendMsg" => "group_before_send_msg",
                "State.StateChange" => "state_change",
                _ => "other",
            },
        }
    }
}

/// Why an id was refused; the caller names the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("longer than {MAX_ID_BYTES} bytes")]
    TooLong,
}

fn check_id(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        Err(IdError::Empty)
    } else if s.len() > MAX_ID_BYTES {
        Err(IdError::TooLong)
    } else {
        Ok(())
    }
}

/// A Tencent IM user id (`From_Account`, `To_Account`). Only non-empty and bounded: real ids
/// break the documented alphabet (https://www.tencentcloud.com/document/product/1047/34365).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct UserId<'a>(&'a str);

impl<'a> UserId<'a> {
    pub fn parse(s: &'a str) -> Result<Self, IdError> {
        check_id(s).map(|()| UserId(s))
    }

    pub fn as_str(&self) -> &'a str {
        self.0
    }
}

/// The message key (`MsgKey`), opaque: one Tencent example even swaps its usual parts. Owned
/// when we had to derive it for an older payload that lacks one
/// (https://www.tencentcloud.com/document/product/1047/34365).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct MsgKey<'a>(Cow<'a, str>);

impl<'a> MsgKey<'a> {
    pub fn parse(s: &'a str) -> Result<Self, IdError> {
        check_id(s).map(|()| MsgKey(Cow::Borrowed(s)))
    }

    /// A key we made ourselves; the caller guarantees it is short and non-empty.
    pub(crate) fn derived(s: String) -> Self {
        debug_assert!(check_id(&s).is_ok());
        MsgKey(Cow::Owned(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Wall-clock time in Unix milliseconds (0 for a clock set before 1970).
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Wall-clock time in Unix seconds.
pub fn unix_seconds() -> u64 {
    unix_millis() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdk_app_id_parses_only_plain_decimal() {
        assert_eq!(SdkAppId::parse("1400000000"), Some(SdkAppId(1400000000)));
        assert_eq!(
            SdkAppId::parse("18446744073709551615"),
            Some(SdkAppId(u64::MAX))
        );
        for bad in [
            "",
            "-1",
            "+1",
            " 1",
            "1 ",
            "0x10",
            "1.0",
            "18446744073709551616",
            "abc",
        ] {
            assert_eq!(SdkAppId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn commands_route_known_and_keep_others() {
        assert_eq!(
            CallbackCommand::parse("C2C.CallbackAfterSendMsg"),
            CallbackCommand::Relayed(Relayed::AfterSendMsg)
        );
        for r in Relayed::ALL {
            assert_eq!(
                CallbackCommand::parse(r.as_str()),
                CallbackCommand::Relayed(r)
            );
        }
        // Tencent's spelling only: the edit callback is `AfterModifyMsg`.
        assert_eq!(
            CallbackCommand::parse("C2C.CallbackAfterMsgModify").label(),
            "other"
        );
        let group = CallbackCommand::parse("Group.CallbackAfterSendMsg");
        assert_eq!(group.as_str(), "Group.CallbackAfterSendMsg");
        // Known neighbours get their own label; anything else shares `other`.
        assert_eq!(group.label(), "group_after_send_msg");
        assert_eq!(
            CallbackCommand::parse("Sns.CallbackFriendAdd").label(),
            "other"
        );
        // Case matters: Tencent spells commands exactly.
        assert_eq!(
            CallbackCommand::parse("c2c.callbackaftersendmsg").label(),
            "other"
        );
    }

    #[test]
    fn ids_are_non_empty_and_bounded() {
        assert!(UserId::parse("@RBT#001").is_ok());
        assert!(UserId::parse("0b9f3c9e-1a2b-4c5d-8e9f-0a1b2c3d4e5f").is_ok());
        assert_eq!(UserId::parse(""), Err(IdError::Empty));
        assert_eq!(
            UserId::parse(&"x".repeat(MAX_ID_BYTES + 1)),
            Err(IdError::TooLong)
        );
        assert!(MsgKey::parse(&"x".repeat(MAX_ID_BYTES)).is_ok());
    }
}
