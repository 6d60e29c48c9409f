"""Mapping a requested WxH onto what a provider accepts: nearest aspect ratio, size tier."""

from __future__ import annotations

import math

__all__ = ["nearest_aspect_ratio", "scale_into_pixel_range"]


def nearest_aspect_ratio(width: int, height: int, allowed: list[str] | tuple[str, ...]) -> str:
    """The allowed 'W:H' closest to width/height on a log scale (so 2:1 and 1:2 are equally far from 1:1)."""
    target = math.log(width / height)

    def distance(ratio: str) -> float:
        w, h = (float(x) for x in ratio.split(":"))
        return abs(math.log(w / h) - target)

    return min((r for r in allowed if r != "auto"), key=distance)


def scale_into_pixel_range(width: int, height: int, min_pixels: int, max_pixels: int,
                           multiple_of: int = 8) -> tuple[int, int]:
    """Same aspect ratio, scaled so that the pixel count lies in [min_pixels, max_pixels]."""
    pixels = width * height
    scale = 1.0
    if pixels < min_pixels:
        scale = math.sqrt(min_pixels / pixels)
    elif pixels > max_pixels:
        scale = math.sqrt(max_pixels / pixels)
    if scale == 1.0:
        return width, height
    w = max(multiple_of, int(math.ceil(width * scale / multiple_of)) * multiple_of)
    h = max(multiple_of, int(math.ceil(height * scale / multiple_of)) * multiple_of)
    while w * h > max_pixels:  # rounding up may overshoot the ceiling
        w, h = w - multiple_of, h - multiple_of if h > multiple_of else h
    return w, h
