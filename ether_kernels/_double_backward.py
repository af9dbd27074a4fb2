"""Second derivatives of the fused ops (autograd's create_graph=True).

The C++, CUDA and Triton backward ops have no derivative of their own: called with
create_graph=True they would hand back a gradient without a graph, and a second derivative
(a gradient penalty, MAML's inner step, a Hessian-vector product) would silently miss every
term through it. So each op's backward checks torch.is_grad_enabled() (true inside a
backward only under create_graph=True) and then takes this path: the pure-PyTorch reference
recomputes the forward under autograd and is differentiated once here, keeping its graph for
the next derivative. Correct, at the reference's speed, and only on this path.
"""

import torch


def wants_graph():
    """Whether the running backward must return differentiable gradients."""
    return torch.is_grad_enabled()


def reference_gradients(values_of, inputs, grad_outputs):
    """The gradient of sum(grad_outputs * values_of()) in `inputs`, as a differentiable
    function of them (zeros for an input the values do not depend on; None for an input
    that does not require grad)."""
    with torch.enable_grad():
        values = values_of()
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(values, wanted, grad_outputs, create_graph=True,
                                         allow_unused=True, materialize_grads=True)
                     if wanted else ())
        return tuple(next(grads) if t.requires_grad else None for t in inputs)


def distinct_nodes(*tensors):
    """Views of `tensors` that are distinct graph nodes: when one tensor fills two input slots
    (the soft-DTW divergence's sdtw(x, x)), each slot then gets its own partial derivative,
    not the sum of both."""
    with torch.enable_grad():
        return tuple(t.view_as(t) for t in tensors)
