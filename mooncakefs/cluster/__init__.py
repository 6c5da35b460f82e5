"""Cluster mode: nodes on many hosts form one store through etcd (membership so far)."""
