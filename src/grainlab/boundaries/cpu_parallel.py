"""Data-parallel U-Net training on the CPU: each batch split across threads, one part per core.

The demo-size U-Net's convolutions are too small to split well across cores with intra-op
threads; whole parts of the batch side by side, each in its own thread with one intra-op
thread, train faster per image (benchmarks/RESULTS.md), as whole tiles do in inference.

Each thread runs a replica of the network that shares its parameters. The parts' gradients
are summed in a fixed order, so a run stays deterministic for a given number of parts. As in
data-parallel training on several GPUs:
- BatchNorm normalises each part with that part's own statistics; the running statistics
  are the mean over the parts;
- a loss over the whole batch (dice, tversky, cldice, weighted BCE) is computed per part,
  and the parts' losses are weighted by their share of the batch;
- each replica's dropout draws from its own generator, seeded from torch's global one.
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from grainlab.boundaries.infer import mixed_precision
from grainlab.boundaries.unet import ChannelDropout


def cpu_parts(device: torch.device, batch_size: int) -> int:
    """Parts a CPU batch is split into: one per intra-op thread, at least 2 images each."""
    if device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), batch_size // 2))


def _tied_replica(net: nn.Module) -> nn.Module:
    """A copy of net with its own buffers (BatchNorm statistics) and net's very parameters."""
    replica = copy.deepcopy(net)
    for mine, theirs in zip(replica.modules(), net.modules(), strict=True):
        for name, param in theirs._parameters.items():
            mine._parameters[name] = param
    return replica


class SplitBatch:
    """Trains `net` with each batch split into `parts`, forward and backward in threads."""

    def __init__(self, net: nn.Module, parts: int):
        self.net = net
        self.replicas = [net] + [_tied_replica(net) for _ in range(parts - 1)]
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.buffers = [dict(r.named_buffers()) for r in self.replicas]
        self.generators = [torch.Generator() for _ in self.replicas]
        for replica, generator in zip(self.replicas, self.generators, strict=True):
            for module in replica.modules():
                if isinstance(module, ChannelDropout):
                    module.generator = generator
        self.pool = ThreadPoolExecutor(parts, initializer=torch.set_num_threads, initargs=(1,))

    def train(self, mode: bool = True) -> SplitBatch:
        for replica in self.replicas:
            replica.train(mode)
        return self

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, loss_fn, device) -> torch.Tensor:
        """The batch's loss (detached); its gradients are added to the parameters' .grad."""
        n = min(len(self.replicas), len(x))
        xs, ys = x.tensor_split(n), y.tensor_split(n)
        main = self.buffers[0]
        with torch.no_grad():  # the replicas start from the network's statistics
            for buffers in self.buffers[1:n]:
                for name, buf in buffers.items():
                    buf.copy_(main[name])
        for generator in self.generators[:n]:
            generator.manual_seed(int(torch.randint(2**62, ())))

        def part(i: int):
            with mixed_precision(device):
                logits = self.replicas[i](xs[i])
            loss = loss_fn(logits.float(), ys[i]) * (len(xs[i]) / len(x))
            return loss.detach(), torch.autograd.grad(loss, self.params)

        results = list(self.pool.map(part, range(n)))
        with torch.no_grad():
            for k, param in enumerate(self.params):
                grad = results[0][1][k]
                for _, grads in results[1:]:
                    grad = grad + grads[k]
                param.grad = grad if param.grad is None else param.grad + grad
            for name, buf in main.items():
                if buf.is_floating_point():
                    buf.copy_(torch.stack([buffers[name] for buffers in self.buffers[:n]]).mean(0))
        return torch.stack([loss for loss, _ in results]).sum()
