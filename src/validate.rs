//! Stage 2 of the road: **validate**. Reads Tencent's query string and decides whether the
//! request is ours and authentic: `SdkAppid` configured here, then (when a token is set) `Sign`
//! fresh and correct. Knows the secrets; never Kafka, never the body.
//! Query: https://www.tencentcloud.com/document/product/1047/34354; token and freshness:
//! https://cloud.tencent.com/document/product/269/32431.

use sha2::{Digest, Sha256};
use std::borrow::Cow;
use subtle::ConstantTimeEq;

use crate::config::Secret;
use crate::domain::{CallbackCommand, SdkAppId};
use crate::error::{Reason, Rejection};

/// What a valid query says about the callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackQuery<'q> {
    pub sdk_app_id: SdkAppId,
    pub command: CallbackCommand,
    /// Carried into the record; never trusted for anything. Borrowed from the query unless
    /// decoded.
    pub client_ip: Option<Cow<'q, str>>,
    pub opt_platform: Option<Cow<'q, str>>,
    /// Unix seconds of a signed request, kept to measure clock skew.
    pub request_time: Option<i64>,
}

/// The query parameters we read, as sent (borrowed from the query unless decoded).
#[derive(Debug, Default)]
struct RawQuery<'q> {
    sdk_app_id: Option<Cow<'q, str>>,
    command: Option<Cow<'q, str>>,
    client_ip: Option<Cow<'q, str>>,
    opt_platform: Option<Cow<'q, str>>,
    sign: Option<Cow<'q, str>>,
    request_time: Option<Cow<'q, str>>,
}

impl<'q> RawQuery<'q> {
    fn parse(query: &'q str) -> Result<Self, Rejection> {
        // Tencent's queries are printable ASCII without `%` or `+`: such a query needs neither
        // decoding nor a look for control characters, piece by piece (those byte loops were a
        // tenth of the hot path). One pass that never stops early tells.
        let odd = |b: u8| !(b'!'..=b'~').contains(&b) | (b == b'%') | (b == b'+');
        let plain = query.bytes().fold(0u8, |n, b| n | u8::from(odd(b))) == 0;
        let mut q = RawQuery::default();
        for (name, value) in query_pairs(query, plain) {
            let slot = match name.as_ref() {
                "SdkAppid" => &mut q.sdk_app_id,
                "CallbackCommand" => &mut q.command,
                "ClientIP" => &mut q.client_ip,
                "OptPlatform" => &mut q.opt_platform,
                "Sign" => &mut q.sign,
                "RequestTime" => &mut q.request_time,
                // `contenttype` (any case) and anything new: not needed, never refused.
                _ => continue,
            };
            if slot.is_some() {
                // Two different values would leave us guessing which one was signed.
                return Err(Rejection::with_detail(
                    Reason::DuplicateQueryParam,
                    name.into_owned(),
                ));
            }
            // `OptPlatform=iOS%00x` would carry a NUL into every record (and into a
            // database downstream that cannot store one): refused, the parameter named.
            if !plain && value.chars().any(char::is_control) {
                return Err(Rejection::with_detail(
                    Reason::InvalidQueryParam,
                    name.into_owned(),
                ));
            }
            *slot = Some(value);
        }
        Ok(q)
    }
}

/// `form_urlencoded::parse`, without its decoding (a tenth of the hot path's instructions) for
/// the pieces that need none: Tencent's queries carry no `%` or `+`. `plain`: the whole query
/// is known to hold neither.
fn query_pairs(query: &str, plain: bool) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(move |piece| {
            if !plain && piece.bytes().any(|b| b == b'%' || b == b'+') {
                let pair = form_urlencoded::parse(piece.as_bytes()).next();
                pair.unwrap_or((Cow::Borrowed(""), Cow::Borrowed("")))
            } else {
                let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
                (Cow::Borrowed(name), Cow::Borrowed(value))
            }
        })
}

/// Checks callbacks against the configured app ids and tokens.
pub struct Verifier {
    app_ids: Vec<SdkAppId>,
    /// Current and, during a rotation, next token. Empty: signatures are not checked.
    tokens: Vec<Secret>,
    max_skew_s: i64,
}

impl Verifier {
    pub fn new(app_ids: Vec<SdkAppId>, tokens: Vec<Secret>, max_skew_ms: u64) -> Self {
        Verifier {
            app_ids,
            tokens,
            max_skew_s: i64::try_from(max_skew_ms / 1000).unwrap_or(i64::MAX),
        }
    }

    /// Validates the query of one callback, in a fixed order: app id, then
    /// signature, then the command. `now` is Unix seconds.
    pub fn verify<'q>(
        &self,
        query: Option<&'q str>,
        now: i64,
    ) -> Result<CallbackQuery<'q>, Rejection> {
        let q = RawQuery::parse(query.unwrap_or(""))?;
        let raw_id = q.sdk_app_id.as_deref().ok_or(Reason::MissingSdkAppId)?;
        let sdk_app_id = SdkAppId::parse(raw_id).ok_or(Reason::InvalidSdkAppId)?;
        if !self.app_ids.contains(&sdk_app_id) {
            return Err(Reason::UnknownSdkAppId.into());
        }
        let request_time = self.check_signature(&q, now)?;
        let command = q.command.as_deref().ok_or(Reason::MissingCallbackCommand)?;
        Ok(CallbackQuery {
            sdk_app_id,
            command: CallbackCommand::parse(command),
            client_ip: q.client_ip,
            opt_platform: q.opt_platform,
            request_time,
        })
    }

    fn check_signature(&self, q: &RawQuery<'_>, now: i64) -> Result<Option<i64>, Rejection> {
        if self.tokens.is_empty() {
            return Ok(None);
        }
        let (Some(sign), Some(time)) = (q.sign.as_deref(), q.request_time.as_deref()) else {
            return Err(Reason::MissingSignature.into());
        };
        let request_time = parse_unix_seconds(time).ok_or(Reason::InvalidRequestTime)?;
        if now.abs_diff(request_time) > self.max_skew_s.unsigned_abs() {
            return Err(Reason::StaleRequestTime.into());
        }
        let given = unhex(sign.as_bytes()).ok_or(Reason::MalformedSignature)?;
        // Check every token, whatever the first gave, so timing tells nothing about which one.
        let matched = self.tokens.iter().fold(subtle::Choice::from(0), |acc, t| {
            acc | sign_of(t, time).ct_eq(&given)
        });
        if bool::from(matched) {
            Ok(Some(request_time))
        } else {
            Err(Reason::BadSignature.into())
        }
    }
}

/// `Sign` = SHA-256(token ‖ RequestTime), RequestTime exactly as it appears in the URL.
pub fn sign_of(token: &Secret, request_time: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(token.expose().as_bytes());
    h.update(request_time.as_bytes());
    h.finalize().into()
}

/// 64 hex digits, either case, as 32 bytes (`hex::decode_to_slice` took a twentieth of the
/// hot path for it). Eight digits at a time, without a branch per digit: a signature's digits
/// are random, and a mispredicted branch on half of them cost more than the rest of the
/// reading (a digit at a time, branchless, was 960 instructions; this is a fifth of that). The
/// digits are the sender's, not a secret: constant time is not the point.
fn unhex(digits: &[u8]) -> Option<[u8; 32]> {
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    let mut ok = true;
    for (word, four) in digits.chunks_exact(8).zip(out.chunks_exact_mut(4)) {
        let (bytes, valid) = unhex8(u64::from_le_bytes(word.try_into().unwrap_or_default()));
        four.copy_from_slice(&bytes);
        ok &= valid;
    }
    ok.then_some(out)
}

/// Eight hex digits (the first in the lowest byte) as four bytes, and whether all eight were
/// digits. A byte of 0x80 or more fails on its own; for the others, every range test adds to
/// a byte below 0x80 and stays below 0x100, so no byte carries into the next.
fn unhex8(w: u64) -> ([u8; 4], bool) {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = ONES * 0x80;
    // High bit of a byte set when it is at least `lo` and below `hi`.
    let within = |x: u64, lo: u8, hi: u8| {
        x.wrapping_add(ONES * u64::from(0x80 - lo)) & !x.wrapping_add(ONES * u64::from(0x80 - hi))
    };
    // `| 0x20` lowers `A`–`F`, and nothing else lands on `a`–`f`; digits are tested as sent,
    // since it would also turn 0x10–0x19 into them.
    let digit = within(w, b'0', b'9' + 1);
    let letter = within(w | (ONES * 0x20), b'a', b'f' + 1);
    let valid = w & HIGH == 0 && (digit | letter) & HIGH == HIGH;
    // A digit's value is its low four bits; a letter's (bit 6 set) those plus nine.
    let letters = (w >> 6) & ONES;
    let nibbles = (w & (ONES * 0x0f)) + (letters << 3) + letters;
    // Byte k holds digit k << 4 | digit k + 1; the even bytes are the four wanted.
    let pairs = ((nibbles << 4) | (nibbles >> 8)) & 0x00ff_00ff_00ff_00ff;
    let pairs = (pairs | (pairs >> 8)) & 0x0000_ffff_0000_ffff;
    let pairs = (pairs | (pairs >> 16)) & 0xffff_ffff;
    ((pairs as u32).to_le_bytes(), valid)
}

fn parse_unix_seconds(s: &str) -> Option<i64> {
    if s.is_empty() || s.len() > 12 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Our hex reading is `hex`'s, on valid digits of either case and on anything else.
        #[test]
        fn unhex_reads_what_hex_reads(digits in "[0-9a-fA-F]{64}|[0-9a-fA-F]{0,63}[^0-9a-fA-F][0-9a-fA-F]{0,63}|.{62,66}") {
            let mut theirs = [0u8; 32];
            let theirs = hex::decode_to_slice(&digits, &mut theirs).ok().map(|()| theirs);
            proptest::prop_assert_eq!(unhex(digits.as_bytes()), theirs);
        }

        /// The fast path splits exactly as `form_urlencoded` does, and decodes the same.
        #[test]
        fn query_pairs_match_form_urlencoded(q in "[a-zA-Z0-9=&%+._~-]{0,60}", plain: bool) {
            let plain = plain && !q.contains(['%', '+']);
            let ours: Vec<_> = query_pairs(&q, plain).collect();
            let theirs: Vec<_> = form_urlencoded::parse(q.as_bytes()).collect();
            proptest::prop_assert_eq!(ours, theirs);
        }
    }

    /// Every byte at every place of a valid signature, in either case: `hex` decides as we do.
    #[test]
    fn unhex_reads_any_byte_anywhere_as_hex_does() {
        let sign = hex::encode(sign_of(&Secret::new("t"), "1"));
        for digits in [sign.clone(), sign.to_uppercase()] {
            for at in 0..64 {
                for byte in 0..=u8::MAX {
                    let mut digits = digits.clone().into_bytes();
                    digits[at] = byte;
                    let mut theirs = [0u8; 32];
                    let theirs = hex::decode_to_slice(&digits, &mut theirs)
                        .ok()
                        .map(|()| theirs);
                    assert_eq!(unhex(&digits), theirs, "byte {byte:#x} at {at}");
                }
            }
        }
    }

    const APP: u64 = 1400000000;
    const NOW: i64 = 1669872112;

    fn verifier(tokens: &[&str]) -> Verifier {
        Verifier::new(
            vec![SdkAppId::from(APP)],
            tokens.iter().map(|t| Secret::new(*t)).collect(),
            60_000,
        )
    }

    fn query(extra: &str) -> String {
        format!("SdkAppid={APP}&CallbackCommand=C2C.CallbackAfterSendMsg&contenttype=json{extra}")
    }

    fn signed(token: &str, time: i64) -> String {
        let sign = hex::encode(sign_of(&Secret::new(token), &time.to_string()));
        query(&format!("&RequestTime={time}&Sign={sign}"))
    }

    fn reason(v: &Verifier, q: &str) -> Reason {
        v.verify(Some(q), NOW).unwrap_err().reason
    }

    #[test]
    fn spec_test_vector() {
        assert_eq!(
            hex::encode(sign_of(&Secret::new("xxxxyyyy"), "1669872112")),
            "17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061"
        );
        let v = verifier(&["xxxxyyyy"]);
        let q = query(
            "&RequestTime=1669872112&Sign=17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061",
        );
        let ok = v.verify(Some(&q), NOW).unwrap();
        assert_eq!(ok.request_time, Some(NOW));
        // Either case of hex is accepted.
        let upper = query(
            "&RequestTime=1669872112&Sign=17773BC39A671D7B9AA835458704D2A6DB81360A5940292B587D6D760D484061",
        );
        assert!(v.verify(Some(&upper), NOW).is_ok());
    }

    #[test]
    fn unsigned_mode_reads_the_query() {
        let v = verifier(&[]);
        let raw = query("&ClientIP=1.2.3.4&OptPlatform=iOS&unknown=1");
        let q = v.verify(Some(&raw), NOW).unwrap();
        assert_eq!(q.sdk_app_id, SdkAppId::from(APP));
        assert_eq!(
            q.command,
            CallbackCommand::Relayed(crate::domain::Relayed::AfterSendMsg)
        );
        assert_eq!(q.client_ip.as_deref(), Some("1.2.3.4"));
        assert_eq!(q.opt_platform.as_deref(), Some("iOS"));
    }

    #[test]
    fn both_tokens_of_a_rotation_are_accepted() {
        let v = verifier(&["current", "next"]);
        assert!(v.verify(Some(&signed("current", NOW)), NOW).is_ok());
        assert!(v.verify(Some(&signed("next", NOW)), NOW).is_ok());
        assert_eq!(reason(&v, &signed("other", NOW)), Reason::BadSignature);
    }

    #[test]
    fn freshness_window_is_inclusive_sixty_seconds() {
        let v = verifier(&["t"]);
        assert!(v.verify(Some(&signed("t", NOW - 60)), NOW).is_ok());
        assert!(v.verify(Some(&signed("t", NOW + 60)), NOW).is_ok());
        assert_eq!(reason(&v, &signed("t", NOW - 61)), Reason::StaleRequestTime);
        assert_eq!(reason(&v, &signed("t", NOW + 61)), Reason::StaleRequestTime);
    }

    #[test]
    fn each_bad_query_has_its_reason() {
        let v = verifier(&["t"]);
        let good_sig = hex::encode(sign_of(&Secret::new("t"), &NOW.to_string()));
        let cases: &[(&str, Reason)] = &[
            ("", Reason::MissingSdkAppId),
            ("CallbackCommand=x", Reason::MissingSdkAppId),
            ("sdkappid=1400000000", Reason::MissingSdkAppId),
            ("SdkAppid=abc", Reason::InvalidSdkAppId),
            ("SdkAppid=-1", Reason::InvalidSdkAppId),
            ("SdkAppid=", Reason::InvalidSdkAppId),
            ("SdkAppid=99999999999999999999", Reason::InvalidSdkAppId),
            ("SdkAppid=1400000001", Reason::UnknownSdkAppId),
            (
                "SdkAppid=1400000000&SdkAppid=1400000000",
                Reason::DuplicateQueryParam,
            ),
            (
                "SdkAppid=1400000000&OptPlatform=iOS%00x",
                Reason::InvalidQueryParam,
            ),
            (
                "SdkAppid=1400000000&ClientIP=1.2.3.4%0A",
                Reason::InvalidQueryParam,
            ),
            // Raw, as a caller other than hyper could hand them over; past ASCII the query
            // leaves the fast path, and a C1 control character is still found.
            (
                "SdkAppid=1400000000&OptPlatform=iOS\u{1}x",
                Reason::InvalidQueryParam,
            ),
            (
                "SdkAppid=1400000000&OptPlatform=iOS\u{85}",
                Reason::InvalidQueryParam,
            ),
            ("SdkAppid=1400000000", Reason::MissingSignature),
            ("SdkAppid=1400000000&Sign=00", Reason::MissingSignature),
            (
                "SdkAppid=1400000000&RequestTime=1",
                Reason::MissingSignature,
            ),
            (
                "SdkAppid=1400000000&RequestTime=abc&Sign=00",
                Reason::InvalidRequestTime,
            ),
            (
                "SdkAppid=1400000000&RequestTime=-5&Sign=00",
                Reason::InvalidRequestTime,
            ),
            (
                "SdkAppid=1400000000&RequestTime=1669872112&Sign=00",
                Reason::MalformedSignature,
            ),
            (
                "SdkAppid=1400000000&RequestTime=1669872112&Sign=zz77",
                Reason::MalformedSignature,
            ),
        ];
        for (q, want) in cases {
            assert_eq!(reason(&v, q), *want, "{q}");
        }
        let no_command = format!("SdkAppid={APP}&RequestTime={NOW}&Sign={good_sig}");
        assert_eq!(reason(&v, &no_command), Reason::MissingCallbackCommand);
        let non_hex = format!("SdkAppid={APP}&RequestTime={NOW}&Sign={}", "g".repeat(64));
        assert_eq!(reason(&v, &non_hex), Reason::MalformedSignature);
    }
}
