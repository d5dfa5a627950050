"""The ``segany`` command line, run as a real subprocess (console script, or ``python -m segany``).

Every subprocess imports torch (~2 s), so independent commands run concurrently where they can.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from conftest import test_image

# pycocotools' decode under numpy 2 warns about __array__(copy=...); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SCRIPT = shutil.which("segany")
BASE = [SCRIPT] if SCRIPT else [sys.executable, "-m", "segany"]


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None, base: list[str] | None = None
        ) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "SEGANY_DEBUG"}
    full_env["SEGANY_WEIGHTS_DIR"] = str(cwd / "weights-cache")
    full_env.update(env or {})
    return subprocess.run([*(base or BASE), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=300)


def run_many(cases: list, cwd: Path, **kw) -> list[subprocess.CompletedProcess]:
    """Run commands concurrently; a case is an argument list, or (arguments, base command)."""
    def one(case):
        args, base = case if isinstance(case, tuple) else (case, None)
        return run(args, cwd, base=base, **kw)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, cases))


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


def one_line_error(p: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == code, f"exit {p.returncode}, expected {code}\nstderr:\n{p.stderr}"
    assert "Traceback" not in p.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{p.stderr}"
    assert lines[0].startswith("segany: error: ")
    for frag in fragments:
        assert frag in lines[0], f"{frag!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "img.jpg"
    cv2.imwrite(str(path), test_image(180, 240))
    return path


def load_coco(path: Path) -> dict:
    data = json.loads(path.read_text())
    h, w = data["image"]["height"], data["image"]["width"]
    for ann in data["annotations"]:
        m = mask_utils.decode(ann["segmentation"])
        assert m.shape == (h, w)
        assert int(m.sum()) == ann["area"]
    return data


# ----------------------------------------------------------------------------------- predict


def test_predict_box_and_mask_prompt_writes_outputs(small_ckpt, tmp_path, image):
    mask = np.zeros((180, 240), np.uint8)
    mask[40:90, 60:120] = 255
    cv2.imwrite(str(tmp_path / "mask.png"), mask)
    p = ok(run(["predict", f"model={small_ckpt}", "source=img.jpg", "bboxes=[60,45,120,90]", "masks=mask.png",
                "save_txt=True"], tmp_path))
    assert "image 1/1 img.jpg: " in p.stdout and "1 mask," in p.stdout
    out = tmp_path / "runs" / "segment" / "predict"
    assert f"Results saved to {Path('runs/segment/predict')}" in p.stdout
    plotted = cv2.imread(str(out / "img.jpg"))
    assert plotted is not None and plotted.shape == (180, 240, 3)
    data = load_coco(out / "img.json")
    assert (data["image"]["height"], data["image"]["width"]) == (180, 240)
    assert len(data["annotations"]) == 1 and data["annotations"][0]["segmentation"]["size"] == [180, 240]
    assert (out / "labels" / "img.txt").is_file()


def test_predict_dash_dash_form_points_and_run_numbering(small_ckpt, tmp_path, image):
    (tmp_path / "runs" / "segment" / "predict").mkdir(parents=True)  # an earlier run: this one is predict2
    p = ok(run(["predict", "--model", small_ckpt, "--source", str(image), "--points", "[[60,50],", "[180,120]]",
                "--labels", "[1,1]", "--multimask-output", "--save-txt", "--save_conf", "true"], tmp_path))
    assert "6 masks" in p.stdout  # 2 points x 3 candidates; the shell-split list was joined back
    out = tmp_path / "runs" / "segment" / "predict2"
    assert len(load_coco(out / "img.json")["annotations"]) == 6
    lines = (out / "labels" / "img.txt").read_text().splitlines()
    assert lines and all(len(line.split()) % 2 == 0 for line in lines)  # cls, pairs, conf


def test_predict_directory_source_lines_and_named_run(small_ckpt, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (h, w) in enumerate([(180, 240), (200, 150), (120, 120)]):
        cv2.imwrite(str(folder / f"im{i}.png"), test_image(h, w, seed=i))
    (folder / "notes.txt").write_text("not an image")
    p = ok(run(["predict", f"model={small_ckpt}", "source=images", "bboxes=[10,10,100,100]", "project=out",
                "name=boxes"], tmp_path))
    for i in range(3):
        assert f"image {i + 1}/3 im{i}.png: " in p.stdout
    assert "Results saved to" in p.stdout and str(Path("out/boxes")) in p.stdout
    out = tmp_path / "out" / "boxes"
    assert sorted(f.name for f in out.glob("*.json")) == ["im0.json", "im1.json", "im2.json"]
    assert load_coco(out / "im1.json")["image"]["height"] == 200

    # An unreadable file in the folder is skipped and reported; the others are written; exit 1.
    (folder / "im1.png").write_bytes(b"truncated")
    p = run(["predict", f"model={small_ckpt}", "source=images", "bboxes=[10,10,100,100]", "project=out",
             "name=skip"], tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "segany: warning: skipped, unreadable: " in p.stderr and "im1.png is not a readable image" in p.stderr
    assert "1 file(s) could not be read and were skipped" in p.stderr
    assert "image 2/2 im2.png: " in p.stdout  # the skipped file is taken off the count
    assert sorted(f.name for f in (tmp_path / "out" / "skip").glob("*.json")) == ["im0.json", "im2.json"]


def test_predict_segment_everything(small_ckpt, tmp_path, image):
    p = ok(run(["predict", f"model={small_ckpt}", "source=img.jpg", "points_per_side=4", "conf_thres=0",
                "stability_score_thresh=0", "conf=0", "use_m2m=True"], tmp_path))
    assert "image 1/1 img.jpg: " in p.stdout
    anns = load_coco(tmp_path / "runs" / "segment" / "predict" / "img.json")["annotations"]
    assert anns, "thresholds at 0 keep at least one mask"
    assert {"predicted_iou", "stability_score", "point_coords", "crop_box"} <= set(anns[0])


# ---------------------------------------------------------------------------- info, benchmark


def test_info_and_benchmark(small_ckpt, tmp_path):
    cache = tmp_path / "weights-cache"
    cache.mkdir()
    shutil.copy(small_ckpt, cache / "mobile_sam.pt")  # found in the cache under a registry alias
    info, bench_json, bench_table, bench_none = run_many([
        ["info", f"model={small_ckpt}", "detailed=True"],
        ["benchmark", f"model=[{small_ckpt},missing_model.pt]", "format=json", "runs=1", "warmup=0",
         "everything=False"],  # a list in brackets, as bboxes= takes them (or comma-separated without)
        ["benchmark", "runs=1", "warmup=0", "everything=False", "device=cpu"],
        ["benchmark", "model=missing_model.pt", "runs=1"],  # the models named: none could be timed
    ], tmp_path)
    assert bench_none.returncode == 1 and "none of the models given could be timed" in bench_none.stderr
    assert "missing_model.pt: not found locally" in bench_none.stdout
    out = ok(info).stdout
    assert "summary:" in out and "4,940,144 parameters" in out and "GFLOPs" in out and "MB" in out
    assert "image_encoder" in out  # the detailed table

    rows = json.loads(ok(bench_json).stdout)
    assert [r["status"] for r in rows] == ["ok", "skipped"]
    assert rows[0]["size_mb"] > 1 and abs(rows[0]["params_m"] - 4.940144) < 1e-6
    assert rows[0]["encoder_ms"] > 0 and rows[0]["prompt_ms"] > 0 and rows[0]["everything_ms"] is None
    assert "not found locally" in rows[1]["reason"] and rows[1]["model"] == "missing_model.pt"

    table = ok(bench_table).stdout
    assert "size (MB)" in table and "params (M)" in table and "encoder (ms/im)" in table
    timed = [line for line in table.splitlines() if line.startswith("mobile_sam ")]
    assert len(timed) == 1 and "4.94" in timed[0]
    assert "skipped:" in table and "sam_b: not found locally" in table


# ------------------------------------------------------------------------------ version, help


def test_version_and_help(tmp_path):
    from segany import __version__

    version, top, predict = run_many(
        [["--version"], (["--help"], [sys.executable, "-m", "segany"]), ["predict", "--help"]], tmp_path)
    assert ok(version).stdout.startswith(f"segany {__version__}")
    for word in ("predict", "info", "benchmark", "annotate", "exit status"):
        assert word in ok(top).stdout
    for word in ("bboxes", "points", "labels", "masks", "multimask_output", "points_stride", "pred_iou_thresh",
                 "save_txt", "project"):
        assert word in ok(predict).stdout


# -------------------------------------------------------------------------------- bad usage

BAD_USAGE = {
    "unknown command": (["predcit"], ["unknown command 'predcit'", "Did you mean 'predict'?"]),
    "unknown key": (["predict", "modle=x"], ["unknown option 'modle'", "Did you mean 'model'?"]),
    # an unknown --key with no value after it: the name is what is wrong
    "unknown --key": (["info", "--detials"], ["unknown option 'detials'", "Did you mean 'detailed'?"]),
    "malformed list": (["predict", "source=img.jpg", "bboxes=[439,437,524"], ["bboxes=", "malformed list"]),
    "labels without points": (["predict", "source=img.jpg", "labels=[1]"], ["labels were given without points"]),
    "missing source": (["predict", "source=nope.jpg", "bboxes=[1,1,5,5]"], ["not found", "nope.jpg"]),
    "empty directory": (["predict", "source=empty", "bboxes=[1,1,5,5]"], ["holds no image files"]),
    "unwritable output": (["predict", "source=img.jpg", "bboxes=[1,1,5,5]", "project=img.jpg"],
                          ["cannot write results", "not a folder"]),
    "checkpoint not found": (["predict", "model=missing_model.pt", "source=img.jpg", "bboxes=[1,1,5,5]"],
                             ["missing_model.pt", "not found"]),
    "bad value": (["predict", "imgsz=abc"], ["imgsz='abc'", "expected an integer"]),
    "bad format": (["benchmark", "format=xml"], ["format=xml", "table, json or csv"]),
    "value missing": (["predict", "--bboxes", "--save"], ["--bboxes needs a value"]),
    "empty value": (["predict", "source="], ["source= has no value"]),
    "benchmark of a folder": (["benchmark", "source=imgs", "runs=1"], ["source=imgs", "one image"]),
    # the value "help" of a --key is a value (a model, a run folder), not a request for the help
    "help as a value": (["info", "--model", "help"], ["Checkpoint 'help' not found"]),
    "option under both names": (["predict", "points_per_side=4", "points_stride=4"],
                                ["'points_stride' is given twice (as 'points_per_side' and 'points_stride')"]),
    "option name without value": (["info", "model"], ["'model' needs a value: model=VALUE or --model VALUE"]),
    "stray word": (["predict", "yes"], ["unexpected argument 'yes'", "source=yes"]),
    "stray word, no source option": (["info", "yes"], ["unexpected argument 'yes'"]),
}


@pytest.fixture(scope="module")
def bad_usage_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("bad")
    cv2.imwrite(str(cwd / "img.jpg"), test_image(60, 80))
    (cwd / "empty").mkdir()
    (cwd / "empty" / "readme.txt").write_text("no images here")
    (cwd / "imgs").mkdir()
    cv2.imwrite(str(cwd / "imgs" / "a.jpg"), test_image(60, 80))
    names = list(BAD_USAGE)
    return dict(zip(names, run_many([BAD_USAGE[n][0] for n in names], cwd)))


@pytest.mark.parametrize("case", list(BAD_USAGE))
def test_bad_usage_exits_2_with_one_line(case, bad_usage_runs):
    one_line_error(bad_usage_runs[case], 2, *BAD_USAGE[case][1])
    if case == "stray word, no source option":
        assert "source=" not in bad_usage_runs[case].stderr  # info has no source option


def test_failed_predict_leaves_no_run_folder(tmp_path, image, small_ckpt):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    base = ["predict", f"model={small_ckpt}", "project=out"]
    (tmp_path / "all_bad").mkdir()
    for name in ("a.jpg", "b.png", "c.mp4"):
        (tmp_path / "all_bad" / name).write_bytes(b"not an image")
    bad_box, outside, unreadable, folder = run_many([[*base, "source=img.jpg", "bboxes=[1,2,3]"],
                                                     [*base, "source=img.jpg", "bboxes=[-9,-9,0,0]"],
                                                     [*base, "source=bad.jpg", "bboxes=[1,1,5,5]"],
                                                     [*base, "source=all_bad/*", "bboxes=[1,1,5,5]"]], tmp_path)
    one_line_error(bad_box, 2, "bboxes must be")
    one_line_error(outside, 2, "lies outside")
    one_line_error(unreadable, 1, "bad.jpg is not a readable image")
    assert "BytesIO" not in unreadable.stderr
    # a folder of unreadable images: each reported, no speed of nothing ("0.0ms per image")
    assert folder.returncode == 1 and folder.stderr.count("skipped, unreadable") == 3
    assert "moov atom" not in folder.stderr  # FFmpeg's own line for the broken video: the warning says it
    assert "Speed: no image was segmented" in folder.stdout and "0.0ms" not in folder.stdout
    assert not (tmp_path / "out").exists()


def test_names_that_look_like_numbers_stay_as_typed(small_ckpt, tmp_path):
    """A folder "0123" is not the number 123, a run "007" not 7 (nor a folder "1e3" the float 1000.0)."""
    for folder in ("0123", "1e3"):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "a.png"), test_image(60, 80))
    runs = run_many([["predict", f"model={small_ckpt}", "source=0123", "bboxes=[5,5,40,40]", "name=007"],
                     ["predict", f"model={small_ckpt}", "source=1e3", "bboxes=[5,5,40,40]", "project=1e3/out"]],
                    tmp_path)
    for p in runs:
        ok(p)
    assert (tmp_path / "runs" / "segment" / "007" / "a.json").is_file()
    assert (tmp_path / "1e3" / "out" / "predict" / "a.json").is_file()


def test_a_run_that_writes_nothing_says_so(small_ckpt, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    p = run(["predict", f"model={small_ckpt}", "source=bad", "bboxes=[1,1,5,5]"], tmp_path)
    assert p.returncode == 1 and "Nothing written" in p.stdout and "Results saved" not in p.stdout
    assert not (tmp_path / "runs").exists()


def test_runtime_failure_exits_1_and_verbose_shows_traceback(tmp_path, image):
    (tmp_path / "broken.pt").write_bytes(b"this is not a checkpoint")
    args = ["predict", "model=broken.pt", "source=img.jpg", "bboxes=[1,1,5,5]"]
    plain, verbose, env_debug = run_many([args, [*args, "--verbose"]], tmp_path) + [
        run(args, tmp_path, env={"SEGANY_DEBUG": "1"})]
    one_line_error(plain, 1, "broken.pt")
    for p in (verbose, env_debug):
        assert p.returncode == 1 and "Traceback" in p.stderr and "segany: error:" in p.stderr


def test_in_process_runs_each_show_their_warnings(small_ckpt, tmp_path, image, capsys, monkeypatch):
    from segany.cli import main

    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # the second run in the same process warns again
        assert main(["predict", f"model={small_ckpt}", f"source={image}", "bboxes=[-20,10,100,100]",
                     "save=False"]) == 0
        assert "segany: warning: bboxes extend past" in capsys.readouterr().err


def test_name_options_parse_as_typed_but_lists_and_words_still_parse():
    from segany.cli import parse_options
    from segany.errors import ConfigError

    valid = dict(source=None, name=None, class_names=None, save_json="")
    got = parse_options(["source=[1].jpg", "name=007", 'class_names=["person","car"]'], valid)
    assert got == dict(source="[1].jpg", name="007", class_names=["person", "car"])
    with pytest.raises(ConfigError, match="save_json=True: expected a single value"):
        parse_options(["save_json=True"], valid)  # a word, refused by the type check, as before


def test_device_empty_as_a_shell_passes_it_is_the_default():
    from segany.cli import parse_options

    # --help shows device's default as '': typed as device='' the shell hands over "device="
    assert parse_options(["device="], dict(device="")) == dict(device="")
    assert parse_options(["--device", ""], dict(device="")) == dict(device="")


def _clip(path: Path, frames: int, fps: float = 12.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (240, 180))
    assert writer.isOpened(), "this OpenCV build cannot write mp4v"
    for i in range(frames):
        writer.write(np.roll(test_image(), 8 * i, axis=1))
    writer.release()
    return path


def test_a_video_source_is_saved_as_one_annotated_video(small_ckpt, tmp_path):
    """As Ultralytics writes it: clip.mp4 holds the annotated frames (at the source's rate over
    vid_stride); the masks' JSON and labels stay per frame; an image after it is saved as before."""
    from segany import SAM

    clip = _clip(tmp_path / "clip.mp4", 6)
    cv2.imwrite(str(tmp_path / "still.png"), test_image())
    results = SAM(small_ckpt)([str(clip), str(tmp_path / "still.png")], bboxes=[60, 45, 120, 90], save=True,
                              save_txt=True, vid_stride=2, project=str(tmp_path / "runs"), name="v")
    assert [Path(r.path).name for r in results] == ["clip.mp4:frame_0", "clip.mp4:frame_2", "clip.mp4:frame_4",
                                                     "still.png"]
    out = tmp_path / "runs" / "v"
    assert sorted(p.name for p in out.iterdir()) == ["clip.mp4", "clip_frame_0.json", "clip_frame_2.json",
                                                      "clip_frame_4.json", "labels", "still.json", "still.png"]
    video = cv2.VideoCapture(str(out / "clip.mp4"))
    frames = []
    while (got := video.read())[0]:
        frames.append(got[1])
    assert len(frames) == 3 and frames[0].shape == (180, 240, 3)
    assert video.get(cv2.CAP_PROP_FPS) == pytest.approx(6.0)
    # the frames are the plots, not the raw frames (mp4v is lossy: compared by distance)
    def distance(a, b):
        return np.abs(a.astype(int) - b.astype(int)).mean()

    assert distance(frames[1], results[1].plot()) < distance(frames[1], results[1].orig_img) / 2
    assert len(list((out / "labels").iterdir())) == 4


def test_cli_predict_on_a_video_writes_the_video(small_ckpt, tmp_path):
    _clip(tmp_path / "clip.mp4", 3)
    p = ok(run(["predict", f"model={small_ckpt}", "source=clip.mp4", "bboxes=[60,45,120,90]"], tmp_path))
    out = tmp_path / "runs" / "segment" / "predict"
    assert "images, videos and mask JSON" in p.stdout
    assert cv2.VideoCapture(str(out / "clip.mp4")).get(cv2.CAP_PROP_FRAME_COUNT) == 3
    assert not list(out.glob(".*"))  # no temporary file left


def _frames_written(tmp_path: Path, paths: list[str], name: str, **kw) -> Path:
    """``paths`` (video frame names ``clip.mp4:frame_N`` and image names) through a RunWriter,
    as a prediction would hand their results to it; returns the run folder."""
    from segany.engine.results import Results
    from segany.engine.saving import RunWriter

    img = test_image()[:48, :64]
    writer = RunWriter(str(tmp_path / "runs"), name, **kw)
    list(writer.passing(Results(img, p, np.zeros((1, 48, 64), bool)) for p in paths))
    return tmp_path / "runs" / name


def _frame_counts(out: Path) -> dict[str, int]:
    return {p.name: int(cv2.VideoCapture(str(p)).get(cv2.CAP_PROP_FRAME_COUNT)) for p in out.glob("*.mp4")}


def test_the_same_video_twice_in_a_run_is_saved_as_two_videos(tmp_path):
    # source=["clip.mp4", "clip.mp4"]: the second pass restarts at frame 0, so it is a video of its own
    v = str(tmp_path / "clip.mp4")
    out = _frames_written(tmp_path, [f"{v}:frame_0", f"{v}:frame_1", f"{v}:frame_0", f"{v}:frame_1"], "twice")
    assert _frame_counts(out) == {"clip.mp4": 2, "clip_2.mp4": 2}
    # each video's frames are named after it: clip_2.mp4's JSON is clip_2_frame_N.json
    assert sorted(p.name for p in out.glob("*.json")) == ["clip_2_frame_0.json", "clip_2_frame_1.json",
                                                           "clip_frame_0.json", "clip_frame_1.json"]
    # so are the labels when no video is saved (save_txt only)
    out = _frames_written(tmp_path, [f"{v}:frame_0", f"{v}:frame_0"], "labels_only", save=False, save_txt=True)
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["clip_2_frame_0.txt", "clip_frame_0.txt"]
    assert not list(out.glob("*.mp4"))


def test_an_image_of_a_videos_stem_keeps_its_name(tmp_path):
    # clip.mp4 and clip.jpg are different files: neither is renamed for the other (as before videos,
    # and as in Ultralytics); only another video of that stem is numbered
    v, still = str(tmp_path / "clip.mp4"), str(tmp_path / "clip.jpg")
    out = _frames_written(tmp_path, [f"{v}:frame_0", still, f"{v}:frame_0"], "video_first")
    assert sorted(p.name for p in out.iterdir()) == ["clip.jpg", "clip.json", "clip.mp4", "clip_2.mp4",
                                                      "clip_2_frame_0.json", "clip_frame_0.json"]
    out = _frames_written(tmp_path, [still, f"{v}:frame_0"], "image_first")
    assert sorted(p.name for p in out.glob("clip*.*")) == ["clip.jpg", "clip.json", "clip.mp4", "clip_frame_0.json"]


def test_a_video_encoder_that_cannot_open_is_the_error_reported(tmp_path, monkeypatch):
    # the ConfigError must not be replaced by a FileNotFoundError for the temporary file never made
    from segany.errors import ConfigError

    class NoEncoder:
        def __init__(self, *args):
            pass

        def isOpened(self):
            return False

        def release(self):
            pass

    monkeypatch.setattr(cv2, "VideoWriter", NoEncoder)
    with pytest.raises(ConfigError, match="could not open an mp4v encoder"):
        _frames_written(tmp_path, [f"{tmp_path}/clip.mp4:frame_0"], "no_encoder")
