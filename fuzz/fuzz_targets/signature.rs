//! Any `Sign`/`RequestTime` pair: accepted exactly when it is the token's signature of a fresh
//! time, in either hex case.
#![no_main]

use im_relay::config::Secret;
use im_relay::domain::SdkAppId;
use im_relay::validate::{Verifier, sign_of};
use libfuzzer_sys::fuzz_target;

const NOW: i64 = 1_669_872_112;

fuzz_target!(|input: (String, String, bool)| {
    let (time, sign, use_real_sign) = input;
    let token = Secret::new("xxxxyyyy");
    let real = hex_lower(&sign_of(&token, &time));
    let sign = if use_real_sign { real.clone() } else { sign };
    let enc = |s: &str| form_encode(s);
    let query = format!(
        "SdkAppid=1400000000&CallbackCommand=C2C.CallbackAfterSendMsg&RequestTime={}&Sign={}",
        enc(&time),
        enc(&sign)
    );
    let v = Verifier::new(vec![SdkAppId::from(1400000000)], vec![token], 60_000);
    let accepted = v.verify(Some(&query), NOW).is_ok();
    let fresh = !time.is_empty()
        && time.len() <= 12
        && time.bytes().all(|b| b.is_ascii_digit())
        && time.parse::<i64>().is_ok_and(|t| (t - NOW).abs() <= 60);
    assert_eq!(
        accepted,
        fresh && sign.eq_ignore_ascii_case(&real),
        "{query}"
    );
});

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Percent-encodes everything but unreserved characters, so the value survives the query.
fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
