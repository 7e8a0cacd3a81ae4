//! `MsgBody` elements, typed per `MsgType`
//! (https://www.tencentcloud.com/document/product/1047/33527). An element we cannot type — an
//! unknown `MsgType`, or a known one whose content has an unexpected shape — is kept raw as
//! `{"type":"unknown",…}`: the message is never refused for the shape of one element.

use super::fields::{Extra, FieldError, Obj, Problem};
use crate::json::Json;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Element<'a> {
    #[serde(flatten)]
    pub kind: Kind<'a>,
    /// Unknown fields inside `MsgContent`.
    #[serde(skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra<'a>,
    /// Unknown fields beside `MsgType`/`MsgContent`.
    #[serde(skip_serializing_if = "Extra::is_empty")]
    pub element_extra: Extra<'a>,
}

type OptStr<'a> = Option<&'a str>;

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Kind<'a> {
    Text {
        text: OptStr<'a>,
    },
    Location {
        desc: OptStr<'a>,
        latitude: Option<f64>,
        longitude: Option<f64>,
    },
    Face {
        index: Option<i64>,
        data: OptStr<'a>,
    },
    Custom {
        data: OptStr<'a>,
        desc: OptStr<'a>,
        ext: OptStr<'a>,
        sound: OptStr<'a>,
    },
    Sound {
        url: OptStr<'a>,
        uuid: OptStr<'a>,
        size: Option<u64>,
        second: Option<u64>,
        download_flag: Option<i64>,
    },
    Image {
        uuid: OptStr<'a>,
        image_format: Option<i64>,
        images: Vec<ImageInfo<'a>>,
    },
    File {
        url: OptStr<'a>,
        uuid: OptStr<'a>,
        file_size: Option<u64>,
        file_name: OptStr<'a>,
        download_flag: Option<i64>,
    },
    Video {
        video_url: OptStr<'a>,
        video_uuid: OptStr<'a>,
        video_size: Option<u64>,
        video_second: Option<u64>,
        video_format: OptStr<'a>,
        video_download_flag: Option<i64>,
        thumb_url: OptStr<'a>,
        thumb_uuid: OptStr<'a>,
        thumb_size: Option<u64>,
        thumb_width: Option<u64>,
        thumb_height: Option<u64>,
        thumb_format: OptStr<'a>,
        thumb_download_flag: Option<i64>,
    },
    Relay {
        title: OptStr<'a>,
        msg_num: Option<u64>,
        compatible_text: OptStr<'a>,
        abstract_list: Option<Vec<&'a str>>,
        messages: Option<Vec<RelayedMessage<'a>>>,
        json_msg_key: OptStr<'a>,
    },
    Unknown {
        msg_type: OptStr<'a>,
        content: &'a Json<'a>,
    },
}

impl Kind<'_> {
    /// Every `label`.
    pub const LABELS: [&'static str; 10] = [
        "text", "location", "face", "custom", "sound", "image", "file", "video", "relay", "unknown",
    ];

    /// Metric label, from a fixed set.
    pub fn label(&self) -> &'static str {
        match self {
            Kind::Text { .. } => "text",
            Kind::Location { .. } => "location",
            Kind::Face { .. } => "face",
            Kind::Custom { .. } => "custom",
            Kind::Sound { .. } => "sound",
            Kind::Image { .. } => "image",
            Kind::File { .. } => "file",
            Kind::Video { .. } => "video",
            Kind::Relay { .. } => "relay",
            Kind::Unknown { .. } => "unknown",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ImageInfo<'a> {
    /// 1 original, 2 large, 3 thumbnail.
    #[serde(rename = "type")]
    pub kind: Option<i64>,
    pub size: Option<u64>,
    pub width: Option<u64>,
    pub height: Option<u64>,
    pub url: OptStr<'a>,
    #[serde(skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra<'a>,
}

/// One message inlined in a `TIMRelayElem`'s `MsgList`.
#[derive(Debug, Serialize)]
pub struct RelayedMessage<'a> {
    pub from_account: OptStr<'a>,
    pub to_account: OptStr<'a>,
    pub group_id: OptStr<'a>,
    pub msg_seq: Option<u64>,
    pub msg_random: Option<u64>,
    pub msg_time: Option<i64>,
    pub elements: Vec<Element<'a>>,
    pub cloud_custom_data: OptStr<'a>,
    #[serde(skip_serializing_if = "Extra::is_empty")]
    pub extra: Extra<'a>,
}

const ELEMENT_FIELDS: &[&str] = &["MsgType", "MsgContent"];

/// Types one element; never fails (see the module note).
pub fn element<'a>(raw: &'a Json<'a>) -> Element<'a> {
    let Json::Object(map) = raw else {
        return unknown(None, raw, Extra::new());
    };
    let outer = Obj(map);
    let element_extra = outer.extra(ELEMENT_FIELDS);
    let msg_type = outer.str("MsgType").ok().flatten();
    let content = map.get("MsgContent").unwrap_or(&Json::Null);
    let typed = match (msg_type, content) {
        (Some(t), Json::Object(c)) => typed(t, Obj(c)),
        _ => None,
    };
    match typed {
        Some(Ok((kind, extra))) => Element {
            kind,
            extra,
            element_extra,
        },
        // Unknown type or a shape we cannot type: the raw content carries everything.
        Some(Err(_)) | None => unknown(msg_type, content, element_extra),
    }
}

fn unknown<'a>(
    msg_type: OptStr<'a>,
    content: &'a Json<'a>,
    element_extra: Extra<'a>,
) -> Element<'a> {
    Element {
        kind: Kind::Unknown { msg_type, content },
        extra: Extra::new(),
        element_extra,
    }
}

/// Types a `MsgBody`. Every element must be an object (`{"MsgType": …, "MsgContent": …}`):
/// a bare number or string in the array is not a message element, and relaying it as an
/// "unknown" one would hide a broken sender.
pub fn elements<'a>(raw: &'a [Json<'a>]) -> Result<Vec<Element<'a>>, FieldError> {
    if raw.iter().any(|e| !matches!(e, Json::Object(_))) {
        return Err(FieldError {
            field: "MsgBody",
            problem: Problem::Invalid("must hold objects only".into()),
        });
    }
    Ok(raw.iter().map(element).collect())
}

type Typed<'a> = Result<(Kind<'a>, Extra<'a>), FieldError>;

/// The `MsgContent` fields each known `MsgType` has; anything else goes to `extra`
/// (https://www.tencentcloud.com/document/product/1047/33527).
const KNOWN: &[(&str, &[&str])] = &[
    ("TIMTextElem", &["Text"]),
    ("TIMLocationElem", &["Desc", "Latitude", "Longitude"]),
    ("TIMFaceElem", &["Index", "Data"]),
    ("TIMCustomElem", &["Data", "Desc", "Ext", "Sound"]),
    (
        "TIMSoundElem",
        &["Url", "UUID", "Size", "Second", "Download_Flag"],
    ),
    ("TIMImageElem", &["UUID", "ImageFormat", "ImageInfoArray"]),
    (
        "TIMFileElem",
        &["Url", "UUID", "FileSize", "FileName", "Download_Flag"],
    ),
    (
        "TIMVideoFileElem",
        &[
            "VideoUrl",
            "VideoUUID",
            "VideoSize",
            "VideoSecond",
            "VideoFormat",
            "VideoDownloadFlag",
            "ThumbUrl",
            "ThumbUUID",
            "ThumbSize",
            "ThumbWidth",
            "ThumbHeight",
            "ThumbFormat",
            "ThumbDownloadFlag",
        ],
    ),
    (
        "TIMRelayElem",
        &[
            "Title",
            "MsgNum",
            "CompatibleText",
            "AbstractList",
            "MsgList",
            "JsonMsgKey",
        ],
    ),
];

/// `None` for a `MsgType` we do not know.
fn typed<'a>(msg_type: &str, c: Obj<'a>) -> Option<Typed<'a>> {
    let (_, known) = KNOWN.iter().find(|(t, _)| *t == msg_type)?;
    Some(kind(msg_type, c).map(|k| (k, c.extra(known))))
}

fn kind<'a>(msg_type: &str, c: Obj<'a>) -> Result<Kind<'a>, FieldError> {
    Ok(match msg_type {
        "TIMTextElem" => Kind::Text {
            text: c.str("Text")?,
        },
        "TIMLocationElem" => Kind::Location {
            desc: c.str("Desc")?,
            latitude: c.f64("Latitude")?,
            longitude: c.f64("Longitude")?,
        },
        "TIMFaceElem" => Kind::Face {
            index: c.i64("Index")?,
            data: c.str("Data")?,
        },
        "TIMCustomElem" => Kind::Custom {
            data: c.str("Data")?,
            desc: c.str("Desc")?,
            ext: c.str("Ext")?,
            sound: c.str("Sound")?,
        },
        "TIMSoundElem" => Kind::Sound {
            url: c.str("Url")?,
            uuid: c.str("UUID")?,
            size: c.u64("Size")?,
            second: c.u64("Second")?,
            download_flag: c.i64("Download_Flag")?,
        },
        "TIMImageElem" => Kind::Image {
            uuid: c.str("UUID")?,
            image_format: c.i64("ImageFormat")?,
            images: image_infos(c)?,
        },
        "TIMFileElem" => Kind::File {
            url: c.str("Url")?,
            uuid: c.str("UUID")?,
            file_size: c.u64("FileSize")?,
            file_name: c.str("FileName")?,
            download_flag: c.i64("Download_Flag")?,
        },
        "TIMVideoFileElem" => Kind::Video {
            video_url: c.str("VideoUrl")?,
            video_uuid: c.str("VideoUUID")?,
            video_size: c.u64("VideoSize")?,
            video_second: c.u64("VideoSecond")?,
            video_format: c.str("VideoFormat")?,
            video_download_flag: c.i64("VideoDownloadFlag")?,
            thumb_url: c.str("ThumbUrl")?,
            thumb_uuid: c.str("ThumbUUID")?,
            thumb_size: c.u64("ThumbSize")?,
            thumb_width: c.u64("ThumbWidth")?,
            thumb_height: c.u64("ThumbHeight")?,
            thumb_format: c.str("ThumbFormat")?,
            thumb_download_flag: c.i64("ThumbDownloadFlag")?,
        },
        "TIMRelayElem" => relay(c)?,
        _ => {
            return Err(FieldError {
                field: "MsgType",
                problem: Problem::Invalid("is not a known element type".into()),
            });
        }
    })
}

fn image_infos<'a>(c: Obj<'a>) -> Result<Vec<ImageInfo<'a>>, FieldError> {
    const FIELD: &str = "ImageInfoArray";
    let Some(infos) = c.array(FIELD)? else {
        return Ok(Vec::new());
    };
    infos
        .iter()
        .map(|info| {
            let Json::Object(m) = info else {
                return Err(not_object(FIELD));
            };
            let i = Obj(m);
            Ok(ImageInfo {
                kind: i.i64("Type")?,
                size: i.u64("Size")?,
                width: i.u64("Width")?,
                height: i.u64("Height")?,
                url: i.str("URL")?,
                extra: i.extra(&["Type", "Size", "Width", "Height", "URL"]),
            })
        })
        .collect()
}

fn relay(c: Obj<'_>) -> Result<Kind<'_>, FieldError> {
    let abstract_list = c
        .array("AbstractList")?
        .map(|items| {
            items
                .iter()
                .map(|s| s.as_str().ok_or_else(|| not_string("AbstractList")))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let messages = c
        .array("MsgList")?
        .map(|list| list.iter().map(relayed_message).collect())
        .transpose()?;
    Ok(Kind::Relay {
        title: c.str("Title")?,
        msg_num: c.u64("MsgNum")?,
        compatible_text: c.str("CompatibleText")?,
        abstract_list,
        messages,
        json_msg_key: c.str("JsonMsgKey")?,
    })
}

fn relayed_message<'a>(raw: &'a Json<'a>) -> Result<RelayedMessage<'a>, FieldError> {
    let Json::Object(m) = raw else {
        return Err(not_object("MsgList"));
    };
    let o = Obj(m);
    // Relayed messages carry their time as `MsgTimeStamp`; some senders reuse `MsgTime`.
    let msg_time = match o.i64("MsgTimeStamp")? {
        Some(t) => Some(t),
        None => o.i64("MsgTime")?,
    };
    Ok(RelayedMessage {
        from_account: o.str("From_Account")?,
        to_account: o.str("To_Account")?,
        group_id: o.str("GroupId")?,
        msg_seq: o.u64("MsgSeq")?,
        msg_random: o.u64("MsgRandom")?,
        msg_time,
        elements: elements(o.array("MsgBody")?.unwrap_or_default())?,
        cloud_custom_data: o.str("CloudCustomData")?,
        extra: o.extra(&[
            "From_Account",
            "To_Account",
            "GroupId",
            "MsgSeq",
            "MsgRandom",
            "MsgTimeStamp",
            "MsgTime",
            "MsgBody",
            "CloudCustomData",
        ]),
    })
}

fn not_object(field: &'static str) -> FieldError {
    FieldError {
        field,
        problem: Problem::Expected("an array of objects"),
    }
}

fn not_string(field: &'static str) -> FieldError {
    FieldError {
        field,
        problem: Problem::Expected("an array of strings"),
    }
}
