"""benchmarks/soup.py's weight average (issue 13's cifar10-1 soup) against a numpy mean."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _soup():
    path = os.path.join(HERE, "..", "benchmarks", "soup.py")
    spec = importlib.util.spec_from_file_location("dhf_bench_soup", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_average_states_is_the_mean_of_float_tensors_and_keeps_counters_of_the_first():
    rng = np.random.default_rng(0)
    states = [{"w": torch.tensor(rng.standard_normal((3, 4)), dtype=torch.float32),
               "h": torch.tensor(rng.standard_normal(5), dtype=torch.float16),
               "n": torch.tensor(i + 7, dtype=torch.int64)} for i in range(3)]
    avg = _soup().average_states(states)
    ref_w = np.mean([s["w"].numpy().astype(np.float64) for s in states], axis=0)
    ref_h = np.mean([s["h"].numpy().astype(np.float64) for s in states], axis=0)
    assert avg["w"].dtype == torch.float32 and avg["h"].dtype == torch.float16
    np.testing.assert_allclose(avg["w"].numpy(), ref_w, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(avg["h"].numpy().astype(np.float64), ref_h, rtol=1e-3, atol=1e-3)
    assert int(avg["n"]) == 7  # batch-norm counters: the first state's


def test_soup_of_a_model_with_itself_is_the_model():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    net.eval()
    sd = net.state_dict()
    avg = _soup().average_states([sd, sd])
    for k, v in sd.items():
        assert torch.equal(avg[k], v), k
