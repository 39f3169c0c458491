"""Images a person gives the dashboard: read an upload safely (:func:`load_upload`), and fit it to the model's square
input without stretching it (:func:`letterbox`), saying in words what was done (:func:`fit_note`)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from toolkit.dashboard.common import InputError

MAX_UPLOAD_PIXELS = 40_000_000
IMAGE_FORMATS = "PNG, JPEG, BMP, GIF or WebP"
LETTERBOX_FILL = (0, 0, 0)
DISPLAY_SIDE = 256          # a 32x32 test digit is shown enlarged to at least this  # black: the embedded digits sit on a black canvas, so bars read as background


def load_upload(path) -> Image.Image:
    """An uploaded file as an RGB PIL image, or :class:`InputError` (missing, not an image, too large)."""
    path = getattr(path, "name", path)
    if not path or not Path(path).is_file():
        raise InputError("the uploaded file is missing: upload it again")
    name = Path(path).name
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_UPLOAD_PIXELS:
                raise InputError(f"the uploaded image is too large ({width}x{height} pixels; at most "
                                 f"{MAX_UPLOAD_PIXELS:,} pixels)")
            img.load()
            return img.convert("RGB")
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        # What PIL says (e.g. "cannot identify image file '/tmp/…'") names a server path: say it for people.
        raise InputError(f"the uploaded file {name!r} is not an image that can be read; upload a "
                         f"{IMAGE_FORMATS} image") from None


def letterbox(image: Image.Image, fill=LETTERBOX_FILL) -> Image.Image:
    """``image`` centred on a square canvas of its longer side, the rest filled with ``fill``: resizing that square
    to the model's input keeps the proportions (a plain resize squashed a 300x200 photo into a square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def enlarged(image: Image.Image, minimum: int = DISPLAY_SIDE) -> Image.Image:
    """A copy of a small ``image`` scaled up by a whole factor (nearest neighbour: pixels stay sharp squares) so
    its longer side reaches ``minimum``; larger images are returned as they are. For display only."""
    factor = -(-minimum // max(image.size))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def fit_note(size: tuple[int, int], model_side: int) -> str:
    """One sentence on how an image of ``size`` (width, height) reaches the model's ``model_side`` square input."""
    width, height = size
    if width == height == model_side:
        return f"The {width}×{height} image is the model's input size: used as it is."
    if width == height:
        return f"The {width}×{height} image was resized to the model's {model_side}×{model_side} input."
    side = max(width, height)
    bars = "above and below" if width > height else "left and right"
    return (f"The {width}×{height} image is not square: it was letterboxed to {side}×{side} (black bars {bars}, "
            f"nothing stretched), then resized to the model's {model_side}×{model_side} input.")
