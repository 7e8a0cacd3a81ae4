//! Realistic `C2C.CallbackAfterSendMsg` bodies: a rotation of element mixes and sizes (short
//! and long text, CJK and emoji, custom data, images, sound, files, video, a merged-forward
//! relay), each with a unique `MsgKey` so that every one can be found again in Kafka.

/// Message bodies, as the `MsgBody` array, in the order callbacks cycle through them.
/// Weighted toward text, as chat traffic is.
const BODIES: &[&str] = &[
    r#"[{"MsgType":"TIMTextElem","MsgContent":{"Text":"ok"}}]"#,
    r#"[{"MsgType":"TIMTextElem","MsgContent":{"Text":"Are we still on for lunch tomorrow? I can book the place near the office."}}]"#,
    r#"[{"MsgType":"TIMTextElem","MsgContent":{"Text":"明天下午三点在会议室见，记得带上季度报告 📊 我们需要讨论预算和新项目的时间表。"}}]"#,
    r#"[{"MsgType":"TIMTextElem","MsgContent":{"Text":"see below"}},{"MsgType":"TIMCustomElem","MsgContent":{"Data":"{\"type\":\"order\",\"id\":88123,\"items\":[{\"sku\":\"A-1\",\"qty\":2}]}","Desc":"order update","Ext":"https://example.com/o/88123","Sound":""}}]"#,
    r#"[{"MsgType":"TIMFaceElem","MsgContent":{"Index":12,"Data":"[smile]"}}]"#,
    r#"[{"MsgType":"TIMImageElem","MsgContent":{"UUID":"1853095_D61040894AC3DE44CDFFFB3EC7EB720F","ImageFormat":1,"ImageInfoArray":[{"Type":1,"Size":1853095,"Width":2448,"Height":3264,"URL":"https://cos.example.com/im/o/D61040894AC3DE44.jpg"},{"Type":2,"Size":8192,"Width":720,"Height":960,"URL":"https://cos.example.com/im/l/D61040894AC3DE44.jpg"},{"Type":3,"Size":2193,"Width":149,"Height":198,"URL":"https://cos.example.com/im/t/D61040894AC3DE44.jpg"}]}}]"#,
    r#"[{"MsgType":"TIMSoundElem","MsgContent":{"Url":"https://cos.example.com/im/s/1053D4E2.silk","UUID":"1053D4E2","Size":62351,"Second":4,"Download_Flag":2}}]"#,
    r#"[{"MsgType":"TIMTextElem","MsgContent":{"Text":"haha 😂😂 that is exactly what I said"}}]"#,
    r#"[{"MsgType":"TIMLocationElem","MsgContent":{"Desc":"深圳市南山区科技园","Latitude":22.5431,"Longitude":113.9345}}]"#,
    r#"[{"MsgType":"TIMFileElem","MsgContent":{"Url":"https://cos.example.com/im/f/report.pdf","UUID":"f-7781","FileSize":1773552,"FileName":"Q3 report.pdf","Download_Flag":2}}]"#,
    r#"[{"MsgType":"TIMVideoFileElem","MsgContent":{"VideoUrl":"https://cos.example.com/im/v/clip.mp4","VideoUUID":"v-1","VideoSize":1194603,"VideoSecond":5,"VideoFormat":"mp4","VideoDownloadFlag":2,"ThumbUrl":"https://cos.example.com/im/v/clip.jpg","ThumbUUID":"t-1","ThumbSize":13907,"ThumbWidth":720,"ThumbHeight":1280,"ThumbFormat":"JPG","ThumbDownloadFlag":2}}]"#,
    r#"[{"MsgType":"TIMRelayElem","MsgContent":{"Title":"Chat history","MsgNum":2,"CompatibleText":"upgrade to view","AbstractList":["alice: hi","bob: 你好"],"MsgList":[{"From_Account":"alice","To_Account":"bob","MsgSeq":1,"MsgRandom":2,"MsgTimeStamp":1688000000,"MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"hi"}}]},{"From_Account":"bob","To_Account":"alice","MsgSeq":2,"MsgRandom":3,"MsgTimeStamp":1688000001,"MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"你好"}}]}]}}]"#,
];

/// Users the generator sends between: enough for realistic active-user counts.
const USERS: u64 = 5000;

/// The body of callback number `n` of run `run`, and its `MsgKey`.
pub fn callback(run: &str, n: u64, unix_seconds: u64) -> (String, String) {
    let key = format!("{run}-{n}");
    let from = n.wrapping_mul(2_654_435_761) % USERS;
    let to = (from + 1 + n % 97) % USERS;
    let msg_body = BODIES[(n % BODIES.len() as u64) as usize];
    let random = n.wrapping_mul(0x9E37_79B9) & 0xFFFF_FFFF;
    let body = format!(
        concat!(
            r#"{{"CallbackCommand":"C2C.CallbackAfterSendMsg","From_Account":"user{from}","#,
            r#""To_Account":"user{to}","MsgSeq":{seq},"MsgRandom":{random},"MsgTime":{time},"#,
            r#""MsgKey":"{key}","MsgId":"144115233406643804-{time}-{random}","OnlineOnlyFlag":0,"#,
            r#""SendMsgResult":0,"ErrorInfo":"send msg succeed","UnreadMsgNum":{unread},"#,
            r#""MsgBody":{msg_body},"CloudCustomData":"{{\"v\":1}}","EventTime":{event}}}"#
        ),
        from = from,
        to = to,
        seq = n & 0xFFFF_FFFF,
        random = random,
        time = unix_seconds,
        key = key,
        unread = n % 7,
        msg_body = msg_body,
        event = unix_seconds * 1000,
    );
    (body, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_body_is_a_valid_callback_with_its_key() {
        let sizes: Vec<usize> = (0..BODIES.len() as u64)
            .map(|n| {
                let (body, key) = callback("run", n, 1_700_000_000);
                let v: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
                assert_eq!(v["MsgKey"], key.as_str());
                assert_eq!(v["CallbackCommand"], "C2C.CallbackAfterSendMsg");
                assert!(v["MsgBody"].as_array().is_some_and(|a| !a.is_empty()));
                body.len()
            })
            .collect();
        // Varied sizes (400 to 870 bytes), around the 600 bytes of a typical text message.
        let mean = sizes.iter().sum::<usize>() / sizes.len();
        assert!(sizes.iter().min() < Some(&450) && sizes.iter().max() > Some(&800));
        assert!(
            (500..=700).contains(&mean),
            "mean body {mean} bytes: {sizes:?}"
        );
    }
}
