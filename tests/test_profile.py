"""MACs against a hand count, parameter counts, and latency measurement hygiene."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bpl


def _small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )


def test_macs_match_a_hand_count():
    net = _small_net()
    # conv: every output element (8 channels x 16 x 16) takes 3 x 3 x 3 multiply-adds
    conv = 8 * 16 * 16 * (3 * 3 * 3)
    # linear: 512 inputs x 10 outputs; BN, ReLU, pooling and bias adds are not MACs
    linear = 512 * 10
    assert bpl.count_macs(net, torch.randn(1, 3, 16, 16)) == conv + linear
    assert bpl.count_macs(net, (torch.randn(4, 3, 16, 16),)) == 4 * (conv + linear)


def test_params_hand_count_and_shared_parameters():
    net = _small_net()
    assert bpl.count_params(net) == 8 * 3 * 3 * 3 + 2 * 8 + 512 * 10 + 10
    shared = nn.Linear(4, 4)
    assert bpl.count_params(nn.Sequential(shared, shared)) == 20


def test_count_macs_leaves_the_model_alone():
    net = _small_net().train()
    bn = net[1]
    before = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    bpl.count_macs(net, torch.randn(2, 3, 16, 16))
    assert net.training and bn.training
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.num_batches_tracked, before[1])


def test_profile_reports_positive_numbers_and_restores_state():
    net = _small_net().train()
    threads = torch.get_num_threads()
    report = bpl.profile(net, torch.randn(1, 3, 16, 16), batch_size=3, threads=1,
                         warmup=1, repeats=3)
    assert report["macs"] == 8 * 16 * 16 * 27 + 5120
    assert report["params"] == bpl.count_params(net)
    assert report["latency_ms"] > 0
    assert report["batch_size"] == 3 and report["threads"] == 1
    assert torch.get_num_threads() == threads
    assert net.training
    no_time = bpl.profile(net, torch.randn(1, 3, 16, 16), latency=False)
    assert "latency_ms" not in no_time and no_time["macs"] > 0


def test_compare_latency_times_every_model():
    big = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1))
    small = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    result = bpl.compare_latency({"big": big, "small": small}, x, batch_size=4, warmup=1, repeats=5)
    assert set(result) == {"big", "small"}
    assert all(v > 0 for v in result.values())


class _Clocked(nn.Module):
    """Takes the given times (s) on a fake clock: the warm-up passes first, then the timed."""

    def __init__(self, clock: list[float], name: str, calls: list[str], times: list[float]):
        super().__init__()
        self.clock, self.name, self.calls, self.times = clock, name, calls, list(times)

    def forward(self, x):
        self.calls.append(self.name)
        self.clock[0] += self.times.pop(0)
        return x


def test_compare_latency_is_the_median_of_interleaved_timed_passes(monkeypatch):
    import types

    import bpl.profiling

    clock, calls = [0.0], []
    monkeypatch.setattr(bpl.profiling, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    # two warm-up passes of 1 s that must not count, then five timed passes each, with outliers
    big = _Clocked(clock, "big", calls, [1, 1, 0.009, 0.005, 0.007, 1.0, 0.008])
    small = _Clocked(clock, "small", calls, [1, 1, 0.001, 0.002, 0.1, 0.003, 0.002])
    result = bpl.compare_latency({"big": big, "small": small}, torch.zeros(1, 1), warmup=2,
                                 repeats=5)
    assert result == {"big": pytest.approx(8.0), "small": pytest.approx(2.0)}
    assert calls == ["big", "small"] * 7  # interleaved, warm-up included
    assert not big.times and not small.times


def test_compare_latency_times_fast_models_in_warm_samples_of_several_passes(monkeypatch):
    import types

    import bpl.profiling

    clock, calls = [0.0], []
    monkeypatch.setattr(bpl.profiling, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    # the last warm-up pass says how many passes fill 10 ms: 2 ms -> 5, 30 ms -> 1; each
    # sample of tiny is 5 untimed passes (slow, cold: 9 ms, not counted) then 5 timed ones
    cold = [0.009] * 5
    tiny = _Clocked(clock, "tiny", calls, [0.5, 0.002] + cold + [0.001] * 5 + cold + [0.003] * 5
                    + cold + [0.002] * 5)
    slow = _Clocked(clock, "slow", calls, [0.5, 0.030, 0.020, 0.040, 0.030])
    result = bpl.compare_latency({"tiny": tiny, "slow": slow}, torch.zeros(1, 1), warmup=2,
                                 repeats=3, min_sample_ms=10)
    # a sample of tiny is the mean of its 5 timed passes; the median of 1, 3 and 2 ms is 2 ms
    assert result == {"tiny": pytest.approx(2.0), "slow": pytest.approx(30.0)}
    assert calls[4:] == (["tiny"] * 10 + ["slow"]) * 3  # slow (>= 10 ms a pass): no extra pass
    assert not tiny.times and not slow.times
    with pytest.raises(bpl.errors.InvalidArgumentError, match="min_sample_ms"):
        bpl.compare_latency({"tiny": tiny}, torch.zeros(1, 1), min_sample_ms=-1)


def test_speed_note_says_why_and_suggests_a_fix():
    from bpl.profiling import conv_widths, speed_note

    good = {"a": 64, "b": 48, "stem": 12, "narrow": 5}  # under 16: not counted
    fine = {"torch": {1: 0.8, 16: 0.9}, "onnxruntime": {1: 0.85, 16: 0.95}}
    assert speed_note(good, fine) is None and speed_note(good) is None
    odd = speed_note({**good, "layer1.0.conv1": 45, "c": 91}, fine)
    assert odd.startswith("note: 2 of 6 conv widths are not multiples of 8")
    assert "layer1.0.conv1: 45" in odd and "--round-to 8" in odd and "\n" not in odd
    slow = speed_note(good, {"torch": {1: 0.48, 16: 0.62}, "onnxruntime": {16: 0.40}})
    assert "onnxruntime at batch 16 reaches 0.40" in slow and "torch at batch 1 reaches 0.48" in slow
    assert "batch 16 reaches 0.62" not in slow and "--round-to" not in slow
    assert "per-layer fixed costs" in slow
    both = speed_note({"x": 20}, {"onnxruntime": {16: 0.4}})
    assert "1 of 1 conv widths" in both and "0.40" in both and "--round-to 8" in both
    # on real pruned models: unrounded widths get the note, the default's do not
    torch.manual_seed(0)
    model = bpl.build_model("resnet18", 10)
    x = torch.randn(1, 3, 32, 32)
    assert speed_note(conv_widths(bpl.prune(model, x, channel_ratio=0.3, round_to=1)))
    assert speed_note(conv_widths(bpl.prune(model, x, channel_ratio=0.3))) is None
