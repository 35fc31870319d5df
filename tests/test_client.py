"""vlmserve_client: unit tests on httpx.MockTransport, then integration tests against the real server."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

import vlmserve_client
from vlmserve_client import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    Completion,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    VlmserveError,
    sniff_mime,
    user_message,
)
from vlmserve_client import _async as async_mod
from vlmserve_client import _sync as sync_mod
from vlmserve_client._base import (
    MAX_RETRY_AFTER,
    SSEDecoder,
    SSELineSplitter,
    chat_body,
    parse_retry_after,
    retry_delay,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


def _error(status: int, message: str = "nope", *, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return httpx.Response(status, json=body, headers=headers)


def _chat_ok(text: str = "hi") -> httpx.Response:
    return httpx.Response(200, json={
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    })


class Recorder:
    """A MockTransport handler answering from a list (the last answer repeats), recording the requests."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Retry waits are recorded instead of slept (sync and async)."""
    waited: list[float] = []

    async def async_sleep(seconds: float) -> None:
        waited.append(seconds)

    monkeypatch.setattr(sync_mod, "_sleep", waited.append)
    monkeypatch.setattr(async_mod, "_sleep", async_sleep)
    return waited


def _client(handler: Callable[[httpx.Request], httpx.Response], **kwargs: Any) -> Client:
    return Client("http://test", transport=httpx.MockTransport(handler), **kwargs)


def _async_client(handler: Callable[[httpx.Request], httpx.Response], **kwargs: Any) -> AsyncClient:
    return AsyncClient("http://test", transport=httpx.MockTransport(handler), **kwargs)


# ---------------------------------------------------------------- request building


@pytest.mark.parametrize(("data", "mime"), [
    (PNG, "image/png"),
    (b"\xff\xd8\xff\xe0" + b"\0" * 8, "image/jpeg"),
    (b"GIF89a" + b"\0" * 8, "image/gif"),
    (b"GIF87a" + b"\0" * 8, "image/gif"),
    (b"RIFF\x10\0\0\0WEBPVP8 ", "image/webp"),
    (b"BM" + b"\0" * 12, "image/bmp"),
    (b"RIFF\x10\0\0\0WAVEfmt ", "application/octet-stream"),
    (b"hello", "application/octet-stream"),
    (b"", "application/octet-stream"),
])
def test_sniff_mime(data: bytes, mime: str) -> None:
    assert sniff_mime(data) == mime


def test_chat_body_images_first_then_text(tmp_path: Path) -> None:
    path = tmp_path / "a.gif"
    path.write_bytes(b"GIF89a-data")
    pil = Image.new("RGB", (4, 3), "red")
    body = chat_body("what?", images=[PNG, path, pil, str(path)], model="m", max_tokens=5, temperature=0.0,
                     top_p=None, top_k=3, seed=7, stop="\n", system="be brief", stream=True)
    system, user = body["messages"]
    assert system == {"role": "system", "content": "be brief"}
    parts = user["content"]
    assert [p["type"] for p in parts] == ["image_url"] * 4 + ["text"]
    assert parts[-1]["text"] == "what?"
    urls = [p["image_url"]["url"] for p in parts[:4]]
    assert urls[0] == "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert urls[1] == urls[3] == "data:image/gif;base64," + base64.b64encode(b"GIF89a-data").decode()
    assert urls[2].startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(urls[2].split(",", 1)[1]))).size == (4, 3)
    assert body["stop"] == ["\n"] and body["model"] == "m" and body["temperature"] == 0.0 and "top_p" not in body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_chat_body_without_images_is_plain_text() -> None:
    body = chat_body("hi", images=(), model=None, max_tokens=None, temperature=None, top_p=None, top_k=None,
                     seed=None, stop=None, system=None, stream=False)
    assert body == {"messages": [{"role": "user", "content": "hi"}]}


def test_chat_body_history_comes_between_system_and_the_new_turn() -> None:
    first = user_message("what color?", PNG)
    assert first["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert first["content"][1] == {"type": "text", "text": "what color?"}
    history = [first, {"role": "assistant", "content": "red"}]
    body = chat_body("and the shape?", images=(), model=None, max_tokens=None, temperature=None, top_p=None,
                     top_k=None, seed=None, stop=None, system="be brief", stream=False, history=history)
    assert body["messages"] == [{"role": "system", "content": "be brief"}, *history,
                                {"role": "user", "content": "and the shape?"}]


def test_chat_body_response_format_and_extra_body() -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "c", "schema": {"enum": ["red"]}}}
    body = chat_body("hi", images=(), model=None, max_tokens=None, temperature=0.0, top_p=None, top_k=None,
                     seed=None, stop=None, system=None, stream=True, response_format=schema,
                     extra_body={"ignore_eos": True, "temperature": 0.5})
    assert body["response_format"] == schema and body["ignore_eos"] is True
    assert body["temperature"] == 0.5 and body["stream_options"] == {"include_usage": True}  # extra_body last


def test_chat_and_streams_send_response_format_and_extra_body() -> None:
    rec, fmt = Recorder(_chat_ok('"red"')), {"type": "json_object"}
    with _client(rec, max_connections=2) as client:
        assert client.chat("hi", response_format=fmt, extra_body={"top_k": 3}).text == '"red"'
    body = json.loads(rec.requests[0].content)
    assert body["response_format"] == fmt and body["top_k"] == 3

    async def main() -> list[str]:
        async with _async_client(stream_rec, max_connections=2) as client:
            return [d async for d in client.chat_stream("hi", response_format=fmt, extra_body={"ignore_eos": True})]

    stream_rec = Recorder(_sse(*STREAM))
    assert asyncio.run(main()) == ["Hel", "lo"]
    body = json.loads(stream_rec.requests[0].content)
    assert body["response_format"] == fmt and body["ignore_eos"] is True and body["stream"] is True


def test_bad_image_type() -> None:
    with pytest.raises(TypeError, match="path, bytes or a PIL image"):
        chat_body("hi", images=[42], model=None, max_tokens=None, temperature=None,  # type: ignore[list-item]
                  top_p=None, top_k=None, seed=None, stop=None, system=None, stream=False)


def test_chat_request_headers_and_base_url() -> None:
    rec = Recorder(_chat_ok("hello"))
    with Client("http://test/v1/", api_key="k", model="m", transport=httpx.MockTransport(rec)) as client:
        answer = client.chat("hi", images=PNG)
    assert answer == Completion(id="chatcmpl-1", model="m", text="hello", finish_reason="stop",
                                usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4})
    (request,) = rec.requests
    assert str(request.url) == "http://test/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer k"
    body = json.loads(request.content)
    assert body["model"] == "m" and body["messages"][0]["content"][0]["type"] == "image_url"


def test_generate_multipart(tmp_path: Path) -> None:
    rec = Recorder(httpx.Response(200, json={"id": "gen-1", "model": "m", "text": "ok", "finish_reason": "length",
                                             "usage": {"prompt_tokens": 5, "completion_tokens": 2,
                                                       "total_tokens": 7}}))
    path = tmp_path / "b.jpg"
    path.write_bytes(b"\xff\xd8\xffJPEG")
    with _client(rec) as client:
        answer = client.generate("describe", images=[PNG, path], max_tokens=2, seed=1, stop=["a", "b"])
    assert answer.text == "ok" and answer.finish_reason == "length" and answer.usage and answer.usage.total_tokens == 7
    (request,) = rec.requests
    assert request.url.path == "/v1/generate"
    assert request.headers["content-type"].startswith("multipart/form-data")
    content = request.content
    assert content.count(b'name="image"') == 2
    assert content.index(b'filename="image0.png"') < content.index(b'filename="image1.jpeg"')
    assert b"Content-Type: image/jpeg" in content and b"\xff\xd8\xffJPEG" in content
    assert content.count(b'name="stop"') == 2 and b'name="max_tokens"\r\n\r\n2\r\n' in content


# ---------------------------------------------------------------- retries and errors


def test_retry_after_honoured_on_429_then_success(sleeps: list[float]) -> None:
    rec = Recorder(_error(429, headers={"Retry-After": "2"}), _error(503, headers={"Retry-After": "1"}), _chat_ok())
    with _client(rec, backoff=0.5) as client:
        assert client.chat("hi").text == "hi"
    assert len(rec.requests) == 3 and sleeps == [2.0, 1.0]


def test_retry_after_is_capped_and_backoff_grows(sleeps: list[float]) -> None:
    rec = Recorder(_error(503, headers={"Retry-After": "3600"}), _error(429), _error(429), _chat_ok())
    with _client(rec, backoff=1.0) as client:
        client.chat("hi")
    assert sleeps[0] == MAX_RETRY_AFTER
    assert 1.0 <= sleeps[1] <= 2.0 and 2.0 <= sleeps[2] <= 4.0  # 1 s then 2 s base, half of it jittered
    assert retry_delay(20, 1.0, None) <= 8.0


def test_retries_exhausted_raise_typed_error(sleeps: list[float]) -> None:
    rec = Recorder(_error(429, "queue full", type_="rate_limit_error", headers={"Retry-After": "1"}))
    with _client(rec, max_retries=2) as client, pytest.raises(RateLimitError) as info:
        client.chat("hi")
    assert len(rec.requests) == 3 and len(sleeps) == 2
    assert info.value.status == 429 and info.value.retry_after == 1.0 and info.value.message == "queue full"


def test_no_retry_on_400(sleeps: list[float]) -> None:
    rec = Recorder(_error(400, "too long", param="max_tokens", code="context_length_exceeded"))
    with _client(rec) as client, pytest.raises(BadRequestError) as info:
        client.chat("hi")
    assert len(rec.requests) == 1 and sleeps == []
    e = info.value
    assert (e.status, e.type, e.param, e.code, e.message) == (400, "invalid_request_error", "max_tokens",
                                                              "context_length_exceeded", "too long")
    assert "HTTP 400" in str(e) and "context_length_exceeded" in str(e)


@pytest.mark.parametrize(("status", "cls"), [
    (400, BadRequestError), (401, AuthenticationError), (404, NotFoundError), (413, PayloadTooLargeError),
    (429, RateLimitError), (503, ServiceUnavailableError), (500, ServerError), (502, ServerError),
    (418, VlmserveError),
])
def test_error_mapping(status: int, cls: type[VlmserveError], sleeps: list[float]) -> None:
    with _client(Recorder(_error(status, "bad", code="c")), max_retries=0) as client, pytest.raises(cls) as info:
        client.models()
    assert type(info.value) is cls and info.value.status == status and info.value.code == "c"
    assert isinstance(info.value, VlmserveError)


def test_error_without_our_body(sleeps: list[float]) -> None:
    with _client(Recorder(httpx.Response(502, text="<html>bad gateway</html>")), max_retries=0) as client, \
            pytest.raises(ServerError, match="bad gateway"):
        client.models()


def test_connection_errors_retried_then_raised(sleeps: list[float]) -> None:
    rec = Recorder(httpx.ConnectError("refused"))
    with _client(rec, max_retries=2, backoff=0.1) as client, pytest.raises(APIConnectionError) as info:
        client.chat("hi")
    assert len(rec.requests) == 3 and len(sleeps) == 2 and info.value.status is None
    rec = Recorder(httpx.ConnectError("refused"), _chat_ok("back"))
    with _client(rec) as client:
        assert client.chat("hi").text == "back"


def test_unreachable_server() -> None:
    with Client("http://127.0.0.1:1", max_retries=0, timeout=5) as client, pytest.raises(APIConnectionError):
        client.models()


def test_read_timeout_not_retried(sleeps: list[float]) -> None:
    rec = Recorder(httpx.ReadTimeout("slow"))
    with _client(rec) as client, pytest.raises(APITimeoutError):
        client.chat("hi")
    assert len(rec.requests) == 1
    assert issubclass(APITimeoutError, APIConnectionError)


def test_ready_and_parse_retry_after() -> None:
    with _client(Recorder(httpx.Response(503, json={"status": "loading"}))) as client:
        assert client.ready() is False
    with _client(Recorder(httpx.ConnectError("refused"))) as client:
        assert client.ready() is False
    with _client(Recorder(httpx.Response(200, json={"status": "ready"}))) as client:
        assert client.ready() is True
    assert parse_retry_after("5") == 5.0 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past


def test_async_retries_and_errors(sleeps: list[float]) -> None:
    async def main() -> None:
        rec = Recorder(_error(503, headers={"Retry-After": "3"}), _chat_ok("async"))
        async with _async_client(rec) as client:
            assert (await client.chat("hi")).text == "async"
        assert sleeps == [3.0]
        async with _async_client(Recorder(_error(404, code="model_not_found"))) as client:
            with pytest.raises(NotFoundError):
                await client.chat("hi", model="nope")

    asyncio.run(main())


# ---------------------------------------------------------------- server-sent events


def _sse(*events: dict[str, Any] | str) -> httpx.Response:
    text = "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)
    return httpx.Response(200, content=text.encode(), headers={"content-type": "text/event-stream"})


def _chunk(delta: dict[str, Any] | None = None, finish: str | None = None, usage: dict[str, int] | None = None
           ) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "chatcmpl-9", "object": "chat.completion.chunk", "model": "m", "choices": choices, "usage": usage}


STREAM = (
    _chunk({"role": "assistant", "content": ""}), _chunk({"content": "Hel"}), _chunk({"content": "lo"}),
    _chunk({}, "stop"), _chunk(usage={"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}), "[DONE]",
)


def test_sse_decoder() -> None:
    lines = [": keep-alive", "data: a", "data: b", "", "event: x", "data:c", "", "", "data: tail"]
    assert list(SSEDecoder().events(lines)) == ["a\nb", "c", "tail"]


def test_sse_lines_break_at_cr_lf_crlf_only() -> None:
    splitter = SSELineSplitter()
    got = [*splitter.feed("a\u2028b\x85c\u2029d\x0be\x1cf\r"), *splitter.feed("\ng\rh\n\ni"), *splitter.close()]
    assert got == ["a\u2028b\x85c\u2029d\x0be\x1cf", "g", "h", "", "i"]
    splitter = SSELineSplitter()
    assert [*splitter.feed("x\r"), *splitter.feed("\r"), *splitter.feed("y\n")] == ["x", "", "y"]


# Text a model may generate that `str.splitlines` (httpx's iter_lines) takes for line breaks; the events carry it raw.
ODD_TEXT = ("line\u2028sep", "next\x85line", "para\u2029sep", "é🙂")


def _raw_sse_chunks(size: int) -> list[bytes]:
    events = [_chunk({"content": t}) for t in ODD_TEXT] + [_chunk({}, "stop")]
    text = "".join(f"data: {json.dumps(e, ensure_ascii=False)}\r\n\r\n" for e in events) + "data: [DONE]\r\n\r\n"
    raw = text.encode()
    return [raw[i:i + size] for i in range(0, len(raw), size)]  # splits CRLFs and UTF-8 sequences alike


@pytest.mark.parametrize("size", [1, 3, 7, 4096])
def test_stream_keeps_unicode_line_separators_inside_events(size: int) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=iter(_raw_sse_chunks(size)), headers={"content-type": "text/event-stream"})

    with Client("http://test", transport=httpx.MockTransport(handler), max_retries=0) as client:
        stream = client.chat_stream("hi")
        assert list(stream) == list(ODD_TEXT)
    assert stream.completion.text == "".join(ODD_TEXT) and stream.completion.finish_reason == "stop"


def test_async_stream_keeps_unicode_line_separators_inside_events() -> None:
    class Chunks(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for chunk in _raw_sse_chunks(5):
                yield chunk

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Chunks(), headers={"content-type": "text/event-stream"})

    async def main() -> list[str]:
        async with AsyncClient("http://test", transport=httpx.MockTransport(handler), max_retries=0) as client:
            return [d async for d in client.chat_stream("hi")]

    assert asyncio.run(main()) == list(ODD_TEXT)


def test_stream_deltas_and_completion() -> None:
    rec = Recorder(_sse(*STREAM))
    with _client(rec) as client:
        stream = client.chat_stream("hi", images=PNG, seed=1)
        with pytest.raises(RuntimeError):
            _ = stream.completion
        assert list(stream) == ["Hel", "lo"]
    c = stream.completion
    assert (c.id, c.model, c.text, c.finish_reason) == ("chatcmpl-9", "m", "Hello", "stop")
    assert c.usage is not None and c.usage.total_tokens == 6
    body = json.loads(rec.requests[0].content)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    with pytest.raises(RuntimeError):
        list(stream)  # once only


def test_stream_error_event_raises_after_deltas() -> None:
    error = {"error": {"message": "engine gone", "type": "service_unavailable", "param": None, "code": "x"}}
    with _client(Recorder(_sse(_chunk({"content": "a"}), error, "[DONE]"))) as client:
        got: list[str] = []
        with pytest.raises(ServiceUnavailableError) as info:
            got.extend(client.chat_stream("hi"))
    assert got == ["a"] and info.value.status == 503 and info.value.code == "x"
    with _client(Recorder(_sse({"error": {"message": "oops", "type": "server_error"}}))) as client, \
            pytest.raises(ServerError, match="oops"):
        list(client.chat_stream("hi"))


def test_stream_http_error_and_truncation(sleeps: list[float]) -> None:
    with _client(Recorder(_error(400, code="invalid_value"))) as client, pytest.raises(BadRequestError):
        list(client.chat_stream("hi"))
    with _client(Recorder(_sse(_chunk({"content": "a"})))) as client, pytest.raises(APIConnectionError):
        list(client.chat_stream("hi"))  # no finish_reason, no [DONE]


def test_async_stream() -> None:
    async def main() -> Completion:
        error = {"error": {"message": "full", "type": "rate_limit_error"}}
        async with _async_client(Recorder(_sse(_chunk({"content": "a"}), error))) as client:
            with pytest.raises(RateLimitError):
                async for _ in client.chat_stream("hi"):
                    pass
        async with _async_client(Recorder(_sse(*STREAM))) as client:
            async with client.chat_stream("hi") as stream:
                assert [d async for d in stream] == ["Hel", "lo"]
            return stream.completion

    completion = asyncio.run(main())
    assert completion.text == "Hello" and completion.usage and completion.usage.prompt_tokens == 4


def test_package_is_light() -> None:
    import subprocess
    import sys

    code = "import sys, vlmserve_client; print(any(m.split('.')[0] in ('torch', 'PIL') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
    assert vlmserve_client.__version__


def test_cli_imports_neither_training_nor_the_client_up_front() -> None:
    """`vlmserve.server.cli` loads `training` (torch) and the client only inside the commands that use them."""
    import subprocess
    import sys

    code = ("import sys, vlmserve.server.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'vlmserve_client', 'httpx') "
            "or m.startswith('vlmserve.training')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


# ---------------------------------------------------------------- against the real server


@pytest.fixture(scope="module")
def image_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (220, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


GREEDY = {"max_tokens": 8, "temperature": 0.0, "seed": 0}


def test_live_sync_chat_stream_generate_models(live_server: Any, image_png: bytes) -> None:
    with Client(live_server.url, timeout=30) as client:
        assert client.ready() is True
        assert client.models() == ["tiny-llava"]
        answer = client.chat("What color is it?", images=[image_png, Image.open(io.BytesIO(image_png))], **GREEDY)
        assert answer.model == "tiny-llava" and answer.id.startswith("chatcmpl-")
        assert answer.finish_reason in ("stop", "length") and answer.usage is not None
        u = answer.usage
        assert u.completion_tokens >= 1 and u.total_tokens == u.prompt_tokens + u.completion_tokens

        stream = client.chat_stream("What color is it?", images=[image_png, image_png], **GREEDY)
        deltas = list(stream)
        assert "".join(deltas) == answer.text == stream.completion.text
        assert stream.completion.usage == answer.usage and stream.completion.finish_reason == answer.finish_reason

        generated = client.generate("What color is it?", images=[image_png, image_png], **GREEDY)
        assert generated.id.startswith("gen-") and generated.model == "tiny-llava"
        assert generated.text == answer.text and generated.usage == answer.usage


def test_live_async_chat_and_stream(live_server: Any, image_png: bytes) -> None:
    async def main() -> tuple[Completion, list[str], Completion]:
        async with AsyncClient(live_server.url, timeout=30) as client:
            assert await client.ready()
            answer, _ = await asyncio.gather(client.chat("Describe.", images=image_png, **GREEDY),
                                             client.chat("Another one.", **GREEDY))
            stream = client.chat_stream("Describe.", images=image_png, **GREEDY)
            deltas = [d async for d in stream]
            return answer, deltas, stream.completion

    answer, deltas, streamed = asyncio.run(main())
    assert answer.model == "tiny-llava" and answer.text
    assert "".join(deltas) == answer.text == streamed.text and streamed.usage == answer.usage


def test_live_errors(live_server: Any, image_png: bytes) -> None:
    with Client(live_server.url, timeout=30) as client:
        with pytest.raises(NotFoundError) as info:
            client.chat("hi", model="no-such-model")
        assert info.value.status == 404 and info.value.code == "model_not_found" and info.value.param == "model"
        with pytest.raises(NotFoundError):
            list(client.chat_stream("hi", model="no-such-model"))
        with pytest.raises(BadRequestError) as info:
            client.chat("hi", images=image_png, max_tokens=10**7)
        assert info.value.code == "context_length_exceeded" and info.value.param == "max_tokens"
        assert "10000000" in info.value.message
        with pytest.raises(BadRequestError):
            client.generate("hi", images=b"not an image")


def test_readme_examples_run(live_server: Any, image_png: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    """Every Python example of client/README.md runs against the real server (the openai SDK one too)."""
    readme = Path(__file__).parents[1] / "client" / "README.md"
    blocks = readme.read_text().split("```python\n")[1:]
    assert len(blocks) >= 6
    (tmp_path / "circle.png").write_bytes(image_png)
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        code = block.split("```", 1)[0].replace("http://127.0.0.1:8000", live_server.url)
        exec(compile(code, str(readme), "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert "context_length_exceeded" in out and "['tiny-llava']" in out
