"""torch's Adam without torch._dynamo: the same kernel, numbers and state_dict, a lighter process.

Why: `torch.optim.Optimizer` imports torch._dynamo (sympy, fx, inductor's config) the first time
any of its methods runs, to wrap them for `torch.compile`, which the engine never applies to
an optimizer. On torch 2.13 CPU that import costs every training process about 1 s and 120 MB
of private memory, which each concurrent trial pays again (bench/ray_overhead.py).

`Adam` below is `torch.optim.Adam` with those methods replaced by the functions torch's wrappers
wrap (`__wrapped__`, which `functools.wraps` keeps): the same bodies run, only the dynamo
import around them is skipped, so training is bit-identical and checkpoints load into either
class (tests/test_optim.py). It is for eager training only: an optimizer step under torch.compile
needs the graph breaks torch's wrappers add, so a compiled step should use torch's own class.
"""
from __future__ import annotations

import inspect

import torch


def _unwrapped(fn):
    # Down the whole `__wrapped__` chain: once any torch Adam exists, its class's step is also
    # wrapped in the profiler hook. A torch upgrade that drops a wrapper leaves the plain function.
    return inspect.unwrap(fn)


_ADAM_STEP = _unwrapped(torch.optim.Adam.step)


class Adam(torch.optim.Adam):
    """`torch.optim.Adam(params, lr=, weight_decay=, fused=)`: the engine's optimizer (see module doc)."""

    add_param_group = _unwrapped(torch.optim.Optimizer.add_param_group)
    zero_grad = _unwrapped(torch.optim.Optimizer.zero_grad)
    state_dict = _unwrapped(torch.optim.Optimizer.state_dict)
    load_state_dict = _unwrapped(torch.optim.Optimizer.load_state_dict)

    def step(self, closure=None):
        # torch's wrapper sets grad mode to the `differentiable` setting (off here) around the body
        # and adds graph breaks for dynamo; eager, grad mode is all that it does.
        with torch.set_grad_enabled(bool(self.defaults["differentiable"])):
            return _ADAM_STEP(self, closure)
