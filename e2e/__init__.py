"""End-to-end test harness for kubetune.

``e2e.cluster`` starts a real Kubernetes cluster built from the pinned
upstream releases (see ``e2e/cluster/build.sh``): the control plane and one
real node (kubelet, containerd, runc, CNI, kube-proxy, CoreDNS). The smoke tests in
``e2e/test_harness_smoke.py`` talk to the cluster only through a kubeconfig, so
they run unchanged against kind or any real cluster.
"""
