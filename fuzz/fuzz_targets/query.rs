//! Any query string: `verify` answers Ok or a rejection, never panics.
#![no_main]

use im_relay::config::Secret;
use im_relay::domain::SdkAppId;
use im_relay::validate::Verifier;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let query = String::from_utf8_lossy(data);
    for tokens in [vec![], vec![Secret::new("token")]] {
        let v = Verifier::new(vec![SdkAppId::from(1400000000)], tokens, 60_000);
        let _ = v.verify(Some(&query), 1_669_872_112);
    }
});
