"""Functions used as ``--transform module:function`` in the tests.

A module of its own (not a test module) so that worker processes import it cheaply.
"""

from __future__ import annotations

from PIL import Image, ImageOps

# Printed into the image so a test can tell the function ran.
MARK = (0, 255, 0)


def mark_corner(image: Image.Image) -> Image.Image:
    """Paint the top-left pixel green (on an RGB copy)."""
    marked = image.convert("RGB")
    marked.putpixel((0, 0), MARK)
    return marked


def invert(image: Image.Image) -> Image.Image:
    """Return the negative of the image."""
    return ImageOps.invert(image.convert("RGB"))


def add_alpha(image: Image.Image) -> Image.Image:
    """Return an RGBA image, which a JPEG output must flatten."""
    return image.convert("RGBA")


def scribble_in_place(image: Image.Image) -> Image.Image:
    """Change the argument itself and return it."""
    image.paste(0, (0, 0, image.width, image.height))
    return image


def fail(image: Image.Image) -> Image.Image:
    """Raise, as a buggy user function would."""
    raise ValueError(f"cannot handle {image.width}x{image.height}")


def not_an_image(image: Image.Image) -> int:
    """Return something that is not an image."""
    return image.width


NOT_CALLABLE = 42
