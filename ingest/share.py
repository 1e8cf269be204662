"""Sharing a poll: its short link, the addresses of its pages, its QR code.

The short link is ``/p/`` and the poll id's 16 bytes in unpadded base64url
(22 characters): nothing to store or look up, and a QR code of a short URL
stays coarse enough to be read from the back of a room. The links point at
VOTEFLOW_PUBLIC_URL when it is set (the address voters open may differ from
the one the presenter's screen loaded), else at the edge's own origin as the
request names it.
"""

from __future__ import annotations

import base64
import binascii
import io
import uuid
from typing import Any

import segno

# The QR code's error correction: Q restores up to a quarter of the symbol,
# for a projector's glare or a head in the way.
QR_ERROR = "q"
# Modules of white around the code; 4 is what ISO/IEC 18004 asks for.
QR_BORDER = 4


def short_code(poll_id: str) -> str:
    return base64.urlsafe_b64encode(uuid.UUID(poll_id).bytes).rstrip(b"=").decode()


def poll_of_code(code: str) -> str | None:
    """The poll id a short code names, None for anything else."""
    if len(code) != 22 or not code.isascii():
        return None
    try:
        raw = base64.urlsafe_b64decode(code + "==")
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 16 or short_code(str(uuid.UUID(bytes=raw))) != code:
        return None  # another spelling of the same bytes: one link per poll
    return str(uuid.UUID(bytes=raw))


def links(base: str, poll_id: str) -> dict[str, Any]:
    """The body of GET /api/polls/{id}/share; `base` is an origin."""
    return {
        "poll_id": poll_id,
        "short_url": f"{base}/p/{short_code(poll_id)}",
        "vote_url": f"{base}/polls/{poll_id}",
        "present_url": f"{base}/polls/{poll_id}/present",
        "qr_svg": f"/api/polls/{poll_id}/qr.svg",
    }


def qr_svg(url: str) -> bytes:
    """`url` as a QR code: an SVG of dark modules on white that scales to any
    size (no width or height of its own, a viewBox)."""
    out = io.BytesIO()
    segno.make_qr(url, error=QR_ERROR).save(
        out, kind="svg", border=QR_BORDER, dark="#000", light="#fff", omitsize=True,
        xmldecl=False, svgns=True, title=f"QR code: {url}",
    )  # fmt: skip
    return out.getvalue()
