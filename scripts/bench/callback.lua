-- wrk script: POSTs signed C2C.CallbackAfterSendMsg callbacks, each with a unique MsgKey (the
-- relay drops repeats as duplicates). Arguments: <signed query> <tag>.
local query, tag, n = "", "", 0

function init(args)
  query = args[1]
  math.randomseed(os.time())
  tag = (args[2] or "bench") .. "-" .. tostring(math.random(1, 1000000000))
end

function request()
  n = n + 1
  local body = '{"CallbackCommand":"C2C.CallbackAfterSendMsg","From_Account":"alice","To_Account":"bob",'
    .. '"MsgSeq":' .. n .. ',"MsgRandom":2804799576,"MsgTime":1700000000,"MsgKey":"' .. tag .. '-' .. n .. '",'
    .. '"MsgId":"144115233406643804-1727580296-4026038328","OnlineOnlyFlag":0,"SendMsgResult":0,'
    .. '"ErrorInfo":"send msg succeed","UnreadMsgNum":1,"MsgBody":[{"MsgType":"TIMTextElem",'
    .. '"MsgContent":{"Text":"hello, this is a benchmark message with some CJK text 你好世界"}},'
    .. '{"MsgType":"TIMCustomElem","MsgContent":{"Data":"{\\"order\\":12345}","Desc":"notification","Ext":"","Sound":""}}],'
    .. '"CloudCustomData":"{\\"k\\":1}","EventTime":1670574414123}'
  return wrk.format("POST", "/im/callback?" .. query, nil, body)
end
