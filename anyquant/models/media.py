"""Images in chat messages: `image_url` content parts -> PIL images, within limits (the server's,
and `LLM.chat`'s).

Accepted: `data:image/...;base64,...` URLs; `file://` paths inside the directory the operator
allowed (`--allowed-local-media-path`; `LLM.chat` allows any, the caller owns the process). Remote http(s) URLs are refused: the server assumes no
network and never fetches on a client's behalf. Every refusal is an `ImageInputError` (the app
answers 400): too many images, an encoded image over the byte limit, a decoded one over the
pixel limit (checked from the header, before decoding: no decompression bombs), a corrupt one.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from anyquant.models.multimodal import ImageInputError


@dataclass(frozen=True)
class MediaLimits:
    max_images: int = 8  # per request
    max_image_bytes: int = 16 * 2**20  # encoded
    max_image_pixels: int = 8192 * 8192  # decoded, width * height
    allowed_local_path: Path | None = None  # file:// URLs only below this directory


def image_url_of(part: dict[str, Any], where: str) -> str:
    """The URL of an `image_url` part (object or bare-string form)."""
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise ImageInputError(
            f'{where}: expected {{"type": "image_url", "image_url": {{"url": "data:..."}}}}'
        )
    return url


def load_image(url: str, limits: MediaLimits, where: str) -> Any:
    """Decode one image URL into an RGB-convertible PIL image (fully loaded)."""
    data = _read(url, limits, where)
    if len(data) > limits.max_image_bytes:
        raise ImageInputError(
            f"{where}: image of {len(data)} bytes exceeds the limit of {limits.max_image_bytes}"
        )
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageInputError(f"{where}: not a readable image ({exc})") from exc
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise ImageInputError(
            f"{where}: image of {width}x{height} pixels exceeds the limit of {limits.max_image_pixels} pixels"
        )
    try:
        image.load()
    except Exception as exc:  # truncated or corrupt data surfaces only when decoding
        raise ImageInputError(f"{where}: the image data is corrupt ({type(exc).__name__}: {exc})") from exc
    return image


def _read(url: str, limits: MediaLimits, where: str) -> bytes:
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ImageInputError(f"{where}: a data URL must look like data:image/png;base64,<data>")
        if len(payload) > 4 * (limits.max_image_bytes // 3 + 1):
            raise ImageInputError(f"{where}: image exceeds the limit of {limits.max_image_bytes} bytes")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageInputError(f"{where}: invalid base64 in the data URL ({exc})") from exc
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        raise ImageInputError(
            f"{where}: remote image URLs are not fetched (this server makes no network requests); "
            "send the image inline as a data:image/...;base64 URL"
        )
    if parsed.scheme == "file":
        return _read_local(Path(unquote(parsed.path)), limits, where)
    raise ImageInputError(f"{where}: unsupported image URL scheme {parsed.scheme!r:.20}; use a data: URL")


def _read_local(path: Path, limits: MediaLimits, where: str) -> bytes:
    root = limits.allowed_local_path
    if root is None:
        raise ImageInputError(
            f"{where}: file:// URLs are refused unless the server allows a local media path"
        )
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ImageInputError(f"{where}: {path} is outside the allowed local media path")
    try:
        size = resolved.stat().st_size
        if size > limits.max_image_bytes:
            raise ImageInputError(
                f"{where}: image of {size} bytes exceeds the limit of {limits.max_image_bytes}"
            )
        return resolved.read_bytes()
    except OSError as exc:
        raise ImageInputError(f"{where}: cannot read {path}: {exc.strerror}") from exc
