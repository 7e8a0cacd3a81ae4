//! Normalization against real payload shapes (`tests/fixtures/`), field by field, and every
//! record against the published JSON Schema.

use serde_json::{Map, Value, json};
use time::macros::datetime;

use super::*;

const DOC_SAMPLE: &str = include_str!("../../tests/fixtures/doc_sample.json");
const ALL_ELEMENTS: &str = include_str!("../../tests/fixtures/all_elements.json");
const LEGACY_MINIMAL: &str = include_str!("../../tests/fixtures/legacy_minimal.json");
const NO_KEY_NO_SEQ: &str = include_str!("../../tests/fixtures/no_key_no_seq.json");

fn ctx(key_mode: KeyMode) -> Context<'static> {
    Context {
        sdk_app_id: SdkAppId::from(1400000000),
        client_ip: Some("203.0.113.7"),
        opt_platform: Some("iOS"),
        received_at: datetime!(2026-11-25 12:00:00.123456 UTC),
        key_mode,
        source: Source::Callback,
    }
}

fn body(text: &str) -> Map<String, Value> {
    match serde_json::from_str(text).expect("fixture is JSON") {
        Value::Object(m) => m,
        _ => panic!("fixture is an object"),
    }
}

/// The functions under test, over the `serde_json` bodies the tests build.
fn normalize(
    ctx: &Context<'_>,
    command: Relayed,
    body: &Map<String, Value>,
) -> Result<Vec<Output>, NormalizeError> {
    normalize_map(ctx, command, body)
}

fn after_send(ctx: &Context<'_>, body: &Map<String, Value>) -> Result<Output, NormalizeError> {
    super::after_send(ctx, &Object::from_map(body))
}

fn run(text: &str) -> (Output, Value) {
    let out = after_send(&ctx(KeyMode::MsgKey), &body(text)).expect("normalizes");
    let record: Value = serde_json::from_slice(&out.value).expect("record is JSON");
    assert_valid(&record);
    (out, record)
}

fn assert_valid(record: &Value) {
    let name = record["schema"].as_str().expect("a schema name");
    let (_, text) = SCHEMAS
        .iter()
        .find(|(n, _)| *n == name)
        .expect("a published schema");
    let schema: Value = serde_json::from_str(text).expect("schema is JSON");
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(record)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "schema violations: {errors:#?}\n{record:#}"
    );
}

#[test]
fn doc_sample_field_by_field() {
    let (out, r) = run(DOC_SAMPLE);
    let id = "1400000000:Jonh:jared:48374_2837546_1557481126";
    assert_eq!(out.id, id);
    assert_eq!(out.key, "48374_2837546_1557481126");
    assert_eq!(out.untyped_elements, 0);
    let expected = json!({
        "schema": "im-relay.c2c-message.v2",
        "source": "callback",
        "id": id,
        "sdk_app_id": 1400000000u64,
        "callback_command": "C2C.CallbackAfterSendMsg",
        "msg_key": "48374_2837546_1557481126",
        "msg_key_derived": false,
        "msg_id": "144115233406643804-1727580296-4026038328",
        "from_account": "jared",
        "to_account": "Jonh",
        "msg_seq": 48374,
        "msg_random": 2837546,
        "msg_time": 1557481126,
        "msg_time_rfc3339": "2019-05-10T09:38:46Z",
        "event_time_ms": 1670574414123u64,
        "online_only": true,
        "send_result": 0,
        "delivered": true,
        "error_info": "send msg succeed",
        "unread_msg_num": 0,
        "elements": [{"type": "text", "text": "red packet"}],
        "cloud_custom_data": "your cloud custom data",
        "client_ip": "203.0.113.7",
        "opt_platform": "iOS",
        "received_at": "2026-11-25T12:00:00.123Z",
        "extra": {},
    });
    assert_eq!(r, expected);
    let headers: Vec<(&str, &str)> = out.headers.iter().map(|(k, v)| (*k, v.as_ref())).collect();
    assert_eq!(
        headers,
        vec![
            ("ce_specversion", "1.0"),
            ("ce_id", id),
            ("ce_source", "/tencent-im/1400000000"),
            ("ce_type", EVENT_TYPE),
            ("ce_time", "2019-05-10T09:38:46Z"),
            ("content-type", "application/json"),
            ("im_sdk_app_id", "1400000000"),
            ("im_callback_command", "C2C.CallbackAfterSendMsg"),
        ]
    );
}

#[test]
fn every_element_type_is_typed_and_nothing_is_lost() {
    let (out, r) = run(ALL_ELEMENTS);
    let e = r["elements"].as_array().unwrap();
    let types: Vec<&str> = e.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "text", "location", "face", "custom", "sound", "image", "file", "video", "relay",
            "unknown", "unknown"
        ]
    );
    assert_eq!(e[0]["text"], "你好 👋 a&b=c \u{0} end");
    assert_eq!(
        e[1],
        json!({"type": "location", "desc": "深圳", "latitude": 22.54, "longitude": 114.05})
    );
    assert_eq!(e[2], json!({"type": "face", "index": 1, "data": "content"}));
    assert_eq!(e[3]["data"], "{\"k\":[1,2]}");
    assert_eq!(e[3]["sound"], "dingdong.aiff");
    assert_eq!(
        e[4],
        json!({"type": "sound", "url": "https://example.com/a.silk", "uuid": "1053D4E2",
               "size": 62351, "second": 1, "download_flag": 2})
    );
    assert_eq!(e[5]["image_format"], 1);
    assert_eq!(e[5]["images"].as_array().unwrap().len(), 3);
    assert_eq!(e[5]["images"][0]["url"], "https://example.com/o.jpg");
    assert_eq!(e[5]["images"][1]["extra"], json!({"Quality": 80}));
    assert_eq!(e[6]["file_name"], "file:a.txt");
    assert_eq!(e[6]["file_size"], 1773552);
    assert_eq!(e[7]["video_format"], "mp4");
    assert_eq!(e[7]["thumb_height"], 1280);
    assert_eq!(e[7]["thumb_download_flag"], 2);
    let relay = &e[8];
    assert_eq!(relay["abstract_list"], json!(["alice: hi", "bob: 你好"]));
    assert_eq!(relay["messages"][0]["msg_time"], 1688000000);
    assert_eq!(
        relay["messages"][0]["elements"][0],
        json!({"type": "text", "text": "hi"})
    );
    assert_eq!(relay["messages"][1]["extra"], json!({"NewField": true}));
    // An unknown type and a known type with a wrong shape are both kept raw.
    assert_eq!(
        e[9],
        json!({"type": "unknown", "msg_type": "TIMStreamElem", "content": {"Chunks": ["a", "b"]}})
    );
    assert_eq!(
        e[10],
        json!({"type": "unknown", "msg_type": "TIMTextElem", "content": {"Text": 42}})
    );
    assert_eq!(out.untyped_elements, 2);
    // Numbers beyond i32, a failed delivery, unknown top-level fields.
    assert_eq!(r["msg_seq"], 4294967295u64);
    assert_eq!(r["msg_random"], 2804799576u64);
    assert_eq!(r["msg_time"], 2563141290u64);
    assert_eq!(r["msg_time_rfc3339"], "2051-03-22T23:41:30Z");
    assert_eq!(r["send_result"], 80001);
    assert_eq!(r["delivered"], false);
    assert_eq!(r["unread_msg_num"], -1);
    assert_eq!(r["online_only"], false);
    assert_eq!(
        r["extra"],
        json!({"SomeFutureField": {"nested": [1, "two"]}})
    );
    // Ids are ordered by byte value: '0' sorts before '@'.
    assert_eq!(
        out.id,
        "1400000000:0b9f3c9e-1a2b-4c5d-8e9f-0a1b2c3d4e5f:@RBT#001:4294967295_2804799576_2563141290"
    );
}

#[test]
fn legacy_payload_numbers_as_strings_and_a_derived_key() {
    let (out, r) = run(LEGACY_MINIMAL);
    assert_eq!(r["msg_seq"], 123);
    assert_eq!(r["msg_random"], 2804799576u64);
    assert_eq!(r["msg_time"], 2563141290u64);
    assert_eq!(r["msg_key"], "123_2804799576_2563141290");
    assert_eq!(r["msg_key_derived"], true);
    assert_eq!(out.key, "123_2804799576_2563141290");
    for absent in [
        "msg_id",
        "online_only",
        "send_result",
        "delivered",
        "error_info",
        "unread_msg_num",
        "cloud_custom_data",
        "event_time_ms",
    ] {
        assert_eq!(r[absent], Value::Null, "{absent}");
    }
    assert_eq!(
        r["elements"][0],
        json!({"type": "sound", "url": null, "uuid": "s1", "size": 100, "second": 3, "download_flag": null})
    );
}

#[test]
fn without_seq_the_key_is_a_stable_hash_of_the_body() {
    let (a, r) = run(NO_KEY_NO_SEQ);
    assert_eq!(r["msg_key_derived"], true);
    assert!(
        a.key.starts_with("sha256_") && a.key.len() == 7 + 32,
        "{}",
        a.key
    );
    // Same body with keys in another order: same key. Another body: another key.
    let reordered = r#"{"MsgBody": [], "To_Account": "amy", "From_Account": "zed", "CallbackCommand": "C2C.CallbackAfterSendMsg"}"#;
    let (b, _) = run(reordered);
    assert_eq!(a.key, b.key);
    let other = NO_KEY_NO_SEQ.replace("amy", "ann");
    let (c, _) = run(&other);
    assert_ne!(a.key, c.key);
    assert_eq!(r["elements"], json!([]));
    assert_eq!(r["msg_time_rfc3339"], Value::Null);
}

#[test]
fn conversation_keys_are_the_same_in_both_directions() {
    let there = body(DOC_SAMPLE);
    let mut back = there.clone();
    back.insert("From_Account".into(), json!("Jonh"));
    back.insert("To_Account".into(), json!("jared"));
    let a = after_send(&ctx(KeyMode::Conversation), &there).unwrap();
    let b = after_send(&ctx(KeyMode::Conversation), &back).unwrap();
    assert_eq!(a.key, "1400000000:Jonh:jared");
    assert_eq!(a.key, b.key);
    // Same MsgKey, same conversation: same dedup id whichever way it is told.
    assert_eq!(a.id, b.id);
}

#[test]
fn messages_we_cannot_relay_name_the_field() {
    let cases: &[(Value, &str)] = &[
        (
            json!({"To_Account": "b", "MsgBody": []}),
            "From_Account is missing",
        ),
        (
            json!({"From_Account": "", "To_Account": "b", "MsgBody": []}),
            "From_Account must not be empty",
        ),
        (
            json!({"From_Account": 5, "To_Account": "b", "MsgBody": []}),
            "From_Account must be a string",
        ),
        (
            json!({"From_Account": "a", "MsgBody": []}),
            "To_Account is missing",
        ),
        (
            json!({"From_Account": "a", "To_Account": "b"}),
            "MsgBody is missing",
        ),
        (
            json!({"From_Account": "a", "To_Account": "b", "MsgBody": {}}),
            "MsgBody must be an array",
        ),
        (
            json!({"From_Account": "a", "To_Account": "b", "MsgBody": [], "MsgSeq": -1}),
            "MsgSeq is out of range",
        ),
        (
            json!({"From_Account": "a", "To_Account": "b", "MsgBody": [], "MsgTime": "soon"}),
            "MsgTime must be an integer",
        ),
        (
            json!({"From_Account": "a", "To_Account": "b", "MsgBody": [], "MsgKey": ""}),
            "MsgKey must not be empty",
        ),
        (
            json!({"From_Account": "a", "To_Account": "b", "MsgBody": [], "MsgKey": 7}),
            "MsgKey must be a string",
        ),
        (
            json!({"From_Account": "a".repeat(300), "To_Account": "b", "MsgBody": []}),
            "From_Account longer than 256 bytes",
        ),
    ];
    for (v, want) in cases {
        let Value::Object(m) = v else { unreachable!() };
        let err = after_send(&ctx(KeyMode::MsgKey), m).unwrap_err();
        assert_eq!(err.to_string(), *want, "{v}");
    }
}

mod properties {
    use std::sync::OnceLock;

    use proptest::prelude::*;

    use super::*;

    /// The validator of each published schema, by name.
    fn validators() -> &'static Vec<(&'static str, jsonschema::Validator)> {
        static V: OnceLock<Vec<(&'static str, jsonschema::Validator)>> = OnceLock::new();
        V.get_or_init(|| {
            SCHEMAS
                .iter()
                .map(|(name, text)| {
                    let schema: Value = serde_json::from_str(text).unwrap();
                    (*name, jsonschema::validator_for(&schema).unwrap())
                })
                .collect()
        })
    }

    fn validator() -> &'static jsonschema::Validator {
        &validators()[0].1
    }

    fn valid(record: &Value) -> bool {
        let name = record["schema"].as_str().unwrap_or_default();
        validators()
            .iter()
            .any(|(n, v)| *n == name && v.is_valid(record))
    }

    pub(super) fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            ".{0,12}".prop_map(Value::String),
            "[0-9]{1,25}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(field_name(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Tencent's own field names most of the time, so the typed paths are exercised.
    pub(super) fn field_name() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "From_Account",
                "To_Account",
                "MsgSeq",
                "MsgRandom",
                "MsgTime",
                "MsgKey",
                "MsgBody",
                "MsgType",
                "MsgContent",
                "Text",
                "ImageInfoArray",
                "MsgList",
                "AbstractList",
                "Latitude",
                "Index",
                "Size",
                "OnlineOnlyFlag",
                "URL",
                "Operator_Account",
                "Report_Account",
                "Peer_Account",
                "LastReadTime",
                "C2CMsgInfo",
                "EventTime",
            ])
            .prop_map(str::to_owned),
            ".{0,8}",
        ]
    }

    pub(super) fn element() -> impl Strategy<Value = Value> {
        let content = prop::collection::btree_map(field_name(), any_json(), 0..4)
            .prop_map(|m| Value::Object(m.into_iter().collect()));
        (
            prop::sample::select(vec![
                "TIMTextElem",
                "TIMLocationElem",
                "TIMFaceElem",
                "TIMCustomElem",
                "TIMSoundElem",
                "TIMImageElem",
                "TIMFileElem",
                "TIMVideoFileElem",
                "TIMRelayElem",
                "TIMNewElem",
            ]),
            content,
        )
            .prop_map(|(t, c)| json!({"MsgType": t, "MsgContent": c}))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever the JSON and the command, normalize answers: records that validate
        /// against their kind's schema, or an error naming a field.
        #[test]
        fn never_panics_and_records_always_validate(body in prop::collection::btree_map(field_name(), any_json(), 0..10)) {
            let body: Map<String, Value> = body.into_iter().collect();
            for command in Relayed::ALL {
                if let Ok(records) = normalize(&ctx(KeyMode::MsgKey), command, &body) {
                    prop_assert!(!records.is_empty());
                    for out in records {
                        let record: Value = serde_json::from_slice(&out.value).unwrap();
                        prop_assert!(valid(&record), "{record:#}");
                        prop_assert_eq!(record["id"].as_str(), Some(out.id.as_str()));
                    }
                }
            }
        }

        /// Any valid callback becomes a record that validates and carries its fields.
        #[test]
        fn valid_callbacks_round_trip(
            from in "\\PC{1,40}", to in "\\PC{1,40}",
            seq in any::<u32>(), random in any::<u32>(), time in 0i64..4_000_000_000,
            seq_as_text in any::<bool>(), key in proptest::option::of("[ -~]{1,50}"),
            elements in prop::collection::vec(element(), 0..5),
            extra in prop::collection::btree_map("[a-z]{1,8}", any_json(), 0..3),
        ) {
            let mut body = json!({
                "CallbackCommand": "C2C.CallbackAfterSendMsg",
                "From_Account": from, "To_Account": to,
                "MsgSeq": if seq_as_text { Value::from(seq.to_string()) } else { Value::from(seq) },
                "MsgRandom": random, "MsgTime": time, "MsgBody": elements,
            });
            if let Some(k) = &key {
                body["MsgKey"] = Value::from(k.clone());
            }
            let Value::Object(mut body) = body else { unreachable!() };
            for (k, v) in extra {
                body.entry(k).or_insert(v);
            }
            let out = after_send(&ctx(KeyMode::MsgKey), &body).unwrap();
            let r: Value = serde_json::from_slice(&out.value).unwrap();
            prop_assert!(validator().is_valid(&r), "{r:#}");
            prop_assert_eq!(&r["from_account"], &Value::from(from));
            prop_assert_eq!(&r["to_account"], &Value::from(to));
            prop_assert_eq!(&r["msg_seq"], &Value::from(seq));
            prop_assert_eq!(&r["msg_random"], &Value::from(random));
            prop_assert_eq!(&r["msg_time"], &Value::from(time));
            let expected_key = key.unwrap_or_else(|| format!("{seq}_{random}_{time}"));
            prop_assert_eq!(&out.key, &expected_key);
            prop_assert_eq!(r["elements"].as_array().unwrap().len(), body["MsgBody"].as_array().unwrap().len());
        }
    }
}

mod lifecycle {
    use super::*;

    const RECALL: &str = include_str!("../../tests/fixtures/recall.json");
    const EDIT: &str = include_str!("../../tests/fixtures/edit.json");
    const READ_REPORT: &str = include_str!("../../tests/fixtures/read_report.json");
    const READ_RECEIPT: &str = include_str!("../../tests/fixtures/read_receipt.json");
    const READ_ALL: &str = include_str!("../../tests/fixtures/read_all.json");

    fn records(command: Relayed, text: &str, mode: KeyMode) -> Vec<(Output, Value)> {
        normalize(&ctx(mode), command, &body(text))
            .expect("normalizes")
            .into_iter()
            .map(|out| {
                let record: Value = serde_json::from_slice(&out.value).expect("JSON");
                assert_valid(&record);
                (out, record)
            })
            .collect()
    }

    fn one(command: Relayed, text: &str) -> (Output, Value) {
        let mut all = records(command, text, KeyMode::MsgKey);
        assert_eq!(all.len(), 1);
        all.remove(0)
    }

    fn header<'a>(out: &'a Output, name: &str) -> Option<&'a str> {
        out.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_ref())
    }

    fn without(text: &str, field: &str) -> Map<String, Value> {
        let mut b = body(text);
        b.remove(field);
        b
    }

    #[test]
    fn a_recall_joins_its_message_and_is_keyed_like_it() {
        let (message, _) = run(DOC_SAMPLE);
        let (out, r) = one(Relayed::AfterMsgWithDraw, RECALL);
        // The same message as the doc sample: the recall names it by its record id.
        assert_eq!(r["message_id"], message.id.as_str());
        assert_eq!(out.id, format!("{}#recall", message.id));
        assert_eq!(r["id"], out.id.as_str());
        assert_eq!(out.key, message.key);
        assert_eq!(out.target, Target::Recalls);
        assert_eq!(r["event_time_ms"], 1670574414123i64);
        assert_eq!(r["unread_msg_num"], 7);
        assert_eq!(r["source"], "callback");
        assert_eq!(
            header(&out, "ce_type"),
            Some("com.tencent.im.c2c.after_msg_withdraw.v1")
        );
        assert_eq!(header(&out, "ce_time"), Some("2022-12-09T08:26:54.123Z"));
        assert_eq!(
            header(&out, "im_callback_command"),
            Some("C2C.CallbackAfterMsgWithDraw")
        );
        // A recall rebuilt from history has no EventTime: same id.
        let bare = normalize(
            &ctx(KeyMode::MsgKey),
            Relayed::AfterMsgWithDraw,
            &without(RECALL, "EventTime"),
        )
        .unwrap();
        assert_eq!(bare[0].id, out.id);
        // Keyed by conversation, like its message.
        let conv = records(Relayed::AfterMsgWithDraw, RECALL, KeyMode::Conversation);
        assert_eq!(conv[0].0.key, "1400000000:Jonh:jared");
        // MsgKey is the only join: required.
        let err = normalize(
            &ctx(KeyMode::MsgKey),
            Relayed::AfterMsgWithDraw,
            &without(RECALL, "MsgKey"),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "MsgKey is missing");
    }

    #[test]
    fn an_edit_is_identified_by_its_time_or_its_content() {
        let (out, r) = one(Relayed::AfterModifyMsg, EDIT);
        let message = "1400000000:Jonh:jared:609_690_1769771529";
        assert_eq!(r["message_id"], message);
        assert_eq!(out.id, format!("{message}#edit@1769772027036"));
        assert_eq!(out.key, "609_690_1769771529");
        assert_eq!(out.target, Target::Edits);
        assert_eq!(r["elements"][0]["text"], "edited text");
        assert_eq!(r["cloud_custom_data"], "1769772027");
        assert_eq!(r["operator_account"], "jared");
        // Without EventTime: a digest of the new content, the same whatever the key order,
        // different for different content.
        let timeless = without(EDIT, "EventTime");
        let a = normalize(&ctx(KeyMode::MsgKey), Relayed::AfterModifyMsg, &timeless).unwrap();
        let reordered: Map<String, Value> = timeless.clone().into_iter().rev().collect();
        let b = normalize(&ctx(KeyMode::MsgKey), Relayed::AfterModifyMsg, &reordered).unwrap();
        assert_eq!(a[0].id, b[0].id);
        assert!(a[0].id.starts_with(&format!("{message}#edit@sha256_")));
        let mut other = timeless.clone();
        other.insert("CloudCustomData".into(), json!("else"));
        let c = normalize(&ctx(KeyMode::MsgKey), Relayed::AfterModifyMsg, &other).unwrap();
        assert_ne!(a[0].id, c[0].id);
        // Only CloudCustomData edited: elements null, not "now empty".
        let r = normalize(
            &ctx(KeyMode::MsgKey),
            Relayed::AfterModifyMsg,
            &without(EDIT, "MsgBody"),
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&r[0].value).unwrap();
        assert_valid(&v);
        assert_eq!(v["elements"], Value::Null);
        // No MsgKey: derived from MsgSeq/MsgRandom/MsgTime like after-send's; with none of
        // them it cannot be joined and is refused.
        let derived = normalize(
            &ctx(KeyMode::MsgKey),
            Relayed::AfterModifyMsg,
            &without(EDIT, "MsgKey"),
        )
        .unwrap();
        assert_eq!(derived[0].key, "609_690_1769771529");
        let mut lost = without(EDIT, "MsgKey");
        lost.remove("MsgSeq");
        let err = normalize(&ctx(KeyMode::MsgKey), Relayed::AfterModifyMsg, &lost).unwrap_err();
        assert_eq!(err.to_string(), "MsgKey is missing");
    }

    #[test]
    fn a_read_report_is_a_watermark_keyed_by_its_conversation() {
        let (out, r) = one(Relayed::AfterMsgReport, READ_REPORT);
        assert_eq!(out.id, "1400000000:jared:Jonh#read_report@1614754606");
        assert_eq!(out.key, "1400000000:Jonh:jared");
        assert_eq!(r["conversation"], "1400000000:Jonh:jared");
        assert_eq!(r["report_account"], "jared");
        assert_eq!(r["peer_account"], "Jonh");
        assert_eq!(r["last_read_time"], 1614754606);
        assert_eq!(out.target, Target::ReadReports);
        // Keyed by conversation whatever the key mode: it has no MsgKey.
        let conv = records(Relayed::AfterMsgReport, READ_REPORT, KeyMode::Conversation);
        assert_eq!(conv[0].0.key, out.key);
        let err = normalize(
            &ctx(KeyMode::MsgKey),
            Relayed::AfterMsgReport,
            &without(READ_REPORT, "LastReadTime"),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "LastReadTime is missing");
    }

    #[test]
    fn a_read_all_is_a_watermark_over_the_reader_s_conversations_without_its_group_part() {
        let (out, r) = one(Relayed::AfterMsgReadAll, READ_ALL);
        assert_eq!(out.id, "1400000000:jared#read_all@1769139587754");
        assert_eq!(out.key, "1400000000:jared");
        assert_eq!(out.target, Target::ReadReports);
        assert_eq!(r["report_account"], "jared");
        assert_eq!(r["event_time_ms"], 1769139587754i64);
        assert_eq!(r["extra"], json!({}), "the group part is not relayed");
        assert_eq!(
            header(&out, "ce_type"),
            Some(crate::normalize::lifecycle::READ_ALL_TYPE)
        );
        let err = normalize(
            &ctx(KeyMode::MsgKey),
            Relayed::AfterMsgReadAll,
            &without(READ_ALL, "Report_Account"),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "Report_Account is missing");
        // Without EventTime: still a record, told apart by its arrival.
        let b = without(READ_ALL, "EventTime");
        let out = normalize(&ctx(KeyMode::MsgKey), Relayed::AfterMsgReadAll, &b).unwrap();
        assert!(
            out[0].id.starts_with("1400000000:jared#read_all@r"),
            "{}",
            out[0].id
        );
    }

    #[test]
    fn a_read_receipt_becomes_one_record_per_message() {
        let all = records(Relayed::AfterMsgReadReceipt, READ_RECEIPT, KeyMode::MsgKey);
        assert_eq!(all.len(), 2);
        let (first, r) = &all[0];
        assert_eq!(
            first.id,
            "1400000000:Jonh:jared:33973751_24064952_1769139583#read_receipt"
        );
        assert_eq!(first.key, "33973751_24064952_1769139583");
        assert_eq!(r["msg_id"], "144115433090395387-1769139578-24064952");
        assert_eq!(r["operator_account"], "jared");
        assert_eq!(first.target, Target::ReadReceipts);
        assert_eq!(all[1].0.key, "33973752_1_1769139584");
        assert_eq!(all[1].1["msg_id"], Value::Null);
        for (bad, want) in [
            (json!([]), "C2CMsgInfo must name at least one message"),
            (json!([1]), "C2CMsgInfo must hold objects only"),
            (
                json!([{"From_Account": "a", "To_Account": "b"}]),
                "MsgKey is missing",
            ),
        ] {
            let mut b = body(READ_RECEIPT);
            b.insert("C2CMsgInfo".into(), bad);
            let err = normalize(&ctx(KeyMode::MsgKey), Relayed::AfterMsgReadReceipt, &b);
            assert_eq!(err.unwrap_err().to_string(), want);
        }
    }

    #[test]
    fn a_read_receipt_s_readable_entries_are_kept_and_its_bad_ones_set_aside_with_why() {
        let good = json!({"From_Account": "a", "To_Account": "b", "MsgKey": "1_2_3"});
        let mut b = body(READ_RECEIPT);
        b.insert(
            "C2CMsgInfo".into(),
            json!([good, {"From_Account": "a", "To_Account": "b"}, 7]),
        );
        let (out, set_aside) = normalize_parts(
            &ctx(KeyMode::MsgKey),
            Relayed::AfterMsgReadReceipt,
            &Object::from_map(&b),
        )
        .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].key, "1_2_3");
        assert_eq!(
            set_aside,
            [
                "C2CMsgInfo[1]: MsgKey is missing",
                "C2CMsgInfo[2]: C2CMsgInfo must hold objects only"
            ]
        );
        // The strict form refuses it; a receipt with nothing readable is refused by both.
        let strict = normalize(&ctx(KeyMode::MsgKey), Relayed::AfterMsgReadReceipt, &b);
        assert!(strict.unwrap_err().to_string().contains("C2CMsgInfo[1]"));
        b.insert("C2CMsgInfo".into(), json!([7]));
        let none = normalize_parts(
            &ctx(KeyMode::MsgKey),
            Relayed::AfterMsgReadReceipt,
            &Object::from_map(&b),
        );
        assert_eq!(
            none.map(|_| ()).unwrap_err().to_string(),
            "C2CMsgInfo must hold objects only"
        );
    }

    #[test]
    fn elements_that_are_not_objects_are_refused_by_every_command_that_has_them() {
        for (command, text) in [
            (Relayed::AfterSendMsg, DOC_SAMPLE),
            (Relayed::AfterModifyMsg, EDIT),
        ] {
            let mut b = body(text);
            b.insert("MsgBody".into(), json!([1, 2]));
            let err = normalize(&ctx(KeyMode::MsgKey), command, &b).unwrap_err();
            assert_eq!(err.to_string(), "MsgBody must hold objects only");
        }
    }
}

/// The borrowed reader (`crate::json`) against the one it replaced, a `serde_json::Value` tree:
/// the same tree, the same text, the same records byte for byte — over the fixtures, every body
/// of the fuzz corpus and generated payloads (escapes, big and odd numbers, repeated keys are
/// where a hand-made reader silently differs).
mod differential {
    use proptest::prelude::*;

    use super::*;
    use crate::json::{self, Json};

    /// Asserts the two readings of `bytes` agree; says whether it was an object.
    fn agree(bytes: &[u8]) -> bool {
        json::fast_reader_agrees(bytes);
        let old = serde_json::from_slice::<Value>(bytes);
        let new = json::parse(bytes);
        let (new, old) = match (new, old) {
            (Ok(new), Ok(old)) => (new, old),
            (Err(_), Err(_)) => return false,
            (Err(e), Ok(_)) => {
                // The one refusal that is ours: serde_json keeps the last of repeated keys.
                assert!(e.to_string().contains("duplicate key"), "{e}");
                return false;
            }
            (Ok(_), Err(e)) => panic!("serde_json refused what we read: {e}"),
        };
        assert_eq!(new, Json::from_value(&old));
        assert_eq!(
            serde_json::to_vec(&new).unwrap(),
            serde_json::to_vec(&old).unwrap()
        );
        assert_eq!(
            json::to_vec(&new, 0).unwrap(),
            serde_json::to_vec(&old).unwrap()
        );
        let (Json::Object(new), Value::Object(old)) = (&new, &old) else {
            return false;
        };
        for mode in [KeyMode::MsgKey, KeyMode::Conversation] {
            for command in Relayed::ALL {
                assert_eq!(
                    super::super::normalize(&ctx(mode), command, new),
                    normalize(&ctx(mode), command, old),
                    "{command:?}"
                );
            }
        }
        true
    }

    #[test]
    fn the_fixtures_and_the_fuzz_corpus() {
        let dirs = ["tests/fixtures", "fuzz/corpus/body"];
        let (mut objects, mut fast) = (0, 0);
        for dir in dirs {
            for entry in std::fs::read_dir(dir).unwrap() {
                let bytes = std::fs::read(entry.unwrap().path()).unwrap();
                objects += usize::from(agree(&bytes));
                fast += usize::from(json::fast_reader_agrees(&bytes));
            }
        }
        // About half the corpus (902 of 1,763 files) are objects: a reader refusing them all
        // would agree vacuously. Likewise the fast reader, which gives the rest to serde_json.
        assert!(objects > 850, "{objects}");
        assert!(fast > 900, "{fast}");
    }

    /// `text` with every `/` and non-ASCII character escaped (both appear only inside
    /// strings, so the JSON means the same).
    fn escaped(text: &str) -> String {
        let mut out = String::with_capacity(text.len() * 2);
        for c in text.chars() {
            match c {
                '/' => out.push_str("\\/"),
                c if c.is_ascii() => out.push(c),
                c => {
                    for unit in c.encode_utf16(&mut [0; 2]) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
            }
        }
        out
    }

    const ODD_NUMBERS: &[&str] = &[
        "-0",
        "1.0",
        "1e2",
        "1E+2",
        "0.1",
        "2.5e-308",
        "123456789012345678901234567890",
        "-9223372036854775809",
        "18446744073709551615",
        "18446744073709551616",
        "4294967296",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn generated_payloads(
            fields in prop::collection::btree_map(properties::field_name(), properties::any_json(), 0..10),
            elements in prop::collection::vec(properties::element(), 0..4),
            escape in any::<bool>(),
            number in prop::option::of((properties::field_name(), prop::sample::select(ODD_NUMBERS))),
            repeat in prop::option::of(properties::field_name()),
        ) {
            let mut body: Map<String, Value> = fields.into_iter().collect();
            body.insert("MsgBody".into(), Value::Array(elements));
            let mut text = serde_json::to_string(&body).unwrap();
            let mut extra = String::new();
            if let Some((name, n)) = number {
                extra.push_str(&format!("{}:{n},", Value::from(name)));
            }
            if let Some(name) = repeat {
                extra.push_str(&format!("{0}:1,{0}:2,", Value::from(name)));
            }
            text.insert_str(1, &extra);
            if escape {
                text = escaped(&text);
            }
            agree(text.as_bytes());
        }
    }
}

mod timestamps {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Our RFC 3339 writer against `time`'s, over every instant `time` holds (years beyond
        /// 0..=9999 included: both refuse them), at each sub-second precision, in UTC and not.
        #[test]
        fn rfc3339_writes_what_time_writes(
            seconds in -400_000_000_000i64..400_000_000_000,
            nanos in prop_oneof![Just(0u32), 0..1_000_000_000u32, (0..1000u32).prop_map(|m| m * 1_000_000)],
            offset in prop_oneof![3 => Just(0i32), 1 => -86_399..86_400i32],
        ) {
            let Ok(t) = OffsetDateTime::from_unix_timestamp(seconds) else {
                return Ok(());
            };
            let t = t.replace_nanosecond(nanos).unwrap()
                .to_offset(time::UtcOffset::from_whole_seconds(offset).unwrap());
            prop_assert_eq!(super::super::rfc3339(Some(t)), t.format(&Rfc3339).ok());
        }
    }
}
