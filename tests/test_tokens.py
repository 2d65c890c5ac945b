"""aiproxy.tokens: the ceil(bytes/4) approximation, what a request and an answer count, and
tiktoken used only from a verified local file, never downloaded."""

from __future__ import annotations

import base64
import hashlib
import logging
import socket
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
import tiktoken.model
import tiktoken.registry
from tiktoken_ext.openai_public import r50k_pat_str

from aiproxy import tokens


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """An empty tiktoken cache folder, fresh lru caches, and any download attempt recorded."""
    attempts: list[str] = []

    def no_download(blobpath: str) -> bytes:
        attempts.append(blobpath)
        raise AssertionError(f"tiktoken tried to download {blobpath}")

    def no_connect(self: socket.socket, address: object) -> None:
        attempts.append(repr(address))
        raise AssertionError(f"a connection to {address!r} was attempted")

    monkeypatch.setattr(tiktoken.load, "read_file", no_download)
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    tokens._encoder.cache_clear()
    tokens._say_once.cache_clear()
    yield attempts
    tokens._encoder.cache_clear()
    tokens._say_once.cache_clear()
    assert attempts == [], "a network attempt was made"


# ---------------------------------------------------------------- the approximation

@pytest.mark.parametrize(("text", "expected"), [
    ("", 0), ("a", 1), ("abcd", 1), ("abcde", 2), ("a" * 400, 100), ("a" * 401, 101),
    ("é", 1),            # 2 bytes
    ("éé", 1),           # 4 bytes
    ("ééé", 2),          # 6 bytes: counted in bytes, not characters (3 chars would be 1)
    ("日本語", 3),        # 9 bytes
    ("😀", 1), ("😀a", 2),  # 4 and 5 bytes
])
def test_approximation_is_ceil_of_utf8_bytes_over_four(text, expected):
    assert tokens.approximate(text) == expected
    assert tokens.count(text) == expected
    assert tokens.count(text, "a-model-tiktoken-does-not-know") == expected


# ---------------------------------------------------------------- prompts

def test_chat_prompt_counts_each_message_with_its_framing_and_the_reply_priming():
    body = {"messages": [{"role": "system", "content": "You are terse."},  # 14 bytes: 4
                         {"role": "user", "content": "Say hi"}]}             # 6 bytes: 2
    assert tokens.PER_MESSAGE == 3 and tokens.REPLY_PRIMING == 3
    assert tokens.prompt(body) == 3 + (3 + 4) + (3 + 2)
    assert tokens.prompt({"messages": []}) == 3


def test_chat_prompt_reads_the_text_parts_of_a_content_list():
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "abcd"},
        {"type": "image_url", "image_url": {"url": "https://example.test/" + "x" * 400}},
        {"type": "text", "text": "efgh"},
        {"type": "text", "text": None}, "not a part"]}]}
    assert tokens.prompt(body) == 3 + 3 + 2  # "abcdefgh"; the image URL is not text


def test_chat_prompt_counts_tool_calls_and_tools():
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}  # 11 and 16 bytes
    body = {"messages": [{"role": "user", "content": "abcd"},
                         {"role": "assistant", "content": None, "tool_calls": [call, call]},
                         {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]}  # 5 bytes: 2
    without_tools = 3 + (3 + 1) + (3 + 2 * (3 + 4)) + (3 + 2)
    assert tokens.prompt(body) == without_tools
    tools = [{"type": "function", "function": {"name": "f"}}]
    compact = '[{"type":"function","function":{"name":"f"}}]'  # 45 bytes: 12
    assert len(compact) == 45
    assert tokens.prompt({**body, "tools": tools}) == without_tools + 12
    assert tokens.prompt({**body, "tools": []}) == without_tools


def test_chat_prompt_skips_what_is_not_a_message():
    body = {"messages": ["hello", None, {"role": "user", "content": 42},
                         {"role": "assistant", "tool_calls": ["x", {"function": "y"}]}]}
    assert tokens.prompt(body) == 3 + 3 + 3  # two messages of no text


@pytest.mark.parametrize(("value", "expected"), [
    ("abcdefgh", 2),
    (["abcd", "abcdefgh", "é"], 1 + 2 + 1),
    ([101, 102, 103], 3),              # already tokens
    ([[1, 2], [3, 4, 5]], 5),          # a batch of token arrays
    (["abcd", [1, 2, 3], None], 1 + 3),
    ([], 0), (None, 0), (7, 0),
])
def test_completion_and_embedding_inputs(value, expected):
    assert tokens.prompt({"prompt": value}) == expected
    assert tokens.prompt({"input": value}) == expected


def test_an_empty_prompt_falls_back_to_input_only_when_prompt_is_absent():
    assert tokens.prompt({"input": "abcdefgh"}) == 2
    assert tokens.prompt({"prompt": "", "input": "abcdefgh"}) == 0
    assert tokens.prompt({}) == 0


# ---------------------------------------------------------------- answers

def test_completion_counts_text_and_tool_calls_of_every_choice():
    answer = {"choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hello there!"}},  # 12 bytes: 3
        {"index": 1, "message": {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "lookup", "arguments": '{"q":"x"}'}}]}},
        {"index": 2, "message": {"role": "assistant", "content": [{"type": "text", "text": "abcdefgh"}]}},
        "junk"]}
    assert tokens.completion(answer) == 3 + (2 + 3) + 2  # lookup: 6 bytes, {"q":"x"}: 9 bytes
    text = {"object": "text_completion", "choices": [{"index": 0, "text": "abcdefghi"},
                                                     {"index": 1, "text": "ab"}]}
    assert tokens.completion(text) == 3 + 1
    assert tokens.completion(None) == 0 and tokens.completion({}) == 0
    assert tokens.completion({"choices": None}) == 0


def test_completion_counts_reasoning_as_output():
    """A reasoning model's stream cut short is estimated with what it had thought so far."""
    for key in ("reasoning_content", "reasoning"):
        answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "abcd",  # 1
                                                       key: "abcdefghijklmnop"}}]}  # 16 bytes: 4
        assert tokens.completion(answer) == 1 + 4


def test_completion_counts_reasoning_sent_under_both_names_once():
    """vLLM from 0.11.1 until it dropped the old name sends the same reasoning as both
    ``reasoning`` and ``reasoning_content``: it was thought, and is billed, once."""
    message = {"role": "assistant", "content": "abcd", "reasoning": "abcdefghijklmnop",
               "reasoning_content": "abcdefghijklmnop"}
    assert tokens.completion({"choices": [{"index": 0, "message": message}]}) == 1 + 4


def test_max_completion_reads_what_the_request_allows():
    assert tokens.max_completion({"max_completion_tokens": 50, "max_tokens": 10}) == 50
    assert tokens.max_completion({"max_tokens": 10}) == 10
    assert tokens.max_completion({}, default=4096) == 4096
    for bad in (0, -5, True, 12.0, "100", None):
        assert tokens.max_completion({"max_tokens": bad}, default=7) == 7
    assert tokens.max_completion({"max_completion_tokens": None, "max_tokens": 9}) == 9


def test_max_completion_counts_every_choice_a_request_asks_for():
    assert tokens.max_completion({"max_tokens": 10, "n": 3}) == 30
    assert tokens.max_completion({"n": 2}, default=256) == 512
    assert tokens.max_completion({"max_tokens": 10, "best_of": 4, "n": 2}) == 40  # completions
    assert tokens.max_completion({"max_tokens": 10, "n": "3"}) == 10  # not a count: one choice
    assert tokens.max_completion({"max_tokens": 10, "n": True}) == 10


# ---------------------------------------------------------------- tiktoken, offline only

def test_without_the_encoding_file_it_approximates_says_so_once_and_never_downloads(caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="aiproxy.tokens")
    assert tokens.cache_path("o200k_base") is not None
    assert not Path(tokens.cache_path("o200k_base") or "").exists()
    text = "The quick brown fox jumps over the lazy dog."  # 44 bytes
    assert tokens.count(text, "gpt-4o-mini") == 11
    assert tokens.count(text, "gpt-4o") == 11  # the same encoding: not said again
    said = [r for r in caplog.records if "not in" in r.getMessage()]
    assert len(said) == 1 and "o200k_base" in said[0].getMessage() and str(tmp_path) in said[0].getMessage()


def test_a_damaged_encoding_file_is_approximated_with_a_warning_and_kept(caplog):
    path = Path(tokens.cache_path("cl100k_base") or "")
    path.write_bytes(b"IQ== 0\nIg== 1\n")  # well formed, but not the published file
    caplog.set_level(logging.INFO, logger="aiproxy.tokens")
    assert tokens.count("abcdefgh", "gpt-4") == 2
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "cl100k_base" in warning.getMessage() and "damaged" in warning.getMessage()
    # tiktoken itself would have deleted the file and downloaded it again (the fixture
    # fails the test on that attempt); the file is the operator's to replace
    assert path.read_bytes() == b"IQ== 0\nIg== 1\n"


def test_caching_turned_off_means_approximation_not_a_download(monkeypatch, tmp_path):
    # TIKTOKEN_CACHE_DIR="" makes tiktoken download every time; a file in the data-gym
    # folder must not tempt the gateway into handing tiktoken the encoding then
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path))
    assert tokens.cache_path("o200k_base") is None
    blob = tokens._BLOB.format("o200k_base")
    (tmp_path / hashlib.sha1(blob.encode()).hexdigest()).write_bytes(b"IQ== 0\n")
    assert tokens.count("abcdefgh", "gpt-4o") == 2


def test_an_encoding_without_a_pinned_file_is_approximated():
    assert tiktoken.model.encoding_name_for_model("gpt2") == "gpt2"  # data-gym files, not one .tiktoken
    assert tokens.cache_path("gpt2") is None
    assert tokens.count("abcdefgh", "gpt2") == 2


# A tiny but real BPE file: the 256 bytes, then merges that make "hello" one token.
_RANKS = [bytes([b]) for b in range(256)] + [b"he", b"ll", b"hell", b"hello"]


@pytest.fixture
def tiny_encoding(monkeypatch, tmp_path):
    """A model "aiproxy-tiny" whose encoding's file is in the cache folder, verified by its
    sha256 the way tiktoken verifies the published ones."""
    content = b"".join(base64.b64encode(t) + b" " + str(r).encode() + b"\n" for r, t in enumerate(_RANKS))
    sha256 = hashlib.sha256(content).hexdigest()
    url = tokens._BLOB.format("aiproxy_tiny")
    (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(content)

    def construct() -> dict:
        return {"name": "aiproxy_tiny", "pat_str": r50k_pat_str, "special_tokens": {},
                "mergeable_ranks": tiktoken.load.load_tiktoken_bpe(url, expected_hash=sha256)}

    tiktoken.registry.list_encoding_names()  # the registry is filled lazily
    assert tiktoken.registry.ENCODING_CONSTRUCTORS is not None
    monkeypatch.setitem(tiktoken.registry.ENCODING_CONSTRUCTORS, "aiproxy_tiny", construct)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setitem(tiktoken.model.MODEL_TO_ENCODING, "aiproxy-tiny", "aiproxy_tiny")
    monkeypatch.setitem(tokens.ENCODING_FILES, "aiproxy_tiny", ("aiproxy_tiny", sha256))
    return tmp_path / hashlib.sha1(url.encode()).hexdigest()


def test_a_verified_local_encoding_file_gives_tiktoken_counts(tiny_encoding):
    text = "hello" * 8  # 40 bytes: 10 by approximation
    assert tokens.count(text, "aiproxy-tiny") == 8
    assert tokens.count(text, "another-model") == 10
    body = {"messages": [{"role": "user", "content": "hellohello"}]}
    assert tokens.prompt(body, "aiproxy-tiny") == 3 + 3 + 2
    assert tokens.completion({"choices": [{"message": {"content": "hello"}}]}, "aiproxy-tiny") == 1
    tiny_encoding.unlink()
    assert tokens.count(text, "aiproxy-tiny") == 8  # loaded once per process


def test_the_same_file_with_one_byte_changed_is_refused(tiny_encoding, caplog):
    data = bytearray(tiny_encoding.read_bytes())
    data[-3] ^= 1  # a rank digit: still parses, no longer the pinned file
    tiny_encoding.write_bytes(bytes(data))
    assert tokens.count("hello" * 8, "aiproxy-tiny") == 10
    assert any("damaged" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert tiny_encoding.exists()


def test_a_calls_prompt_is_counted_once_however_many_stages_ask(monkeypatch):
    from starlette.datastructures import Headers

    from aiproxy.call import Call

    counted = []
    real = tokens.prompt
    monkeypatch.setattr(tokens, "prompt", lambda body, model="": counted.append(model) or real(body, model))
    body = {"messages": [{"role": "user", "content": "hello there"}]}
    call = Call(request_id="r", operation="chat", body=body, model="m", stream=False, headers=Headers())
    call.upstream_model = "up"
    first = tokens.prompt_of(call)
    assert tokens.prompt_of(call) == first == real(body, "up")
    assert counted == ["up"]
    call.body = {"messages": [{"role": "user", "content": "a much longer question than before"}]}
    assert tokens.prompt_of(call) > first  # a stage replaced the body: counted again
    assert counted == ["up", "up"]
