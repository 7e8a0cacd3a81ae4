//! UserSig version 2, made in-process from the app's secret key: the REST API's credential
//! for the administrator account. The algorithm of Tencent's reference implementation
//! (https://www.tencentcloud.com/document/product/1047/34385, `tencentyun/tls-sig-api-v2-python`):
//! HMAC-SHA256 over four `TLS.*` lines, a JSON object, zlib, base64 with `*-_` for `+/=`.

use std::io::{Read, Write};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

/// `TLS.sig`: standard base64 of the HMAC of the four lines.
fn signature(key: &str, identifier: &str, sdk_app_id: u64, time: u64, expire: u64) -> String {
    let text = format!(
        "TLS.identifier:{identifier}\nTLS.sdkappid:{sdk_app_id}\nTLS.time:{time}\nTLS.expire:{expire}\n"
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key");
    mac.update(text.as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

/// A UserSig for `identifier`, issued at `time` (Unix seconds), valid `expire` seconds.
pub fn make(key: &str, identifier: &str, sdk_app_id: u64, time: u64, expire: u64) -> String {
    let doc = json!({
        "TLS.ver": "2.0",
        "TLS.identifier": identifier,
        "TLS.sdkappid": sdk_app_id,
        "TLS.expire": expire,
        "TLS.time": time,
        "TLS.sig": signature(key, identifier, sdk_app_id, time, expire),
    });
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing to a Vec cannot fail.
    let _ = z.write_all(doc.to_string().as_bytes());
    let packed = z.finish().unwrap_or_default();
    STANDARD
        .encode(packed)
        .chars()
        .map(|c| match c {
            '+' => '*',
            '/' => '-',
            '=' => '_',
            c => c,
        })
        .collect()
}

/// The JSON object inside a UserSig (step 5 reversed, inflated), unchecked.
pub fn decode(sig: &str) -> Option<Value> {
    let b64: String = sig
        .chars()
        .map(|c| match c {
            '*' => '+',
            '-' => '/',
            '_' => '=',
            c => c,
        })
        .collect();
    let packed = STANDARD.decode(b64).ok()?;
    let mut text = Vec::new();
    flate2::read::ZlibDecoder::new(packed.as_slice())
        .take(64 * 1024)
        .read_to_end(&mut text)
        .ok()?;
    serde_json::from_slice(&text).ok()
}

/// Whether `sig` was made with `key` for `identifier` and `sdk_app_id` and is valid at `now`:
/// what Tencent checks (the fake REST server in the tests uses it).
pub fn verify(sig: &str, key: &str, identifier: &str, sdk_app_id: u64, now: u64) -> bool {
    let Some(doc) = decode(sig) else {
        return false;
    };
    let (Some(time), Some(expire)) = (doc["TLS.time"].as_u64(), doc["TLS.expire"].as_u64()) else {
        return false;
    };
    let expected = signature(key, identifier, sdk_app_id, time, expire);
    let given = doc["TLS.sig"].as_str().unwrap_or_default();
    let same = subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), given.as_bytes()).into();
    same && doc["TLS.identifier"] == identifier
        && doc["TLS.sdkappid"].as_u64() == Some(sdk_app_id)
        && now < time.saturating_add(expire)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e";

    #[test]
    fn the_spec_test_vector() {
        let sig = make(KEY, "administrator", 1400000000, 1700000000, 86400);
        let doc = decode(&sig).expect("decodes");
        assert_eq!(
            doc["TLS.sig"],
            "yLAe+w7WUeUuqbV9h/TX78u21oTGi+i9Zp1u3PpnY60="
        );
        assert_eq!(doc["TLS.ver"], "2.0");
        assert_eq!(doc["TLS.identifier"], "administrator");
        assert_eq!(doc["TLS.sdkappid"], 1400000000);
        assert!(!sig.contains(['+', '/', '=']), "{sig}");
    }

    #[test]
    fn round_trip_and_expiry() {
        let sig = make(KEY, "administrator", 1400000000, 1700000000, 86400);
        assert!(verify(&sig, KEY, "administrator", 1400000000, 1700000000));
        assert!(verify(&sig, KEY, "administrator", 1400000000, 1700086399));
        assert!(!verify(&sig, KEY, "administrator", 1400000000, 1700086400));
        assert!(!verify(
            &sig,
            "another key",
            "administrator",
            1400000000,
            1700000001
        ));
        assert!(!verify(&sig, KEY, "someone", 1400000000, 1700000001));
        assert!(!verify(&sig, KEY, "administrator", 1400000001, 1700000001));
        assert!(!verify(
            "not a sig",
            KEY,
            "administrator",
            1400000000,
            1700000001
        ));
    }
}
