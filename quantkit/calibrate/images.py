"""A folder of images as calibration or evaluation data, decoded and preprocessed one batch at a
time (Pillow). Images in class subfolders (root/cat/1.png, root/dog/2.jpg) get labels: the index
of their folder in sorted order, for the accuracy report.

--preprocess takes comma-separated KEY=VALUE steps, applied in this order:
  resize=N        shorter side to N pixels (bilinear), or resize=HxW for an exact size
  crop=N          centre crop to N x N (or HxW)
  scale=X         multiply pixel values (0..255) by X; default 1/255
  mean=a/b/c      subtract per channel (after scale)
  std=a/b/c       divide per channel
  layout=nchw     or nhwc
  mode=RGB        or L (grayscale)
e.g. resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=nchw
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantkit.calibrate.data import LABELS, InputSpec
from quantkit.errors import ConfigError, InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True)
class Preprocess:
    resize: tuple[int, int] | int | None = None
    crop: tuple[int, int] | None = None
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "nchw"
    mode: str = "RGB"

    @classmethod
    def parse(cls, text: str | None) -> Preprocess:
        if not text:
            return cls()
        kw: dict = {}
        for part in text.split(","):
            if "=" not in part:
                raise ConfigError(f"--preprocess: {part!r} is not KEY=VALUE")
            key, value = (x.strip() for x in part.split("=", 1))
            try:
                if key == "resize":
                    kw[key] = _size(value) if "x" in value else int(value)
                elif key == "crop":
                    kw[key] = _size(value) if "x" in value else (int(value), int(value))
                elif key == "scale":
                    num, _, den = value.partition("/")
                    kw[key] = float(num) / float(den or 1)
                elif key in ("mean", "std"):
                    kw[key] = tuple(float(v) for v in value.split("/"))
                elif key == "layout" and value.lower() in ("nchw", "nhwc"):
                    kw[key] = value.lower()
                elif key == "mode" and value.upper() in ("RGB", "L"):
                    kw[key] = value.upper()
                else:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"--preprocess: bad value for {key!r}: {value!r}") from None
        return cls(**kw)

    def apply(self, img) -> np.ndarray:
        from PIL import Image

        bilinear = getattr(Image, "Resampling", Image).BILINEAR  # moved in Pillow 9.1
        img = img.convert(self.mode)
        if isinstance(self.resize, int):
            w, h = img.size
            f = self.resize / min(w, h)
            img = img.resize((max(1, round(w * f)), max(1, round(h * f))), bilinear)
        elif self.resize is not None:
            img = img.resize((self.resize[1], self.resize[0]), bilinear)
        if self.crop is not None:
            ch, cw = self.crop
            w, h = img.size
            if ch > h or cw > w:
                raise InputError(f"--preprocess crop {ch}x{cw} is larger than the {h}x{w} image; resize first")
            left, top = (w - cw) // 2, (h - ch) // 2
            img = img.crop((left, top, left + cw, top + ch))
        x = np.asarray(img, dtype=np.float32)
        if x.ndim == 2:
            x = x[:, :, None]
        x = x * np.float32(self.scale)
        if self.mean is not None:
            x = x - np.asarray(self.mean, np.float32)
        if self.std is not None:
            x = x / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1) if self.layout == "nchw" else x)


def _size(v: str) -> tuple[int, int]:
    h, w = v.lower().split("x")
    return int(h), int(w)


def is_image_data(path: Path) -> bool:
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() in IMAGE_SUFFIXES
    return path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*"))


class ImageSource:
    """Same interface as DataSource, for images: one input, float32, preprocessed."""

    def __init__(self, path: Path, inputs: list[InputSpec], preprocess: Preprocess):
        try:
            import PIL  # noqa: F401
        except ImportError:
            raise InputError("image data needs Pillow: pip install pillow") from None
        self.path = Path(path)
        if len(inputs) != 1:
            raise InputError(f"{path}: image folders feed single-input models; this one takes "
                             f"{', '.join(s.name for s in inputs)}")
        self.inputs, self.pre = inputs, preprocess
        files = [self.path] if self.path.is_file() else sorted(
            p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        classes = sorted({p.parent for p in files if p.parent != self.path})
        self.has_labels = bool(classes) and all(p.parent != self.path for p in files)
        self.files = [(p, classes.index(p.parent) if self.has_labels else -1) for p in files]
        self.extra_keys: list[str] = []
        self._check(self.load(self.files[0][0]))

    @property
    def samples(self) -> int:
        return len(self.files)

    def load(self, path: Path) -> np.ndarray:
        return load_image(path, self.pre)

    def _check(self, x: np.ndarray) -> None:
        spec = self.inputs[0]
        if spec.dtype != np.float32:
            raise InputError(f"images become float32 but input '{spec.name}' is {spec.dtype}")
        if spec.shape is not None:
            want = spec.shape[1:]
            if len(want) != x.ndim or any(w is not None and w != g for w, g in zip(want, x.shape)):
                raise InputError(f"{self.path}: preprocessed images are {x.shape} but input '{spec.name}' "
                                 f"expects {spec.describe()}; adjust --preprocess (resize/crop/layout)")

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        files = self.files[: limit if limit is not None else None]
        for i in range(0, len(files), batch_size):
            chunk = files[i : i + batch_size]
            out = {self.inputs[0].name: np.stack([self.load(p) for p, _ in chunk])}
            if self.has_labels:
                out[LABELS] = np.array([c for _, c in chunk], np.int64)
            yield out


def load_image(path: Path, preprocess: Preprocess) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return preprocess.apply(img)
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(f"{path} is not a readable image ({e})") from None


def image_spec(path: Path, name: str, preprocess: Preprocess) -> InputSpec:
    """The input signature images imply, for models that declare none (PyTorch)."""
    first = next(p for p in ([Path(path)] if Path(path).is_file() else sorted(Path(path).rglob("*")))
                 if p.suffix.lower() in IMAGE_SUFFIXES)
    return InputSpec(name, np.dtype(np.float32), (None, *load_image(first, preprocess).shape))
