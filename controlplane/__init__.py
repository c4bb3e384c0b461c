"""Tandem control plane: node agent, control-plane server (election, health prober,
Admin API), tandemctl and the local factory (`tandemctl up`)."""
