"""The debug console: an authenticated SSH shell in a pod's guest."""
