"""The official `openai` Python client against a running `troupe serve`: chat and completions,
whole and streamed (with and without usage), a session continued by id and forked, and errors
surfacing as the client's own exception types.

    python server/tests/openai_client.py http://127.0.0.1:PORT/v1
"""

import sys

import openai
from openai import OpenAI

base = sys.argv[1]
client = OpenAI(base_url=base, api_key="unused")
model = client.models.list().data[0].id
messages = [{"role": "user", "content": "Tell me about the sea."}]

whole = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
reply = whole.choices[0].message.content
assert whole.choices[0].finish_reason == "length", whole
assert whole.usage.completion_tokens == 12, whole.usage
assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12

stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=12, temperature=0, stream=True,
    stream_options={"include_usage": True},
)
chunks = list(stream)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == reply, (text, reply)
assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []

comp = client.completions.create(model=model, prompt="The sea", max_tokens=8, temperature=0)
streamed = "".join(
    c.choices[0].text
    for c in client.completions.create(
        model=model, prompt="The sea", max_tokens=8, temperature=0, stream=True
    )
)
assert streamed == comp.choices[0].text, (streamed, comp.choices[0].text)

# A session, continued by id: the second turn sends only its new message.
session = client.post("/sessions", body={"name": "Ferris"}, cast_to=object)
sid = session["id"]
for content in ["Hello.", "And then?"]:
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=6,
        temperature=0, extra_body={"session": sid},
    )
    assert r.usage.completion_tokens == 6
cached = r.usage.prompt_tokens_details.cached_tokens
assert cached > 0, r.usage

# A fork continues a copy of the session's context: the same next message, the same reply.
fork = client.post(f"/sessions/{sid}/fork", body={}, cast_to=object)
assert fork["id"] != sid and fork["forked_from"] == sid, fork
replies = [
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Go on."}], max_tokens=6,
        temperature=0, extra_body={"session": s},
    )
    for s in [sid, fork["id"]]
]
assert replies[0].choices[0].message.content == replies[1].choices[0].message.content, replies
assert replies[1].usage.prompt_tokens_details.cached_tokens == replies[0].usage.prompt_tokens_details.cached_tokens
client.delete(f"/sessions/{sid}", cast_to=object)
client.delete(f"/sessions/{fork['id']}", cast_to=object)

try:
    client.chat.completions.create(model=model, messages=messages, n=2)
    raise AssertionError("n=2 was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "n", e.body
try:
    client.chat.completions.create(
        model=model, messages=messages, extra_body={"session": "424242"}
    )
    raise AssertionError("an unknown session was accepted")
except openai.NotFoundError:
    pass
print(f"openai client: ok ({model}: {reply!r})")
