"""Tandem control plane: registry client, node agent, control-plane server, tandemctl."""

__version__ = "0.1.0"
