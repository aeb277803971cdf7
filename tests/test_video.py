"""Video frame sampling on a synthetic video (written with cv2.VideoWriter), and unreadable-video errors."""

from __future__ import annotations

import numpy as np
import pytest

from edge.errors import InvalidInputError
from edge.io.video import VideoOptions, load_video, preprocess_frames, sample_frame_indices, uniform_sample

cv2 = pytest.importorskip("cv2")

FPS = 10.0
N_FRAMES = 30
GREY_STEP = 8  # frame i is a uniform grey of level i * GREY_STEP, so the decoded frame tells its index


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "synthetic.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (64, 48))
    assert writer.isOpened(), "OpenCV cannot write MJPG/AVI here"
    for i in range(N_FRAMES):
        writer.write(np.full((48, 64, 3), i * GREY_STEP, np.uint8))
    writer.release()
    return path


def _decoded_index(frame) -> int:
    return int(round(np.asarray(frame, dtype=np.float64).mean() / GREY_STEP))


@pytest.mark.parametrize("fps,max_frames,expected", [
    (1.0, 64, [0, 10, 20]),  # official default: one frame per second
    (2.0, 64, [0, 5, 10, 15, 20, 25]),
    (10.0, 4, [3, 11, 18, 26]),  # 30 candidates capped to 4 bin centres: int(i * 7.5 + 3.75)
    (3.0, 64, list(range(0, 30, 3))),  # step round(10 / 3) = 3
    (100.0, 64, list(range(30))),  # faster than the video: every frame
])
def test_sampling_indices_and_timestamps(video_path, fps, max_frames, expected):
    v = load_video(video_path, VideoOptions(fps=fps, max_frames=max_frames))
    assert v.frame_indices == expected
    assert v.timestamps == pytest.approx([i / FPS for i in expected])
    assert v.source_fps == pytest.approx(FPS) and v.n_source_frames == N_FRAMES
    assert v.duration == pytest.approx(N_FRAMES / FPS)
    assert [_decoded_index(f) for f in v.frames] == expected  # the pixels are really those frames
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in v.frames)


def test_bytes_input(video_path):
    v = load_video(video_path.read_bytes())
    assert v.frame_indices == [0, 10, 20]


def test_long_video_is_evenly_spread():
    # 2 h at 30 fps, 1 fps sampling = 7200 candidates -> 64 frames, one per 112.5-s bin centre
    idx = sample_frame_indices(216_000, 30.0, VideoOptions())
    assert len(idx) == 64
    assert idx == uniform_sample(list(range(0, 216_000, 30)), 64)
    assert idx[0] == 56 * 30 and np.all(np.diff(idx) >= 111 * 30)


def test_frames_preprocess_unsliced(video_path):
    v = load_video(video_path)
    pre = preprocess_frames(v)
    assert [p.n_slices for p in pre] == [1, 1, 1]
    assert all(p.placeholder == "<image>" + "<unk>" * 64 + "</image>" for p in pre)  # no image id, no slices


def test_unreadable_video(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"definitely not a video" * 100)
    with pytest.raises(InvalidInputError, match="cannot be opened as a video|no decodable frames"):
        load_video(bad)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(InvalidInputError, match="empty"):
        load_video(empty)
    with pytest.raises(InvalidInputError, match="not found"):
        load_video(tmp_path / "missing.mp4")
    with pytest.raises(InvalidInputError, match="fps"):
        VideoOptions(fps=0)
