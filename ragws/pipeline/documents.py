"""Untrusted bytes in, RGB pages out: image decoding and PDF rendering with hard limits.

Everything here that reads a client's bytes is blocking and runs in the document workers
(:mod:`ragws.pipeline.document_pool`): processes with a memory limit, killed when a task takes too
long. Every failure is a :class:`~ragws.errors.RequestError` with a message a client can
act on, except running out of memory, which is a :class:`MemoryError` (the pool answers it
``too_large``, naming its limit).

The server itself holds a :class:`PdfFile` per open document: where the workers find it and
how many pages it has.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import pymupdf
from PIL import Image, ImageOps, UnidentifiedImageError

from ragws.errors import bad_request, too_large
from ragws.pipeline.geometry import BBox
from ragws.pipeline.tables import Table, table_from_pymupdf
from ragws.pipeline.textlayer import Line, Shapes, page_shapes, pdf_lines

# The pixel cap is ours (``max_image_pixels``), checked on the header before decoding; PIL's
# own bomb check would otherwise fire at a different, global threshold.
Image.MAX_IMAGE_PIXELS = None
pymupdf.TOOLS.mupdf_display_errors(False)  # corrupt input is reported to the client, not stderr

#: The image formats decoded. Pillow's other readers stay off: some hand the bytes to external
#: programs (EPS to Ghostscript) or parse rarely audited formats, and no page scan needs them.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF")

#: Steps Pillow may take in Python before an image's pixels: PNG chunks, JPEG markers and
#: stray bytes, GIF blocks. Each costs it a few microseconds, so a 60 MB PNG of five million
#: empty chunks kept a decoder busy for 16-40 s. Real files take a few dozen (a 96 MiB PNG
#: cut into libpng's 8 KiB IDAT chunks, 12 000).
MAX_HEADER_STEPS = 65_536


def decode_image(data: bytes | memoryview, max_pixels: int) -> np.ndarray:
    """Decode image bytes to an ``H×W×3`` RGB array, refusing bombs before decoding."""
    if not data:
        raise bad_request("image is empty")
    _check_structure(data)
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


def _check_structure(data: bytes | memoryview) -> None:
    """Refuse an image whose structure Pillow would walk in Python for too long."""
    steps, head = 0, bytes(data[:8])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        steps = _png_chunks(data)
    elif head.startswith(b"\xff\xd8"):
        steps = _jpeg_steps(data)
    elif head.startswith((b"GIF87a", b"GIF89a")):
        steps = _gif_blocks(data)
    if steps > MAX_HEADER_STEPS:
        raise too_large(
            f"image has more than {MAX_HEADER_STEPS} chunks, markers or blocks (an image has a "
            "few dozen); it is not decoded"
        )


def _png_chunks(data: bytes | memoryview) -> int:
    pos, count = 8, 0
    while pos + 8 <= len(data) and count <= MAX_HEADER_STEPS:
        count += 1
        if data[pos + 4 : pos + 8] == b"IEND":
            break
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
    return count


def _jpeg_steps(data: bytes | memoryview) -> int:
    """Pillow reads a JPEG up to its first scan a marker, or a stray byte, at a time."""
    pos, steps = 2, 0
    while pos + 1 < len(data) and steps <= MAX_HEADER_STEPS:
        steps += 1
        if data[pos] != 0xFF:
            pos += 1  # a stray byte, skipped
            continue
        code = data[pos + 1]
        if code == 0xFF:
            pos += 1  # fill
        elif code == 0x00 or code == 0x01 or 0xD0 <= code <= 0xD9:
            pos += 2  # an escaped 0xFF, or a marker without a segment
        elif code == 0xDA or code < 0xC0:
            break  # the scan's entropy-coded data (decoded in C), or no marker at all
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return steps


def _gif_blocks(data: bytes | memoryview) -> int:
    """Pillow reads a GIF up to its first image a block, or a stray byte, at a time."""
    palette = 3 << ((data[10] & 7) + 1) if len(data) > 10 and data[10] & 0x80 else 0
    pos = 13 + palette  # after the header, the screen descriptor and its colour table
    steps = 0
    while pos < len(data) and steps <= MAX_HEADER_STEPS:
        steps += 1
        if data[pos] in b",;":  # an image (decoded in C), or the end
            break
        if data[pos] != 0x21:
            pos += 1  # a stray byte, skipped
            continue
        pos += 2  # an extension: its label, then sub-blocks up to an empty one
        while pos < len(data) and steps <= MAX_HEADER_STEPS:
            steps += 1
            size = data[pos]
            pos += 1 + size
            if size == 0:
                break
    return steps


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

    def check_size(self, size: int) -> None:
        if not size:
            raise bad_request("pdf is empty")
        if size > self.max_bytes:
            raise too_large(f"pdf is {size} bytes; the limit is {self.max_bytes}")


@dataclass(frozen=True, slots=True)
class PdfFile:
    """A validated PDF as the server holds it: a file the document workers open by its path."""

    path: str
    page_count: int
    limits: PdfLimits

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


#: How MuPDF says that an allocation failed (a document worker at its memory limit).
_NO_MEMORY = re.compile(r"\b(?:m|c|re)alloc\b.*\bfailed|out of memory", re.IGNORECASE)


def _failure(exc: Exception, message: str) -> Exception:
    """A pymupdf failure as the client sees it: out of memory, or a document it cannot read."""
    if isinstance(exc, MemoryError) or _NO_MEMORY.search(str(exc)):
        return MemoryError(f"{message}: {exc}")
    return bad_request(f"{message}: {exc}")


@dataclass(slots=True)
class PdfDocument:
    """An opened, validated PDF. pymupdf is not thread-safe: one thread per document."""

    _doc: pymupdf.Document
    limits: PdfLimits
    page_count: int
    _pages_checked: set[int] = field(default_factory=set)  # pages whose images fit the cap

    @classmethod
    def open(cls, source: bytes | str, limits: PdfLimits) -> PdfDocument:
        """Open PDF bytes, or a PDF file by its path, refusing what cannot be served."""
        limits.check_size(len(source) if isinstance(source, bytes) else os.path.getsize(source))
        try:
            if isinstance(source, bytes):
                doc = pymupdf.open(stream=source, filetype="pdf")
            else:
                doc = pymupdf.open(source, filetype="pdf")
        except Exception as exc:
            raise _failure(exc, "pdf cannot be opened") from None
        try:
            encrypted, count = doc.needs_pass, doc.page_count
        except Exception as exc:  # a page tree that cannot be counted
            doc.close()
            raise _failure(exc, "pdf cannot be opened") from None
        if encrypted:
            doc.close()
            raise bad_request("pdf is encrypted and needs a password")
        if count < 1:
            doc.close()
            raise bad_request("pdf has no pages")
        return cls(doc, limits, count)

    def count_pages(self) -> int:
        return self.page_count

    def render(self, page: int, scale_x: float, scale_y: float | None = None) -> np.ndarray:
        """Render one page to an RGB array, refusing sizes over the pixel cap first: the
        page's own at this scale, and those its images declare."""
        scale_y = scale_x if scale_y is None else scale_y
        pdf_page = self._page(page)
        width = round(pdf_page.rect.width * scale_x)
        height = round(pdf_page.rect.height * scale_y)
        if width * height > self.limits.max_pixels:
            raise too_large(
                f"page {page} at this scale is {width}×{height} pixels; the limit is "
                f"{self.limits.max_pixels} (lower 'scale')"
            )
        self._check_images(page, pdf_page)
        try:
            pix = pdf_page.get_pixmap(
                matrix=pymupdf.Matrix(scale_x, scale_y), colorspace=pymupdf.csRGB, alpha=False
            )
        except Exception as exc:
            raise _failure(exc, f"page {page} cannot be rendered") from None
        return np.frombuffer(pix.samples, dtype=np.uint8).reshape(pix.height, pix.width, 3)

    def _check_images(self, page: int, pdf_page: pymupdf.Page) -> None:
        """Refuse a page that draws an image over the pixel cap, by the size its image
        dictionary declares, before anything is decoded: a 2.8 KB PDF can declare a JBIG2
        image of 130 000 × 130 000 (images of form XObjects and soft masks included)."""
        if page in self._pages_checked:
            return
        try:
            images = pdf_page.get_images(full=True)
            sizes = [(width, height) for _, _, width, height, *_ in images]
            for smask in {image[1] for image in images if image[1] > 0}:
                sizes.append((self._dimension(smask, "Width"), self._dimension(smask, "Height")))
        except Exception as exc:
            raise _failure(exc, f"page {page} cannot be read") from None
        for width, height in sizes:
            if width * height > self.limits.max_pixels:
                raise too_large(
                    f"page {page} draws an image of {width}×{height} = {width * height} "
                    f"pixels; the limit is {self.limits.max_pixels}"
                )
        self._pages_checked.add(page)

    def _dimension(self, xref: int, key: str) -> int:
        kind, value = self._doc.xref_get_key(xref, key)
        return int(value) if kind == "int" else 0

    def words(self, page: int) -> list[tuple[float, float, float, float, str, int, int, int]]:
        """The page's text layer as words: ``(x0, y0, x1, y1, word, block, line, word_no)`` in
        PDF points (pymupdf's ``get_text("words")``); empty for a scanned page."""
        pdf_page = self._page(page)
        try:
            return pdf_page.get_text("words", sort=False)
        except Exception as exc:
            raise _failure(exc, f"page {page} text cannot be read") from None

    def lines(self, page: int) -> tuple[list[Line], Shapes]:
        """The page's text layer as lines with their fonts, and the bullets and ruled areas
        drawn on it, in PDF points (see :mod:`ragws.pipeline.textlayer`); no lines for a scan."""
        pdf_page = self._page(page)
        try:
            return pdf_lines(pdf_page), page_shapes(pdf_page)
        except Exception as exc:
            raise _failure(exc, f"page {page} text cannot be read") from None

    def text(self, page: int) -> tuple[list[Line], Shapes, float]:
        """What the parse pipeline's text-layer pass needs of a page: :meth:`lines` and the
        page's height in points."""
        lines, shapes = self.lines(page)
        return lines, shapes, self.page_size(page)[1]

    def page_size(self, page: int) -> tuple[float, float]:
        """Width and height of a page in points."""
        rect = self._page(page).rect
        return float(rect.width), float(rect.height)

    def table(self, page: int, clip: BBox) -> Table | None:
        """The table pymupdf's table finder reads inside ``clip`` (points), if any."""
        try:
            return table_from_pymupdf(self._page(page), clip)
        except MemoryError:
            raise
        except Exception as exc:
            if _NO_MEMORY.search(str(exc)):
                raise MemoryError(f"page {page} table cannot be read: {exc}") from None
            return None  # the finder failed on odd drawings: the lines stay plain text

    def _page(self, page: int) -> pymupdf.Page:
        try:
            return self._doc[page]
        except Exception as exc:  # a damaged page tree: a cycle, a missing page object
            raise _failure(exc, f"page {page} cannot be read") from None

    def close(self) -> None:
        self._doc.close()
        # MuPDF keeps what it decoded of a document (fonts, images) in a process-wide store
        # after the document is closed, up to 256 MiB: a server that opens document after
        # document would hold that much for nothing. Emptying it at each close costs nothing
        # measurable (0.217 against 0.216 s per 4-page document rendered at 2×); a document
        # still open merely decodes again what it needs next.
        pymupdf.TOOLS.store_shrink(100)
