"""The stream meter: events pass through as they complete, the usage chunk is read (and dropped
when the client did not ask for it), split reads and CRLF streams work."""

from __future__ import annotations

import json

from inference.gateway.sse import SSEMeter


def ev(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


ROLE = ev({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
TOKENS = [ev({"choices": [{"index": 0, "delta": {"content": f" t{i}"}}]}) for i in range(3)]
FINISH = ev({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
USAGE = ev({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
DONE = b"data: [DONE]\n\n"
STREAM = [ROLE, *TOKENS, FINISH, USAGE, DONE]


def run(meter: SSEMeter, reads: list[bytes]) -> bytes:
    return b"".join(meter.feed(r) for r in reads) + meter.tail()


def test_usage_chunk_dropped_when_not_asked_for() -> None:
    meter = SSEMeter(client_wants_usage=False, chat=True)
    out = run(meter, STREAM)
    assert out == b"".join([ROLE, *TOKENS, FINISH, DONE])
    assert meter.usage == {"prompt_tokens": 7, "completion_tokens": 3}
    assert meter.done


def test_usage_chunk_kept_when_asked_for() -> None:
    meter = SSEMeter(client_wants_usage=True, chat=True)
    assert run(meter, STREAM) == b"".join(STREAM)
    assert meter.usage == {"prompt_tokens": 7, "completion_tokens": 3}


def test_events_split_across_reads_go_out_whole() -> None:
    whole = b"".join(STREAM)
    meter = SSEMeter(client_wants_usage=False, chat=True)
    pieces = [whole[i : i + 7] for i in range(0, len(whole), 7)]
    outputs = [meter.feed(p) for p in pieces]
    assert all(o == b"" or o.endswith(b"\n\n") for o in outputs)
    assert b"".join(outputs) + meter.tail() == b"".join([ROLE, *TOKENS, FINISH, DONE])
    assert meter.usage is not None


def test_first_token_is_forwarded_before_the_stream_ends() -> None:
    meter = SSEMeter(client_wants_usage=False, chat=True)
    assert meter.feed(ROLE) == ROLE
    assert meter.feed(TOKENS[0]) == TOKENS[0]
    assert meter.first_token_at is not None


def test_crlf_delimited_streams() -> None:
    crlf = [e.replace(b"\n\n", b"\r\n\r\n") for e in STREAM]
    meter = SSEMeter(client_wants_usage=False, chat=True)
    out = run(meter, crlf)
    assert b'"usage"' not in out and out.endswith(b"data: [DONE]\r\n\r\n")
    assert meter.usage == {"prompt_tokens": 7, "completion_tokens": 3}


def test_cut_short_stream_counts_what_was_served() -> None:
    meter = SSEMeter(client_wants_usage=False, chat=True)
    run(meter, [ROLE, *TOKENS])
    assert meter.usage is None and not meter.done
    assert meter.data_events == 3  # the role-only chunk is not a token


def test_completions_have_no_role_chunk() -> None:
    meter = SSEMeter(client_wants_usage=False, chat=False)
    run(meter, [ev({"choices": [{"text": "a"}]}), ev({"choices": [{"text": " b"}]})])
    assert meter.data_events == 2


def test_continuous_usage_is_stripped_from_content_chunks() -> None:
    chunk = ev({"choices": [{"delta": {"content": "x"}}], "usage": {"completion_tokens": 1}})
    meter = SSEMeter(client_wants_usage=False, chat=True)
    out = meter.feed(chunk)
    assert json.loads(out[6:]) == {"choices": [{"delta": {"content": "x"}}]}
    assert meter.usage == {"completion_tokens": 1}


def test_a_token_that_says_usage_is_just_content() -> None:
    chunk = ev({"choices": [{"delta": {"content": "usage"}}]})
    meter = SSEMeter(client_wants_usage=False, chat=False)
    assert meter.feed(chunk) == chunk and meter.usage is None


def test_text_bytes_bound_what_a_cut_stream_generated() -> None:
    """Every string a chunk's choices carry, in UTF-8 bytes (not characters: `é` is 2), role
    excluded, over every choice: tokens of byte-level BPE cover at least a byte each."""
    multi = ev(
        {
            "choices": [
                {"index": 0, "delta": {"content": "héllo", "reasoning_content": "ab"}},
                {"index": 1, "delta": {"tool_calls": [{"function": {"arguments": '{"x":1}'}}]}},
            ]
        }
    )
    text = ev({"choices": [{"index": 0, "text": "日本"}]})  # completions: 3 bytes a character
    meter = SSEMeter(client_wants_usage=False, chat=True)
    run(meter, [ROLE, multi, text])  # cut: no usage, no [DONE]
    assert meter.usage is None and not meter.done
    assert meter.text_bytes == 6 + 2 + 7 + 6
    assert meter.data_events == 2  # the role chunk is not a token
