"""A trivial Flower app: the floor fedmerge's simulation overhead is measured against.

With ``TRIVIAL_ECHO_TORCH=1`` in the environment of the Flower processes, its ServerApp and
ClientApp modules import torch as they load, like any PyTorch Flower app (``flwr new``'s
template): the floor for an app that needs torch on both sides.
"""

TORCH_SWITCH = "TRIVIAL_ECHO_TORCH"
