"""The official openai Python SDK against a running synthesis (run by tests/loopback.rs).

usage: openai_sdk.py BASE_URL API_KEY
"""
import sys

import openai

base_url, api_key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)


def headers(session):
    return {"x-session-affinity": session}


r = client.chat.completions.create(
    model="claude-code",
    messages=[{"role": "user", "content": "hello from the sdk"}],
    extra_headers=headers("sdk-a"),
)
assert r.choices[0].message.content.startswith("echo:"), r
assert "hello from the sdk" in r.choices[0].message.content, r
assert r.choices[0].finish_reason == "stop", r

stream = client.chat.completions.create(
    model="claude-code",
    messages=[{"role": "user", "content": "streamed please"}],
    stream=True,
    stream_options={"include_usage": True},
    extra_headers=headers("sdk-a"),
)
text, finish, usage = "", None, None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for choice in chunk.choices:
        text += choice.delta.content or ""
        finish = choice.finish_reason or finish
assert text.startswith("echo:") and "streamed please" in text, text
assert finish == "stop", finish
assert usage is not None
# fake claude's transcript: two API calls per turn (see TRANSCRIPT_USAGE in examples/fake_claude.rs).
assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (331, 5, 336), usage
assert usage.prompt_tokens_details.cached_tokens == 300, usage
assert r.usage.prompt_tokens == 331, r.usage

try:
    openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).chat.completions.create(
        model="claude-code", messages=[{"role": "user", "content": "x"}], extra_headers=headers("sdk-a")
    )
    raise SystemExit("wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401

print("openai sdk", openai.__version__, "ok:", repr(r.choices[0].message.content), repr(text))
