"""README.md's examples, run: every ```python block, and every ``segany ...`` command line of the
```bash blocks (through :func:`segany.cli.main`), parsed out of README.md at test time.

What makes them runnable here (CPU, offline, no real weights), and nothing else:

- Model names. Before a Python block or a ``segany`` command runs, each official model name its
  text mentions (any registry alias: ``sam_b.pt``, ``mobile_sam.pt``, ``sam2.1_t.pt``, ...) is put
  into the weights cache (``$SEGANY_WEIGHTS_DIR``, a folder of the test) as a small random-weight
  checkpoint of that model's family, as a download would put the real file there. segany takes a
  file in the cache as it is (only downloads are checked for size and SHA-256), so the example text
  stays unchanged. Names are added as they are first mentioned, so ``segany benchmark`` (the
  checkpoints in the cache) sees what the commands before it would have downloaded.
  SAM ViT stand-ins take 256-pixel input (fast segment-everything); in the Export section they take
  the official 1024 pixels, because its ONNX example feeds 1024-pixel images and 256×256 mask inputs
  to the exported files. MobileSAM stand-ins are 1024 pixels anyway (TinyViT checkpoints do not
  record their size); SAM 2 ones are a custom size (segany warns that it assumes the head count).
- Placeholder files the examples name (``img.jpg``, ``a.jpg``, ``images/``, ``path/to/images``,
  ``path/to/coco.json``, ``path/to/dataset``, ``boxes.json``, ...) are created in the working
  directory by :func:`make_placeholders`; ``img.jpg`` and the images of ``images/`` are 768×1024,
  so that the README's prompt coordinates (up to x=900, y=709) fall on them.
- Order. Python blocks run in README order in one namespace and one working directory, as a reader
  pasting them into one session would: a block uses the ``model`` of an earlier one, the ONNX example
  reads the files the Export block wrote. The ``segany`` commands of one bash block run in order in
  one working directory (``segany val`` reads what ``segany train`` wrote); each block has its own.
  Selecting one case (``-k``) first runs what comes before it, once per test session.
- Not run: the statements and commands that the few rules of :data:`SKIPS` match, each rule with
  its reason; ``segany serve`` (it runs until stopped: ``segany serve --help`` is run instead);
  commands other than ``segany`` (``pip install``, ``pytest``, ``python -c``). ``segany export``
  runs with the ONNX exporter stubbed (see :data:`STUBBED_EXPORT`); the Python Export block runs
  the real one. Nothing is downloaded (a download is a test failure).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import warnings
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import pytest
import torch
from conftest import SMALL_VIT, random_sam, test_image

from segany.checkpoints import config_with
from segany.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ASSET = ROOT / "src" / "segany" / "assets" / "astronaut.jpg"

# (what a line or statement contains, why it cannot run here). A Python statement or a ``segany``
# command whose text contains the pattern is not run; keep this list short.
SKIPS = [
    ("det_model=", ("the detector is an Ultralytics YOLO model (yolo11x.pt): the ultralytics package is "
                    "not a dependency, and its weights would be downloaded")),
    ("compile=True", ("torch.compile builds C++ kernels on its first call on a CPU: ~30 s here for the "
                      "small stand-in (tests/test_compile.py checks that the encoders trace as one graph)")),
]
# ``segany serve`` runs until stopped: ``segany serve --help`` is run in its place.
SERVE_CHECK = ["serve", "--help"]
# ``segany export`` runs with the ONNX exporter itself (``segany.onnx_export._export``) replaced by
# one that writes an empty file where the real one would write: a real export takes ~6 s a part
# here. So the command's options, model and output names are checked; the exporter is run for real
# by the Python Export block (whose ONNX example then runs the files in onnxruntime), and
# tests/test_onnx_export.py runs `segany export` and MobileSAM's export in full.
STUBBED_EXPORT = {"export"}
# Sections whose SAM ViT stand-ins take the official 1024-pixel input (see the module docstring).
FULL_SIZE_SECTIONS = {"Export"}


# ------------------------------------------------------------------------------ README parsing

@dataclasses.dataclass(frozen=True)
class Block:
    lang: str
    number: int  # 1-based, among the blocks of this language
    line: int  # README line of the block's first code line
    text: str
    section: str  # the ``## `` heading above it


def readme_blocks(lang: str) -> list[Block]:
    blocks, section, fence, start, body = [], "", None, 0, []
    for i, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        if fence is None:
            if line.startswith("## "):
                section = line[3:].strip()
            elif line.startswith("```"):
                fence, start, body = line[3:].strip(), i + 1, []
        elif line.startswith("```"):
            if fence == lang:
                blocks.append(Block(lang, sum(b.lang == lang for b in blocks) + 1, start, "\n".join(body), section))
            fence = None
        else:
            body.append(line)
    assert fence is None, "README.md has an unclosed code fence"
    return blocks


@dataclasses.dataclass(frozen=True)
class Command:
    block: Block
    index: int  # 0-based, among the block's segany commands
    line: int
    text: str  # the line as written (comment included)
    argv: tuple[str, ...]  # after "segany"


def readme_commands() -> list[Command]:
    """The ``segany ...`` commands of the bash blocks; a line is split at ``&&`` and ``;``, and
    other commands on it (``pip install ...``) are left out."""
    out = []
    for block in readme_blocks("bash"):
        lines = block.text.split("\n")
        i, n = 0, 0
        while i < len(lines):
            first, text = i, lines[i]
            while text.endswith("\\") and i + 1 < len(lines):  # a continued line
                i += 1
                text = text[:-1] + " " + lines[i]
            i += 1
            lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split, lexer.commenters = True, "#"
            part: list[str] = []
            for tok in [*lexer, "&&"]:
                if tok in ("&&", ";", "||", "|", "&"):
                    if part and part[0] == "segany":
                        out.append(Command(block, n, block.line + first, text, tuple(part[1:])))
                        n += 1
                    part = []
                else:
                    part.append(tok)
    return out


def case_id(block: Block, line: int | None = None) -> str:
    return f"{block.lang}-block-{block.number}-line-{block.line if line is None else line}"


def skip_reason(text: str) -> str | None:
    return next((f"{pattern}: {why}" for pattern, why in SKIPS if pattern in text), None)


# ------------------------------------------------------------------------------ stand-in checkpoints

# A small decoder: segment-everything decodes 1024 prompts, and its cost is the decoder's.
SMALL_DECODER = dict(prompt_embed_dim=32, mask_in_chans=4, decoder_mlp_dim=64, iou_head_hidden_dim=32)


def _small(config, **encoder):
    config = config_with(config, **encoder)
    return dataclasses.replace(config, params={**config.params, **SMALL_DECODER})


STAND_INS = {  # (family, full size?) → the config of the random-weight stand-in
    ("sam_vit", False): _small(SMALL_VIT),
    ("sam_vit", True): _small(MODELS["sam_b"], embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,)),
    ("mobile_sam", False): _small(MODELS["mobile_sam"], embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1),
                                  num_heads=(1, 1, 1, 2)),
    ("sam2", False): config_with(MODELS["sam2.1_t"], img_size=256, embed_dim=32, num_heads=1, stages=(1, 1, 2, 1),
                                 global_att_blocks=(3,)),
}
STAND_INS[("mobile_sam", True)] = STAND_INS[("mobile_sam", False)]
STAND_INS[("sam2", True)] = STAND_INS[("sam2", False)]

# Every name a user may type for an official model that would be downloaded, longest first.
MODEL_NAMES = sorted(((alias, cfg) for cfg in MODELS.values() if cfg.weights is not None for alias in cfg.aliases),
                     key=lambda item: -len(item[0]))


def mentioned_models(text: str):
    """(name, config) of each official model name in ``text`` (``sam_b.pt``, not ``sam_b_finetuned.pt``)."""
    return [(alias, cfg) for alias, cfg in MODEL_NAMES
            if re.search(rf"(?<![\w.\-/]){re.escape(alias)}(?![\w.\-])", text)]


def stand_in_file(family: str, full_size: bool, folder: Path) -> Path:
    """A random-weight checkpoint for ``family`` in ``folder`` (written once)."""
    path = folder / f"{family}-{'1024' if full_size else 'small'}.pt"
    if not path.is_file():
        torch.save(random_sam(STAND_INS[(family, full_size)], seed=1).state_dict(), path)
    return path


# ------------------------------------------------------------------------------ placeholder files

def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image)


def make_placeholders(root: Path) -> None:
    """The files and folders the README's examples name, in a fresh working directory."""
    from segany.data.synthetic import write_synthetic

    big = dict(h=768, w=1024)  # the README's prompts reach x=900, y=709
    _write(root / "img.jpg", test_image(**big))
    for k, name in enumerate(("a.jpg", "b.jpg", "c.jpg")):
        _write(root / name, test_image(seed=k + 1))
    for k in range(2):
        _write(root / "images" / f"im{k}.jpg", test_image(**big, seed=k + 4))
    _write(root / "src/segany/assets/astronaut.jpg", cv2.imread(str(ASSET)))  # the Quick start's path
    # A COCO dataset at path/to/coco.json (its images in path/to/images, where the auto-annotation
    # examples take theirs), and another one at path/to/dataset.
    data = write_synthetic(root / "path/to", n=2, seed=0, size=256, format="coco")
    coco = json.loads((data / "annotations.json").read_text())
    (data / "annotations.json").rename(data / "coco.json")
    write_synthetic(root / "path/to/dataset", n=2, seed=1, size=256, format="coco")
    # Box labels for path/to/images: YOLO detection labels, and a COCO JSON of boxes.
    labels = root / "path/to/yolo_box_labels"
    labels.mkdir(parents=True)
    for im in coco["images"]:
        (labels / (Path(im["file_name"]).stem + ".txt")).write_text("0 0.5 0.5 0.5 0.5\n1 0.3 0.3 0.2 0.2\n")
    boxes = dict(images=coco["images"], categories=[dict(id=1, name="thing"), dict(id=2, name="other")],
                 annotations=[dict(id=i + 1, image_id=a["image_id"], category_id=1 + i % 2, bbox=a["bbox"],
                                   iscrowd=0) for i, a in enumerate(coco["annotations"])])
    (root / "boxes.json").write_text(json.dumps(boxes))


# ------------------------------------------------------------------------------ running

OUTCOMES = (pytest.fail.Exception,)  # not an Exception


def _no_download(url, dest, *args, **kwargs):
    raise AssertionError(f"a README example would download {url}: give its model a stand-in (STAND_INS)")


class Session:
    """A working directory with its placeholders and weights caches, and what ran there."""

    def __init__(self, root: Path, ckpt_folder: Path) -> None:
        self.root, self.ckpt_folder = root, ckpt_folder
        make_placeholders(root)
        self.namespace: dict = {"__name__": "__readme__"}
        self.done: dict[str, BaseException | None] = {}  # case id → its error, None if it passed

    def cache(self, full_size: bool) -> Path:
        return self.root / ("weights-1024" if full_size else "weights")

    @contextlib.contextmanager
    def entered(self, text: str, full_size: bool):
        """cwd = the working directory, ``$SEGANY_WEIGHTS_DIR`` = the cache, holding the models ``text`` names."""
        cache = self.cache(full_size)
        cache.mkdir(exist_ok=True)
        for alias, cfg in mentioned_models(text):
            if not (cache / alias).is_file():
                shutil.copyfile(stand_in_file(cfg.family, full_size, self.ckpt_folder), cache / alias)
        old_cwd, old_env = os.getcwd(), os.environ.get("SEGANY_WEIGHTS_DIR")
        os.chdir(self.root)
        os.environ["SEGANY_WEIGHTS_DIR"] = str(cache)
        try:
            with mock.patch("segany.hub.download_file", _no_download):
                yield
        finally:
            os.chdir(old_cwd)
            if old_env is None:
                os.environ.pop("SEGANY_WEIGHTS_DIR", None)
            else:
                os.environ["SEGANY_WEIGHTS_DIR"] = old_env

    def run_once(self, key: str, fn) -> None:
        """Run ``fn`` once in this session; a later call raises the error it raised."""
        if key not in self.done:
            try:
                fn()
                self.done[key] = None
            except (Exception, *OUTCOMES) as e:  # a pytest.fail is kept too
                self.done[key] = e
        if self.done[key] is not None:
            raise self.done[key]


def compiled_block(block: Block):
    """The block's code compiled with README line numbers, the statements that :data:`SKIPS` name
    left out; and what was left out."""
    tree = ast.parse(block.text, filename=str(README))
    lines = block.text.split("\n")
    kept, skipped = [], []
    for stmt in tree.body:
        source = "\n".join(lines[stmt.lineno - 1:stmt.end_lineno])
        reason = skip_reason(source)
        if reason:
            skipped.append(f"README line {block.line + stmt.lineno - 1}: {reason}")
        else:
            kept.append(stmt)
    tree.body = kept
    ast.increment_lineno(tree, block.line - 1)
    return compile(tree, str(README), "exec"), skipped


def onnx_files_named(text: str) -> list[str]:
    """``.onnx`` files that the comments of ``text`` say the code writes (``a_{b,c}.onnx`` expanded)."""
    names = []
    for comment in re.findall(r"#(.*)", text):
        for name in re.findall(r"[\w./{},-]*\.onnx", comment):
            m = re.fullmatch(r"(.*)\{(.*)\}(.*)", name)
            names += [m[1] + part + m[3] for part in m[2].split(",")] if m else [name]
    return names


PY_BLOCKS = readme_blocks("python")
ALL_COMMANDS = readme_commands()
# The commands run; those a rule of SKIPS names get no test case (a skipped case proves nothing).
COMMANDS = [c for c in ALL_COMMANDS if not skip_reason(c.text)]


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """Sessions by name ("python", or a bash block's id), made on first use."""
    folder = tmp_path_factory.mktemp("readme-checkpoints")
    made: dict[str, Session] = {}

    def get(name: str) -> Session:
        if name not in made:
            made[name] = Session(tmp_path_factory.mktemp(f"readme-{name}"), folder)
        return made[name]

    return get


def run_python_block(session: Session, block: Block) -> list[str]:
    code, skipped = compiled_block(block)
    with session.entered(block.text, block.section in FULL_SIZE_SECTIONS):
        exec(code, session.namespace)
    missing = [n for n in onnx_files_named(block.text) if not (session.root / n).is_file()]
    assert not missing, f"the block's comments name {missing}, which it did not write"
    return skipped


@pytest.mark.parametrize("block", PY_BLOCKS, ids=[case_id(b) for b in PY_BLOCKS])
def test_python_block(block, sessions, one_thread):
    session = sessions("python")
    for earlier in PY_BLOCKS[:PY_BLOCKS.index(block)]:  # once per session: see the module docstring
        with contextlib.suppress(Exception, *OUTCOMES):  # its own case reports it
            session.run_once(case_id(earlier), lambda b=earlier: run_python_block(session, b))
    failed = [k for k, e in session.done.items() if e is not None]
    skipped: list[str] = []

    def run():
        skipped.extend(run_python_block(session, block))

    try:
        session.run_once(case_id(block), run)
    except Exception as e:
        if failed:
            raise AssertionError(f"{case_id(block)} failed after earlier blocks failed ({', '.join(failed)}): "
                                 f"{type(e).__name__}: {e}") from e
        raise
    for note in skipped:
        warnings.warn(f"not run: {note}", stacklevel=1)


def _empty_onnx_file(module, args, path: Path, *rest) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def run_command(session: Session, cmd: Command, capsys) -> None:
    from segany.cli import main

    argv = SERVE_CHECK if cmd.argv[:1] == ("serve",) else list(cmd.argv)
    with contextlib.ExitStack() as stack:
        stack.enter_context(session.entered(cmd.text, cmd.block.section in FULL_SIZE_SECTIONS))
        if argv[0] in STUBBED_EXPORT:
            stack.enter_context(mock.patch("segany.onnx_export._export", _empty_onnx_file))
        status = main(argv)
    err = capsys.readouterr().err
    assert status == 0, f"segany {shlex.join(argv)} exited with {status}:\n{err[-3000:]}"
    missing = [n for n in onnx_files_named(cmd.text) if not (session.root / n).is_file()]
    assert not missing, f"the command's comment names {missing}, which it did not write"


@pytest.mark.parametrize("cmd", COMMANDS, ids=[case_id(c.block, c.line) + f"-{c.argv[0]}" for c in COMMANDS])
def test_segany_command(cmd, sessions, capsys, one_thread):
    session = sessions(case_id(cmd.block))
    for earlier in COMMANDS[:COMMANDS.index(cmd)]:
        if earlier.block == cmd.block:
            with contextlib.suppress(Exception, *OUTCOMES):  # its own case reports it
                session.run_once(str(earlier.index), lambda c=earlier: run_command(session, c, capsys))
    session.run_once(str(cmd.index), lambda: run_command(session, cmd, capsys))


# ------------------------------------------------------------------------------ the harness itself

def test_readme_has_examples_and_every_block_parses():
    assert len(PY_BLOCKS) >= 5 and len(COMMANDS) >= 5
    for block in PY_BLOCKS:
        ast.parse(block.text)  # a syntax error names its README line through the case id
    # Every command is one the CLI knows (the test cases run them; this catches a typo in one not run).
    from segany.cli import COMMANDS as KNOWN

    assert {c.argv[0] for c in ALL_COMMANDS} <= set(KNOWN)


@pytest.mark.parametrize("family", ["sam_vit", "mobile_sam", "sam2"])
def test_stand_in_checkpoints_load_as_their_family(family, tmp_path, monkeypatch):
    from segany import SAM

    name = {"sam_vit": "sam_b.pt", "mobile_sam": "mobile_sam.pt", "sam2": "sam2.1_t.pt"}[family]
    assert [cfg.family for _, cfg in mentioned_models(f'SAM("{name}")')] == [family]
    monkeypatch.setenv("SEGANY_WEIGHTS_DIR", str(tmp_path))
    shutil.copyfile(stand_in_file(family, False, tmp_path), tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SAM 2: the custom size's assumed head count
        model = SAM(name)
    assert model.config.family == family and Path(model.ckpt_path) == tmp_path / name


def test_model_names_in_text():
    names = lambda text: [a for a, _ in mentioned_models(text)]
    assert names('SAM("sam_b.pt"); model.save("sam_b_finetuned.pt")') == ["sam_b.pt"]
    assert names("model=mobile_sam.pt file=out/mobile_sam") == ["mobile_sam.pt"]
    assert names("model=runs/train/exp/best.pt") == []
    assert onnx_files_named("x  # out/m_{encoder,decoder}.onnx, b.onnx") == ["out/m_encoder.onnx",
                                                                             "out/m_decoder.onnx", "b.onnx"]
