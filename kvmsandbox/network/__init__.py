"""Pod networking: network namespaces, CNI plugins, and the link from a pod's namespace to its VM."""
