"""Hostile documents, written as raw PDF bytes (or PNG chunks) so that each attack is exactly
the one it names: small files whose decoding or rendering costs without bound.

* :func:`inflating_pdf` — a content stream that inflates ~1000:1 to drawing operators;
* :func:`nested_forms_pdf` — a form XObject that draws the next one ``width`` times,
  ``depth`` levels deep (10 × 8: a line drawn 10^8 times from 2 KB);
* :func:`declared_image_pdf` — an image dictionary that declares 130 000 × 130 000 pixels
  (JBIG2) over a few bytes of data;
* :func:`huge_page_pdf` — one page of 6000 × 6000 points: under the pixel cap at scale 1, but
  108 MB of pixels to render;
* :func:`chunky_png` — a 64 × 64 PNG carrying empty ancillary chunks before its image data.
"""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def raw_pdf(objects: list[bytes]) -> bytes:
    """A PDF of these object bodies (object n is ``objects[n - 1]``, 1 the catalog), with a
    correct cross-reference table."""
    out = io.BytesIO()
    out.write(b"%PDF-1.7\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(
        b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    )
    return out.getvalue()


def stream(entries: bytes, data: bytes) -> bytes:
    return b"<< %s /Length %d >>\nstream\n%s\nendstream" % (entries, len(data), data)


def page_pdf(
    content: bytes,
    resources: bytes = b"<< >>",
    extra: list[bytes] | None = None,
    *,
    size: tuple[int, int] = (400, 300),
    compress: bool = True,
) -> bytes:
    """One page drawing ``content``; ``extra`` objects are numbered from 5 on."""
    data = zlib.compress(content, 9) if compress else content
    return raw_pdf(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] /Contents 4 0 R "
            b"/Resources %s >>" % (*size, resources),
            stream(b"/Filter /FlateDecode" if compress else b"", data),
            *(extra or []),
        ]
    )


def inflating_pdf(megabytes: int = 20) -> bytes:
    """Short strokes, ``megabytes`` of them once inflated (20 MB: ~20 KB of PDF)."""
    stroke = b"10 10 m 20 20 l S\n"
    return page_pdf(stroke * (megabytes * 2**20 // len(stroke)))


def nested_forms_pdf(width: int = 10, depth: int = 8) -> bytes:
    forms = []
    for level in range(depth):
        if level < depth - 1:
            body = b"/X Do\n" * width
            resources = b"<< /XObject << /X %d 0 R >> >>" % (5 + level + 1)
        else:
            body, resources = b"0 0 m 10 10 l S\n", b"<< >>"
        forms.append(
            stream(
                b"/Type /XObject /Subtype /Form /BBox [0 0 400 300] /Resources " + resources,
                body,
            )
        )
    return page_pdf(b"/X Do\n" * width, b"<< /XObject << /X 5 0 R >> >>", forms)


def declared_image_pdf(side: int = 130_000, filter_name: bytes = b"JBIG2Decode") -> bytes:
    image = stream(
        b"/Type /XObject /Subtype /Image /Width %d /Height %d /BitsPerComponent 1 "
        b"/ColorSpace /DeviceGray /Filter /%s" % (side, side, filter_name),
        b"\x00" * 64,
    )
    return page_pdf(b"q 400 0 0 300 0 0 cm /I Do Q\n", b"<< /XObject << /I 5 0 R >> >>", [image])


def huge_page_pdf(side: int = 6000) -> bytes:
    return page_pdf(b"0 0 m %d %d l S\n" % (side, side), size=(side, side))


def chunky_png(chunks: int) -> bytes:
    """A white 64 × 64 PNG with ``chunks`` empty ``teXt`` chunks after its header (12 bytes
    each: 5 million make 60 MB)."""
    out = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(out, format="PNG")
    png = out.getvalue()
    empty = struct.pack(">I", 0) + b"teXt" + struct.pack(">I", zlib.crc32(b"teXt"))
    return png[:33] + empty * chunks + png[33:]  # 33: signature and IHDR
