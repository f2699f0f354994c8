"""colo-compare: compare the network output of two replicas packet by packet."""

__version__ = "0.1.0"
