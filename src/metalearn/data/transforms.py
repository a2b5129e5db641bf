"""The one preprocessing path from an image to a model input, shared by the data sources
(their resize recipes) and the adapt API (a user's own images, metalearn/learner.py).

A model is trained on images as its source delivers them: uint8, ``channels`` channels,
``image_size`` square, stored ink-high (255 = stroke) when the source's files are drawings
on white paper. ``Preprocessing`` records that in every checkpoint, and ``prepare`` applies it
to any image a user brings: decode, drop alpha onto white paper, convert to the model's
channels, resize with the source's own recipe, invert where the source inverts, scale to
[0, 1] (and normalise, if the source is normalised).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from metalearn.errors import ConfigError, DataError


@dataclass(frozen=True)
class Preprocessing:
    """How a source's images become model inputs (saved in checkpoints as a dict).

    ``paper_white``: the source's files are dark strokes on white paper (Omniglot's PNGs); they
    are inverted to ink-high when loaded. ``resize``: the recipe the source resizes with.
    """

    source: str
    image_size: int
    channels: int = 1
    paper_white: bool = False
    resize: str = "bilinear"
    mean: tuple[float, ...] | None = None  # per channel, after scaling to [0, 1]
    std: tuple[float, ...] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Preprocessing:
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        for key in ("mean", "std"):
            if known.get(key) is not None:
                known[key] = tuple(known[key])
        return cls(**known)


# ---- resize recipes (the sources resize with these too) ------------------------------------
def resize_lanczos(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [..., H, W] to size x size with Pillow's LANCZOS, on the polarity given (the
    recipe of the Omniglot ``_28.npz`` files, applied to the original paper-white images)."""
    if images.shape[-2:] == (size, size):
        return images
    from PIL import Image

    return resize_pillow(images, size, Image.LANCZOS)


def resize_pillow(images: np.ndarray, size: int, resample) -> np.ndarray:
    """uint8 [..., H, W] to size x size, each image by Pillow's ``resample`` filter."""
    from PIL import Image

    flat = images.reshape(-1, *images.shape[-2:])
    out = np.stack([np.asarray(Image.fromarray(x).resize((size, size), resample)) for x in flat])
    return out.reshape(*images.shape[:-2], size, size)


def resize_bilinear(images: np.ndarray, size: int, chunk: int = 2048) -> np.ndarray:
    """uint8 [..., H, W] to size x size (antialiased bilinear, torch only)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    flat = images.reshape(-1, 1, *images.shape[-2:])
    out = np.empty((flat.shape[0], size, size), dtype=np.uint8)
    for start in range(0, flat.shape[0], chunk):
        x = torch.from_numpy(np.ascontiguousarray(flat[start : start + chunk])).float()
        y = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out[start : start + chunk] = y.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    return out.reshape(*images.shape[:-2], size, size)


def resize_binary(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [..., H, W] to 0/255 images of size x size: thresholded at 128, then Pillow's
    nearest neighbour (what Pillow does to the official Omniglot PNGs, 1-bit images, in the
    reference codes of MAML and Prototypical Networks). Polarity-symmetric."""
    from PIL import Image

    return resize_pillow(np.where(images >= 128, 255, 0).astype(np.uint8), size, Image.NEAREST)


RESIZERS = {"lanczos": resize_lanczos, "bilinear": resize_bilinear, "binary": resize_binary}


def check_resize(recipe: str) -> None:
    if recipe not in RESIZERS:
        raise ConfigError(f"data.resize={recipe!r} is unknown: choose one of {sorted(RESIZERS)}")


# ---- a user's images -----------------------------------------------------------------------
def split_images(images, channels: int = 1) -> list:
    """A sequence of images from what a user passes: a list (of paths, PIL images, arrays,
    tensors), or one batched array/tensor (numpy [n, H, W] / [n, H, W, C], torch [n, H, W] /
    [n, C, H, W]). A 3-D torch tensor is one image when its first axis is the model's
    channels (1, or 3-4 for a colour model), else a batch of grayscale images: pass a list
    to be unambiguous."""
    if isinstance(images, np.ndarray | torch.Tensor):
        if images.ndim == 4:
            return list(images)
        if images.ndim == 3 and not one_image(images, channels):
            return list(images)
        return [images]
    if isinstance(images, str | Path):
        return [images]
    return list(images)


def one_image(array, channels: int) -> bool:
    """Whether a 3-D array is one image (see ``split_images``)."""
    if isinstance(array, torch.Tensor):
        return array.shape[0] == 1 or (channels == 3 and array.shape[0] in (3, 4))
    return array.shape[-1] in (1, 3, 4)


# 16-bit and 32-bit grayscale (a scanner's or microscope's PNG/TIFF): scaled as arrays are
DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_pil(image, name: str):
    """A PIL image from a path, a PIL image, or an array/tensor (uint8 0..255, uint16
    0..65535, or float 0..1).

    A file is read the way image viewers show it: a camera stores a portrait photo sideways
    with an EXIF Orientation tag, which is applied here."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(image, str | Path):
        try:
            with Image.open(image) as im:
                im.load()
                image = ImageOps.exif_transpose(im)
        except FileNotFoundError as err:
            raise DataError(f"{image}: no such image file") from err
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise DataError(
                f"{image} is not an image Pillow can decode ({err}): remove it or convert it "
                "to PNG/JPEG"
            ) from err
    if isinstance(image, Image.Image):
        if image.mode not in DEEP_MODES:
            return image
        image = np.asarray(image)  # Pillow's convert("L") would clip these at 255
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = (image.permute(1, 2, 0) if image.ndim == 3 else image).numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise DataError(
            f"{name}: an array of shape {array.shape} is not an image ([H, W], [H, W, C] or "
            "torch [C, H, W] with 1, 3 or 4 channels)"
        )
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:  # 16-bit: 65535 is white
        array = np.round(array / 257.0).astype(np.uint8)
    if array.dtype != np.uint8:
        array = np.asarray(array, dtype=np.float64)
        if array.size and array.max() <= 1.0:
            array = array * 255.0
        array = np.clip(np.round(array), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def to_channels(im, channels: int):
    """``im`` as mode L (1 channel) or RGB (3); transparency becomes white paper."""
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(paper, rgba)
    return im.convert("L" if channels == 1 else "RGB")


def is_colour(im) -> bool:
    return im.mode not in ("1", "L", "LA", "I", "I;16", "F")


def decode(item, channels: int, name: str = "image", notes: set | None = None) -> np.ndarray:
    """One image (path, PIL image, array or tensor) as uint8 [channels, H, W] at its own size;
    transparency becomes white paper."""
    im = to_pil(item, name)
    if notes is not None and is_colour(im) != (channels == 3):
        kind = "colour" if is_colour(im) else "grayscale"
        notes.add(f"{kind} images converted to {'RGB' if channels == 3 else 'grayscale'}")
    array = np.asarray(to_channels(im, channels), dtype=np.uint8)
    return np.ascontiguousarray(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))


def convert(image: np.ndarray, spec: Preprocessing, invert: bool | None = None) -> np.ndarray:
    """A decoded uint8 [C, H, W] image at the model's size and polarity (uint8 [C, S, S])."""
    image = RESIZERS[spec.resize](image, spec.image_size)
    flip = spec.paper_white if invert is None else bool(invert)
    return 255 - image if flip else image


def prepare(
    images, spec: Preprocessing, invert: bool | None = None, notes: set | None = None
) -> torch.Tensor:
    """Images of any size and mode as model inputs: float32 [n, C, H, W].

    ``images`` (see ``split_images``) are taken as the training source's files hold them (e.g.
    Omniglot's: black strokes on white paper) and converted exactly as the source converts its
    files. ``invert`` overrides the source's polarity rule (True: invert, False: keep), for
    drawings made another way. ``notes`` collects what was converted (colour to grayscale, ...),
    so a caller can say it once.
    """
    items = split_images(images, spec.channels)
    if not items:
        raise DataError("no images given")
    out = [
        convert(decode(item, spec.channels, image_name(item, i), notes), spec, invert)
        for i, item in enumerate(items)
    ]
    x = torch.from_numpy(np.stack(out)).float().div_(255.0)
    if spec.mean is not None and spec.std is not None:
        x = normalise(x, (spec.mean, spec.std))
    elif notes is not None and spec.channels == 1 and x.mean() > 0.5:
        flip = spec.paper_white if invert is None else bool(invert)
        notes.add(
            f"the converted images are mostly ink (mean {float(x.mean()):.2f}; the model was "
            "trained on bright strokes on a dark background): if your drawings are dark on "
            f"light, pass invert={not flip}"
        )
    return x


def normalise(x: torch.Tensor, norm: tuple | None) -> torch.Tensor:
    """Images [..., C, H, W] in [0, 1] normalised per channel by ``norm`` = (mean, std); as
    they are when ``norm`` is None. The one normalisation of training data and user images."""
    if norm is None:
        return x
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in norm)
    return (x - mean) / std


def image_name(item, i: int) -> str:
    return str(item) if isinstance(item, str | Path) else f"image {i}"


def image_files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
