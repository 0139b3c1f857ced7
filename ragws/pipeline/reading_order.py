"""Reading order of a page's blocks: columns, full-width bands, then top to bottom.

:func:`reading_order` is the rule; :class:`_Geometry` holds one page's boxes and the overlap
tests the rule is made of. Pure: geometry is in the pixels of the rendered page.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field

from ragws.pipeline.blocks import Block
from ragws.pipeline.geometry import BBox, sorted_bbox


def reading_order(blocks: Sequence[Block], page_width: float, page_height: float) -> list[Block]:
    """The blocks of one page in reading order, with ``order`` set to 0..n-1 on each.

    Headers come first and footers last, wherever the layout model put them; everything else
    (``abandon`` included) is ordered by position, by this rule applied recursively to a set
    of blocks:

    1. **Columns.** Two blocks share a column when their x-intervals overlap by more than a
       tolerance (see below); the connected groups are the columns. With several, columns
       whose vertical extents overlap are read left to right, and groups of columns that
       stand one above another top to bottom (so a page number under a gutter comes last,
       not between the columns). Each column is then ordered by the same rule.
    2. **Bands.** One group left means something joins the columns: a block that overlaps
       two blocks which do not overlap each other *spans* them. A spanning block with no
       block beside it (x-disjoint and overlapping it vertically) is full-width: a title,
       an abstract, a wide figure. Full-width blocks cut the set into horizontal bands;
       each band is read whole (all its columns) before the full-width block below it.
    3. **One column.** With nothing spanning, every block overlaps every other in x:
       top to bottom.

    A spanning block that has something beside it (a left-column paragraph above two small
    figures, with the right column next to it) cuts nothing. If no block is full-width, the
    columns are found without the spanning blocks, and each of those joins the column it
    overlaps most.

    The tolerances make the rule robust to boxes that touch or bleed: x-intervals overlap
    only by more than 10% of the narrower block (and 0.5% of the page), so a paragraph
    bleeding into the gutter joins no column but its own, while jittered left edges of one
    column overlap almost wholly. Ties fall back to position, then input order, so the
    result is deterministic.
    """
    if not blocks:
        return []
    geo = _Geometry([sorted_bbox(b.bbox) for b in blocks], page_width, page_height)
    headers = [i for i, b in enumerate(blocks) if b.type == "header"]
    footers = [i for i, b in enumerate(blocks) if b.type == "footer"]
    body = [i for i, b in enumerate(blocks) if b.type not in ("header", "footer")]
    ordered = [blocks[i] for i in geo.order(headers) + geo.order(body) + geo.order(footers)]
    for n, block in enumerate(ordered):
        block.order = n
    return ordered


@dataclass(slots=True)
class _Geometry:
    """The boxes of one page, addressed by index, and the overlap tests on them."""

    boxes: list[BBox]
    page_width: float
    page_height: float
    x_tol: float = field(init=False)
    y_tol: float = field(init=False)

    def __post_init__(self) -> None:
        self.x_tol = max(1.0, 0.005 * self.page_width)
        self.y_tol = max(1.0, 0.005 * self.page_height)

    def x_overlap(self, i: int, j: int) -> bool:
        a, b = self.boxes[i], self.boxes[j]
        overlap = min(a[2], b[2]) - max(a[0], b[0])
        narrower = min(a[2] - a[0], b[2] - b[0])
        return overlap > max(self.x_tol, 0.1 * narrower)

    def y_overlap(self, i: int, j: int) -> bool:
        a, b = self.boxes[i], self.boxes[j]
        return min(a[3], b[3]) - max(a[1], b[1]) > self.y_tol

    def key(self, i: int) -> tuple[float, float, int]:
        return self.boxes[i][1], self.boxes[i][0], i

    def order(self, idx: list[int]) -> list[int]:
        if len(idx) <= 1:
            return list(idx)
        columns = self._components(idx)
        if len(columns) > 1:
            cutters = self._cutters(idx, columns)
            if cutters:
                return self._order_bands(idx, cutters)
            cut = self._new_row_of_columns(idx, columns)
            if cut is not None:
                y, between = cut
                above = [i for i in idx if self.boxes[i][3] <= y + self.y_tol]
                taken = set(above)
                return (
                    self.order([i for i in above if i not in between])
                    + self.order(between)
                    + self.order([i for i in idx if i not in taken])
                )
            return self._order_columns(columns)
        spanning = [i for i in idx if self._spans(i, idx)]
        if not spanning:
            return sorted(idx, key=self.key)
        full = [i for i in spanning if not any(self._beside(i, j) for j in idx)]
        if full:
            return self._order_bands(idx, full)
        # Spanning blocks with neighbours beside them: find columns without them.
        weak = set(spanning)
        rest = [i for i in idx if i not in weak]
        columns = self._components(rest)
        if len(columns) > 1:
            targets = []
            for i in spanning:
                overlaps = [self._overlap_with(i, col) for col in columns]
                targets.append(overlaps.index(max(overlaps)))
            for i, c in zip(spanning, targets, strict=True):
                columns[c].append(i)
            return self._order_columns(columns)
        return sorted(idx, key=self.key)

    def _cutters(self, idx: list[int], columns: list[list[int]]) -> list[int]:
        """Blocks that cut columns into bands although they are narrow: a heading set across
        the page whose box only covers its words. One line high (3% of the page at most),
        nothing beside it, blocks of another column above it and one starting right below.
        """
        column_of = {i: c for c, col in enumerate(columns) for i in col}
        near = 0.04 * self.page_height
        found = []
        for i in idx:
            box = self.boxes[i]
            if box[3] - box[1] > 0.03 * self.page_height:
                continue
            if any(self._beside(i, j) for j in idx):
                continue
            others = [j for j in idx if column_of[j] != column_of[i]]
            above = any(self.boxes[j][3] <= box[1] + self.y_tol for j in others)
            # ... and another column going on right under it: under a heading that spans
            # the page, every column starts again at once.
            below = any(box[3] - self.y_tol <= self.boxes[j][1] <= box[3] + near for j in others)
            if above and below:
                found.append(i)
        return found

    def _new_row_of_columns(
        self, idx: list[int], columns: list[list[int]]
    ) -> tuple[float, list[int]] | None:
        """The height at which the columns start again below a block set between them (a
        table that spans the columns but is no wider than one): every column that goes on
        below starts within a line of it, nothing crosses it, one column above it runs up to
        it (the block set between) and another ended well before it (columns flowing on
        would not leave one empty for that long). Returns the height and the blocks set
        between: those above it and below where every other column ended, read after the
        columns above them."""
        column_of = {i: c for c, col in enumerate(columns) for i in col}
        near = 0.03 * self.page_height  # a heading and its margins
        for y in sorted({self.boxes[i][1] for i in idx}):
            if any(
                self.boxes[i][1] < y - self.y_tol < y + self.y_tol < self.boxes[i][3] for i in idx
            ):
                continue
            above = [i for i in idx if self.boxes[i][3] <= y + self.y_tol]
            below = [i for i in idx if self.boxes[i][1] >= y - self.y_tol]
            shared = {column_of[i] for i in above} & {column_of[i] for i in below}
            if len(shared) < 2:
                continue
            start = {c: min(self.boxes[i][1] for i in below if column_of[i] == c) for c in shared}
            end = {c: max(self.boxes[i][3] for i in above if column_of[i] == c) for c in shared}
            last = max(shared, key=lambda c: (end[c], -c))  # the column running up to the cut
            others = max(e for c, e in end.items() if c != last)
            if (
                max(start.values()) - y <= 1.5 * near
                and y - end[last] <= near
                and y - min(end.values()) >= 0.06 * self.page_height
            ):
                between = [
                    i
                    for i in above
                    if column_of[i] == last and self.boxes[i][1] >= others - self.y_tol
                ]
                return y, between
        return None

    def _components(self, idx: list[int]) -> list[list[int]]:
        """Groups of blocks connected by x-overlap, each in input order."""
        parent = {i: i for i in idx}

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for n, i in enumerate(idx):
            for j in idx[n + 1 :]:
                if self.x_overlap(i, j):
                    parent[find(i)] = find(j)
        groups: dict[int, list[int]] = {}
        for i in idx:
            groups.setdefault(find(i), []).append(i)
        return list(groups.values())

    def _order_columns(self, columns: list[list[int]]) -> list[int]:
        extents = [
            (
                min(self.boxes[i][0] for i in col),
                min(self.boxes[i][1] for i in col),
                max(self.boxes[i][3] for i in col),
            )
            for col in columns
        ]
        # Columns side by side (vertical extents overlapping) form one row of columns.
        rows: list[list[int]] = []
        row_bottom = 0.0
        for c in sorted(range(len(columns)), key=lambda c: (extents[c][1], extents[c][0])):
            if rows and extents[c][1] < row_bottom - self.y_tol:
                rows[-1].append(c)
                row_bottom = max(row_bottom, extents[c][2])
            else:
                rows.append([c])
                row_bottom = extents[c][2]
        out: list[int] = []
        for row in rows:
            for c in sorted(row, key=lambda c: (extents[c][0], extents[c][1])):
                out.extend(self.order(columns[c]))
        return out

    def _spans(self, i: int, idx: list[int]) -> bool:
        """Whether ``i`` overlaps two blocks that do not overlap each other."""
        touching = [j for j in idx if j != i and self.x_overlap(i, j)]
        if len(touching) < 2:
            return False
        # The pair most likely apart: the one ending leftmost and the one starting rightmost.
        left = min(touching, key=lambda j: (self.boxes[j][2], j))
        right = max(touching, key=lambda j: (self.boxes[j][0], -j))
        return left != right and not self.x_overlap(left, right)

    def _beside(self, i: int, j: int) -> bool:
        return i != j and not self.x_overlap(i, j) and self.y_overlap(i, j)

    def _overlap_with(self, i: int, column: list[int]) -> float:
        a = self.boxes[i]
        return sum(
            max(0.0, min(a[2], self.boxes[j][2]) - max(a[0], self.boxes[j][0])) for j in column
        )

    def _order_bands(self, idx: list[int], full: list[int]) -> list[int]:
        """Full-width blocks in vertical order, each band between them read before the next."""
        full = sorted(full, key=lambda i: (self._center_y(i), self.boxes[i][0], i))
        centers = [self._center_y(i) for i in full]
        bands: list[list[int]] = [[] for _ in range(len(full) + 1)]
        members = set(full)
        for i in idx:
            if i not in members:
                bands[bisect_right(centers, self._center_y(i))].append(i)
        out = self.order(bands[0])
        for breaker, band in zip(full, bands[1:], strict=True):
            out.append(breaker)
            out.extend(self.order(band))
        return out

    def _center_y(self, i: int) -> float:
        return (self.boxes[i][1] + self.boxes[i][3]) / 2
