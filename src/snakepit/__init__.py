"""Snakepit for Kubernetes."""
