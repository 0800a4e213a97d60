"""Image sources: one reader layer used by every sdmem command."""

from .base import ArraySource, FileSource, ImageSource, center_crop_resize, decode_image, to_rgb_array

__all__ = ["ArraySource", "FileSource", "ImageSource", "center_crop_resize", "decode_image", "to_rgb_array"]
