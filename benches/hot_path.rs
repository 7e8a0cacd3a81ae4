//! The per-callback hot path, without I/O: verify the query, parse the body, normalize and
//! encode the record and its spool entry — for a ~600-byte callback (BENCHMARKS.md has the figures).
//! `cargo bench --bench hot_path`; compare runs on the same machine only.

use criterion::{Criterion, criterion_group, criterion_main};

/// The allocator the relay runs with (`src/main.rs`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::hint::black_box;

use im_relay::config::Secret;
use im_relay::domain::{Relayed, SdkAppId};
use im_relay::json::{self, Json};
use im_relay::normalize::{Context, KeyMode, Source, normalize};
use im_relay::record::message_entry;
use im_relay::validate::{Verifier, sign_of};

const BODY: &str = r#"{"CallbackCommand":"C2C.CallbackAfterSendMsg","From_Account":"0b9f3c9e-1a2b-4c5d-8e9f-0a1b2c3d4e5f","To_Account":"user_1042","MsgSeq":48374,"MsgRandom":2837546,"MsgTime":1557481126,"MsgKey":"48374_2837546_1557481126","MsgId":"144115233406643804-1727580296-4026038328","OnlineOnlyFlag":0,"SendMsgResult":0,"ErrorInfo":"send msg succeed","UnreadMsgNum":3,"MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"hello, this is a typical chat message 你好世界 👋"}},{"MsgType":"TIMCustomElem","MsgContent":{"Data":"{\"order\":12345,\"status\":\"paid\"}","Desc":"notification","Ext":"","Sound":""}}],"CloudCustomData":"{\"k\":1}","EventTime":1670574414123}"#;

fn hot_path(c: &mut Criterion) {
    let now = 1_669_872_112;
    let sign = sign_of(&Secret::new("token"), &now.to_string());
    let query = format!(
        "SdkAppid=1400000000&CallbackCommand=C2C.CallbackAfterSendMsg&contenttype=json&ClientIP=203.0.113.7&OptPlatform=iOS&RequestTime={now}&Sign={}",
        sign.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let verifier = Verifier::new(
        vec![SdkAppId::from(1400000000)],
        vec![Secret::new("token")],
        60_000,
    );
    let received_at = time::OffsetDateTime::from_unix_timestamp(now).unwrap();
    assert!((550..=700).contains(&BODY.len()), "{}", BODY.len());

    let mut g = c.benchmark_group("callback");
    g.bench_function("verify query", |b| {
        b.iter(|| verifier.verify(Some(black_box(&query)), now).unwrap())
    });
    g.bench_function("parse body", |b| {
        b.iter(|| json::parse(black_box(BODY.as_bytes())).unwrap())
    });
    let Ok(Json::Object(body)) = json::parse(BODY.as_bytes()) else {
        unreachable!()
    };
    let ctx = Context {
        sdk_app_id: SdkAppId::from(1400000000),
        client_ip: Some("203.0.113.7"),
        opt_platform: Some("iOS"),
        received_at,
        key_mode: KeyMode::MsgKey,
        source: Source::Callback,
    };
    g.bench_function("normalize + encode", |b| {
        b.iter(|| normalize(&ctx, Relayed::AfterSendMsg, black_box(&body)).unwrap())
    });
    g.bench_function("all: verify + parse + normalize + spool entry", |b| {
        b.iter(|| {
            let q = verifier.verify(Some(black_box(&query)), now).unwrap();
            let Ok(Json::Object(body)) = json::parse(black_box(BODY.as_bytes())) else {
                unreachable!()
            };
            let ctx = Context {
                sdk_app_id: q.sdk_app_id,
                ..ctx
            };
            let mut out = normalize(&ctx, Relayed::AfterSendMsg, &body).unwrap();
            let out = out.pop().unwrap();
            message_entry(
                out.target,
                &out.key,
                &out.headers,
                &out.value,
                received_at,
                None,
            )
        })
    });
    g.finish();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
