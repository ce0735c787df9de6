"""Chat with images over the OpenAI API: the real `openai` client streams an answer about a base64
PNG that equals `LLM.generate` on the same rendered prompt; remote URLs, corrupt or oversized
images, too many images and images for a text model are 400s with a message."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from anyquant import LLM, SamplingParams
from anyquant.models.media import MediaLimits
from anyquant.server import ServerConfig, create_app
from anyquant.utils.tiny_vlm import write_tiny_vlm
from tests.helpers.images import png_data_url
from tests.server.conftest import LiveServer, call

openai = pytest.importorskip("openai")
Image = pytest.importorskip("PIL.Image")


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    path = write_tiny_vlm(tmp_path_factory.mktemp("vlm-server"), v25=True, seed=21)
    return LLM(path, dtype="float32", max_model_len=256)


@pytest.fixture
def app(llm: LLM, tmp_path: Path) -> Iterator[Any]:
    media = MediaLimits(max_images=2, max_image_bytes=64 * 1024, allowed_local_path=tmp_path)
    assert llm.tokenizer is not None
    app = create_app(llm.engine, llm.tokenizer, ServerConfig("vlm", media=media), llm.image_processor())
    yield app
    app.state.server.engine.close()


def test_openai_client_streams_a_chat_about_an_image(app: Any, llm: LLM) -> None:
    url = png_data_url(120, 80, 1)
    messages = [{"role": "user", "content": [image_part(url), {"type": "text", "text": "What is this?"}]}]
    with LiveServer(app) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        stream = client.chat.completions.create(
            model="vlm", messages=messages, max_tokens=6, temperature=0.0, stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert llm.tokenizer is not None
    template_messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}
    ]
    prompt = llm.tokenizer.apply_chat_template(template_messages)
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    expected = llm.generate(
        {"prompt_token_ids": llm.tokenizer.encode(prompt, False), "multi_modal_data": {"image": image}},
        SamplingParams(max_tokens=6, temperature=0.0),
    )[0]
    assert text == expected.text
    assert expected.token_ids  # the comparison saw generated tokens
    # vLLM's offline LLM.chat: the same request (image as the URL, or as vLLM's PIL part) gives the
    # same tokens.
    params = SamplingParams(max_tokens=6, temperature=0.0)
    as_pil = [
        {"role": "user", "content": [{"type": "image_pil", "image_pil": image}, messages[0]["content"][1]]}
    ]
    for chat_messages in (messages, as_pil):
        assert llm.chat(chat_messages, params)[0].token_ids == expected.token_ids


def test_local_file_inside_the_allowed_directory(app: Any, tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(base64.b64decode(png_data_url(64, 64, 2).split(",", 1)[1]))
    body = {"messages": [{"role": "user", "content": [image_part(path.as_uri())]}], "max_tokens": 2}
    response = call(app, "POST", "/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([image_part("https://example.com/cat.png")], "remote image URLs are not fetched"),
        ([image_part("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA")], "not a readable image"),
        ([image_part("data:image/png;base64,@@@")], "invalid base64"),
        ([image_part(png_data_url(300, 300, 3))], "exceeds the limit"),
        ([image_part("file:///etc/passwd")], "outside the allowed local media path"),
        ([image_part(png_data_url(30, 30, 4))] * 3, "3 images in one request; the limit is 2"),
        ([{"type": "input_audio", "input_audio": {}}], "input_audio"),
    ],
)
def test_bad_images_are_400s(app: Any, content: list[dict[str, Any]], message: str) -> None:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2}
    response = call(app, "POST", "/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_truncated_png_is_a_400_not_a_500(app: Any) -> None:
    url = png_data_url(64, 64, 5)
    raw = base64.b64decode(url.split(",", 1)[1])
    truncated = "data:image/png;base64," + base64.b64encode(raw[: len(raw) // 2]).decode()
    body = {"messages": [{"role": "user", "content": [image_part(truncated)]}], "max_tokens": 2}
    response = call(app, "POST", "/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert "corrupt" in response.json()["error"]["message"]


def test_text_model_answers_images_with_400(llm: LLM) -> None:
    assert llm.tokenizer is not None
    app = create_app(llm.engine, llm.tokenizer, ServerConfig("text-only"))  # no image processor
    try:
        content = [image_part(png_data_url(30, 30, 6))]
        response = call(
            app, "POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]}
        )
        assert response.status_code == 400
        assert "takes no images" in response.json()["error"]["message"]
    finally:
        app.state.server.engine.close()
