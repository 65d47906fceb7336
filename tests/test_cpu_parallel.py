import copy

import pytest
import torch

from grainlab.boundaries.cpu_parallel import SplitBatch, cpu_parts
from grainlab.boundaries.losses import make_loss
from grainlab.boundaries.train import forward_backward
from grainlab.boundaries.unet import ChannelDropout, UNetArgs, build_unet

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fp32(monkeypatch):
    monkeypatch.setenv("GRAINLAB_PRECISION", "fp32")  # exact comparisons, whatever the CPU


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 32, 32, generator=g), (torch.rand(n, 1, 32, 32, generator=g) > 0.8).float()


def unet(seed=0, **kw):
    torch.manual_seed(seed)
    return build_unet(UNetArgs(depth=3, base_channels=4, **kw)).train()


def grads(net):
    return [p.grad.clone() for p in net.parameters()]


def test_split_batch_gives_the_full_batch_loss_and_gradients_without_batchnorm():
    x, y = batch()
    loss_fn = make_loss("bce")
    full = unet(norm="none")
    net = copy.deepcopy(full)
    expected = forward_backward(full, x, y, loss_fn, CPU)
    loss = SplitBatch(net, 3).forward_backward(x, y, loss_fn, CPU)
    assert torch.allclose(loss, expected, atol=1e-6)
    for got, want in zip(grads(net), grads(full), strict=True):
        assert torch.allclose(got, want, atol=1e-6)


def test_split_batch_normalises_each_part_and_averages_the_running_statistics():
    x, y = batch()
    loss_fn = make_loss("mse")
    net = unet()
    parts = [copy.deepcopy(net) for _ in range(2)]
    for part, xs, ys in zip(parts, x.tensor_split(2), y.tensor_split(2), strict=True):
        forward_backward(part, xs, ys, loss_fn, CPU)
    split = SplitBatch(net, 2)
    split.forward_backward(x, y, loss_fn, CPU)
    bn = [dict(m.named_buffers()) for m in (net, *parts)]
    for name in ("down.0.1.running_mean", "down.0.1.running_var", "merge.0.4.running_var"):
        assert torch.allclose(bn[0][name], (bn[1][name] + bn[2][name]) / 2, atol=1e-6)
    assert not torch.equal(bn[1]["down.0.1.running_mean"], bn[2]["down.0.1.running_mean"])
    for got, a, b in zip(grads(net), grads(parts[0]), grads(parts[1]), strict=True):
        assert torch.allclose(got, (a + b) / 2, atol=1e-6)  # each part's loss weighs half
    # the replicas share the network's parameters: an optimizer step moves them all
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    for replica in split.replicas[1:]:
        for p, q in zip(net.parameters(), replica.parameters(), strict=True):
            assert p is q


def test_split_batch_dropout_is_reproducible_from_the_global_seed():
    x, y = batch()
    loss_fn = make_loss("bce")

    def run(seed):
        net = unet(dropout=0.5)
        torch.manual_seed(seed)
        SplitBatch(net, 2).forward_backward(x, y, loss_fn, CPU)
        return grads(net)

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))


def test_split_batch_handles_a_batch_smaller_than_its_parts():
    x, y = batch(n=1)
    net = unet(norm="none")
    full = copy.deepcopy(net)
    loss = SplitBatch(net, 2).forward_backward(x, y, make_loss("bce"), CPU)
    assert torch.allclose(loss, forward_backward(full, x, y, make_loss("bce"), CPU), atol=1e-6)


def test_channel_dropout_draws_whole_channels_from_its_generator():
    drop = ChannelDropout(0.5).train()
    x = torch.ones(4, 16, 8, 8)
    drop.generator = torch.Generator().manual_seed(3)
    a = drop(x)
    drop.generator.manual_seed(3)
    assert torch.equal(a, drop(x))
    per_channel = a.flatten(2)
    assert torch.equal(per_channel.amin(2), per_channel.amax(2))  # a channel is kept or dropped whole
    assert set(per_channel.unique().tolist()) == {0.0, 2.0}  # kept channels scaled by 1 / (1 - p)
    assert torch.equal(drop.eval()(x), x)


def test_cpu_parts_keep_two_images_per_part(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert cpu_parts(CPU, 8) == 2
    assert cpu_parts(CPU, 3) == 1
    assert cpu_parts(torch.device("cuda"), 8) == 1
