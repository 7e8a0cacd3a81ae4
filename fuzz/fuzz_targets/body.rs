//! Any body: the strict JSON reader and the normalizer answer, never panic, and every record
//! they produce is JSON again.
#![no_main]

use im_relay::domain::SdkAppId;
use im_relay::normalize::{Context, KeyMode, normalize};
use im_relay::receive::json;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(Value::Object(body)) = json::parse(data) else {
        return;
    };
    let ctx = Context {
        sdk_app_id: SdkAppId::from(1400000000),
        client_ip: Some("203.0.113.7"),
        opt_platform: None,
        received_at: time::OffsetDateTime::UNIX_EPOCH,
        key_mode: KeyMode::Conversation,
    };
    if let Ok(out) = normalize(&ctx, &body) {
        let record: Value = serde_json::from_slice(&out.value).expect("records are JSON");
        assert_eq!(record["id"].as_str(), Some(out.id.as_str()));
        assert!(!out.key.is_empty());
    }
});
