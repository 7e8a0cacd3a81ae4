//! Any body, under each of the six relayed commands: the strict JSON reader and the
//! normalizer answer, never panic, and every record they produce is JSON again, carrying its
//! id and a key. Seeds for each command are in the corpus (the `tests/fixtures` bodies).
#![no_main]

use im_relay::domain::{Relayed, SdkAppId};
use im_relay::normalize::{Context, KeyMode, Source, normalize};
use im_relay::json::{self, Json};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(Json::Object(body)) = json::parse(data) else {
        return;
    };
    let ctx = Context {
        sdk_app_id: SdkAppId::from(1400000000),
        client_ip: Some("203.0.113.7"),
        opt_platform: None,
        received_at: time::OffsetDateTime::UNIX_EPOCH,
        key_mode: KeyMode::Conversation,
        source: Source::Callback,
    };
    for command in Relayed::ALL {
        if let Ok(records) = normalize(&ctx, command, &body) {
            assert!(!records.is_empty());
            for out in records {
                let record: Value = serde_json::from_slice(&out.value).expect("records are JSON");
                assert_eq!(record["id"].as_str(), Some(out.id.as_str()));
                assert_eq!(record["callback_command"].as_str(), Some(command.as_str()));
                assert!(!out.key.is_empty());
            }
        }
    }
});
