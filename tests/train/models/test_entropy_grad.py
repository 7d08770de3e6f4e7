"""The differentiable entropy of train/models/tiled_logits.py (the RL entropy bonus): value and gradient equal autograd
through -sum p log p in float64, and it keeps no tensor beyond log_softmax's own output."""

import torch

from train.models.tiled_logits import _Entropy


def test_entropy_value_and_gradient_equal_the_naive_formula():
    torch.manual_seed(0)
    logits = (torch.randn(3, 4, 11, dtype=torch.float64) * 2).requires_grad_(True)
    weights = torch.randn(3, 4, dtype=torch.float64)
    naive = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    (grad_naive,) = torch.autograd.grad((naive * weights).sum(), logits)
    ours = _Entropy.apply(torch.log_softmax(logits, -1))
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    torch.testing.assert_close(ours, naive, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_naive, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(_Entropy.apply, (torch.log_softmax(logits.detach(), -1).requires_grad_(True),))


def test_entropy_saves_only_the_log_probs():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    log_probs = torch.log_softmax(logits, -1)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _Entropy.apply(log_probs)
    assert len(saved) == 1 and saved[0].data_ptr() == log_probs.data_ptr()


def test_entropy_graph_is_released_when_no_bonus_trains_on_it():
    """PackedLoss drops the entropy's graph without an entropy bonus: the trainer keeps a micro-batch's outputs until
    the next forward, and the graph would keep the vocab-sized log-probs alive that long."""
    from train.rl.algorithm import PackedLoss

    log_probs = torch.log_softmax(torch.randn(1, 3, 7, requires_grad=True), -1)
    entropy = _Entropy.apply(log_probs)
    calls = []

    def objective(*args, **kwargs):
        calls.append(kwargs["entropy"])
        raise StopIteration  # only the call matters

    for bonus in (False, True):
        ent = _Entropy.apply(log_probs) if bonus else entropy
        try:
            PackedLoss(objective, 1.0, entropy_bonus=bonus)(torch.zeros(1, 3), ent, _OneDoc(),
                                                            {"old_logprobs": None, "advantages": torch.zeros(1)})
        except StopIteration:
            pass
        assert (ent.grad_fn is None) == (not bonus)


class _OneDoc:
    """A packed row of one document whose 3 predicted positions are all loss tokens."""

    def __init__(self):
        self.labels = torch.tensor([[0, 1, 2, 3]])
        self.doc_ids = torch.zeros(1, 4, dtype=torch.long)
        self.sample_ids = ["0"]
