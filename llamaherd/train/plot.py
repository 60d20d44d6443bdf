"""A loss-curve PNG without a plotting library: lines rasterised into an RGB image, written with zlib.

Deliberately small (axes box, light grid, one polyline per series, no text): the figures in the note give the
numbers; the picture shows the shape. PNG layout per the PNG specification (RFC 2083): signature, IHDR, IDAT
(zlib of filter-byte-prefixed rows), IEND, each chunk with its CRC-32.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from ..atomic import write_bytes

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: str | Path, pixels: list[bytearray], width: int, height: int) -> None:
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")
    write_bytes(path, png)


def plot_series(path: str | Path, series: list[list[tuple[float, float]]], width: int = 640, height: int = 400) -> None:
    """Draw each series of (x, y) points as a polyline on shared axes (series 0 blue, 1 red, ...)."""
    pixels = [bytearray(b"\xff" * (3 * width)) for _ in range(height)]
    m = 30
    pts = [p for s in series for p in s]
    if not pts:
        return write_png(path, pixels, width, height)
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def put(x: int, y: int, rgb) -> None:
        if 0 <= x < width and 0 <= y < height:
            pixels[y][3 * x : 3 * x + 3] = bytes(rgb)

    def to_px(x: float, y: float) -> tuple[int, int]:
        return (round(m + (x - x0) / (x1 - x0) * (width - 2 * m)), round(height - m - (y - y0) / (y1 - y0) * (height - 2 * m)))

    for k in range(1, 5):  # grid
        gy, gx = m + k * (height - 2 * m) // 5, m + k * (width - 2 * m) // 5
        for x in range(m, width - m):
            put(x, gy, (230, 230, 230))
        for y in range(m, height - m):
            put(gx, y, (230, 230, 230))
    for x in range(m, width - m + 1):  # axes box
        put(x, m, (0, 0, 0)), put(x, height - m, (0, 0, 0))
    for y in range(m, height - m + 1):
        put(m, y, (0, 0, 0)), put(width - m, y, (0, 0, 0))
    for i, s in enumerate(series):
        rgb = COLORS[i % len(COLORS)]
        prev = None
        for x, y in s:
            cur = to_px(x, y)
            if prev is not None:
                n = max(abs(cur[0] - prev[0]), abs(cur[1] - prev[1]), 1)
                for t in range(n + 1):
                    px = round(prev[0] + (cur[0] - prev[0]) * t / n)
                    py = round(prev[1] + (cur[1] - prev[1]) * t / n)
                    for dx, dy in ((0, 0), (1, 0), (0, 1)):
                        put(px + dx, py + dy, rgb)
            else:
                put(*cur, rgb)
            prev = cur
    write_png(path, pixels, width, height)
