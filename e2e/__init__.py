"""End-to-end test harness for kubetune.

``e2e.cluster`` starts a real Kubernetes control plane built from the pinned
upstream releases (see ``e2e/cluster/build.sh``); ``e2e.kubelet`` is a small
process kubelet that runs pods as local processes. The smoke tests in
``e2e/test_harness_smoke.py`` talk to the cluster only through a kubeconfig, so
they run unchanged against kind or any real cluster.
"""
