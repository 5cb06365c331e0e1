"""fill_columns_ (model/column_mask.py) against an out-of-place masked_fill: same logits, same gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ualm_nemo.model.column_mask import column_ranges, fill_columns_


def test_column_ranges_are_the_true_runs():
    mask = torch.tensor([True, True, False, False, True, False, True])
    assert column_ranges(mask) == ((0, 2), (4, 5), (6, 7))
    assert column_ranges(torch.zeros(4, dtype=torch.bool)) == ()


@pytest.mark.parametrize("loss_kind", ["cross_entropy", "sum"])  # "sum": the padded columns get a real gradient
def test_in_place_fill_equals_masked_fill(loss_kind):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 8, generator=gen, requires_grad=True)
    w = torch.randn(12, 8, generator=gen, requires_grad=True)
    mask = torch.zeros(12, dtype=torch.bool)
    mask[4:6] = mask[10:] = True
    target = torch.randint(0, 4, (18,), generator=gen)
    results = []
    for fill in (lambda y: fill_columns_(y, column_ranges(mask), -1e30), lambda y: y.masked_fill(mask, -1e30)):
        logits = fill(F.linear(x, w))
        loss = F.cross_entropy(logits.view(-1, 12), target) if loss_kind == "cross_entropy" else logits.sum()
        x.grad = w.grad = None
        loss.backward()
        results.append((logits.detach(), x.grad.clone(), w.grad.clone()))
    for mine, reference in zip(*results):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)
