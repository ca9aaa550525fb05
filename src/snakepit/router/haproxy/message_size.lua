-- snakepit: answer a refused request only once its whole body has been read.
--
-- Loaded by the router's HAProxy (lua-load); message_size.py writes the rules that send a call
-- here and says why. HAProxy 2.6 resets with CANCEL a stream it answered before reading its
-- request to the end (haproxy/haproxy#1219), and a client on gRPC's C core (grpcio, C++, Ruby)
-- then reports CANCELLED, not the answer. An applet reads the request to its end before its
-- answer goes out, so the stream ends cleanly and every client reads the status.
--
-- http-request use-service lua.snakepit_answer_after_body
--   answers gRPC's Trailers-Only form: HTTP status 200, content-type application/grpc, and
--   the status, message and error detail in txn.refusal_status, txn.refusal_message and
--   txn.refusal_detail.

local CHUNK = 65536

core.register_service("snakepit_answer_after_body", "http", function(applet)
  -- The body is read and dropped, a chunk at a time (a Lua string each, never the whole).
  while true do
    local data = applet:receive(CHUNK)
    if data == nil or #data == 0 then
      break
    end
  end
  applet:set_status(200)
  applet:add_header("content-type", "application/grpc")
  applet:add_header("grpc-status", applet:get_var("txn.refusal_status"))
  applet:add_header("grpc-message", applet:get_var("txn.refusal_message"))
  applet:add_header("snakepit-error-bin", applet:get_var("txn.refusal_detail"))
  applet:add_header("content-length", "0")
  applet:start_response()
end)
