import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from train import (Config, aggregate, batch_slots, clipped_surrogate, entropy_from_logits, entropy_shaped_advantage,
                   group_advantages, kl_k3)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- pure math against hand-computed values ----------------------------------------------------------------------

def test_group_advantages_eq1():
    r = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    a = group_advantages(r, eps=0.0)
    std = math.sqrt(1 / 3)                       # unbiased std of [1, 0, 1, 0]
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, 0.5, -0.5]) / std)
    assert torch.equal(group_advantages(r)[1], torch.zeros(4))    # zero-variance group: no signal
    # groups are independent: shifting one group's rewards leaves the other's advantages unchanged
    r2 = r.clone(); r2[1] += torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert torch.equal(group_advantages(r2)[0], group_advantages(r)[0])


def test_clipped_surrogate():
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    s, clipped = clipped_surrogate(logp, old, adv, 0.2, 0.28)
    assert torch.allclose(s, torch.tensor([[1.28, -1.5, -0.8, 0.5]]))
    assert clipped.tolist() == [[True, False, True, False]]
    s, clipped = clipped_surrogate(old, old, adv, 0.2, 0.28)      # ratio 1: plain policy gradient, nothing clipped
    assert torch.equal(s, adv) and not clipped.any()


def test_kl_k3():
    logp, ref = torch.log(torch.tensor([0.5, 0.3])), torch.log(torch.tensor([0.25, 0.3]))
    k = kl_k3(logp, ref)
    assert k[0].item() == pytest.approx(0.5 - math.log(0.5) - 1) and k[1].item() == 0.0


def test_aggregations():
    per_tok = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate(per_tok, mask, "grpo", 2).item() == pytest.approx((1.5 + 3) / 2)
    assert aggregate(per_tok, mask, "dapo", 3).item() == pytest.approx(6 / 3)
    assert aggregate(per_tok, mask, "dr_grpo", 2 * 3).item() == pytest.approx(1.0)
    # micro-batches with the full-batch normaliser add up to the full-batch loss
    for lt, norm in (("grpo", 2), ("dapo", 3), ("dr_grpo", 6)):
        full = aggregate(per_tok, mask, lt, norm)
        parts = aggregate(per_tok[:1], mask[:1], lt, norm) + aggregate(per_tok[1:], mask[1:], lt, norm)
        assert parts.item() == pytest.approx(full.item())


def test_entropy_and_entropy_advantage():
    assert entropy_from_logits(torch.zeros(4)).item() == pytest.approx(math.log(4))
    assert entropy_from_logits(torch.tensor([100.0, 0.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)
    a = entropy_shaped_advantage(torch.tensor([1.0, -1.0, 1.0]), torch.tensor([2.0, 2.0, 20.0]), 0.1, 2.0)
    assert torch.allclose(a, torch.tensor([1.2, -0.8, 1.5]))


def test_batch_slots_is_a_function_of_the_step():
    n, b = 10, 4
    seen = [batch_slots(s, b, n, seed=3) for s in range(5)]
    assert seen == [batch_slots(s, b, n, seed=3) for s in range(5)]
    first_epoch = seen[0] + seen[1] + seen[2][:2]
    assert sorted(first_epoch) == list(range(n))               # every sample once per epoch
    assert seen != [batch_slots(s, b, n, seed=4) for s in range(5)]


def test_cli_exposes_every_config_field():
    from train import parse_args
    cfg = parse_args(["--algo", "syn-grpo", "--batch-size", "3", "--lr", "0.5", "--freeze-vision", "--mu", "2"])
    assert (cfg.algo, cfg.batch_size, cfg.lr, cfg.freeze_vision, cfg.mu) == ("syn-grpo", 3, 0.5, True, 2)
    assert parse_args([]).batch_size is None        # device-dependent defaults are resolved later
