from tests.conftest import CHAT, OPENAI_BASE


async def test_chat_passes_through_with_model_replaced(client):
    http, upstream = client
    route = upstream.post(f"{OPENAI_BASE}/chat/completions").respond(
        200, json={"id": "x", "object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 1}})
    r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    assert route.calls.last.request.headers["authorization"] == "Bearer sk-upstream-secret-123"
    import json
    assert json.loads(route.calls.last.request.content)["model"] == "gpt-4o-mini"
