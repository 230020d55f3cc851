"""Cluster: dev/test service launchers (`rtml services`), KubeRay manifests, failover."""
