"""`zoo show` and data.show: a video as GIF / strip PNG, audio as a spectrogram PNG."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data.show import write_gif, write_spectrogram, write_strip
from data.video import VideoWorld
from zoo.cli import main


def test_gif_strip_and_spectrogram(tmp_path):
    clip = VideoWorld(image_size=32, num_frames=4).clip(0, "test")
    gif = write_gif(clip.frames, tmp_path / "a.gif", scale=2)
    with Image.open(gif) as im:
        assert im.n_frames == 4 and im.size == (64, 64)
        im.seek(3)
        # The last GIF frame is the last video frame, enlarged (GIF keeps these few colours exactly).
        assert np.array_equal(np.asarray(im.convert("RGB"))[::2, ::2], np.asarray(clip.frames[3]))
    strip = write_strip(clip.frames, tmp_path / "a.png", scale=1)
    with Image.open(strip) as im:
        assert im.size == (4 * 32 + 3 * 2, 32 + 12)
        assert np.array_equal(np.asarray(im.convert("RGB"))[:32, 34:66], np.asarray(clip.frames[1]))
    png = write_spectrogram(np.sin(np.linspace(0, 2000, 8000)).astype(np.float32), tmp_path / "s.png", title="t")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (800, 400)
    with pytest.raises(ValueError, match="frames differ in size"):
        write_gif([clip.frames[0], clip.frames[0].resize((16, 16))], tmp_path / "x.gif")


def test_zoo_show_cli(tmp_path, capsys):
    assert main(["show", "video", "--shapes-clip", "2", "--out", str(tmp_path / "v.gif")]) == 0
    assert main(["show", "audio", "--say", "How many circles?", "--out", str(tmp_path / "q.png"),
                 "--save-wav", str(tmp_path / "q.wav")]) == 0  # fmt: skip
    assert (tmp_path / "v.gif").is_file() and (tmp_path / "q.png").is_file() and (tmp_path / "q.wav").is_file()
    assert main(["show", "audio", "--wav", str(tmp_path / "q.wav"), "--out", str(tmp_path / "w.png")]) == 0
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="must end in .gif or .png"):
        main(["show", "video", "--shapes-clip", "0", "--out", str(tmp_path / "v.mp4")])
