"""Speaker sink: gap-free playback order, jitter buffer, interruption; WAV writing."""

from __future__ import annotations

import numpy as np
import soundfile as sf

from edge.io.speaker import SpeakerOptions, SpeakerSink, WavSink, write_wav


class FakeStream:
    """Stands in for sounddevice.OutputStream: the test drives the callback."""

    def __init__(self, callback, **kw):
        self.callback = callback
        self.kw = kw

    def start(self):
        pass

    def stop(self):
        pass

    def close(self):
        pass

    def pull(self, frames):
        out = np.zeros((frames, 1), np.float32)
        self.callback(out, frames, None, None)
        return out[:, 0]


def _sink(prebuffer=0.01, rate=1000):
    holder = {}

    def factory(**kw):
        holder["s"] = FakeStream(**kw)
        return holder["s"]

    sink = SpeakerSink(SpeakerOptions(sample_rate=rate, prebuffer_seconds=prebuffer, block_frames=4),
                       stream_factory=factory)
    return sink, holder["s"]


def test_plays_chunks_in_order_without_gaps():
    sink, stream = _sink(prebuffer=0.01)  # 10 frames at 1 kHz
    a, b = np.arange(1, 7, dtype=np.float32), np.arange(7, 13, dtype=np.float32)
    sink.push(a)
    assert not stream.pull(4).any()  # 6 < 10 frames queued: still buffering
    sink.push(b)
    got = np.concatenate([stream.pull(4) for _ in range(3)])
    np.testing.assert_array_equal(got, np.arange(1, 13, dtype=np.float32))
    assert sink.underruns == 0


def test_underrun_is_counted_and_flush_is_not():
    sink, stream = _sink(prebuffer=0.004)
    sink.push(np.ones(5, np.float32))
    stream.pull(4)
    stream.pull(4)  # ran dry mid-reply
    assert sink.underruns == 1
    sink.push(np.ones(2, np.float32))
    sink.flush()
    stream.pull(4)
    assert sink.underruns == 1


def test_interrupt_drops_queued_audio_at_once():
    sink, stream = _sink(prebuffer=0.001)
    sink.push(np.ones(100, np.float32))
    stream.pull(4)
    sink.interrupt()
    assert sink.pending_seconds == 0
    assert not stream.pull(4).any()


def test_wav_sink_and_write_wav(tmp_path):
    wave = (0.5 * np.sin(np.linspace(0, 100, 2400))).astype(np.float32)
    sink = WavSink(tmp_path / "a.wav", sample_rate=24000)
    sink.push(wave[:1000])
    sink.push(wave[1000:])
    sink.close()
    back, sr = sf.read(tmp_path / "a.wav", dtype="float32")
    assert sr == 24000 and np.abs(back - wave).max() <= 1 / 32767 + 1e-6
    write_wav(tmp_path / "b.wav", wave, 24000)
    assert sf.info(str(tmp_path / "b.wav")).frames == len(wave)
