"""The process kubelet: runs pods bound to its node as local processes.

See ``e2e/README.md`` for what it implements and its limits. ``python -m
e2e.kubelet --help`` lists its flags; ``e2e.cluster`` starts one per node.
"""
