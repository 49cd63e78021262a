"""Every concept of the synthetic world, listed in one place.

The base model is pretrained on ``BASE_SHAPES`` and ``BASE_STYLES`` only. ``HELD_OUT_SHAPES`` and
``HELD_OUT_STYLES`` are never shown to it: they are what personalization has to learn. The world
judge sees every concept.
"""

from __future__ import annotations

IMAGE_SIZE = 64
GRID = 3  # positions are the cells of a 3x3 grid

BASE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "rectangle", "semicircle")
HELD_OUT_SHAPES: tuple[str, ...] = ("star", "heart", "cross", "crescent", "arrow", "hourglass")
SHAPES: tuple[str, ...] = BASE_SHAPES + HELD_OUT_SHAPES

BASE_STYLES: tuple[str, ...] = ("flat", "striped", "dotted", "outlined")
HELD_OUT_STYLES: tuple[str, ...] = ("shadowed", "ringed", "halved", "haloed")  # studio.world.render draws them
STYLES: tuple[str, ...] = BASE_STYLES + HELD_OUT_STYLES

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (245, 220, 20),
    "green": (30, 170, 60),
    "cyan": (0, 200, 220),
    "blue": (30, 60, 220),
    "purple": (140, 40, 180),
    "pink": (255, 120, 190),
    "white": (255, 255, 255),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

# Diameter of the object's bounding box in pixels of the 64x64 image.
SIZES: dict[str, float] = {"small": 11.0, "medium": 15.0, "large": 19.0}
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)

# Position name -> (row, col) of its grid cell. The caption phrase is in ``POSITION_PHRASES``.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}
POSITION_NAMES: tuple[str, ...] = tuple(POSITIONS)
# a random scene's object count is drawn from this list: 40% one object, 40% two, 20% three
OBJECT_COUNTS: tuple[int, ...] = (1, 1, 2, 2, 3)
POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}


def cell_of(position: str) -> int:
    """Index 0..8 of a position's grid cell, row-major."""
    row, col = POSITIONS[position]
    return row * GRID + col


def position_of_cell(cell: int) -> str:
    """Inverse of :func:`cell_of`."""
    return POSITION_NAMES[[cell_of(p) for p in POSITION_NAMES].index(cell)]
