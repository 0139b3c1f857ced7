"""Untrusted bytes in, RGB pages out: image decoding and PDF rendering with hard limits.

Everything here is blocking and runs on worker threads. Every failure is a
:class:`~ragws.protocol.RequestError` with a message a client can act on.

pymupdf is not thread-safe, so every call into it must run on the single PDF thread that the
layout service owns (see :class:`PdfDocument`).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import pymupdf
from PIL import Image, ImageOps, UnidentifiedImageError

from .protocol import bad_request, too_large
from .tables import Table, table_from_pymupdf
from .textlayer import BBox, Line, Shapes, page_shapes, pdf_lines

# The pixel cap is ours (``max_image_pixels``), checked on the header before decoding; PIL's
# own bomb check would otherwise fire at a different, global threshold.
Image.MAX_IMAGE_PIXELS = None
pymupdf.TOOLS.mupdf_display_errors(False)  # corrupt input is reported to the client, not stderr

#: The image formats decoded. Pillow's other readers stay off: some hand the bytes to external
#: programs (EPS to Ghostscript) or parse rarely audited formats, and no page scan needs them.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF")


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode image bytes to an ``H×W×3`` RGB array, refusing bombs before decoding."""
    if not data:
        raise bad_request("image is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise bad_request(
            "image is not in a format that can be decoded (PNG, JPEG, WebP, TIFF, BMP, GIF)"
        ) from None
    except Exception as exc:
        raise bad_request(f"image header is corrupt: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise bad_request(f"image has no pixels ({width}×{height})")
    if width * height > max_pixels:
        raise too_large(
            f"image is {width}×{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF oddities, palette transparency notes
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except Exception as exc:
        raise bad_request(f"image data is truncated or corrupt: {exc}") from None


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent areas of a scan are paper, not black.
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, rgba)
    return np.asarray(image.convert("RGB"))


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=quality)
    return out.getvalue()


@dataclass(frozen=True, slots=True)
class PdfLimits:
    max_bytes: int
    max_pages: int
    max_pixels: int


class PdfDocument:
    """An opened, validated PDF. Use only from the PDF thread."""

    def __init__(self, data: bytes, limits: PdfLimits) -> None:
        if not data:
            raise bad_request("pdf is empty")
        if len(data) > limits.max_bytes:
            raise too_large(f"pdf is {len(data)} bytes; the limit is {limits.max_bytes}")
        try:
            doc = pymupdf.open(stream=data, filetype="pdf")
        except Exception as exc:
            raise bad_request(f"pdf cannot be opened: {exc}") from None
        if doc.needs_pass:
            doc.close()
            raise bad_request("pdf is encrypted and needs a password")
        if doc.page_count < 1:
            doc.close()
            raise bad_request("pdf has no pages")
        self._doc = doc
        self.limits = limits
        self.page_count = doc.page_count

    def select(self, pages: tuple[int, ...] | None) -> list[int]:
        """Validate a page selection (0-based) against the document and the page cap."""
        chosen = list(range(self.page_count)) if pages is None else list(pages)
        for page in chosen:
            if page >= self.page_count:
                raise bad_request(
                    f"page {page} is out of range: the pdf has {self.page_count} pages (0-based)"
                )
        if len(chosen) > self.limits.max_pages:
            raise too_large(
                f"{len(chosen)} pages requested; at most {self.limits.max_pages} per request "
                "(select some with 'pages')"
            )
        return chosen

    def render(self, page: int, scale_x: float, scale_y: float | None = None) -> np.ndarray:
        """Render one page to an RGB array, refusing sizes over the pixel cap first."""
        scale_y = scale_x if scale_y is None else scale_y
        try:
            pdf_page = self._doc[page]
        except Exception as exc:  # a damaged page tree: a cycle, a missing page object
            raise bad_request(f"page {page} cannot be read: {exc}") from None
        width = round(pdf_page.rect.width * scale_x)
        height = round(pdf_page.rect.height * scale_y)
        if width * height > self.limits.max_pixels:
            raise too_large(
                f"page {page} at this scale is {width}×{height} pixels; the limit is "
                f"{self.limits.max_pixels} (lower 'scale')"
            )
        try:
            pix = pdf_page.get_pixmap(
                matrix=pymupdf.Matrix(scale_x, scale_y), colorspace=pymupdf.csRGB, alpha=False
            )
        except Exception as exc:
            raise bad_request(f"page {page} cannot be rendered: {exc}") from None
        return np.frombuffer(pix.samples, dtype=np.uint8).reshape(pix.height, pix.width, 3)

    def words(self, page: int) -> list[tuple[float, float, float, float, str, int, int, int]]:
        """The page's text layer as words: ``(x0, y0, x1, y1, word, block, line, word_no)`` in
        PDF points (pymupdf's ``get_text("words")``); empty for a scanned page."""
        try:
            return self._doc[page].get_text("words", sort=False)
        except Exception as exc:
            raise bad_request(f"page {page} text cannot be read: {exc}") from None

    def lines(self, page: int) -> tuple[list[Line], Shapes]:
        """The page's text layer as lines with their fonts, and the bullets and ruled areas
        drawn on it, in PDF points (see :mod:`ragws.textlayer`); no lines for a scan."""
        try:
            pdf_page = self._doc[page]
            return pdf_lines(pdf_page), page_shapes(pdf_page)
        except Exception as exc:
            raise bad_request(f"page {page} text cannot be read: {exc}") from None

    def page_size(self, page: int) -> tuple[float, float]:
        """Width and height of a page in points."""
        try:
            rect = self._doc[page].rect
        except Exception as exc:  # a damaged page tree: a cycle, a missing page object
            raise bad_request(f"page {page} cannot be read: {exc}") from None
        return float(rect.width), float(rect.height)

    def table(self, page: int, clip: BBox) -> Table | None:
        """The table pymupdf's table finder reads inside ``clip`` (points), if any."""
        try:
            return table_from_pymupdf(self._doc[page], clip)
        except Exception:
            return None  # the finder failed on odd drawings: the lines stay plain text

    def close(self) -> None:
        self._doc.close()
        # MuPDF keeps what it decoded of a document (fonts, images) in a process-wide store
        # after the document is closed, up to 256 MiB: a server that opens document after
        # document would hold that much for nothing. Emptying it at each close costs nothing
        # measurable (0.217 against 0.216 s per 4-page document rendered at 2×); a document
        # still open merely decodes again what it needs next.
        pymupdf.TOOLS.store_shrink(100)
