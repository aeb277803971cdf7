"""Real-time governor: an artificially slow encoder lowers the frame rate, never the audio; recovery raises it."""

from __future__ import annotations

from edge.governor import GovernorOptions, RealtimeGovernor


def run_units(gov: RealtimeGovernor, n: int, frame_cost: float, audio_cost: float):
    frames = audio = 0
    for _ in range(n):
        f = gov.take_frame()
        frames += f
        audio += 1  # every unit's audio is always encoded
        gov.observe(audio_cost + (frame_cost if f else 0.0), f)
    return frames, audio


def test_slow_encoder_lowers_frame_rate_and_keeps_audio():
    gov = RealtimeGovernor()
    frames, audio = run_units(gov, 40, frame_cost=1.4, audio_cost=0.2)  # a frame alone blows the 1-s budget
    assert audio == 40
    assert gov.stride > 1 and gov.fps < 1.0
    assert frames < 40 / 2
    assert any("lowered" in c for c in gov.changes)


def test_fast_encoder_keeps_one_frame_per_second():
    gov = RealtimeGovernor()
    frames, _ = run_units(gov, 20, frame_cost=0.2, audio_cost=0.1)
    assert frames == 20 and gov.stride == 1 and not gov.changes


def test_recovers_when_the_machine_is_fast_again():
    gov = RealtimeGovernor()
    run_units(gov, 20, frame_cost=1.5, audio_cost=0.2)
    slow = gov.stride
    run_units(gov, 60, frame_cost=0.1, audio_cost=0.05)
    assert slow > 1 and gov.stride == 1
    assert any("raised" in c for c in gov.changes)


def test_prime_starts_at_the_rate_the_estimates_allow():
    slow = RealtimeGovernor()
    msg = slow.prime(frame_unit_seconds=3.0, audio_unit_seconds=0.5)
    # stride 4: (3.0 + 3 * 0.5) / 4 = 1.125 > 0.9; stride 8: (3.0 + 7 * 0.5) / 8 = 0.81 <= 0.9
    assert slow.stride == 8 and "starts at 0.12 fps" in msg
    frames, audio = run_units(slow, 16, frame_cost=3.0, audio_cost=0.5)
    assert frames == 2 and audio == 16  # the first unit takes a frame; no late learning
    assert RealtimeGovernor().prime(0.6, 0.1) is None  # fits the budget at 1 fps
    two = RealtimeGovernor()
    two.prime(1.2, 0.3)  # stride 2: (1.2 + 0.3) / 2 = 0.75
    assert two.stride == 2
    hopeless = RealtimeGovernor()
    hopeless.prime(8.0, 2.2)  # audio alone is over budget (2 cores, 7B prefill): the lowest frame rate
    assert hopeless.stride == hopeless.options.max_stride
    capped = RealtimeGovernor(GovernorOptions(min_stride=4))
    assert capped.prime(0.2, 0.1) is None and capped.stride == 4
