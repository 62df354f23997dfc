"""A scripted Anthropic Messages API for running the real Claude Code CLI offline in tests.

usage: fake_anthropic.py LOGFILE        (prints "PORT <n>" once listening on 127.0.0.1)

The newest <channel ...>BODY</channel> in the conversation scripts the answer; `step` counts the
assistant messages after it, so multi-step scripts continue across tool results:
  (default)  step 0: text + reply(chat_id, "echo: BODY")   then: text "done", end_turn
  #plain     text "PLAIN: BODY", end_turn (no reply tool: the answer is last_assistant_message)
  #reply2    step 0: reply "part 1"   step 1: reply "part 2"   then: text "done"
  #slowN     wait N seconds before answering (an interrupted claude hangs up meanwhile)
  #bigN      step 0: reply "echo: BODY", a newline and N times "y"   then: text "done"
  #err400    HTTP 400 invalid_request_error (claude gives up: StopFailure)
  #bash      step 0: Bash "touch made-by-bash && echo bash-ran" (needs permission)   step 1: reply "echo: bash said: <output>"
  #tool      step 0: call the client tool mcp__synthesis__ls {"path": "."}
  #toolNAME  the same with the client tool mcp__synthesis__NAME
             step 1: reply "echo: tool result: <the tool's result text>"   then: text "done"
  #read      step 0: Read the first attachment the message names ("[image attached: PATH — ...")
             step 1: reply "echo: read <n> image block(s)" (n: image blocks in the Read result)
Requests without a channel tag (titles, probes) get a short text answer.
Usage is scripted too, distinct per step (see `usage`), so a test can check the sums synthesis reports.
Every /v1/messages body is appended to LOGFILE as one JSON line; with FAKE_ANTHROPIC_TIMES=<path>,
also its arrival time, size, whether it carries a channel message, and the answer's tool calls and
stop reason ({"t", "bytes", "channel", "tool_use", "stop"}) to that file.
"""
import json
import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOG = sys.argv[1]
TIMES = os.environ.get("FAKE_ANTHROPIC_TIMES")
LOCK = threading.Lock()
CHANNEL = re.compile(r"<channel([^>]*)>(.*?)</channel>", re.S)
COUNTER = [0]


def next_id(prefix):
    with LOCK:
        COUNTER[0] += 1
        return f"{prefix}_{COUNTER[0]:05d}"


def text_of(content):
    if isinstance(content, str):
        return content
    return "\n".join(b.get("text", "") for b in content or [] if isinstance(b, dict) and b.get("type") == "text")


def tool_result_text(message):
    """The text of the message's tool_result, or None without one."""
    content = message.get("content")
    for block in content if isinstance(content, list) else []:
        if isinstance(block, dict) and block.get("type") == "tool_result":
            content = block.get("content")
            return content if isinstance(content, str) else text_of(content)
    return None


ATTACHED = re.compile(r"\[(?:image|file) attached: (?:.* at )?(/\S+) — open it with the Read tool\]")


def image_blocks(msgs):
    """Image blocks inside the newest tool_result."""
    for m in reversed(msgs):
        content = m.get("content")
        for block in content if isinstance(content, list) else []:
            if isinstance(block, dict) and block.get("type") == "tool_result":
                inner = block.get("content")
                return [b for b in inner if isinstance(b, dict) and b.get("type") == "image"] if isinstance(inner, list) else []
    return []


def usage(step):
    """The usage reported for a call: step N of a channel turn, or None for other requests.
    A default turn (steps 0 and 1): input 203, output 15, cache read 15000, cache creation 300."""
    if step is None:
        return {"input_tokens": 2, "output_tokens": 1, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    return {"input_tokens": 101 + step, "output_tokens": 7 + step, "cache_read_input_tokens": 5000 * (step + 1),
            "cache_creation_input_tokens": 300 if step == 0 else 0}


def channel_step(body):
    """The step of a channel turn this request is, or None."""
    msgs = body.get("messages") or []
    for i in range(len(msgs) - 1, -1, -1):
        if msgs[i].get("role") == "user" and CHANNEL.findall(text_of(msgs[i].get("content"))):
            return sum(1 for m in msgs[i + 1:] if m.get("role") == "assistant")
    return None


def script(body):
    """(blocks, stop_reason, directives) for a request."""
    msgs = body.get("messages") or []
    for i in range(len(msgs) - 1, -1, -1):
        tags = CHANNEL.findall(text_of(msgs[i].get("content"))) if msgs[i].get("role") == "user" else []
        if tags:
            break
    else:
        return [{"type": "text", "text": "ok"}], "end_turn", []
    step = sum(1 for m in msgs[i + 1:] if m.get("role") == "assistant")
    attrs, inner = tags[-1]
    inner = inner.strip()
    chat_id = dict(re.findall(r'(\w+)="([^"]*)"', attrs)).get("chat_id", "?")
    dirs = re.findall(r"#(\w+)", inner)

    def reply(text):
        return {"type": "tool_use", "id": next_id("toolu"), "name": "mcp__synthesis__reply",
                "input": {"chat_id": chat_id, "text": text}}

    done = ([{"type": "text", "text": "done"}], "end_turn", dirs)
    if "bash" in dirs and step == 0:
        call = {"type": "tool_use", "id": next_id("toolu"), "name": "Bash",
                "input": {"command": "touch made-by-bash && echo bash-ran", "description": "make a file"}}
        return [call], "tool_use", dirs
    if "bash" in dirs and step == 1:
        result = next((t for t in map(tool_result_text, reversed(msgs)) if t is not None), "")
        return [reply(f"echo: bash said: {result.strip()}")], "tool_use", dirs
    if "bash" in dirs:
        return done
    if "read" in dirs and step == 0:
        path = ATTACHED.search(inner).group(1)
        return [{"type": "tool_use", "id": next_id("toolu"), "name": "Read", "input": {"file_path": path}}], "tool_use", dirs
    if "read" in dirs and step == 1:
        return [reply(f"echo: read {len(image_blocks(msgs))} image block(s)")], "tool_use", dirs
    if "read" in dirs:
        return done
    tool = next((d[4:] or "ls" for d in dirs if d.startswith("tool")), None)
    if tool and step == 0:
        call = {"type": "tool_use", "id": next_id("toolu"), "name": f"mcp__synthesis__{tool}", "input": {"path": "."}}
        return [call], "tool_use", dirs
    if tool and step == 1:
        result = next((t for t in map(tool_result_text, reversed(msgs)) if t is not None), "")
        return [reply(f"echo: tool result: {result}")], "tool_use", dirs
    if tool:
        return done
    if "plain" in dirs:
        return [{"type": "text", "text": f"PLAIN: {inner}"}], "end_turn", dirs
    if "reply2" in dirs:
        if step < 2:
            return [reply(f"part {step + 1}")], "tool_use", dirs
        return done
    big = next((int(d[3:]) for d in dirs if re.fullmatch(r"big\d+", d)), None)
    if big is not None and step == 0:
        return [reply(f"echo: {inner}\n" + "y" * big)], "tool_use", dirs
    if step == 0:
        return [{"type": "text", "text": "Replying."}, reply(f"echo: {inner}")], "tool_use", dirs
    return done


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def json_response(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_GET(self):
        self.json_response(404, {"type": "error", "error": {"type": "not_found_error", "message": "not found"}})

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        path = self.path.split("?")[0]
        if path == "/v1/messages/count_tokens":
            return self.json_response(200, {"input_tokens": 10})
        if path != "/v1/messages":
            return self.do_GET()
        body = json.loads(raw)
        t = time.time()
        with LOCK, open(LOG, "a") as f:
            f.write(json.dumps(body) + "\n")
        blocks, stop, dirs = script(body)
        if TIMES:
            step = sum(1 for b in blocks if b["type"] == "tool_use")
            with LOCK, open(TIMES, "a") as f:
                f.write(json.dumps({"t": t, "bytes": len(raw), "channel": "<channel" in raw.decode(errors="replace"),
                                    "tool_use": step, "stop": stop}) + "\n")
        slow = next((int(d[4:]) for d in dirs if re.fullmatch(r"slow\d+", d)), 0)
        if slow and stop == "tool_use" and "reply2" not in dirs:
            time.sleep(slow)
        if "err400" in dirs:
            return self.json_response(400, {"type": "error", "error": {
                "type": "invalid_request_error", "message": "scripted failure"}})
        call_usage = usage(channel_step(body))
        message = {"id": next_id("msg"), "type": "message", "role": "assistant", "model": body.get("model", "fake"),
                   "content": [], "stop_reason": None, "stop_sequence": None, "usage": call_usage}
        try:
            if not body.get("stream"):
                return self.json_response(200, {**message, "content": blocks, "stop_reason": stop})
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("connection", "close")
            self.end_headers()

            def event(name, obj):
                self.wfile.write(f"event: {name}\ndata: {json.dumps({'type': name, **obj})}\n\n".encode())
                self.wfile.flush()

            event("message_start", {"message": message})
            for i, b in enumerate(blocks):
                if b["type"] == "text":
                    event("content_block_start", {"index": i, "content_block": {"type": "text", "text": ""}})
                    event("content_block_delta", {"index": i, "delta": {"type": "text_delta", "text": b["text"]}})
                else:
                    event("content_block_start", {"index": i, "content_block": {**b, "input": {}}})
                    event("content_block_delta", {"index": i, "delta": {
                        "type": "input_json_delta", "partial_json": json.dumps(b["input"])}})
                event("content_block_stop", {"index": i})
            event("message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None}, "usage": {"output_tokens": call_usage["output_tokens"]}})
            event("message_stop", {})
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(f"PORT {server.server_address[1]}", flush=True)
server.serve_forever()
